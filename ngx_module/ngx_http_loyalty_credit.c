
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include "ngx_http_loyalty_module.h"
#include "ngx_http_loyalty_redis.h"
#include "ngx_http_loyalty_credit.h"


/*
 * Credits: one atomic script per confirmed order, sent by EVALSHA and
 * never waited for by the request.  A credit that fails is retried from a
 * bounded per-worker queue while the worker lives; one that cannot be
 * applied goes to the journal, so none is lost.
 *
 * New credits leave a few per event loop iteration.  Redis answers the
 * commands it read together only after it has run all of them, so the
 * read of a checkout that follows a burst of credit scripts would wait
 * for the whole burst; in small portions they delay the reads much less.
 * Each iteration sends an eighth of those waiting, at least
 * NGX_HTTP_LOYALTY_FLUSH_MIN, so a backlog drains in a few iterations,
 * and at most NGX_HTTP_LOYALTY_FLUSH_MAX, which keeps them well within
 * the connection's output buffer.  A worker that shuts down gracefully
 * sends them all before it exits: the deadline of the credits in flight
 * is a timer that keeps it alive.
 */


#if (nginx_version < 1017005)
#error ngx_http_loyalty_module needs nginx 1.17.5 or later
#endif


#define NGX_HTTP_LOYALTY_CREDITS_MAX   16384
#define NGX_HTTP_LOYALTY_RETRY_MAX     8192
#define NGX_HTTP_LOYALTY_ATTEMPTS_MAX  5
#define NGX_HTTP_LOYALTY_RETRY_DELAY   1000
#define NGX_HTTP_LOYALTY_RETRY_BATCH   10
#define NGX_HTTP_LOYALTY_FLUSH_MIN     4
#define NGX_HTTP_LOYALTY_FLUSH_MAX     64


struct ngx_http_loyalty_credits_s {
    ngx_pool_t                    *pool;
    ngx_http_loyalty_main_conf_t  *lmcf;
    ngx_queue_t                    free;
    ngx_queue_t                    retry;
    ngx_uint_t                     nretry;
    ngx_queue_t                    waiting;
    ngx_uint_t                     nwaiting;
    ngx_event_t                    flush;
    ngx_uint_t                     ncredits;
    ngx_event_t                    timer;
    ngx_log_t                     *log;
};


static ngx_int_t ngx_http_loyalty_credit_earned(ngx_http_request_t *r,
    ngx_http_loyalty_ctx_t *ctx, ngx_http_loyalty_credit_t *cr);
static ngx_int_t ngx_http_loyalty_credit_redeem(ngx_http_request_t *r,
    ngx_http_loyalty_ctx_t *ctx, ngx_http_loyalty_credit_t *cr);
static ngx_int_t ngx_http_loyalty_credit_order(ngx_http_request_t *r,
    ngx_http_loyalty_ctx_t *ctx, ngx_http_loyalty_credit_t *cr);
static void ngx_http_loyalty_credit_post(ngx_http_loyalty_credit_t *cr,
    ngx_log_t *log);
static ngx_int_t ngx_http_loyalty_credit_send(ngx_http_loyalty_credit_t *cr,
    ngx_log_t *log);
static void ngx_http_loyalty_credit_wait(ngx_http_loyalty_credit_t *cr);
static void ngx_http_loyalty_credit_handler(void *data, ngx_int_t rc,
    ngx_http_loyalty_reply_t *reply);
static void ngx_http_loyalty_credit_waited(void *data, ngx_int_t rc,
    ngx_http_loyalty_reply_t *reply);
static void ngx_http_loyalty_credit_done(ngx_http_loyalty_credit_t *cr);
static void ngx_http_loyalty_credit_unwait(ngx_http_loyalty_credit_t *cr);
static void ngx_http_loyalty_credit_retry(ngx_http_loyalty_credit_t *cr,
    const char *reason, ngx_log_t *log);
static ngx_int_t ngx_http_loyalty_credit_loaded(
    ngx_http_loyalty_reply_t *reply, void *data, ngx_log_t *log);
static void ngx_http_loyalty_credit_timer(ngx_event_t *ev);
static void ngx_http_loyalty_credit_flush(ngx_event_t *ev);
static void ngx_http_loyalty_credit_journal_all(ngx_queue_t *queue,
    ngx_log_t *log);
