
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
 *     POST .../refund, POST .../adjust         not implemented yet: 501
 *
 * Every answer is JSON with a "status" word.  The customer id is taken as
 * given (the caller is trusted), checked as a cookie's would be.  Redis is
 * waited for within loyalty_redis_timeout: "unavailable" and 503 when it
 * does not answer.
 */


#define NGX_HTTP_LOYALTY_API_COUNT     20       /* ledger entries by default */
#define NGX_HTTP_LOYALTY_API_COUNT_MAX 1000     /* and at most */


typedef struct {
    ngx_http_request_t           *request;
    ngx_http_loyalty_cmd_t       *cmd;
    ngx_str_t                     customer;
} ngx_http_loyalty_api_ctx_t;


static ngx_int_t ngx_http_loyalty_api_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_loyalty_api_ledger(ngx_http_request_t *r);
static void ngx_http_loyalty_api_ledger_handler(void *data, ngx_int_t rc,
    ngx_http_loyalty_reply_t *reply);
static ngx_int_t ngx_http_loyalty_api_entries(ngx_http_request_t *r,
    ngx_http_loyalty_api_ctx_t *ctx, ngx_http_loyalty_reply_t *reply);
static ngx_uint_t ngx_http_loyalty_api_number(ngx_str_t *name,
    ngx_str_t *value);
static ngx_int_t ngx_http_loyalty_api_not_allowed(ngx_http_request_t *r,
    char *allow);
static ngx_int_t ngx_http_loyalty_api_status(ngx_http_request_t *r,
    ngx_uint_t status, char *word);
static ngx_int_t ngx_http_loyalty_api_send(ngx_http_request_t *r,
    ngx_uint_t status, ngx_str_t *json);
static void ngx_http_loyalty_api_cleanup(void *data);


static ngx_str_t  ngx_http_loyalty_api_type = ngx_string("application/json");


/* the ledger fields that are counts: numbers in JSON, not strings */
static ngx_str_t  ngx_http_loyalty_api_counts[] = {
    ngx_string("earned"),
    ngx_string("redeemed"),
    ngx_string("points"),
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

    /* the merge gives the location a Redis */
    llcf->balance = 1;

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_loyalty_api_handler(ngx_http_request_t *r)
{
    u_char     *p, *last;
    ngx_int_t   rc;
    ngx_str_t   call;

    /* none of the calls so far takes a body */

    rc = ngx_http_discard_request_body(r);

    if (rc != NGX_OK) {
        return rc;
    }

    /* the last part of the URI */

    last = r->uri.data + r->uri.len;

    for (p = last; p > r->uri.data && p[-1] != '/'; p--) {
        /* void */
    }

    call.data = p;
    call.len = last - p;

    if (call.len == sizeof("ledger") - 1
        && ngx_strncmp(call.data, "ledger", call.len) == 0)
    {
        if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
            return ngx_http_loyalty_api_not_allowed(r, "GET, HEAD");
        }

        return ngx_http_loyalty_api_ledger(r);
    }

    if ((call.len == sizeof("refund") - 1
         && ngx_strncmp(call.data, "refund", call.len) == 0)
        || (call.len == sizeof("adjust") - 1
            && ngx_strncmp(call.data, "adjust", call.len) == 0))
    {
        if (!(r->method & NGX_HTTP_POST)) {
            return ngx_http_loyalty_api_not_allowed(r, "POST");
        }

        return ngx_http_loyalty_api_status(r, NGX_HTTP_NOT_IMPLEMENTED,
                                           "unsupported");
    }

    return ngx_http_loyalty_api_status(r, NGX_HTTP_NOT_FOUND, "invalid");
}


/* GET .../ledger?customer=ID[&count=N]: XREVRANGE, newest first */

static ngx_int_t
ngx_http_loyalty_api_ledger(ngx_http_request_t *r)
{
    u_char                       *p, *src;
    ngx_int_t                     n;
    ngx_str_t                     arg, customer, count, argv[6];
    ngx_http_cleanup_t           *cln;
    ngx_http_loyalty_api_ctx_t   *ctx;
    ngx_http_loyalty_loc_conf_t  *llcf;
    u_char                        key[NGX_HTTP_LOYALTY_KEY_LEN
                                      + sizeof(":ledger")];
    u_char                        num[NGX_INT_T_LEN];

    llcf = ngx_http_get_module_loc_conf(r, ngx_http_loyalty_module);

    if (ngx_http_arg(r, (u_char *) "customer", sizeof("customer") - 1, &arg)
        != NGX_OK)
    {
        return ngx_http_loyalty_api_status(r, NGX_HTTP_BAD_REQUEST,
                                           "invalid");
    }

    /* "alice%40example" is "alice@example" */

    customer.data = ngx_pnalloc(r->pool, arg.len);
    if (customer.data == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = customer.data;
    src = arg.data;
    ngx_unescape_uri(&p, &src, arg.len, 0);
    customer.len = p - customer.data;

    if (ngx_http_loyalty_valid_id(customer.data, customer.len) != NGX_OK) {
        return ngx_http_loyalty_api_status(r, NGX_HTTP_BAD_REQUEST,
                                           "invalid");
    }

    n = NGX_HTTP_LOYALTY_API_COUNT;

    if (ngx_http_arg(r, (u_char *) "count", sizeof("count") - 1, &count)
        == NGX_OK)
    {
        n = ngx_atoi(count.data, count.len);

        if (n == NGX_ERROR || n == 0) {
            return ngx_http_loyalty_api_status(r, NGX_HTTP_BAD_REQUEST,
                                               "invalid");
        }
    }

    /* no more than the ledger keeps, and a reply of bounded size */

    n = ngx_min(n, llcf->ledger);
    n = ngx_min(n, NGX_HTTP_LOYALTY_API_COUNT_MAX);

    ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_loyalty_api_ctx_t));
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->request = r;
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

    cln = ngx_http_cleanup_add(r, 0);
    if (cln == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->cmd = ngx_http_loyalty_redis_send(llcf->server, &argv[1], 6, argv,
                                           llcf->timeout,
                                           ngx_http_loyalty_api_ledger_handler,
                                           ctx, r->connection->log);
    if (ctx->cmd == NULL) {
        return ngx_http_loyalty_api_status(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                           "unavailable");
    }

    cln->handler = ngx_http_loyalty_api_cleanup;
    cln->data = ctx;

    /* a client that goes away cancels the command */
    r->read_event_handler = ngx_http_test_reading;
    r->main->count++;

    return NGX_DONE;
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

        ngx_http_finalize_request(r,
                      ngx_http_loyalty_api_status(r,
                                                  NGX_HTTP_SERVICE_UNAVAILABLE,
                                                  "unavailable"));

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


static ngx_int_t
ngx_http_loyalty_api_not_allowed(ngx_http_request_t *r, char *allow)
{
    ngx_table_elt_t  *h;

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

    return ngx_http_loyalty_api_status(r, NGX_HTTP_NOT_ALLOWED, "invalid");
}


static ngx_int_t
ngx_http_loyalty_api_status(ngx_http_request_t *r, ngx_uint_t status,
    char *word)
{
    u_char     *p;
    ngx_str_t   json;

    p = ngx_pnalloc(r->pool, sizeof("{\"status\":\"\"}\n") + 32);
    if (p == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    json.data = p;
    json.len = ngx_sprintf(p, "{\"status\":\"%s\"}\n", word) - p;

    return ngx_http_loyalty_api_send(r, status, &json);
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
