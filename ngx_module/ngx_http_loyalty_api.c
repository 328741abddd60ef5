
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include "ngx_http_loyalty_module.h"
#include "ngx_http_loyalty_rules.h"


/*
 * loyalty_api: the shop's own calls, in a location that nginx's access
 * control guards ("allow"/"deny", "auth_basic").  The last part of the
 * URI names the call:
 *
 *     GET  .../ledger?customer=ID[&count=N]    the last N ledger entries
 *     POST .../refund   customer, order, refunded (the total so far, or
 *                       "all") [, reason]
 *     POST .../adjust   customer, points (signed), id, reason
 *
 * Arguments come from the query string or an
 * application/x-www-form-urlencoded body, the body first.  Every answer
 * is JSON with a "status" word.  The customer id is taken as given (the
 * caller is trusted), checked as a cookie's would be.  A refund or an
 * adjustment is one call of the API script, idempotent, so a caller that
 * got no answer sends it again.  Redis is waited for within
 * loyalty_redis_timeout: "unavailable" and 503 when it does not answer.
 */


#define NGX_HTTP_LOYALTY_API_COUNT     20       /* ledger entries by default */
#define NGX_HTTP_LOYALTY_API_COUNT_MAX 1000     /* and at most */


#define NGX_HTTP_LOYALTY_API_NONE      NGX_HTTP_LOYALTY_API_OPS


typedef struct {
    ngx_http_request_t           *request;
    ngx_http_loyalty_cmd_t       *cmd;
    ngx_uint_t                    op;
    ngx_str_t                     customer;
    ngx_str_t                     id;           /* order or adjustment */
    ngx_str_t                     argv[14];     /* refund, adjust */
    unsigned                      cleanup:1;
    unsigned                      eval:1;
} ngx_http_loyalty_api_ctx_t;


static ngx_int_t ngx_http_loyalty_api_handler(ngx_http_request_t *r);
static ngx_uint_t ngx_http_loyalty_api_op(ngx_http_request_t *r);
static ngx_int_t ngx_http_loyalty_api_ledger(ngx_http_request_t *r);
static void ngx_http_loyalty_api_ledger_handler(void *data, ngx_int_t rc,
    ngx_http_loyalty_reply_t *reply);
static ngx_int_t ngx_http_loyalty_api_entries(ngx_http_request_t *r,
    ngx_http_loyalty_api_ctx_t *ctx, ngx_http_loyalty_reply_t *reply);
static ngx_uint_t ngx_http_loyalty_api_number(ngx_str_t *name,
    ngx_str_t *value);
static void ngx_http_loyalty_api_body(ngx_http_request_t *r);
static char *ngx_http_loyalty_api_form(ngx_http_request_t *r,
    ngx_str_t *body);
static ngx_int_t ngx_http_loyalty_api_write(ngx_http_request_t *r,
    ngx_uint_t op, ngx_str_t *body);
static ngx_int_t ngx_http_loyalty_api_ask(ngx_http_request_t *r,
    ngx_http_loyalty_api_ctx_t *ctx, ngx_str_t *key, ngx_uint_t argc,
    ngx_str_t *argv, ngx_http_loyalty_reply_pt handler);
static void ngx_http_loyalty_api_written(void *data, ngx_int_t rc,
    ngx_http_loyalty_reply_t *reply);
static ngx_int_t ngx_http_loyalty_api_result(ngx_http_request_t *r,
    ngx_http_loyalty_api_ctx_t *ctx, ngx_http_loyalty_reply_t *reply);
static ngx_int_t ngx_http_loyalty_api_arg(ngx_http_request_t *r,
    ngx_str_t *body, char *name, ngx_str_t *value);
static ngx_int_t ngx_http_loyalty_api_customer(ngx_http_request_t *r,
    ngx_str_t *body, ngx_str_t *customer);
static ngx_int_t ngx_http_loyalty_api_not_allowed(ngx_http_request_t *r,
    ngx_uint_t op, char *allow);
static ngx_int_t ngx_http_loyalty_api_invalid(ngx_http_request_t *r,
    ngx_uint_t op, char *error);
static ngx_int_t ngx_http_loyalty_api_status(ngx_http_request_t *r,
    ngx_uint_t op, ngx_uint_t http, ngx_uint_t status, char *error);
static ngx_int_t ngx_http_loyalty_api_send(ngx_http_request_t *r,
    ngx_uint_t status, ngx_str_t *json);
static void ngx_http_loyalty_api_cleanup(void *data);


static ngx_str_t  ngx_http_loyalty_api_type = ngx_string("application/json");


/* the calls, by op */
static ngx_str_t  ngx_http_loyalty_api_calls[] = {
    ngx_string("ledger"),
    ngx_string("refund"),
    ngx_string("adjust")
};


/* the status words, by NGX_HTTP_LOYALTY_API_*, and their HTTP codes */
ngx_http_loyalty_api_status_t  ngx_http_loyalty_api_statuses[] = {
    { ngx_string("ok"), NGX_HTTP_OK },
    { ngx_string("applied"), NGX_HTTP_OK },
    { ngx_string("unchanged"), NGX_HTTP_OK },
    { ngx_string("unknown_order"), NGX_HTTP_NOT_FOUND },
    { ngx_string("invalid"), NGX_HTTP_BAD_REQUEST },
    { ngx_string("insufficient"), NGX_HTTP_CONFLICT },
    { ngx_string("unavailable"), NGX_HTTP_SERVICE_UNAVAILABLE }
};