static ngx_http_loyalty_credit_t *ngx_http_loyalty_credit_alloc(
    ngx_http_loyalty_credits_t *credits);
static void ngx_http_loyalty_credit_free(ngx_http_loyalty_credit_t *cr);
static uint64_t ngx_http_loyalty_credit_redeemed(
    ngx_http_loyalty_reply_t *done);


/*
 * Called from the header filter of a 2xx main request: evaluates the
 * order, fills in ctx->earned and ctx->redeemed and sends the credit, all
 * as the location of the read says (ctx->conf).  The credit is made up
 * on the stack, a step each for the points earned, the points redeemed
 * and the order id; a step that finds nothing to credit says
 * NGX_DECLINED, having logged why.
 */

ngx_int_t
ngx_http_loyalty_credit(ngx_http_request_t *r, ngx_http_loyalty_ctx_t *ctx)
{
    ngx_int_t                   rc;
    ngx_http_loyalty_credit_t  *cr, local;

    local.lmcf = ngx_http_get_module_main_conf(r, ngx_http_loyalty_module);
    local.conf = ctx->conf;

    rc = ngx_http_loyalty_credit_earned(r, ctx, &local);

    if (rc == NGX_OK) {
        rc = ngx_http_loyalty_credit_redeem(r, ctx, &local);
    }

    if (rc == NGX_OK) {
        rc = ngx_http_loyalty_credit_order(r, ctx, &local);
    }

    if (rc != NGX_OK) {
        return (rc == NGX_DECLINED) ? NGX_OK : NGX_ERROR;
    }

    ctx->credited = 1;
    ctx->earned = local.earned;
    ctx->redeemed = ngx_min(local.redeem, ctx->record.points);

    local.credits = local.lmcf->credits;
    local.offer = ctx->offer ? ctx->offer->slot : 0;
    local.ts = ngx_time();
    local.attempts = 0;
    local.cmd = NULL;
    local.wait = NULL;
    local.eval = 0;
    local.applied = 0;
    local.shortfall = 0;
    local.replied = 0;
    local.customer_len = ctx->customer.len;
    ngx_memcpy(local.customer, ctx->customer.data, ctx->customer.len);

    /* on the stack only when it goes straight to the journal */

    cr = local.credits ? ngx_http_loyalty_credit_alloc(local.credits) : NULL;

    if (cr == NULL) {
        ngx_http_loyalty_journal(&local,
                                 local.credits ? "too many credits queued"
                                               : "no worker state",
                                 r->connection->log);
        return NGX_OK;
    }

    *cr = local;

    ngx_http_loyalty_credit_post(cr, r->connection->log);

    return NGX_OK;
}


/* the amount of the order, as given, and the points it earns */

static ngx_int_t
ngx_http_loyalty_credit_earned(ngx_http_request_t *r,
    ngx_http_loyalty_ctx_t *ctx, ngx_http_loyalty_credit_t *cr)
{
    uint64_t                      amount, multiplier;
    ngx_str_t                     total;
    ngx_http_loyalty_loc_conf_t  *llcf;

    llcf = cr->conf;

    if (ngx_http_complex_value(r, llcf->earn, &total) != NGX_OK) {
        return NGX_ERROR;
    }

    if (total.len == 0) {
        /* no order */
        return NGX_DECLINED;
    }

    if (ngx_http_loyalty_parse_amount(total.data, total.len, &amount)
        != NGX_OK)
    {
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "loyalty: customer \"%V\": invalid amount \"%V\", "
                      "nothing credited", &ctx->customer, &total);
        return NGX_DECLINED;
    }

    multiplier = ctx->tier ? ctx->tier->multiplier
                           : NGX_HTTP_LOYALTY_FRAC_ONE;

    if (ngx_http_loyalty_earned(amount, llcf->earn_rate, multiplier,
                                &cr->earned)
        != NGX_OK)
    {
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "loyalty: customer \"%V\": amount \"%V\" earns more "
                      "than %uL points, nothing credited",
                      &ctx->customer, &total,
                      (uint64_t) NGX_HTTP_LOYALTY_EARN_MAX);
        return NGX_DECLINED;
    }

    cr->amount_len = total.len;
    ngx_memcpy(cr->amount, total.data, total.len);

    return NGX_OK;
}


/* the points redeemed: none when not given, or not valid */

