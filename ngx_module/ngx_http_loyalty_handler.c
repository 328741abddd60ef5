
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include "ngx_http_loyalty_module.h"
#include "ngx_http_loyalty_redis.h"
#include "ngx_http_loyalty_credit.h"


static ngx_int_t ngx_http_loyalty_identify(ngx_http_request_t *r,
    ngx_http_loyalty_loc_conf_t *llcf, ngx_http_loyalty_ctx_t *ctx);
static void ngx_http_loyalty_invalid(ngx_http_request_t *r, const char *why);
static ngx_int_t ngx_http_loyalty_read(ngx_http_request_t *r,
    ngx_http_loyalty_loc_conf_t *llcf, ngx_http_loyalty_ctx_t *ctx);
static void ngx_http_loyalty_read_handler(void *data, ngx_int_t rc,
    ngx_http_loyalty_reply_t *reply);
static ngx_uint_t ngx_http_loyalty_parse_record(ngx_http_request_t *r,
    ngx_http_loyalty_ctx_t *ctx, ngx_http_loyalty_reply_t *reply);
static void ngx_http_loyalty_finish(ngx_http_request_t *r,
    ngx_http_loyalty_ctx_t *ctx);
static ngx_int_t ngx_http_loyalty_offer_cond(void *data, void *cond);
static ngx_http_loyalty_ctx_t *ngx_http_loyalty_create_ctx(
    ngx_http_request_t *r);
static void ngx_http_loyalty_cleanup(void *data);
static ngx_int_t ngx_http_loyalty_header_filter(ngx_http_request_t *r);


static ngx_http_output_header_filter_pt  ngx_http_next_header_filter;


/*
 * Post-read: in a server where "loyalty on" appears at any level, the
 * client-sent X-Loyalty-* headers are removed before the server's rewrite
 * phase, in every location, so that no variable, "set" copy, "if" or
 * "map" ever holds one, and no auth_request subrequest sees one.
 */

ngx_int_t
ngx_http_loyalty_post_read_handler(ngx_http_request_t *r)
{
    ngx_http_loyalty_srv_conf_t  *lscf;

    lscf = ngx_http_get_module_srv_conf(r, ngx_http_loyalty_module);

    if (!lscf->strip || r != r->main) {
        return NGX_DECLINED;
    }

    if (ngx_http_loyalty_strip_headers(r) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return NGX_DECLINED;
}


/*
 * Server rewrite: a request that nginx refused while reading its headers
 * (a 400, say) and redirected to an error_page enters the phases here,
 * without the post-read phase.  Once the module has a ctx for the
 * request, the X-Loyalty-* headers in it are the module's own.
 */

ngx_int_t
ngx_http_loyalty_server_rewrite_handler(ngx_http_request_t *r)
{
    ngx_http_loyalty_srv_conf_t  *lscf;

    lscf = ngx_http_get_module_srv_conf(r, ngx_http_loyalty_module);

    if (!lscf->strip
        || r != r->main
        || !r->internal
        || ngx_http_loyalty_get_ctx(r))
    {
        return NGX_DECLINED;
    }

    if (ngx_http_loyalty_strip_headers(r) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return NGX_DECLINED;
}


/*
 * Precontent: the read comes after access checks and limits, so that a
 * request they refuse costs no Redis round trip.
 */

ngx_int_t
ngx_http_loyalty_handler(ngx_http_request_t *r)
{
    ngx_int_t                     rc;
    ngx_http_loyalty_ctx_t       *ctx;
    ngx_http_loyalty_loc_conf_t  *llcf;

    if (r != r->main) {
        return NGX_DECLINED;
    }

    llcf = ngx_http_get_module_loc_conf(r, ngx_http_loyalty_module);

    if (!llcf->enable || llcf->noread) {
        return NGX_DECLINED;
    }

    ctx = ngx_http_loyalty_get_ctx(r);

    if (ctx == NULL || !ctx->started) {
        return ngx_http_loyalty_lookup(r, NULL);
    }

    if (ctx->waiting) {
        return NGX_AGAIN;
    }

    /* resumed after the read, or entered again after a redirect */

    rc = ctx->rc;
    ctx->rc = NGX_DECLINED;

    return rc;
}


static ngx_http_loyalty_ctx_t *
ngx_http_loyalty_create_ctx(ngx_http_request_t *r)
{
    ngx_pool_cleanup_t      *cln;
    ngx_http_loyalty_ctx_t  *ctx;

    ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_loyalty_ctx_t));
    if (ctx == NULL) {
        return NULL;
    }

    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        return NULL;
    }

    cln->handler = ngx_http_loyalty_cleanup;
    cln->data = ctx;

    ctx->request = r;
    ctx->rc = NGX_DECLINED;
    ngx_http_set_ctx(r, ctx, ngx_http_loyalty_module);

    return ctx;
}