/* the ledger fields that are counts: numbers in JSON, not strings */
static ngx_str_t  ngx_http_loyalty_api_counts[] = {
    ngx_string("earned"),
    ngx_string("redeemed"),
    ngx_string("points"),
    ngx_string("pending"),
    ngx_string("reversed"),
    ngx_string("restored"),
    ngx_string("forgiven"),
    ngx_string("ts"),
    ngx_null_string
};


char *
ngx_http_loyalty_api(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_loyalty_loc_conf_t *llcf = conf;

    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

    if (clcf->handler) {
        return "is duplicate";
    }

    clcf->handler = ngx_http_loyalty_api_handler;
    llcf->handler = ngx_http_loyalty_api_handler;

    /*
     * the merge gives the location a Redis; and the calls are not
     * checkouts, so an inherited "loyalty on" reads no customer here
     */
    llcf->balance = 1;
    llcf->noread = 1;

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_loyalty_api_handler(ngx_http_request_t *r)
{
    ngx_int_t   rc;
    ngx_uint_t  op;

    op = ngx_http_loyalty_api_op(r);

    switch (op) {

    case NGX_HTTP_LOYALTY_API_LEDGER:

        if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
            return ngx_http_loyalty_api_not_allowed(r, op, "GET, HEAD");
        }

        rc = ngx_http_discard_request_body(r);

        if (rc != NGX_OK) {
            return rc;
        }

        return ngx_http_loyalty_api_ledger(r);

    case NGX_HTTP_LOYALTY_API_REFUND:
    case NGX_HTTP_LOYALTY_API_ADJUST:

        if (!(r->method & NGX_HTTP_POST)) {
            return ngx_http_loyalty_api_not_allowed(r, op, "POST");
        }

        rc = ngx_http_read_client_request_body(r, ngx_http_loyalty_api_body);

        if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
            return rc;
        }

        return NGX_DONE;

    default:

        rc = ngx_http_discard_request_body(r);

        if (rc != NGX_OK) {
            return rc;
        }

        return ngx_http_loyalty_api_status(r, NGX_HTTP_LOYALTY_API_NONE,
                                           NGX_HTTP_NOT_FOUND,
                                           NGX_HTTP_LOYALTY_API_INVALID,
                                           "no such call");
    }
}


/* the call that the last part of the URI names */

static ngx_uint_t
ngx_http_loyalty_api_op(ngx_http_request_t *r)
{
    u_char      *p, *last;
    ngx_str_t    call;
    ngx_uint_t   op;

    last = r->uri.data + r->uri.len;

    for (p = last; p > r->uri.data && p[-1] != '/'; p--) {
        /* void */
    }

    call.data = p;
    call.len = last - p;

    for (op = 0; op < NGX_HTTP_LOYALTY_API_OPS; op++) {
        if (ngx_http_loyalty_same_str(&call, &ngx_http_loyalty_api_calls[op]))
        {
            return op;
        }
    }

    return NGX_HTTP_LOYALTY_API_NONE;
}


/* GET .../ledger?customer=ID[&count=N]: XREVRANGE, newest first */

static ngx_int_t
ngx_http_loyalty_api_ledger(ngx_http_request_t *r)
{
    u_char                       *p;
    ngx_int_t                     n, rc;
    ngx_str_t                     customer, count, argv[6];
    ngx_http_loyalty_api_ctx_t   *ctx;
    ngx_http_loyalty_loc_conf_t  *llcf;
    u_char                        key[NGX_HTTP_LOYALTY_KEY_LEN
                                      + sizeof(":ledger")];
    u_char                        num[NGX_INT_T_LEN];

    llcf = ngx_http_get_module_loc_conf(r, ngx_http_loyalty_module);

    rc = ngx_http_loyalty_api_customer(r, NULL, &customer);

    if (rc != NGX_OK) {
        return (rc == NGX_DECLINED)
               ? ngx_http_loyalty_api_invalid(r, NGX_HTTP_LOYALTY_API_LEDGER,
                                              "customer is not a customer "
                                              "id")
               : rc;
    }

    n = NGX_HTTP_LOYALTY_API_COUNT;

    rc = ngx_http_loyalty_api_arg(r, NULL, "count", &count);

    if (rc == NGX_HTTP_INTERNAL_SERVER_ERROR) {
        return rc;
    }

    if (rc == NGX_OK) {
        n = ngx_atoi(count.data, count.len);
    }

    if (rc == NGX_ERROR || n == NGX_ERROR || n == 0) {
        return ngx_http_loyalty_api_invalid(r, NGX_HTTP_LOYALTY_API_LEDGER,
                                            "count is not a positive "
                                            "integer");
    }

    /* no more than the ledger keeps, and a reply of bounded size */

    n = ngx_min(n, llcf->ledger);
    n = ngx_min(n, NGX_HTTP_LOYALTY_API_COUNT_MAX);

    ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_loyalty_api_ctx_t));
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->request = r;
    ctx->op = NGX_HTTP_LOYALTY_API_LEDGER;
    ctx->customer = customer;

    if (n == 0) {
        /* "loyalty_ledger off" */
        return ngx_http_loyalty_api_entries(r, ctx, NULL);
    }

    p = ngx_http_loyalty_hash_key(key, &llcf->prefix, customer.data,
                                  customer.len);
    p = ngx_cpymem(p, ":ledger", sizeof(":ledger") - 1);

    ngx_str_set(&argv[0], "XREVRANGE");
    argv[1].data = key;
    argv[1].len = p - key;
    ngx_str_set(&argv[2], "+");
    ngx_str_set(&argv[3], "-");
    ngx_str_set(&argv[4], "COUNT");
    argv[5].data = num;
    argv[5].len = ngx_sprintf(num, "%i", n) - num;

    rc = ngx_http_loyalty_api_ask(r, ctx, &argv[1], 6, argv,
                                  ngx_http_loyalty_api_ledger_handler);

    if (rc == NGX_DONE) {
        r->main->count++;
    }

    return rc;
}