static ngx_int_t
ngx_http_loyalty_credit_redeem(ngx_http_request_t *r,
    ngx_http_loyalty_ctx_t *ctx, ngx_http_loyalty_credit_t *cr)
{
    ngx_str_t                     value;
    ngx_http_loyalty_loc_conf_t  *llcf;

    llcf = cr->conf;

    cr->redeem = 0;

    if (llcf->redeem == NULL) {
        return NGX_OK;
    }

    if (ngx_http_complex_value(r, llcf->redeem, &value) != NGX_OK) {
        return NGX_ERROR;
    }

    if (value.len
        && ngx_http_loyalty_parse_redeem(value.data, value.len, &cr->redeem)
           != NGX_OK)
    {
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "loyalty: customer \"%V\": invalid redeem \"%V\", "
                      "nothing redeemed", &ctx->customer, &value);
        cr->redeem = 0;
    }

    return NGX_OK;
}


/* the order id: loyalty_order_id, else the request id */

static ngx_int_t
ngx_http_loyalty_credit_order(ngx_http_request_t *r,
    ngx_http_loyalty_ctx_t *ctx, ngx_http_loyalty_credit_t *cr)
{
    ngx_str_t  order;

    if (ngx_http_complex_value(r, cr->conf->order_id, &order) != NGX_OK) {
        return NGX_ERROR;
    }

    if (order.len == 0
        && ngx_http_complex_value(r, &cr->lmcf->request_id, &order)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (ngx_http_loyalty_valid_order(order.data, order.len) != NGX_OK) {
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "loyalty: customer \"%V\": invalid order id \"%V\", "
                      "nothing credited", &ctx->customer, &order);
        return NGX_DECLINED;
    }

    cr->order_len = order.len;
    ngx_memcpy(cr->order, order.data, order.len);

    return NGX_OK;
}


/* a new credit waits for the flush, which sends a few per iteration */

static void
ngx_http_loyalty_credit_post(ngx_http_loyalty_credit_t *cr, ngx_log_t *log)
{
    ngx_http_loyalty_credits_t  *credits;

    credits = cr->credits;

    ngx_log_debug6(NGX_LOG_DEBUG_HTTP, log, 0,
                   "loyalty credit \"%*s\" order \"%*s\": %uL earned, "
                   "%uL redeemed", cr->customer_len, cr->customer,
                   cr->order_len, cr->order, cr->earned, cr->redeem);

    ngx_queue_insert_tail(&credits->waiting, &cr->queue);
    credits->nwaiting++;

    if (!credits->flush.posted) {
        ngx_post_event(&credits->flush, &ngx_posted_events);
    }
}


