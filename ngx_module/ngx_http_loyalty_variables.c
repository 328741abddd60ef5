
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include "ngx_http_loyalty_module.h"


typedef struct {
    ngx_str_t                  name;
    ngx_str_t                  lowcase;
    ngx_uint_t                 var;
    ngx_uint_t                 hash;            /* request headers only */
} ngx_http_loyalty_header_t;


static ngx_int_t ngx_http_loyalty_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_loyalty_uint_value(ngx_http_request_t *r,
    uint64_t n, ngx_str_t *value);
static ngx_uint_t ngx_http_loyalty_spoofed(ngx_str_t *name);
static ngx_int_t ngx_http_loyalty_remove_header(ngx_list_t *l,
    ngx_list_part_t *part, ngx_uint_t i);
static void ngx_http_loyalty_flush_variables(ngx_http_request_t *r);


static ngx_http_variable_t  ngx_http_loyalty_vars[] = {

    { ngx_string("loyalty_status"), NULL, ngx_http_loyalty_variable,
      NGX_HTTP_LOYALTY_VAR_STATUS, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("loyalty_customer"), NULL, ngx_http_loyalty_variable,
      NGX_HTTP_LOYALTY_VAR_CUSTOMER, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("loyalty_points"), NULL, ngx_http_loyalty_variable,
      NGX_HTTP_LOYALTY_VAR_POINTS, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("loyalty_lifetime"), NULL, ngx_http_loyalty_variable,
      NGX_HTTP_LOYALTY_VAR_LIFETIME, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("loyalty_tier"), NULL, ngx_http_loyalty_variable,
      NGX_HTTP_LOYALTY_VAR_TIER, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("loyalty_orders"), NULL, ngx_http_loyalty_variable,
      NGX_HTTP_LOYALTY_VAR_ORDERS, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("loyalty_offer"), NULL, ngx_http_loyalty_variable,
      NGX_HTTP_LOYALTY_VAR_OFFER, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("loyalty_offer_code"), NULL, ngx_http_loyalty_variable,
      NGX_HTTP_LOYALTY_VAR_OFFER_CODE, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("loyalty_earned"), NULL, ngx_http_loyalty_variable,
      NGX_HTTP_LOYALTY_VAR_EARNED, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("loyalty_pending"), NULL, ngx_http_loyalty_variable,
      NGX_HTTP_LOYALTY_VAR_PENDING, NGX_HTTP_VAR_NOCACHEABLE, 0 },

      ngx_http_null_variable
};


static ngx_http_loyalty_header_t  ngx_http_loyalty_request_headers[] = {
    { ngx_string("X-Loyalty-Status"), ngx_string("x-loyalty-status"),
      NGX_HTTP_LOYALTY_VAR_STATUS, 0 },
    { ngx_string("X-Loyalty-Customer"), ngx_string("x-loyalty-customer"),
      NGX_HTTP_LOYALTY_VAR_CUSTOMER, 0 },
    { ngx_string("X-Loyalty-Points"), ngx_string("x-loyalty-points"),
      NGX_HTTP_LOYALTY_VAR_POINTS, 0 },
    { ngx_string("X-Loyalty-Lifetime"), ngx_string("x-loyalty-lifetime"),
      NGX_HTTP_LOYALTY_VAR_LIFETIME, 0 },
    { ngx_string("X-Loyalty-Tier"), ngx_string("x-loyalty-tier"),
      NGX_HTTP_LOYALTY_VAR_TIER, 0 },
    { ngx_string("X-Loyalty-Orders"), ngx_string("x-loyalty-orders"),
      NGX_HTTP_LOYALTY_VAR_ORDERS, 0 },
    { ngx_string("X-Loyalty-Offer"), ngx_string("x-loyalty-offer"),
      NGX_HTTP_LOYALTY_VAR_OFFER, 0 },
    { ngx_string("X-Loyalty-Offer-Code"), ngx_string("x-loyalty-offer-code"),
      NGX_HTTP_LOYALTY_VAR_OFFER_CODE, 0 },
    { ngx_string("X-Loyalty-Pending"), ngx_string("x-loyalty-pending"),
      NGX_HTTP_LOYALTY_VAR_PENDING, 0 },
    { ngx_null_string, ngx_null_string, 0, 0 }
};