static void
ngx_http_loyalty_api_ledger_handler(void *data, ngx_int_t rc,
    ngx_http_loyalty_reply_t *reply)
{
    ngx_connection_t            *c;
    ngx_http_request_t          *r;
    ngx_http_loyalty_api_ctx_t  *ctx;

    ctx = data;
    ctx->cmd = NULL;

    if (rc == NGX_ABORT) {
        /* the worker exits: the request is gone */
        return;
    }

    r = ctx->request;
    c = r->connection;

    ngx_http_set_log_request(c->log, r);

    if (reply == NULL
        || (reply->type != NGX_HTTP_LOYALTY_REPLY_ARRAY
            && reply->type != NGX_HTTP_LOYALTY_REPLY_NIL))
    {
        if (reply && reply->type == NGX_HTTP_LOYALTY_REPLY_ERROR) {
            ngx_log_error(NGX_LOG_WARN, c->log, 0,
                          "loyalty: ledger of customer \"%V\" not read: "
                          "\"%V\"", &ctx->customer, &reply->str);
        }

        rc = ngx_http_loyalty_api_status(r, ctx->op,
                                         NGX_HTTP_SERVICE_UNAVAILABLE,
                                         NGX_HTTP_LOYALTY_API_UNAVAILABLE,
                                         NULL);
        ngx_http_finalize_request(r, rc);

    } else {
        ngx_http_finalize_request(r, ngx_http_loyalty_api_entries(r, ctx,
                                                                  reply));
    }

    ngx_http_run_posted_requests(c);
}


/*
 * {"status":"ok","customer":ID,"entries":[{"id":...,FIELD:VALUE...},...]}
 * from the entries of XREVRANGE, each [id, [field, value, ...]]; an entry
 * of another shape is left out.
 */