/*
 * Identifies the customer and starts the read: for the precontent phase
 * (content is NULL), or for a content handler, which "content" completes
 * once the record is read.  Returns what the phase or the content handler
 * returns; NGX_DONE while Redis reads.
 */

ngx_int_t
ngx_http_loyalty_lookup(ngx_http_request_t *r,
    ngx_http_loyalty_content_pt content)
{
    ngx_int_t                     rc;
    ngx_http_loyalty_ctx_t       *ctx;
    ngx_http_loyalty_loc_conf_t  *llcf;

    llcf = ngx_http_get_module_loc_conf(r, ngx_http_loyalty_module);

    ctx = ngx_http_loyalty_get_ctx(r);

    if (ctx == NULL) {
        ctx = ngx_http_loyalty_create_ctx(r);
        if (ctx == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
    }

    /* the request is bound to this location from now on */

    ctx->conf = llcf;
    ctx->started = 1;
    ctx->content = content;

    rc = ngx_http_loyalty_identify(r, llcf, ctx);

    if (rc == NGX_ERROR) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (rc == NGX_OK) {
        rc = ngx_http_loyalty_read(r, llcf, ctx);

        if (rc == NGX_AGAIN) {
            ctx->waiting = 1;

            r->read_event_handler = ngx_http_test_reading;
            r->write_event_handler = ngx_http_request_empty_handler;
            r->main->count++;

            return NGX_DONE;
        }

        if (rc == NGX_ERROR) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        ctx->status = NGX_HTTP_LOYALTY_UNAVAILABLE;
    }

    ngx_http_loyalty_finish(r, ctx);

    if (content) {
        return content(r, ctx);
    }

    rc = ctx->rc;
    ctx->rc = NGX_DECLINED;

    return rc;
}


uint64_t
ngx_http_loyalty_usec(void)
{
    struct timespec  ts;

    (void) clock_gettime(CLOCK_MONOTONIC, &ts);

    return (uint64_t) ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}


/*
 * The ctx, also after an internal redirect, which zeroes the module ctx
 * of the request but keeps its pool.
 */

ngx_http_loyalty_ctx_t *
ngx_http_loyalty_get_ctx(ngx_http_request_t *r)
{
    ngx_pool_cleanup_t      *cln;
    ngx_http_loyalty_ctx_t  *ctx;

    r = r->main;

    ctx = ngx_http_get_module_ctx(r, ngx_http_loyalty_module);

    if (ctx == NULL && (r->internal || r->filter_finalize)) {

        for (cln = r->pool->cleanup; cln; cln = cln->next) {
            if (cln->handler == ngx_http_loyalty_cleanup) {
                ctx = cln->data;
                ngx_http_set_ctx(r, ctx, ngx_http_loyalty_module);
                break;
            }
        }
    }

    return ctx;
}


/* NGX_OK when a valid customer id is found, NGX_DECLINED when none */

static ngx_int_t
ngx_http_loyalty_identify(ngx_http_request_t *r,
    ngx_http_loyalty_loc_conf_t *llcf, ngx_http_loyalty_ctx_t *ctx)
{
    ngx_str_t  id;

    if (llcf->customer == NULL) {
        ctx->status = NGX_HTTP_LOYALTY_ANONYMOUS;
        return NGX_DECLINED;
    }

    if (ngx_http_complex_value(r, llcf->customer, &id) != NGX_OK) {
        return NGX_ERROR;
    }

    if (id.len == 0) {
        ctx->status = NGX_HTTP_LOYALTY_ANONYMOUS;
        return NGX_DECLINED;
    }

    if (llcf->secrets) {
        if (ngx_http_loyalty_verify(&id, llcf->secrets->elts,
                                    llcf->secrets->nelts, &id)
            != NGX_OK)
        {
            ngx_http_loyalty_invalid(r, "invalid customer signature");
            ctx->status = NGX_HTTP_LOYALTY_INVALID;
            return NGX_DECLINED;
        }
    }

    if (ngx_http_loyalty_valid_id(id.data, id.len) != NGX_OK) {
        ngx_http_loyalty_invalid(r, "invalid customer id");
        ctx->status = NGX_HTTP_LOYALTY_INVALID;
        return NGX_DECLINED;
    }

    ctx->customer = id;

    return NGX_OK;
}


/*
 * Anyone can send any cookie: one warning a second per worker at most,
 * with the count of those not logged.  The value itself is not logged.
 */

static void
ngx_http_loyalty_invalid(ngx_http_request_t *r, const char *why)
{
    ngx_uint_t                     more;
    ngx_http_loyalty_main_conf_t  *lmcf;

    lmcf = ngx_http_get_module_main_conf(r, ngx_http_loyalty_module);

    if (ngx_http_loyalty_log_limit(&lmcf->invalid_log, &more) != NGX_OK) {
        return;
    }

    if (more) {
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "loyalty: %s, treated as anonymous (%ui more not "
                      "logged)", why, more);
        return;
    }

    ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                  "loyalty: %s, treated as anonymous", why);
}