static ngx_int_t
ngx_http_loyalty_credit_send(ngx_http_loyalty_credit_t *cr, ngx_log_t *log)
{
    u_char                        *p;
    ngx_str_t                      argv[16];
    ngx_msec_t                     timeout;
    ngx_http_loyalty_cmd_t        *cmd;
    ngx_http_loyalty_server_t     *server;
    ngx_http_loyalty_loc_conf_t   *llcf;
    ngx_http_loyalty_main_conf_t  *lmcf;
    u_char                         keys[3 * (NGX_HTTP_LOYALTY_PREFIX_MAX
                                             + NGX_HTTP_LOYALTY_ID_MAX
                                             + NGX_HTTP_LOYALTY_ORDER_MAX
                                             + sizeof("{}:order:"))];
    u_char                         nums[7 * NGX_INT64_LEN];

    llcf = cr->conf;
    lmcf = cr->lmcf;

    if (cr->eval) {
        ngx_str_set(&argv[0], "EVAL");
        argv[1] = lmcf->script;

    } else {
        ngx_str_set(&argv[0], "EVALSHA");
        argv[1].data = lmcf->script_sha;
        argv[1].len = NGX_HTTP_LOYALTY_SHA1_LEN;
    }

    ngx_str_set(&argv[2], "3");

    /* the lengths are bounded by the id, order and prefix checks */

    p = keys;

    argv[3].data = p;
    p = ngx_http_loyalty_hash_key(p, &llcf->prefix, cr->customer,
                                  cr->customer_len);
    argv[3].len = p - argv[3].data;

    argv[4].data = p;
    p = ngx_cpymem(p, argv[3].data, argv[3].len);
    p = ngx_cpymem(p, ":order:", sizeof(":order:") - 1);
    p = ngx_cpymem(p, cr->order, cr->order_len);
    argv[4].len = p - argv[4].data;

    argv[5].data = p;
    p = ngx_cpymem(p, argv[3].data, argv[3].len);
    p = ngx_cpymem(p, ":ledger", sizeof(":ledger") - 1);
    argv[5].len = p - argv[5].data;

    p = nums;

    argv[6].data = p;
    p = ngx_http_loyalty_write_uint(p, cr->earned);
    argv[6].len = p - argv[6].data;

    argv[7].data = p;
    p = ngx_http_loyalty_write_uint(p, cr->redeem);
    argv[7].len = p - argv[7].data;

    argv[8].data = p;
    p = ngx_http_loyalty_write_uint(p, (uint64_t) cr->ts);
    argv[8].len = p - argv[8].data;

    argv[9].data = p;
    p = ngx_http_loyalty_write_uint(p, (uint64_t) llcf->ledger);
    argv[9].len = p - argv[9].data;

    argv[10].data = p;
    p = ngx_http_loyalty_write_uint(p, (uint64_t) llcf->expire);
    argv[10].len = p - argv[10].data;

    argv[11].data = cr->order;
    argv[11].len = cr->order_len;

    argv[12].data = cr->amount;
    argv[12].len = cr->amount_len;

    ngx_str_set(&argv[13], "");

    argv[14].data = p;
    p = ngx_http_loyalty_write_uint(p, (uint64_t) llcf->order_ttl);
    argv[14].len = p - argv[14].data;

    /* the release time of the order's points, when they are locked */

    argv[15].data = p;
    p = ngx_http_loyalty_write_uint(p, llcf->pending
                                       ? (uint64_t) (cr->ts + llcf->pending)
                                       : 0);
    argv[15].len = p - argv[15].data;

    server = llcf->server;
    timeout = llcf->timeout;

    if (llcf->credit_wait) {
        /*
         * the credits' own connection, where a credit may follow the WAIT
         * of another; and a duplicate writes too, so that the WAIT behind
         * it covers the order's first write
         */

        server = server->credits;
        timeout += llcf->credit_wait_time;
        ngx_str_set(&argv[13], "1");
    }

    cmd = ngx_http_loyalty_redis_send(server, &argv[3], 16, argv, timeout,
                                      ngx_http_loyalty_credit_handler, cr,
                                      log);
    if (cmd == NULL) {
        return NGX_DECLINED;
    }

    cr->cmd = cmd;
    cr->replied = 0;

    if (llcf->credit_wait) {
        ngx_http_loyalty_credit_wait(cr);
    }

    return NGX_OK;
}


/*
 * loyalty_credit_wait: "WAIT replicas time" right behind the credit, on
 * the connection that runs it.  A credit that no WAIT can follow (the
 * connection's buffer is full) proves nothing: its reply, which tells
 * what it did, sends it again.
 */

static void
ngx_http_loyalty_credit_wait(ngx_http_loyalty_credit_t *cr)
{
    u_char                       *p;
    ngx_str_t                     argv[3];
    ngx_http_loyalty_loc_conf_t  *llcf;
    u_char                        nums[2 * NGX_INT_T_LEN];

    llcf = cr->conf;

    ngx_str_set(&argv[0], "WAIT");

    p = nums;

    argv[1].data = p;
    p = ngx_sprintf(p, "%ui", llcf->credit_wait);
    argv[1].len = p - argv[1].data;

    argv[2].data = p;
    p = ngx_sprintf(p, "%M", llcf->credit_wait_time);
    argv[2].len = p - argv[2].data;

    cr->wait = ngx_http_loyalty_redis_send_after(cr->cmd, 3, argv,
                                                 2 * llcf->credit_wait_time
                                                 + llcf->timeout,
                                                 ngx_http_loyalty_credit_waited,
                                                 cr);
}