static ngx_int_t
ngx_http_loyalty_api_entries(ngx_http_request_t *r,
    ngx_http_loyalty_api_ctx_t *ctx, ngx_http_loyalty_reply_t *reply)
{
    size_t                     size;
    u_char                    *p;
    ngx_str_t                  json, name, *value;
    ngx_uint_t                 i, j, first;
    ngx_http_loyalty_reply_t  *e, *f;

    size = sizeof("{\"status\":\"ok\",\"customer\":,\"entries\":[]}\n")
           + ctx->customer.len * NGX_HTTP_LOYALTY_JSON_ESCAPE + 2;

    if (reply && reply->type == NGX_HTTP_LOYALTY_REPLY_ARRAY) {
        for (i = 0; i < reply->nelts; i++) {
            e = reply->element[i];

            if (e->type != NGX_HTTP_LOYALTY_REPLY_ARRAY || e->nelts != 2
                || e->element[0]->type != NGX_HTTP_LOYALTY_REPLY_STRING
                || e->element[1]->type != NGX_HTTP_LOYALTY_REPLY_ARRAY)
            {
                continue;
            }

            size += sizeof("{\"id\":\"\"},")
                    + e->element[0]->str.len * NGX_HTTP_LOYALTY_JSON_ESCAPE;

            f = e->element[1];

            for (j = 0; j < f->nelts; j++) {
                size += f->element[j]->str.len * NGX_HTTP_LOYALTY_JSON_ESCAPE
                        + sizeof(",\"\":\"\"");
            }
        }
    }

    p = ngx_pnalloc(r->pool, size);
    if (p == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    json.data = p;

    p = ngx_cpymem(p, "{\"status\":\"ok\",\"customer\":",
                   sizeof("{\"status\":\"ok\",\"customer\":") - 1);
    p = ngx_http_loyalty_json_string(p, ctx->customer.data,
                                     ctx->customer.len);
    p = ngx_cpymem(p, ",\"entries\":[", sizeof(",\"entries\":[") - 1);

    first = 1;

    for (i = 0; reply && reply->type == NGX_HTTP_LOYALTY_REPLY_ARRAY
                && i < reply->nelts; i++)
    {
        e = reply->element[i];

        if (e->type != NGX_HTTP_LOYALTY_REPLY_ARRAY || e->nelts != 2
            || e->element[0]->type != NGX_HTTP_LOYALTY_REPLY_STRING
            || e->element[1]->type != NGX_HTTP_LOYALTY_REPLY_ARRAY)
        {
            continue;
        }

        if (!first) {
            *p++ = ',';
        }

        first = 0;

        ngx_str_set(&name, "id");
        *p++ = '{';
        p = ngx_http_loyalty_json_field(p, &name, &e->element[0]->str, 1);

        f = e->element[1];

        for (j = 0; j + 1 < f->nelts; j += 2) {
            name = f->element[j]->str;
            value = &f->element[j + 1]->str;

            /* "id" is the entry's */

            if (f->element[j]->type != NGX_HTTP_LOYALTY_REPLY_STRING
                || f->element[j + 1]->type != NGX_HTTP_LOYALTY_REPLY_STRING
                || (name.len == 2 && ngx_strncmp(name.data, "id", 2) == 0))
            {
                continue;
            }

            *p++ = ',';
            p = ngx_http_loyalty_json_string(p, name.data, name.len);
            *p++ = ':';

            if (ngx_http_loyalty_api_number(&name, value)) {
                p = ngx_cpymem(p, value->data, value->len);

            } else {
                p = ngx_http_loyalty_json_string(p, value->data, value->len);
            }
        }

        *p++ = '}';
    }

    *p++ = ']';
    *p++ = '}';
    *p++ = LF;

    json.len = p - json.data;

    ngx_http_loyalty_api_count(r, ctx->op, NGX_HTTP_LOYALTY_API_OK);

    return ngx_http_loyalty_api_send(r, NGX_HTTP_OK, &json);
}


/* a count field whose value is digits only, at most 18: a JSON number */

static ngx_uint_t
ngx_http_loyalty_api_number(ngx_str_t *name, ngx_str_t *value)
{
    u_char     *p;
    ngx_str_t  *c;

    if (value->len == 0 || value->len > 18
        || (value->len > 1 && value->data[0] == '0'))
    {
        return 0;
    }

    for (p = value->data; p < value->data + value->len; p++) {
        if (*p < '0' || *p > '9') {
            return 0;
        }
    }

    for (c = ngx_http_loyalty_api_counts; c->len; c++) {
        if (ngx_http_loyalty_same_str(c, name)) {
            return 1;
        }
    }

    return 0;
}


/*
 * POST .../refund, POST .../adjust, once the body is read: NGX_DONE while
 * Redis is asked, else the request is answered here
 */

static void
ngx_http_loyalty_api_body(ngx_http_request_t *r)
{
    char       *error;
    ngx_int_t   rc;
    ngx_str_t   body;
    ngx_uint_t  op;

    op = ngx_http_loyalty_api_op(r);

    error = ngx_http_loyalty_api_form(r, &body);

    if (error == NULL) {
        rc = ngx_http_loyalty_api_write(r, op, &body);

        if (rc == NGX_DONE) {
            return;
        }

    } else if (error == NGX_CONF_ERROR) {
        rc = NGX_HTTP_INTERNAL_SERVER_ERROR;

    } else {
        rc = ngx_http_loyalty_api_invalid(r, op, error);
    }

    ngx_http_finalize_request(r, rc);
}


/*
 * The form in the body, if any, in one piece: NULL, or why it is refused,
 * or NGX_CONF_ERROR without memory.
 */

static char *
ngx_http_loyalty_api_form(ngx_http_request_t *r, ngx_str_t *body)
{
    u_char       *p;
    size_t        len, n;
    ngx_str_t    *type;
    ngx_chain_t  *cl;

    static char   form[] = "application/x-www-form-urlencoded";

    ngx_str_null(body);

    if (r->request_body == NULL || r->request_body->bufs == NULL) {
        return NULL;
    }

    len = 0;

    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        if (!ngx_buf_in_memory(cl->buf)) {
            /* larger than client_body_buffer_size, or in file only */
            return "the body is in a file: larger than "
                   "client_body_buffer_size";
        }

        len += cl->buf->last - cl->buf->pos;
    }

    if (len == 0) {
        return NULL;
    }

    /* "application/x-www-form-urlencoded", parameters allowed */

    type = r->headers_in.content_type ? &r->headers_in.content_type->value
                                      : NULL;
    n = sizeof(form) - 1;

    if (type == NULL
        || type->len < n
        || ngx_strncasecmp(type->data, (u_char *) form, n) != 0
        || (type->len > n && type->data[n] != ';' && type->data[n] != ' '))
    {
        return "the body is not application/x-www-form-urlencoded";
    }

    p = ngx_pnalloc(r->pool, len);
    if (p == NULL) {
        return NGX_CONF_ERROR;
    }

    body->data = p;
    body->len = len;

    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        p = ngx_cpymem(p, cl->buf->pos, cl->buf->last - cl->buf->pos);
    }

    return NULL;
}


/*
 * The arguments, checked, and the API script's call:
 *
 *     EVAL script 3 hash marker ledger op now ledger expire order_ttl
 *          id value reason
 */