/*
 * NGX_OK when a warning of this kind may be logged now, at most once a
 * second per worker: "suppressed" is then how many were not logged since
 * the last one.
 */

ngx_int_t
ngx_http_loyalty_log_limit(ngx_http_loyalty_log_limit_t *limit,
    ngx_uint_t *suppressed)
{
    time_t  now;

    now = ngx_time();

    if (limit->logged == now) {
        limit->suppressed++;
        return NGX_DECLINED;
    }

    limit->logged = now;

    *suppressed = limit->suppressed;
    limit->suppressed = 0;

    return NGX_OK;
}


/* NGX_AGAIN while the record is read, NGX_DECLINED when Redis is down */

static ngx_int_t
ngx_http_loyalty_read(ngx_http_request_t *r,
    ngx_http_loyalty_loc_conf_t *llcf, ngx_http_loyalty_ctx_t *ctx)
{
    u_char      *p;
    ngx_str_t    argv[2 + NGX_HTTP_LOYALTY_NFIELDS];
    ngx_uint_t   i;
    u_char       key[NGX_HTTP_LOYALTY_KEY_LEN];

    ngx_str_set(&argv[0], "HMGET");

    /* the command is copied into the connection's buffer when queued */

    p = ngx_http_loyalty_hash_key(key, &llcf->prefix, ctx->customer.data,
                                  ctx->customer.len);

    argv[1].data = key;
    argv[1].len = p - key;

    for (i = 0; i < NGX_HTTP_LOYALTY_NFIELDS; i++) {
        argv[2 + i] = ngx_http_loyalty_record_fields[i];
    }

    ctx->cmd = ngx_http_loyalty_redis_send(llcf->server, &argv[1],
                                           2 + NGX_HTTP_LOYALTY_NFIELDS,
                                           argv, llcf->timeout,
                                           ngx_http_loyalty_read_handler,
                                           ctx, r->connection->log);

    if (ctx->cmd == NULL) {
        return NGX_DECLINED;
    }

    ctx->sent = ngx_http_loyalty_usec();

    return NGX_AGAIN;
}