static void
ngx_http_loyalty_credit_handler(void *data, ngx_int_t rc,
    ngx_http_loyalty_reply_t *reply)
{
    ngx_log_t                  *log;
    ngx_uint_t                  redirected;
    ngx_http_loyalty_reply_t   *e;
    ngx_http_loyalty_credit_t  *cr;

    cr = data;
    log = cr->credits->log;

    /* sent again after a redirection, it is not what its WAIT follows */

    redirected = (cr->cmd->redirects != 0);
    cr->cmd = NULL;

    if (rc == NGX_ABORT) {
        ngx_http_loyalty_credit_unwait(cr);
        ngx_http_loyalty_journal(cr, "worker exiting", log);
        ngx_http_loyalty_credit_free(cr);
        return;
    }

    if (rc != NGX_OK) {
        ngx_http_loyalty_credit_unwait(cr);
        ngx_http_loyalty_credit_retry(cr, "redis unavailable", log);
        return;
    }

    if (reply->type == NGX_HTTP_LOYALTY_REPLY_ERROR) {

        ngx_http_loyalty_credit_unwait(cr);

        if (reply->str.len >= sizeof("NOSCRIPT") - 1
            && ngx_strncmp(reply->str.data, "NOSCRIPT",
                           sizeof("NOSCRIPT") - 1)
               == 0
            && !cr->eval)
        {
            /* the script cache was lost: send the script itself */

            cr->eval = 1;

            if (ngx_http_loyalty_credit_send(cr, log) != NGX_OK) {
                ngx_http_loyalty_credit_retry(cr, "redis unavailable", log);
            }

            return;
        }

        ngx_log_error(NGX_LOG_WARN, log, 0,
                      "loyalty: credit of order \"%*s\" for customer "
                      "\"%*s\" failed: \"%V\"",
                      cr->order_len, cr->order, cr->customer_len,
                      cr->customer, &reply->str);

        cr->attempts++;
        ngx_http_loyalty_credit_retry(cr, "error reply", log);
        return;
    }

    if (reply->type != NGX_HTTP_LOYALTY_REPLY_ARRAY
        || reply->nelts < 2
        || reply->element[0]->type != NGX_HTTP_LOYALTY_REPLY_INTEGER)
    {
        ngx_http_loyalty_credit_unwait(cr);

        ngx_log_error(NGX_LOG_WARN, log, 0,
                      "loyalty: unexpected reply to the credit of order "
                      "\"%*s\" for customer \"%*s\"",
                      cr->order_len, cr->order, cr->customer_len,
                      cr->customer);

        cr->attempts++;
        ngx_http_loyalty_credit_retry(cr, "unexpected reply", log);
        return;
    }

    /* what the order did is that of the attempt that applied it */

    if (reply->element[0]->integer != 0 && !cr->applied) {
        cr->applied = 1;

        e = (reply->nelts >= 4) ? reply->element[3] : NULL;

        if (e
            && e->type == NGX_HTTP_LOYALTY_REPLY_INTEGER
            && e->integer == 1)
        {
            cr->shortfall = 1;
            cr->redeemed =
                        ngx_http_loyalty_credit_redeemed(reply->element[1]);
        }
    }

    if (cr->conf->credit_wait == 0) {
        ngx_http_loyalty_credit_done(cr);
        return;
    }

    if (cr->wait == NULL || redirected) {
        /* no WAIT could follow it, or it went to another connection */

        ngx_http_loyalty_credit_unwait(cr);
        ngx_http_loyalty_credit_retry(cr, "no WAIT behind it", log);
        return;
    }

    cr->replied = 1;
}


/* the reply to the WAIT behind a credit, which decides once it is run */