static ngx_int_t
ngx_http_loyalty_api_write(ngx_http_request_t *r, ngx_uint_t op,
    ngx_str_t *body)
{
    u_char                        *p;
    uint64_t                       n;
    ngx_int_t                      rc;
    ngx_str_t                      customer, id, value, reason, *argv;
    ngx_uint_t                     negative;
    ngx_http_loyalty_api_ctx_t    *ctx;
    ngx_http_loyalty_loc_conf_t   *llcf;
    ngx_http_loyalty_main_conf_t  *lmcf;

    llcf = ngx_http_get_module_loc_conf(r, ngx_http_loyalty_module);
    lmcf = ngx_http_get_module_main_conf(r, ngx_http_loyalty_module);

    rc = ngx_http_loyalty_api_customer(r, body, &customer);

    if (rc != NGX_OK) {
        return (rc == NGX_DECLINED)
               ? ngx_http_loyalty_api_invalid(r, op, "customer is not a "
                                                     "customer id")
               : rc;
    }

    rc = ngx_http_loyalty_api_arg(r, body,
                                  (op == NGX_HTTP_LOYALTY_API_REFUND)
                                  ? "order" : "id", &id);

    if (rc == NGX_HTTP_INTERNAL_SERVER_ERROR) {
        return rc;
    }

    if (rc == NGX_OK
        && ngx_http_loyalty_valid_order(id.data, id.len) != NGX_OK)
    {
        rc = NGX_DECLINED;
    }

    if (rc != NGX_OK) {
        return ngx_http_loyalty_api_invalid(r, op,
                                 (op == NGX_HTTP_LOYALTY_API_REFUND)
                                 ? "order is not an order id"
                                 : "id is not an adjustment id");
    }

    if (op == NGX_HTTP_LOYALTY_API_REFUND) {
        rc = ngx_http_loyalty_api_arg(r, body, "refunded", &value);

        if (rc == NGX_HTTP_INTERNAL_SERVER_ERROR) {
            return rc;
        }

        if (rc != NGX_OK
            || ((value.len != 3 || ngx_strncmp(value.data, "all", 3) != 0)
                && ngx_http_loyalty_parse_amount(value.data, value.len, &n)
                   != NGX_OK))
        {
            return ngx_http_loyalty_api_invalid(r, op,
                                 "refunded is neither an amount nor "
                                 "\"all\"");
        }

    } else {
        rc = ngx_http_loyalty_api_arg(r, body, "points", &value);

        if (rc == NGX_HTTP_INTERNAL_SERVER_ERROR) {
            return rc;
        }

        if (rc != NGX_OK
            || ngx_http_loyalty_parse_signed(value.data, value.len, &n,
                                             &negative)
               != NGX_OK)
        {
            return ngx_http_loyalty_api_invalid(r, op,
                                 "points is not an integer of at most 18 "
                                 "digits");
        }
    }

    /* a refund may say why, an adjustment must */

    rc = ngx_http_loyalty_api_arg(r, body, "reason", &reason);

    if (rc == NGX_HTTP_INTERNAL_SERVER_ERROR) {
        return rc;
    }

    if (rc == NGX_DECLINED && op == NGX_HTTP_LOYALTY_API_REFUND) {
        ngx_str_set(&reason, "");

    } else if (rc != NGX_OK
               || ngx_http_loyalty_valid_reason(reason.data, reason.len)
                  != NGX_OK)
    {
        return ngx_http_loyalty_api_invalid(r, op,
                                 "reason is not 1 to 200 printable "
                                 "characters");
    }

    ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_loyalty_api_ctx_t));
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->request = r;
    ctx->op = op;
    ctx->customer = customer;
    ctx->id = id;

    /* kept with the request: NOSCRIPT sends it again, with the script */

    p = ngx_pnalloc(r->pool, 3 * (NGX_HTTP_LOYALTY_KEY_LEN
                                  + NGX_HTTP_LOYALTY_ORDER_MAX
                                  + sizeof(":adjust:"))
                             + 4 * NGX_INT64_LEN);
    if (p == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    argv = ctx->argv;

    ngx_str_set(&argv[0], "EVALSHA");
    argv[1].data = lmcf->api_script_sha;
    argv[1].len = NGX_HTTP_LOYALTY_SHA1_LEN;
    ngx_str_set(&argv[2], "3");

    argv[3].data = p;
    p = ngx_http_loyalty_hash_key(p, &llcf->prefix, customer.data,
                                  customer.len);
    argv[3].len = p - argv[3].data;

    argv[4].data = p;
    p = ngx_cpymem(p, argv[3].data, argv[3].len);

    if (op == NGX_HTTP_LOYALTY_API_REFUND) {
        p = ngx_cpymem(p, ":order:", sizeof(":order:") - 1);

    } else {
        p = ngx_cpymem(p, ":adjust:", sizeof(":adjust:") - 1);
    }

    p = ngx_cpymem(p, id.data, id.len);
    argv[4].len = p - argv[4].data;

    argv[5].data = p;
    p = ngx_cpymem(p, argv[3].data, argv[3].len);
    p = ngx_cpymem(p, ":ledger", sizeof(":ledger") - 1);
    argv[5].len = p - argv[5].data;

    argv[6] = ngx_http_loyalty_api_calls[op];

    argv[7].data = p;
    p = ngx_http_loyalty_write_uint(p, (uint64_t) ngx_time());
    argv[7].len = p - argv[7].data;

    argv[8].data = p;
    p = ngx_http_loyalty_write_uint(p, (uint64_t) llcf->ledger);
    argv[8].len = p - argv[8].data;

    argv[9].data = p;
    p = ngx_http_loyalty_write_uint(p, (uint64_t) llcf->expire);
    argv[9].len = p - argv[9].data;

    argv[10].data = p;
    p = ngx_http_loyalty_write_uint(p, (uint64_t) llcf->order_ttl);
    argv[10].len = p - argv[10].data;

    argv[11] = id;
    argv[12] = value;
    argv[13] = reason;

    /* the body read holds the request meanwhile */

    return ngx_http_loyalty_api_ask(r, ctx, &argv[3], 14, argv,
                                    ngx_http_loyalty_api_written);
}