static void
ngx_http_loyalty_read_handler(void *data, ngx_int_t rc,
    ngx_http_loyalty_reply_t *reply)
{
    ngx_connection_t        *c;
    ngx_http_request_t      *r;
    ngx_http_loyalty_ctx_t  *ctx;

    ctx = data;

    if (rc == NGX_ABORT) {
        /* the worker exits: the request is gone, its cleanup to come */
        ctx->cmd = NULL;
        return;
    }

    r = ctx->request;
    c = r->connection;

    ngx_http_set_log_request(c->log, r);

    ctx->cmd = NULL;
    ctx->waiting = 0;

    if (reply == NULL) {
        ctx->status = NGX_HTTP_LOYALTY_UNAVAILABLE;

    } else {
        ngx_http_loyalty_count_latency(
                   ngx_http_get_module_main_conf(r, ngx_http_loyalty_module),
                   ngx_http_loyalty_usec() - ctx->sent);

        ctx->status = ngx_http_loyalty_parse_record(r, ctx, reply);
    }

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, c->log, 0,
                   "loyalty read \"%V\": %V", &ctx->customer,
                   ngx_http_loyalty_status_name(ctx->status));

    ngx_http_loyalty_finish(r, ctx);

    if (ctx->content) {
        ngx_http_finalize_request(r, ctx->content(r, ctx));
        ngx_http_run_posted_requests(c);
        return;
    }

    r->read_event_handler = ngx_http_block_reading;
    r->write_event_handler = ngx_http_core_run_phases;

    ngx_http_core_run_phases(r);

    ngx_http_finalize_request(r, NGX_DONE);
    ngx_http_run_posted_requests(c);
}


static ngx_uint_t
ngx_http_loyalty_parse_record(ngx_http_request_t *r,
    ngx_http_loyalty_ctx_t *ctx, ngx_http_loyalty_reply_t *reply)
{
    ngx_int_t                      rc;
    ngx_uint_t                     i, bad, more;
    ngx_http_loyalty_main_conf_t  *lmcf;

    if (reply->type == NGX_HTTP_LOYALTY_REPLY_ERROR) {

        /* -LOADING, -NOAUTH, -BUSY: every read gets one */

        lmcf = ngx_http_get_module_main_conf(r, ngx_http_loyalty_module);

        if (ngx_http_loyalty_log_limit(&lmcf->error_reply_log, &more)
            != NGX_OK)
        {
            return NGX_HTTP_LOYALTY_UNAVAILABLE;
        }

        if (more) {
            ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                          "loyalty: redis error reading customer \"%V\": "
                          "\"%V\" (%ui more not logged)",
                          &ctx->customer, &reply->str, more);

        } else {
            ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                          "loyalty: redis error reading customer \"%V\": "
                          "\"%V\"", &ctx->customer, &reply->str);
        }

        return NGX_HTTP_LOYALTY_UNAVAILABLE;
    }

    rc = ngx_http_loyalty_reply_record(reply, &ctx->record, ngx_time(),
                                       &bad);

    if (rc == NGX_ERROR) {
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "loyalty: unexpected redis reply reading customer "
                      "\"%V\"", &ctx->customer);
        return NGX_HTTP_LOYALTY_UNAVAILABLE;
    }

    for (i = 0; bad; i++, bad >>= 1) {
        if (bad & 1) {
            ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                          "loyalty: customer \"%V\" has an invalid \"%V\" "
                          "field, taken as 0",
                          &ctx->customer, &ngx_http_loyalty_record_fields[i]);
        }
    }

    return (rc == NGX_OK) ? NGX_HTTP_LOYALTY_OK : NGX_HTTP_LOYALTY_NEW;
}


/*
 * Tier, offer and request headers; ctx->rc is what the phase handler
 * returns: NGX_DECLINED to go on, or an error status.
 */