static ngx_http_loyalty_header_t  ngx_http_loyalty_response_headers[] = {
    { ngx_string("X-Loyalty-Status"), ngx_string("x-loyalty-status"),
      NGX_HTTP_LOYALTY_VAR_STATUS, 0 },
    { ngx_string("X-Loyalty-Points"), ngx_string("x-loyalty-points"),
      NGX_HTTP_LOYALTY_VAR_BALANCE, 0 },
    { ngx_string("X-Loyalty-Tier"), ngx_string("x-loyalty-tier"),
      NGX_HTTP_LOYALTY_VAR_TIER, 0 },
    { ngx_string("X-Loyalty-Offer"), ngx_string("x-loyalty-offer"),
      NGX_HTTP_LOYALTY_VAR_OFFER, 0 },
    { ngx_string("X-Loyalty-Offer-Code"), ngx_string("x-loyalty-offer-code"),
      NGX_HTTP_LOYALTY_VAR_OFFER_CODE, 0 },
    { ngx_string("X-Loyalty-Earned"), ngx_string("x-loyalty-earned"),
      NGX_HTTP_LOYALTY_VAR_EARNED, 0 },
    { ngx_string("X-Loyalty-Pending"), ngx_string("x-loyalty-pending"),
      NGX_HTTP_LOYALTY_VAR_PENDING_AFTER, 0 },
    { ngx_null_string, ngx_null_string, 0, 0 }
};


static ngx_str_t  ngx_http_loyalty_status_names[] = {
    ngx_string("off"),
    ngx_string("anonymous"),
    ngx_string("invalid"),
    ngx_string("new"),
    ngx_string("ok"),
    ngx_string("unavailable")
};


ngx_int_t
ngx_http_loyalty_add_variables(ngx_conf_t *cf)
{
    ngx_http_variable_t        *var, *v;
    ngx_http_loyalty_header_t  *hd;

    for (hd = ngx_http_loyalty_request_headers; hd->name.len; hd++) {
        hd->hash = ngx_hash_key(hd->lowcase.data, hd->lowcase.len);
    }

    for (v = ngx_http_loyalty_vars; v->name.len; v++) {
        var = ngx_http_add_variable(cf, &v->name, v->flags);
        if (var == NULL) {
            return NGX_ERROR;
        }

        var->get_handler = v->get_handler;
        var->data = v->data;
    }

    return NGX_OK;
}


ngx_str_t *
ngx_http_loyalty_status_name(ngx_uint_t status)
{
    return &ngx_http_loyalty_status_names[status];
}


static ngx_int_t
ngx_http_loyalty_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_str_t                value;
    ngx_http_loyalty_ctx_t  *ctx;

    ctx = ngx_http_loyalty_get_ctx(r);

    if (ctx == NULL || !ctx->done) {
        if (data != NGX_HTTP_LOYALTY_VAR_STATUS) {
            v->not_found = 1;
            return NGX_OK;
        }

        value = ngx_http_loyalty_status_names[NGX_HTTP_LOYALTY_OFF];

    } else if (ngx_http_loyalty_value(r, ctx, data, &value) != NGX_OK) {
        return NGX_ERROR;
    }

    if (value.len == 0) {
        v->not_found = 1;
        return NGX_OK;
    }

    v->len = value.len;
    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;
    v->data = value.data;

    return NGX_OK;
}


/*
 * The value behind a variable and a header; empty when it does not apply:
 * for "anonymous", "invalid" and "unavailable" only the status is known
 * (and what an order earned, when "unavailable").
 */

ngx_int_t
ngx_http_loyalty_value(ngx_http_request_t *r, ngx_http_loyalty_ctx_t *ctx,
    ngx_uint_t var, ngx_str_t *value)
{
    ngx_str_null(value);

    if (var == NGX_HTTP_LOYALTY_VAR_STATUS) {
        *value = ngx_http_loyalty_status_names[ctx->status];
        return NGX_OK;
    }

    if (var == NGX_HTTP_LOYALTY_VAR_EARNED) {
        if (ctx->credited) {
            return ngx_http_loyalty_uint_value(r, ctx->earned, value);
        }

        return NGX_OK;
    }

    if (ctx->status != NGX_HTTP_LOYALTY_OK
        && ctx->status != NGX_HTTP_LOYALTY_NEW)
    {
        return NGX_OK;
    }

    switch (var) {

    case NGX_HTTP_LOYALTY_VAR_CUSTOMER:
        *value = ctx->customer;
        return NGX_OK;

    case NGX_HTTP_LOYALTY_VAR_POINTS:
        return ngx_http_loyalty_uint_value(r, ctx->record.points, value);

    case NGX_HTTP_LOYALTY_VAR_LIFETIME:
        return ngx_http_loyalty_uint_value(r, ctx->record.lifetime, value);

    case NGX_HTTP_LOYALTY_VAR_ORDERS:
        return ngx_http_loyalty_uint_value(r, ctx->record.orders, value);

    case NGX_HTTP_LOYALTY_VAR_TIER:
        if (ctx->tier) {
            *value = ctx->tier->name;
        }

        return NGX_OK;

    case NGX_HTTP_LOYALTY_VAR_OFFER:
        if (ctx->offer) {
            *value = ctx->offer->name;
        }

        return NGX_OK;

    case NGX_HTTP_LOYALTY_VAR_OFFER_CODE:
        if (ctx->offer) {
            *value = ctx->offer->code;
        }

        return NGX_OK;

    case NGX_HTTP_LOYALTY_VAR_PENDING:
    case NGX_HTTP_LOYALTY_VAR_PENDING_AFTER:

        /* only with loyalty_pending, where the order's points are locked */

        if (ctx->conf->pending == 0) {
            return NGX_OK;
        }

        return ngx_http_loyalty_uint_value(r, ctx->record.pending
                                   + ((var == NGX_HTTP_LOYALTY_VAR_PENDING)
                                      ? 0 : ctx->earned),
                                           value);

    default: /* NGX_HTTP_LOYALTY_VAR_BALANCE */
        return ngx_http_loyalty_uint_value(r, ctx->record.points
                                              - ctx->redeemed
                                              + (ctx->conf->pending
                                                 ? 0 : ctx->earned),
                                           value);
    }
}