/*
 * The command of a call, cancelled if the request goes first: NGX_DONE
 * while Redis is asked, else the answer to the request.
 */

static ngx_int_t
ngx_http_loyalty_api_ask(ngx_http_request_t *r,
    ngx_http_loyalty_api_ctx_t *ctx, ngx_str_t *key, ngx_uint_t argc,
    ngx_str_t *argv, ngx_http_loyalty_reply_pt handler)
{
    ngx_http_cleanup_t           *cln;
    ngx_http_loyalty_loc_conf_t  *llcf;

    llcf = ngx_http_get_module_loc_conf(r, ngx_http_loyalty_module);

    if (!ctx->cleanup) {
        cln = ngx_http_cleanup_add(r, 0);
        if (cln == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        cln->handler = ngx_http_loyalty_api_cleanup;
        cln->data = ctx;

        ctx->cleanup = 1;
    }

    ctx->cmd = ngx_http_loyalty_redis_send(llcf->server, key, argc, argv,
                                           llcf->timeout, handler, ctx,
                                           r->connection->log);
    if (ctx->cmd == NULL) {
        return ngx_http_loyalty_api_status(r, ctx->op,
                                           NGX_HTTP_SERVICE_UNAVAILABLE,
                                           NGX_HTTP_LOYALTY_API_UNAVAILABLE,
                                           NULL);
    }

    /* a client that goes away cancels the command */
    r->read_event_handler = ngx_http_test_reading;

    return NGX_DONE;
}


static void
ngx_http_loyalty_api_written(void *data, ngx_int_t rc,
    ngx_http_loyalty_reply_t *reply)
{
    ngx_uint_t                     more;
    ngx_connection_t              *c;
    ngx_http_request_t            *r;
    ngx_http_loyalty_api_ctx_t    *ctx;
    ngx_http_loyalty_main_conf_t  *lmcf;

    ctx = data;
    ctx->cmd = NULL;

    if (rc == NGX_ABORT) {
        /* the worker exits: the request is gone */
        return;
    }

    r = ctx->request;
    c = r->connection;

    ngx_http_set_log_request(c->log, r);

    if (reply == NULL) {
        rc = ngx_http_loyalty_api_status(r, ctx->op,
                                         NGX_HTTP_SERVICE_UNAVAILABLE,
                                         NGX_HTTP_LOYALTY_API_UNAVAILABLE,
                                         NULL);

    } else if (reply->type == NGX_HTTP_LOYALTY_REPLY_ERROR
               && !ctx->eval
               && reply->str.len >= sizeof("NOSCRIPT") - 1
               && ngx_strncmp(reply->str.data, "NOSCRIPT",
                              sizeof("NOSCRIPT") - 1)
                  == 0)
    {
        /* the first call on this Redis: the script itself, cached then */

        lmcf = ngx_http_get_module_main_conf(r, ngx_http_loyalty_module);

        ctx->eval = 1;
        ngx_str_set(&ctx->argv[0], "EVAL");
        ctx->argv[1] = lmcf->api_script;

        rc = ngx_http_loyalty_api_ask(r, ctx, &ctx->argv[3], 14, ctx->argv,
                                      ngx_http_loyalty_api_written);
        if (rc == NGX_DONE) {
            return;
        }

    } else if (reply->type == NGX_HTTP_LOYALTY_REPLY_ERROR) {

        lmcf = ngx_http_get_module_main_conf(r, ngx_http_loyalty_module);

        if (ngx_http_loyalty_log_limit(&lmcf->error_reply_log, &more)
            == NGX_OK)
        {
            ngx_log_error(NGX_LOG_WARN, c->log, 0,
                          "loyalty: %V \"%V\" of customer \"%V\" failed: "
                          "\"%V\"", &ngx_http_loyalty_api_calls[ctx->op],
                          &ctx->id, &ctx->customer, &reply->str);
        }

        rc = ngx_http_loyalty_api_status(r, ctx->op,
                                         NGX_HTTP_SERVICE_UNAVAILABLE,
                                         NGX_HTTP_LOYALTY_API_UNAVAILABLE,
                                         NULL);

    } else {
        rc = ngx_http_loyalty_api_result(r, ctx, reply);
    }

    ngx_http_finalize_request(r, rc);
    ngx_http_run_posted_requests(c);
}


/*
 * The script's answer {status, name, value, ...} as JSON:
 * {"status":...,"customer":...,"order"|"id":...,name:value,...}, values
 * that are integers as numbers.
 */

static ngx_int_t
ngx_http_loyalty_api_result(ngx_http_request_t *r,
    ngx_http_loyalty_api_ctx_t *ctx, ngx_http_loyalty_reply_t *reply)
{
    size_t                          size;
    u_char                         *p;
    ngx_str_t                       json, name, *word;
    ngx_uint_t                      i, status;
    ngx_atomic_int_t                forgiven;
    ngx_http_loyalty_reply_t       *e, *v;
    ngx_http_loyalty_shctx_t       *sh;
    ngx_http_loyalty_main_conf_t   *lmcf;

    lmcf = ngx_http_get_module_main_conf(r, ngx_http_loyalty_module);
    sh = lmcf->sh;

    status = NGX_HTTP_LOYALTY_API_STATUSES;

    if (reply->type == NGX_HTTP_LOYALTY_REPLY_ARRAY && reply->nelts % 2 == 1
        && reply->element[0]->type == NGX_HTTP_LOYALTY_REPLY_STRING)
    {
        word = &reply->element[0]->str;

        for (status = NGX_HTTP_LOYALTY_API_APPLIED;
             status < NGX_HTTP_LOYALTY_API_UNAVAILABLE;
             status++)
        {
            if (ngx_http_loyalty_same_str(word,
                                  &ngx_http_loyalty_api_statuses[status].word))
            {
                break;
            }
        }
    }

    if (status >= NGX_HTTP_LOYALTY_API_UNAVAILABLE) {
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "loyalty: unexpected reply to the %V \"%V\" of "
                      "customer \"%V\"", &ngx_http_loyalty_api_calls[ctx->op],
                      &ctx->id, &ctx->customer);

        return ngx_http_loyalty_api_status(r, ctx->op,
                                           NGX_HTTP_SERVICE_UNAVAILABLE,
                                           NGX_HTTP_LOYALTY_API_UNAVAILABLE,
                                           NULL);
    }

    word = &ngx_http_loyalty_api_statuses[status].word;

    size = sizeof("{\"status\":\"\",\"customer\":,\"order\":}\n") + word->len
           + (ctx->customer.len + ctx->id.len) * NGX_HTTP_LOYALTY_JSON_ESCAPE
           + 4;

    for (i = 1; i < reply->nelts; i++) {
        e = reply->element[i];
        size += sizeof(",\"\":") + NGX_INT64_LEN
                + e->str.len * NGX_HTTP_LOYALTY_JSON_ESCAPE;
    }

    p = ngx_pnalloc(r->pool, size);
    if (p == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    json.data = p;

    p = ngx_sprintf(p, "{\"status\":\"%V\",\"customer\":", word);
    p = ngx_http_loyalty_json_string(p, ctx->customer.data,
                                     ctx->customer.len);

    if (ctx->op == NGX_HTTP_LOYALTY_API_REFUND) {
        p = ngx_cpymem(p, ",\"order\":", sizeof(",\"order\":") - 1);

    } else {
        p = ngx_cpymem(p, ",\"id\":", sizeof(",\"id\":") - 1);
    }

    p = ngx_http_loyalty_json_string(p, ctx->id.data, ctx->id.len);

    forgiven = 0;

    for (i = 1; i + 1 < reply->nelts; i += 2) {
        e = reply->element[i];
        v = reply->element[i + 1];

        if (e->type != NGX_HTTP_LOYALTY_REPLY_STRING) {
            continue;
        }

        name = e->str;

        *p++ = ',';
        p = ngx_http_loyalty_json_string(p, name.data, name.len);
        *p++ = ':';

        if (v->type == NGX_HTTP_LOYALTY_REPLY_INTEGER) {
            p = ngx_sprintf(p, "%L", v->integer);

        } else if (v->type == NGX_HTTP_LOYALTY_REPLY_STRING) {
            p = ngx_http_loyalty_json_string(p, v->str.data, v->str.len);

        } else {
            p = ngx_cpymem(p, "null", sizeof("null") - 1);
            continue;
        }

        if (status != NGX_HTTP_LOYALTY_API_APPLIED
            || v->type != NGX_HTTP_LOYALTY_REPLY_INTEGER
            || v->integer <= 0)
        {
            continue;
        }

        if (name.len == sizeof("reversed") - 1
            && ngx_strncmp(name.data, "reversed", name.len) == 0
            && sh)
        {
            (void) ngx_atomic_fetch_add(&sh->reversed, v->integer);

        } else if (name.len == sizeof("forgiven") - 1
                   && ngx_strncmp(name.data, "forgiven", name.len) == 0)
        {
            forgiven = v->integer;

            if (sh) {
                (void) ngx_atomic_fetch_add(&sh->forgiven, forgiven);
            }
        }
    }

    *p++ = '}';
    *p++ = LF;

    json.len = p - json.data;

    if (forgiven) {
        ngx_log_error(NGX_LOG_NOTICE, r->connection->log, 0,
                      "loyalty: refund of order \"%V\" of customer \"%V\": "
                      "%A points forgiven, more than the balance",
                      &ctx->id, &ctx->customer, forgiven);
    }

    ngx_http_loyalty_api_count(r, ctx->op, status);

    return ngx_http_loyalty_api_send(r,
                                     ngx_http_loyalty_api_statuses[status].http,
                                     &json);
}


/*
 * An argument, form-decoded into the request's pool: from the body first,
 * then from the query string.  NGX_DECLINED when there is none, NGX_ERROR
 * when it is not well escaped; NGX_HTTP_INTERNAL_SERVER_ERROR without
 * memory.
 */

static ngx_int_t
ngx_http_loyalty_api_arg(ngx_http_request_t *r, ngx_str_t *body, char *name,
    ngx_str_t *value)
{
    size_t     len;
    ngx_str_t  raw;

    len = ngx_strlen(name);

    if ((body == NULL
         || ngx_http_loyalty_form_arg(body->data, body->len, (u_char *) name,
                                      len, &raw)
            != NGX_OK)
        && ngx_http_loyalty_form_arg(r->args.data, r->args.len,
                                     (u_char *) name, len, &raw)
           != NGX_OK)
    {
        return NGX_DECLINED;
    }

    value->data = ngx_pnalloc(r->pool, raw.len + 1);
    if (value->data == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (ngx_http_loyalty_form_decode(value->data, raw.data, raw.len,
                                     &value->len)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* "customer", an id as in a cookie: NGX_DECLINED when there is none */

static ngx_int_t
ngx_http_loyalty_api_customer(ngx_http_request_t *r, ngx_str_t *body,
    ngx_str_t *customer)
{
    ngx_int_t  rc;

    rc = ngx_http_loyalty_api_arg(r, body, "customer", customer);

    if (rc == NGX_HTTP_INTERNAL_SERVER_ERROR) {
        return rc;
    }

    if (rc != NGX_OK
        || ngx_http_loyalty_valid_id(customer->data, customer->len) != NGX_OK)
    {
        return NGX_DECLINED;
    }

    return NGX_OK;
}


void
ngx_http_loyalty_api_count(ngx_http_request_t *r, ngx_uint_t op,
    ngx_uint_t status)
{
    ngx_http_loyalty_main_conf_t  *lmcf;

    if (op >= NGX_HTTP_LOYALTY_API_OPS) {
        return;
    }

    lmcf = ngx_http_get_module_main_conf(r, ngx_http_loyalty_module);

    ngx_http_loyalty_count(lmcf->sh, api[op][status]);
}


static ngx_int_t
ngx_http_loyalty_api_not_allowed(ngx_http_request_t *r, ngx_uint_t op,
    char *allow)
{
    ngx_int_t         rc;
    ngx_table_elt_t  *h;

    rc = ngx_http_discard_request_body(r);

    if (rc != NGX_OK) {
        return rc;
    }

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    h->hash = 1;
#if (nginx_version >= 1023000)
    h->next = NULL;
#endif
    ngx_str_set(&h->key, "Allow");
    h->value.data = (u_char *) allow;
    h->value.len = ngx_strlen(allow);

    return ngx_http_loyalty_api_status(r, op, NGX_HTTP_NOT_ALLOWED,
                                       NGX_HTTP_LOYALTY_API_INVALID,
                                       "method not allowed");
}


static ngx_int_t
ngx_http_loyalty_api_invalid(ngx_http_request_t *r, ngx_uint_t op,
    char *error)
{
    return ngx_http_loyalty_api_status(r, op, NGX_HTTP_BAD_REQUEST,
                                       NGX_HTTP_LOYALTY_API_INVALID, error);
}


/* {"status":WORD[,"error":TEXT]}, counted for the call */

static ngx_int_t
ngx_http_loyalty_api_status(ngx_http_request_t *r, ngx_uint_t op,
    ngx_uint_t http, ngx_uint_t status, char *error)
{
    size_t      len;
    u_char     *p;
    ngx_str_t   json, *word;

    word = &ngx_http_loyalty_api_statuses[status].word;

    len = error ? ngx_strlen(error) : 0;

    p = ngx_pnalloc(r->pool, sizeof("{\"status\":\"\",\"error\":}\n")
                             + word->len + 2
                             + len * NGX_HTTP_LOYALTY_JSON_ESCAPE);
    if (p == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    json.data = p;

    p = ngx_sprintf(p, "{\"status\":\"%V\"", word);

    if (error) {
        p = ngx_cpymem(p, ",\"error\":", sizeof(",\"error\":") - 1);
        p = ngx_http_loyalty_json_string(p, (u_char *) error, len);
    }

    *p++ = '}';
    *p++ = LF;

    json.len = p - json.data;

    ngx_http_loyalty_api_count(r, op, status);

    return ngx_http_loyalty_api_send(r, http, &json);
}


static ngx_int_t
ngx_http_loyalty_api_send(ngx_http_request_t *r, ngx_uint_t status,
    ngx_str_t *json)
{
    ngx_http_complex_value_t  cv;

    if (ngx_http_loyalty_no_store(r) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_memzero(&cv, sizeof(ngx_http_complex_value_t));
    cv.value = *json;

    return ngx_http_send_response(r, status, &ngx_http_loyalty_api_type, &cv);
}


static void
ngx_http_loyalty_api_cleanup(void *data)
{
    ngx_http_loyalty_api_ctx_t  *ctx = data;

    if (ctx->cmd) {
        ngx_http_loyalty_redis_cancel(ctx->cmd);
        ctx->cmd = NULL;
    }
}