static void
ngx_http_loyalty_credit_waited(void *data, ngx_int_t rc,
    ngx_http_loyalty_reply_t *reply)
{
    ngx_log_t                     *log;
    ngx_uint_t                     more;
    ngx_http_loyalty_credit_t     *cr;
    ngx_http_loyalty_main_conf_t  *lmcf;

    cr = data;
    log = cr->credits->log;

    cr->wait = NULL;

    if (!cr->replied) {
        /* the credit was redirected: its own reply sends it again */
        return;
    }

    cr->replied = 0;

    if (rc == NGX_ABORT) {
        ngx_http_loyalty_journal(cr, "worker exiting", log);
        ngx_http_loyalty_credit_free(cr);
        return;
    }

    if (rc != NGX_OK) {
        ngx_http_loyalty_credit_retry(cr, "redis unavailable", log);
        return;
    }

    if (reply->type != NGX_HTTP_LOYALTY_REPLY_INTEGER) {
        ngx_log_error(NGX_LOG_WARN, log, 0,
                      "loyalty: WAIT after the credit of order \"%*s\" for "
                      "customer \"%*s\" failed: \"%V\"",
                      cr->order_len, cr->order, cr->customer_len,
                      cr->customer, &reply->str);

        cr->attempts++;
        ngx_http_loyalty_credit_retry(cr, "error reply", log);
        return;
    }

    if (reply->integer >= (long long) cr->conf->credit_wait) {
        ngx_http_loyalty_credit_done(cr);
        return;
    }

    /* the replicas may yet have it, or never will: it is sent again */

    lmcf = cr->lmcf;

    if (ngx_http_loyalty_log_limit(&lmcf->wait_log, &more) == NGX_OK) {
        ngx_log_error(NGX_LOG_WARN, log, 0,
                      "loyalty: credit of order \"%*s\" for customer "
                      "\"%*s\" reached %L of %ui replicas within %M ms, "
                      "sent again (%ui more not logged)",
                      cr->order_len, cr->order, cr->customer_len,
                      cr->customer, reply->integer, cr->conf->credit_wait,
                      cr->conf->credit_wait_time, more);
    }

    ngx_http_loyalty_credit_retry(cr, "not confirmed", log);
}


/* a credit has its final answer: counted, logged and freed */

static void
ngx_http_loyalty_credit_done(ngx_http_loyalty_credit_t *cr)
{
    ngx_log_t                 *log;
    ngx_http_loyalty_shctx_t  *sh;

    log = cr->credits->log;
    sh = cr->lmcf->sh;

    if (!cr->applied) {
        ngx_http_loyalty_count(sh, credits[NGX_HTTP_LOYALTY_DUPLICATE]);

        ngx_log_error(NGX_LOG_INFO, log, 0,
                      "loyalty: order \"%*s\" of customer \"%*s\" was "
                      "credited before",
                      cr->order_len, cr->order, cr->customer_len,
                      cr->customer);

        ngx_http_loyalty_credit_free(cr);
        return;
    }

    ngx_http_loyalty_count(sh, credits[NGX_HTTP_LOYALTY_APPLIED]);

    if (cr->offer) {
        ngx_http_loyalty_count(sh, offers[cr->offer - 1].converted);
    }

    if (cr->shortfall) {
        ngx_http_loyalty_count(sh, shortfall);

        ngx_log_error(NGX_LOG_WARN, log, 0,
                      "loyalty: order \"%*s\" of customer \"%*s\" "
                      "redeemed %uL points, %uL more than the balance",
                      cr->order_len, cr->order, cr->customer_len,
                      cr->customer, cr->redeem, cr->redeem - cr->redeemed);
    }

    ngx_http_loyalty_credit_free(cr);
}


/* the WAIT behind a credit that failed is of no use */

static void
ngx_http_loyalty_credit_unwait(ngx_http_loyalty_credit_t *cr)
{
    if (cr->wait) {
        ngx_http_loyalty_redis_cancel(cr->wait);
        cr->wait = NULL;
    }
}


static void
ngx_http_loyalty_credit_retry(ngx_http_loyalty_credit_t *cr,
    const char *reason, ngx_log_t *log)
{
    ngx_http_loyalty_credits_t  *credits;

    credits = cr->credits;

    if (cr->attempts >= NGX_HTTP_LOYALTY_ATTEMPTS_MAX) {
        ngx_http_loyalty_journal(cr, "retries exhausted", log);
        ngx_http_loyalty_credit_free(cr);
        return;
    }

    if (credits->nretry >= NGX_HTTP_LOYALTY_RETRY_MAX) {
        ngx_http_loyalty_journal(cr, "retry queue full", log);
        ngx_http_loyalty_credit_free(cr);
        return;
    }

    ngx_log_debug3(NGX_LOG_DEBUG_HTTP, log, 0,
                   "loyalty credit of order \"%*s\" queued: %s",
                   cr->order_len, cr->order, reason);

    ngx_http_loyalty_count(cr->lmcf->sh, credits[NGX_HTTP_LOYALTY_RETRIED]);

    ngx_queue_insert_tail(&credits->retry, &cr->queue);
    credits->nretry++;

    if (!credits->timer.timer_set) {
        ngx_add_timer(&credits->timer, NGX_HTTP_LOYALTY_RETRY_DELAY);
    }
}


