
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


static ngx_int_t ngx_http_loyalty_balance_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_loyalty_balance_send(ngx_http_request_t *r,
    ngx_http_loyalty_ctx_t *ctx);


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

    /* the merge gives the location a Redis: this handler reads one */
    llcf->balance = 1;

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


static ngx_int_t
ngx_http_loyalty_balance_send(ngx_http_request_t *r,
    ngx_http_loyalty_ctx_t *ctx)
{
    size_t            size;
    u_char           *p;
    ngx_int_t         rc;
    ngx_buf_t        *b;
    ngx_str_t         value, name;
    ngx_uint_t        i, known;
    ngx_chain_t       out;
    ngx_table_elt_t  *h;
#if (nginx_version < 1023000)
    ngx_table_elt_t **cc;
#endif

    static ngx_uint_t  vars[] = {
        NGX_HTTP_LOYALTY_VAR_POINTS,
        NGX_HTTP_LOYALTY_VAR_LIFETIME,
        NGX_HTTP_LOYALTY_VAR_ORDERS,
        NGX_HTTP_LOYALTY_VAR_TIER,
        NGX_HTTP_LOYALTY_VAR_OFFER,
        NGX_HTTP_LOYALTY_VAR_OFFER_CODE
    };

    static ngx_str_t   names[] = {
        ngx_string("points"),
        ngx_string("lifetime"),
        ngx_string("orders"),
        ngx_string("tier"),
        ngx_string("offer"),
        ngx_string("offer_code")
    };

    /* not an order's response: the header filter leaves it alone */
    ctx->balance = 1;

    known = (ctx->status == NGX_HTTP_LOYALTY_OK
             || ctx->status == NGX_HTTP_LOYALTY_NEW);

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

    size = size * NGX_HTTP_LOYALTY_JSON_ESCAPE + 256 + 3 * NGX_INT64_LEN;

    b = ngx_create_temp_buf(r->pool, size);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = b->last;
    *p++ = '{';

    ngx_str_set(&name, "status");
    p = ngx_http_loyalty_json_field(p, &name,
                                    ngx_http_loyalty_status_name(ctx->status),
                                    1);

    if (known) {
        ngx_str_set(&name, "customer");
        *p++ = ',';
        p = ngx_http_loyalty_json_field(p, &name, &ctx->customer, 1);

        for (i = 0; i < sizeof(vars) / sizeof(vars[0]); i++) {
            if (ngx_http_loyalty_value(r, ctx, vars[i], &value) != NGX_OK) {
                return NGX_HTTP_INTERNAL_SERVER_ERROR;
            }

            *p++ = ',';

            if (value.len == 0) {
                p = ngx_sprintf(p, "\"%V\":null", &names[i]);
                continue;
            }

            p = ngx_http_loyalty_json_field(p, &names[i], &value,
                                            i >= 3 ? 1 : 0);
        }
    }

    *p++ = '}';
    *p++ = LF;

    b->last = p;
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    if (known) {
        r->headers_out.status = NGX_HTTP_OK;

    } else if (ctx->status == NGX_HTTP_LOYALTY_UNAVAILABLE) {
        r->headers_out.status = NGX_HTTP_SERVICE_UNAVAILABLE;

    } else {
        r->headers_out.status = NGX_HTTP_UNAUTHORIZED;
    }

    /*
     * a customer's own data: no cache, shared or private, keeps it, unless
     * "expires" in the location says otherwise (it replaces this header)
     */

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
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
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    cc = ngx_array_push(&r->headers_out.cache_control);
    if (cc == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    *cc = h;
#endif

    r->headers_out.content_length_n = b->last - b->pos;
    ngx_str_set(&r->headers_out.content_type, "application/json");
    r->headers_out.content_type_len = r->headers_out.content_type.len;

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}