static ngx_int_t
ngx_http_loyalty_uint_value(ngx_http_request_t *r, uint64_t n,
    ngx_str_t *value)
{
    value->data = ngx_pnalloc(r->pool, NGX_INT64_LEN);
    if (value->data == NULL) {
        return NGX_ERROR;
    }

    value->len = ngx_http_loyalty_write_uint(value->data, n) - value->data;

    return NGX_OK;
}


/*
 * Client-sent X-Loyalty-* request headers are removed from the list
 * without moving any element: other fields of r->headers_in point into
 * it, and the list is pushed to afterwards.  NGX_ERROR when there was no
 * memory to remove one: it is emptied then, and the request must fail.
 */

ngx_int_t
ngx_http_loyalty_strip_headers(ngx_http_request_t *r)
{
    ngx_int_t         rc;
    ngx_uint_t        i, removed;
    ngx_list_t       *l;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    rc = NGX_OK;
    removed = 0;

    l = &r->headers_in.headers;
    part = &l->part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;

            if (part->nelts == 0) {
                break;
            }
        }

        if (!ngx_http_loyalty_spoofed(&h[i].key)) {
            continue;
        }

        ngx_log_debug2(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                       "loyalty strip \"%V: %V\"", &h[i].key, &h[i].value);

        removed = 1;

        if (ngx_http_loyalty_remove_header(l, part, i) != NGX_OK) {

            /*
             * no memory to split the list: the header is emptied, name
             * and value, as $http_* skip it for its hash 0 but proxy
             * sends every header; and the request fails
             */

            ngx_str_null(&h[i].value);
            h[i].key.len = 0;
            h[i].hash = 0;

            rc = NGX_ERROR;
            continue;
        }

        /* start over: the part may have been split or emptied */

        part = &l->part;
        h = part->elts;
        i = (ngx_uint_t) -1;
    }

    if (removed) {
        ngx_http_loyalty_flush_variables(r);
    }

    return rc;
}


/*
 * "X-Loyalty-" in any case, and with underscores for dashes: nginx's
 * $http_x_loyalty_* variables, and backends that turn headers into CGI
 * names (HTTP_X_LOYALTY_TIER), read "X_Loyalty_Tier" as "X-Loyalty-Tier"
 * where "underscores_in_headers on" lets it in.
 */

static ngx_uint_t
ngx_http_loyalty_spoofed(ngx_str_t *name)
{
    u_char      c;
    ngx_uint_t  i;

    static u_char  prefix[] = "x-loyalty-";

    if (name->len < sizeof(prefix) - 1) {
        return 0;
    }

    for (i = 0; i < sizeof(prefix) - 1; i++) {
        c = ngx_tolower(name->data[i]);

        if (c == '_') {
            c = '-';
        }

        if (c != prefix[i]) {
            return 0;
        }
    }

    return 1;
}


/*
 * Removes element i of a part by shrinking the part from either end, or
 * by splitting it in two.  The last part must keep room for ngx_list_push()
 * at its end, so l->nalloc follows it; no part but the first is left empty.
 */

