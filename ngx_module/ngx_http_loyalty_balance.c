
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include "ngx_http_loyalty_module.h"
#include "ngx_http_loyalty_rules.h"


/*
 * loyalty_balance: a content handler that answers the current customer's
 * record as JSON.  The read path (ngx_http_loyalty_handler.c) identifies
 * the customer and reads the record, also where "loyalty on" is not set.
 */


typedef struct {
    ngx_str_t                  name;
    ngx_uint_t                 var;
    ngx_uint_t                 quote;           /* a string, not a number */
} ngx_http_loyalty_balance_field_t;


static ngx_int_t ngx_http_loyalty_balance_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_loyalty_balance_send(ngx_http_request_t *r,
    ngx_http_loyalty_ctx_t *ctx);
static ngx_int_t ngx_http_loyalty_balance_json(ngx_http_request_t *r,
    ngx_http_loyalty_ctx_t *ctx, ngx_uint_t known, ngx_str_t *json);


/* a known customer's fields after "status" and "customer" */
static ngx_http_loyalty_balance_field_t  ngx_http_loyalty_balance_fields[] = {
    { ngx_string("points"), NGX_HTTP_LOYALTY_VAR_POINTS, 0 },
    { ngx_string("lifetime"), NGX_HTTP_LOYALTY_VAR_LIFETIME, 0 },
    { ngx_string("orders"), NGX_HTTP_LOYALTY_VAR_ORDERS, 0 },
    { ngx_string("tier"), NGX_HTTP_LOYALTY_VAR_TIER, 1 },
    { ngx_string("offer"), NGX_HTTP_LOYALTY_VAR_OFFER, 1 },
    { ngx_string("offer_code"), NGX_HTTP_LOYALTY_VAR_OFFER_CODE, 1 },
    { ngx_null_string, 0, 0 }
};


static ngx_str_t  ngx_http_loyalty_balance_type =
    ngx_string("application/json");


char *
ngx_http_loyalty_balance(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_loyalty_loc_conf_t *llcf = conf;

    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

    if (clcf->handler) {
        return "is duplicate";
    }

    clcf->handler = ngx_http_loyalty_balance_handler;
    llcf->handler = ngx_http_loyalty_balance_handler;

    /*
     * the merge gives the location a Redis: this handler reads one, the
     * content phase's answer, not the access phase's of "loyalty on"
     */
    llcf->balance = 1;
    llcf->noread = 1;

    return NGX_CONF_OK;
}


/*
 * loyalty_balance: the record read by "loyalty on" in this request, or
 * read here, as JSON.
 */

static ngx_int_t
ngx_http_loyalty_balance_handler(ngx_http_request_t *r)
{
    ngx_int_t                rc;
    ngx_http_loyalty_ctx_t  *ctx;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    rc = ngx_http_discard_request_body(r);

    if (rc != NGX_OK) {
        return rc;
    }

    ctx = ngx_http_loyalty_get_ctx(r);

    if (ctx && ctx->done) {
        return ngx_http_loyalty_balance_send(r, ctx);
    }

    return ngx_http_loyalty_lookup(r, ngx_http_loyalty_balance_send);
}


/*
 * 200 with the record for a known or a new customer, 503 with the status
 * alone when Redis is unavailable, 401 for an anonymous or invalid one.
 */

static ngx_int_t
ngx_http_loyalty_balance_send(ngx_http_request_t *r,
    ngx_http_loyalty_ctx_t *ctx)
{
    ngx_uint_t                status, known;
    ngx_http_complex_value_t  cv;

    /* not an order's response: the header filter leaves it alone */
    ctx->balance = 1;

    known = (ctx->status == NGX_HTTP_LOYALTY_OK
             || ctx->status == NGX_HTTP_LOYALTY_NEW);

    ngx_memzero(&cv, sizeof(ngx_http_complex_value_t));

    if (ngx_http_loyalty_balance_json(r, ctx, known, &cv.value) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (known) {
        status = NGX_HTTP_OK;

    } else if (ctx->status == NGX_HTTP_LOYALTY_UNAVAILABLE) {
        status = NGX_HTTP_SERVICE_UNAVAILABLE;

    } else {
        status = NGX_HTTP_UNAUTHORIZED;
    }

    if (ngx_http_loyalty_no_store(r) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return ngx_http_send_response(r, status, &ngx_http_loyalty_balance_type,
                                  &cv);
}


static ngx_int_t
ngx_http_loyalty_balance_json(ngx_http_request_t *r,
    ngx_http_loyalty_ctx_t *ctx, ngx_uint_t known, ngx_str_t *json)
{
    size_t                             size;
    u_char                            *p;
    ngx_str_t                          name, value;
    ngx_http_loyalty_balance_field_t  *f;

    /* the strings, escaped, then field names and numbers */

    size = 0;

    if (known) {
        size = ctx->customer.len;

        if (ctx->tier) {
            size += ctx->tier->name.len;
        }

        if (ctx->offer) {
            size += ctx->offer->name.len + ctx->offer->code.len;
        }
    }

    size = size * NGX_HTTP_LOYALTY_JSON_ESCAPE + 320 + 5 * NGX_INT64_LEN;

    p = ngx_pnalloc(r->pool, size);
    if (p == NULL) {
        return NGX_ERROR;
    }

    json->data = p;

    *p++ = '{';

    ngx_str_set(&name, "status");
    p = ngx_http_loyalty_json_field(p, &name,
                                    ngx_http_loyalty_status_name(ctx->status),
                                    1);

    if (known) {
        ngx_str_set(&name, "customer");
        *p++ = ',';
        p = ngx_http_loyalty_json_field(p, &name, &ctx->customer, 1);

        for (f = ngx_http_loyalty_balance_fields; f->name.len; f++) {
            if (ngx_http_loyalty_value(r, ctx, f->var, &value) != NGX_OK) {
                return NGX_ERROR;
            }

            *p++ = ',';

            if (value.len == 0) {
                p = ngx_sprintf(p, "\"%V\":null", &f->name);
                continue;
            }

            p = ngx_http_loyalty_json_field(p, &f->name, &value, f->quote);
        }

        /* with loyalty_pending: what is locked, and when it next frees */

        if (ctx->conf->pending) {
            p = ngx_sprintf(p, ",\"pending\":%uL,\"pending_release\":",
                            ctx->record.pending);

            if (ctx->record.pending_release) {
                p = ngx_sprintf(p, "%T", ctx->record.pending_release);

            } else {
                p = ngx_cpymem(p, "null", sizeof("null") - 1);
            }
        }
    }

    *p++ = '}';
    *p++ = LF;

    json->len = p - json->data;

    return NGX_OK;
}


/*
 * A customer's own data: no cache, shared or private, keeps it, unless
 * "expires" in the location says otherwise (it replaces this header).
 */

ngx_int_t
ngx_http_loyalty_no_store(ngx_http_request_t *r)
{
    ngx_table_elt_t   *h;
#if (nginx_version < 1023000)
    ngx_table_elt_t  **cc;
#endif

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Cache-Control");
    ngx_str_set(&h->value, "no-store");

#if (nginx_version >= 1023000)
    h->next = NULL;
    r->headers_out.cache_control = h;
#else
    if (r->headers_out.cache_control.elts == NULL
        && ngx_array_init(&r->headers_out.cache_control, r->pool, 1,
                          sizeof(ngx_table_elt_t *))
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    cc = ngx_array_push(&r->headers_out.cache_control);
    if (cc == NULL) {
        return NGX_ERROR;
    }

    *cc = h;
#endif

    return NGX_OK;
}