static void
ngx_http_loyalty_credit_flush(ngx_event_t *ev)
{
    ngx_uint_t                   n;
    ngx_queue_t                 *q;
    ngx_http_loyalty_credit_t   *cr;
    ngx_http_loyalty_credits_t  *credits;

    credits = ev->data;

    n = ngx_max(NGX_HTTP_LOYALTY_FLUSH_MIN, credits->nwaiting / 8);
    n = ngx_min(n, NGX_HTTP_LOYALTY_FLUSH_MAX);

    while (n-- && !ngx_queue_empty(&credits->waiting)) {
        q = ngx_queue_head(&credits->waiting);
        ngx_queue_remove(q);
        credits->nwaiting--;

        cr = ngx_queue_data(q, ngx_http_loyalty_credit_t, queue);

        if (ngx_http_loyalty_credit_send(cr, credits->log) != NGX_OK) {
            ngx_http_loyalty_credit_retry(cr, "redis unavailable",
                                          credits->log);
        }
    }

    if (!ngx_queue_empty(&credits->waiting)) {
        ngx_post_event(ev, &ngx_posted_next_events);
    }
}


static void
ngx_http_loyalty_credit_timer(ngx_event_t *ev)
{
    ngx_uint_t                   n, sent;
    ngx_queue_t                 *q, retry;
    ngx_http_loyalty_credit_t   *cr;
    ngx_http_loyalty_credits_t  *credits;

    credits = ev->data;

    if (ngx_queue_empty(&credits->retry)) {
        return;
    }

    /* what cannot be sent now goes back to the queue, in order */

    retry = credits->retry;
    retry.next->prev = &retry;
    retry.prev->next = &retry;

    ngx_queue_init(&credits->retry);
    n = credits->nretry;
    credits->nretry = 0;

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, credits->log, 0,
                   "loyalty retrying %ui credits", n);

    sent = 0;

    while (!ngx_queue_empty(&retry)) {
        q = ngx_queue_head(&retry);
        ngx_queue_remove(q);

        cr = ngx_queue_data(q, ngx_http_loyalty_credit_t, queue);

        if (ngx_http_loyalty_credit_send(cr, credits->log) == NGX_OK) {
            sent++;
            continue;
        }

        /* Redis is down, or its output buffer full: the rest waits */

        ngx_queue_insert_tail(&credits->retry, &cr->queue);
        credits->nretry++;

        while (!ngx_queue_empty(&retry)) {
            q = ngx_queue_head(&retry);
            ngx_queue_remove(q);
            ngx_queue_insert_tail(&credits->retry, q);
            credits->nretry++;
        }
    }

    if (!ngx_queue_empty(&credits->retry)) {
        /* a busy connection takes the next batch as soon as it has room */
        ngx_add_timer(ev, sent ? NGX_HTTP_LOYALTY_RETRY_BATCH
                               : NGX_HTTP_LOYALTY_RETRY_DELAY);
    }
}