static ngx_int_t
ngx_http_loyalty_remove_header(ngx_list_t *l, ngx_list_part_t *part,
    ngx_uint_t i)
{
    ngx_list_part_t  *prev, *tail;

    if (part->nelts == 1) {

        if (part == &l->part) {
            if (part->next == NULL) {
                part->nelts = 0;
                return NGX_OK;
            }

            tail = part->next;
            *part = *tail;

            if (l->last == tail) {
                l->last = part;
                l->nalloc = part->nelts;
            }

            return NGX_OK;
        }

        for (prev = &l->part; prev->next != part; prev = prev->next) {
            /* void */
        }

        prev->next = part->next;

        if (l->last == part) {
            l->last = prev;
            l->nalloc = prev->nelts;
        }

        return NGX_OK;
    }

    if (i == 0) {
        part->elts = (char *) part->elts + l->size;
        part->nelts--;

        if (l->last == part) {
            l->nalloc = part->nelts;
        }

        return NGX_OK;
    }

    if (i == part->nelts - 1) {
        part->nelts--;

        if (l->last == part) {
            l->nalloc = part->nelts;
        }

        return NGX_OK;
    }

    tail = ngx_palloc(l->pool, sizeof(ngx_list_part_t));
    if (tail == NULL) {
        return NGX_ERROR;
    }

    tail->elts = (char *) part->elts + (i + 1) * l->size;
    tail->nelts = part->nelts - i - 1;
    tail->next = part->next;

    part->nelts = i;
    part->next = tail;

    if (l->last == part) {
        l->last = tail;
        l->nalloc = tail->nelts;
    }

    return NGX_OK;
}


ngx_int_t
ngx_http_loyalty_set_request_headers(ngx_http_request_t *r,
    ngx_http_loyalty_ctx_t *ctx)
{
    ngx_str_t                   value;
    ngx_table_elt_t            *h;
    ngx_http_loyalty_header_t  *hd;

    for (hd = ngx_http_loyalty_request_headers; hd->name.len; hd++) {

        if (ngx_http_loyalty_value(r, ctx, hd->var, &value) != NGX_OK) {
            return NGX_ERROR;
        }

        if (value.len == 0) {
            continue;
        }

        h = ngx_list_push(&r->headers_in.headers);
        if (h == NULL) {
            return NGX_ERROR;
        }

        h->key = hd->name;
        h->lowcase_key = hd->lowcase.data;
        h->hash = hd->hash;
        h->value = value;
#if (nginx_version >= 1023000)
        h->next = NULL;
#endif
    }

    ngx_http_loyalty_flush_variables(r);

    return NGX_OK;
}


/*
 * $http_x_loyalty_* keep what they found when first evaluated, also a
 * client's header or its absence: after the headers changed, they are
 * evaluated again.  Subrequests share the main request's values.
 */

static void
ngx_http_loyalty_flush_variables(ngx_http_request_t *r)
{
    ngx_uint_t                     i, *index;
    ngx_http_loyalty_main_conf_t  *lmcf;

    lmcf = ngx_http_get_module_main_conf(r, ngx_http_loyalty_module);

    index = lmcf->header_vars.elts;

    for (i = 0; i < lmcf->header_vars.nelts; i++) {
        r->variables[index[i]].valid = 0;
        r->variables[index[i]].not_found = 0;
    }
}


ngx_int_t
ngx_http_loyalty_set_response_headers(ngx_http_request_t *r,
    ngx_http_loyalty_ctx_t *ctx)
{
    ngx_str_t                   value;
    ngx_uint_t                  i;
    ngx_list_part_t            *part;
    ngx_table_elt_t            *h;
    ngx_http_loyalty_header_t  *hd;

    /* the upstream's own X-Loyalty-* headers are not passed on */

    part = &r->headers_out.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].key.len >= sizeof("X-Loyalty-") - 1
            && ngx_strncasecmp(h[i].key.data, (u_char *) "X-Loyalty-",
                               sizeof("X-Loyalty-") - 1)
               == 0)
        {
            h[i].hash = 0;
        }
    }

    for (hd = ngx_http_loyalty_response_headers; hd->name.len; hd++) {

        if (hd->var != NGX_HTTP_LOYALTY_VAR_STATUS
            && ctx->status != NGX_HTTP_LOYALTY_OK
            && ctx->status != NGX_HTTP_LOYALTY_NEW)
        {
            break;
        }

        if (ngx_http_loyalty_value(r, ctx, hd->var, &value) != NGX_OK) {
            return NGX_ERROR;
        }

        if (value.len == 0) {
            continue;
        }

        h = ngx_list_push(&r->headers_out.headers);
        if (h == NULL) {
            return NGX_ERROR;
        }

        h->hash = 1;
        h->key = hd->name;
        h->value = value;
#if (nginx_version >= 1023000)
        h->next = NULL;
#endif
    }

    return NGX_OK;
}