static void
ngx_http_loyalty_finish(ngx_http_request_t *r, ngx_http_loyalty_ctx_t *ctx)
{
    ngx_http_loyalty_shctx_t      *sh;
    ngx_http_loyalty_loc_conf_t   *llcf;
    ngx_http_loyalty_main_conf_t  *lmcf;

    llcf = ctx->conf;
    lmcf = ngx_http_get_module_main_conf(r, ngx_http_loyalty_module);

    sh = lmcf->sh;

    ctx->done = 1;

    if (ctx->status == NGX_HTTP_LOYALTY_OK
        || ctx->status == NGX_HTTP_LOYALTY_NEW)
    {
        if (llcf->tiers) {
            ctx->tier = ngx_http_loyalty_select_tier(llcf->tiers->elts,
                                                     llcf->tiers->nelts,
                                                     ctx->record.lifetime);
        }

        if (llcf->offers) {
            ctx->offer = ngx_http_loyalty_select_offer(llcf->offers->elts,
                                                       llcf->offers->nelts,
                                                       &ctx->record,
                                                       ctx->tier,
                                                       ngx_time(),
                                                   ngx_http_loyalty_offer_cond,
                                                       r);
        }

        /*
         * a balance lookup only reports the offer: the request that
         * carries it to the shop is the one that may convert
         */

        if (ctx->offer && ctx->offer->slot && ctx->content == NULL) {
            ngx_http_loyalty_count(sh, offers[ctx->offer->slot - 1].shown);
        }
    }

    ngx_http_loyalty_count(sh, requests[ctx->status]);

    if (ctx->content) {
        return;
    }

    if (ctx->status == NGX_HTTP_LOYALTY_UNAVAILABLE
        && llcf->fail == NGX_HTTP_LOYALTY_FAIL_REJECT)
    {
        ctx->rc = NGX_HTTP_SERVICE_UNAVAILABLE;
        return;
    }

    if (llcf->request_headers
        && ngx_http_loyalty_set_request_headers(r, ctx) != NGX_OK)
    {
        ctx->rc = NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
}


static ngx_int_t
ngx_http_loyalty_offer_cond(void *data, void *cond)
{
    ngx_str_t            value;
    ngx_http_request_t  *r;

    r = data;

    if (ngx_http_complex_value(r, cond, &value) != NGX_OK) {
        return NGX_ERROR;
    }

    if (value.len == 0 || (value.len == 1 && value.data[0] == '0')) {
        return NGX_DECLINED;
    }

    return NGX_OK;
}


static void
ngx_http_loyalty_cleanup(void *data)
{
    ngx_http_loyalty_ctx_t  *ctx = data;

    if (ctx->cmd) {
        ngx_http_loyalty_redis_cancel(ctx->cmd);
        ctx->cmd = NULL;
    }
}


ngx_int_t
ngx_http_loyalty_filter_init(ngx_conf_t *cf)
{
    ngx_http_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_http_loyalty_header_filter;

    return NGX_OK;
}


/*
 * The response headers are known: credit a confirmed order, once per
 * request whatever redirects and error pages it went through, with the
 * settings of the location where the read ran, not of the one the request
 * ended in (which may have other settings, or none).
 */

static ngx_int_t
ngx_http_loyalty_header_filter(ngx_http_request_t *r)
{
    ngx_uint_t                    status;
    ngx_http_loyalty_ctx_t       *ctx;
    ngx_http_loyalty_loc_conf_t  *llcf;

    if (r != r->main) {
        return ngx_http_next_header_filter(r);
    }

    ctx = ngx_http_loyalty_get_ctx(r);

    if (ctx == NULL || !ctx->done || ctx->filtered || ctx->balance) {
        return ngx_http_next_header_filter(r);
    }

    ctx->filtered = 1;

    llcf = ctx->conf;

    status = r->headers_out.status;

    if (llcf->earn
        && status >= NGX_HTTP_OK && status < NGX_HTTP_SPECIAL_RESPONSE
        && (ctx->status == NGX_HTTP_LOYALTY_OK
            || ctx->status == NGX_HTTP_LOYALTY_NEW
            || ctx->status == NGX_HTTP_LOYALTY_UNAVAILABLE))
    {
        if (ngx_http_loyalty_credit(r, ctx) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    if (llcf->response_headers
        && ngx_http_loyalty_set_response_headers(r, ctx) != NGX_OK)
    {
        return NGX_ERROR;
    }

    return ngx_http_next_header_filter(r);
}