ngx_int_t
ngx_http_loyalty_credit_init_process(ngx_cycle_t *cycle,
    ngx_http_loyalty_main_conf_t *lmcf)
{
    ngx_str_t                    argv[3];
    ngx_uint_t                   i;
    ngx_http_loyalty_server_t  **server;
    ngx_http_loyalty_credits_t  *credits;

    credits = ngx_pcalloc(cycle->pool, sizeof(ngx_http_loyalty_credits_t));
    if (credits == NULL) {
        return NGX_ERROR;
    }

    credits->pool = ngx_create_pool(16384, cycle->log);
    if (credits->pool == NULL) {
        return NGX_ERROR;
    }

    credits->lmcf = lmcf;
    credits->log = cycle->log;

    ngx_queue_init(&credits->free);
    ngx_queue_init(&credits->retry);
    ngx_queue_init(&credits->waiting);

    credits->flush.handler = ngx_http_loyalty_credit_flush;
    credits->flush.data = credits;
    credits->flush.log = cycle->log;

    credits->timer.handler = ngx_http_loyalty_credit_timer;
    credits->timer.data = credits;
    credits->timer.log = cycle->log;
    credits->timer.cancelable = 1;

    lmcf->credits = credits;

    /* every connection loads the script, which credits name by its SHA1 */

    ngx_str_set(&argv[0], "SCRIPT");
    ngx_str_set(&argv[1], "LOAD");
    argv[2] = lmcf->script;

    server = lmcf->servers.elts;

    for (i = 0; i < lmcf->servers.nelts; i++) {
        if (ngx_http_loyalty_redis_add_setup(server[i], cycle->pool, 3, argv,
                                             ngx_http_loyalty_credit_loaded,
                                             NULL)
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/*
 * The reply to SCRIPT LOAD in a connection's handshake.  An error reply
 * fails the connection only when Redis serves nothing yet (still loading
 * its data, or wanting AUTH): otherwise credits send the script itself
 * after NOSCRIPT.
 */

static ngx_int_t
ngx_http_loyalty_credit_loaded(ngx_http_loyalty_reply_t *reply,
    void *data, ngx_log_t *log)
{
    if (reply->type != NGX_HTTP_LOYALTY_REPLY_ERROR) {
        return NGX_OK;
    }

    ngx_log_error(NGX_LOG_WARN, log, 0,
                  "loyalty: redis refused SCRIPT LOAD: \"%V\"", &reply->str);

    if ((reply->str.len >= sizeof("LOADING") - 1
         && ngx_strncmp(reply->str.data, "LOADING", sizeof("LOADING") - 1)
            == 0)
        || (reply->str.len >= sizeof("NOAUTH") - 1
            && ngx_strncmp(reply->str.data, "NOAUTH", sizeof("NOAUTH") - 1)
               == 0))
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* after the Redis connections: their failed credits are queued here */

void
ngx_http_loyalty_credit_exit_process(ngx_http_loyalty_main_conf_t *lmcf)
{
    ngx_http_loyalty_credits_t  *credits;

    credits = lmcf->credits;

    if (credits == NULL) {
        return;
    }

    ngx_http_loyalty_credit_journal_all(&credits->waiting, credits->log);
    ngx_http_loyalty_credit_journal_all(&credits->retry, credits->log);

    if (credits->flush.posted) {
        ngx_delete_posted_event(&credits->flush);
    }

    if (credits->timer.timer_set) {
        ngx_del_timer(&credits->timer);
    }

    ngx_destroy_pool(credits->pool);

    lmcf->credits = NULL;
}


static void
ngx_http_loyalty_credit_journal_all(ngx_queue_t *queue, ngx_log_t *log)
{
    ngx_queue_t                *q;
    ngx_http_loyalty_credit_t  *cr;

    while (!ngx_queue_empty(queue)) {
        q = ngx_queue_head(queue);
        ngx_queue_remove(q);

        cr = ngx_queue_data(q, ngx_http_loyalty_credit_t, queue);

        ngx_http_loyalty_journal(cr, "worker exiting", log);
    }
}


static ngx_http_loyalty_credit_t *
ngx_http_loyalty_credit_alloc(ngx_http_loyalty_credits_t *credits)
{
    ngx_queue_t                *q;
    ngx_http_loyalty_credit_t  *cr;

    if (!ngx_queue_empty(&credits->free)) {
        q = ngx_queue_head(&credits->free);
        ngx_queue_remove(q);

        return ngx_queue_data(q, ngx_http_loyalty_credit_t, queue);
    }

    if (credits->ncredits == NGX_HTTP_LOYALTY_CREDITS_MAX) {
        return NULL;
    }

    cr = ngx_palloc(credits->pool, sizeof(ngx_http_loyalty_credit_t));
    if (cr == NULL) {
        return NULL;
    }

    credits->ncredits++;

    return cr;
}


static void
ngx_http_loyalty_credit_free(ngx_http_loyalty_credit_t *cr)
{
    ngx_queue_insert_head(&cr->credits->free, &cr->queue);
}


/* "<earned>:<redeemed>[:...]", as the script marks an order */

static uint64_t
ngx_http_loyalty_credit_redeemed(ngx_http_loyalty_reply_t *done)
{
    u_char    *p, *q, *last;
    uint64_t   redeemed;

    if (done->type != NGX_HTTP_LOYALTY_REPLY_STRING) {
        return 0;
    }

    last = done->str.data + done->str.len;
    p = ngx_strlchr(done->str.data, last, ':');

    if (p == NULL) {
        return 0;
    }

    p++;
    q = ngx_strlchr(p, last, ':');

    if (q == NULL) {
        q = last;
    }

    if (ngx_http_loyalty_parse_uint(p, q - p, &redeemed) != NGX_OK) {
        return 0;
    }

    return redeemed;
}
