
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include "ngx_http_loyalty_module.h"
#include "ngx_http_loyalty_redis.h"


/*
 * Counters shared by all workers, and loyalty_status, the content handler
 * that reports them as Prometheus text.
 */


#define NGX_HTTP_LOYALTY_ZONE_SIZE     (64 * 1024)


typedef struct {
    ngx_uint_t                 usec;            /* upper bound */
    ngx_str_t                  le;              /* the same, in seconds */
} ngx_http_loyalty_bucket_t;


static ngx_int_t ngx_http_loyalty_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);
static ngx_uint_t ngx_http_loyalty_connections(ngx_http_loyalty_shctx_t *sh);
static ngx_int_t ngx_http_loyalty_status_handler(ngx_http_request_t *r);
static u_char *ngx_http_loyalty_status_requests(u_char *p,
    ngx_http_loyalty_shctx_t *sh);
static u_char *ngx_http_loyalty_status_redis(u_char *p,
    ngx_http_loyalty_shctx_t *sh);
static u_char *ngx_http_loyalty_status_latency(u_char *p,
    ngx_http_loyalty_shctx_t *sh);
static u_char *ngx_http_loyalty_status_credits(u_char *p,
    ngx_http_loyalty_shctx_t *sh);
static u_char *ngx_http_loyalty_status_api(u_char *p,
    ngx_http_loyalty_shctx_t *sh);
static u_char *ngx_http_loyalty_status_offers(u_char *p,
    ngx_http_loyalty_shctx_t *sh, ngx_uint_t n);
static u_char *ngx_http_loyalty_status_offer(u_char *p, char *metric,
    u_char *name, size_t len, ngx_atomic_uint_t value);


/* the latency buckets: loopback to LAN, up to 1 s */
static ngx_http_loyalty_bucket_t
    ngx_http_loyalty_buckets[NGX_HTTP_LOYALTY_BUCKETS] =
{
    { 100, ngx_string("0.0001") },
    { 250, ngx_string("0.00025") },
    { 500, ngx_string("0.0005") },
    { 1000, ngx_string("0.001") },
    { 2500, ngx_string("0.0025") },
    { 5000, ngx_string("0.005") },
    { 10000, ngx_string("0.01") },
    { 25000, ngx_string("0.025") },
    { 50000, ngx_string("0.05") },
    { 100000, ngx_string("0.1") },
    { 250000, ngx_string("0.25") },
    { 500000, ngx_string("0.5") },
    { 1000000, ngx_string("1") }
};


static ngx_str_t  ngx_http_loyalty_credit_results[] = {
    ngx_string("applied"),
    ngx_string("duplicate"),
    ngx_string("retried"),
    ngx_string("journaled")
};


static ngx_str_t  ngx_http_loyalty_status_type =
    ngx_string("text/plain; version=0.0.4; charset=utf-8");


ngx_int_t
ngx_http_loyalty_status_zone(ngx_conf_t *cf,
    ngx_http_loyalty_main_conf_t *lmcf)
{
    ngx_str_t        name;
    ngx_shm_zone_t  *shm_zone;

    ngx_str_set(&name, "loyalty_status");

    shm_zone = ngx_shared_memory_add(cf, &name, NGX_HTTP_LOYALTY_ZONE_SIZE,
                                     &ngx_http_loyalty_module);
    if (shm_zone == NULL) {
        return NGX_ERROR;
    }

    shm_zone->init = ngx_http_loyalty_init_zone;
    shm_zone->data = lmcf;

    return NGX_OK;
}


/*
 * Runs in the master: counters survive a reload, offers are matched to
 * their counters by name, new names get new ones.
 */

static ngx_int_t
ngx_http_loyalty_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_loyalty_main_conf_t  *olmcf = data;

    size_t                         len;
    ngx_uint_t                     i, j;
    ngx_slab_pool_t               *shpool;
    ngx_http_loyalty_offer_t     **offer;
    ngx_http_loyalty_shctx_t      *sh;
    ngx_http_loyalty_main_conf_t  *lmcf;

    lmcf = shm_zone->data;
    shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (olmcf) {
        sh = olmcf->sh;

    } else if (shm_zone->shm.exists) {
        sh = shpool->data;

    } else {
        sh = ngx_slab_calloc(shpool, sizeof(ngx_http_loyalty_shctx_t));
        if (sh == NULL) {
            return NGX_ERROR;
        }

        shpool->data = sh;
    }

    lmcf->sh = sh;

    offer = lmcf->offers.elts;

    for (i = 0; i < lmcf->offers.nelts; i++) {

        len = ngx_min(offer[i]->name.len, NGX_HTTP_LOYALTY_NAME_MAX);

        for (j = 0; j < sh->noffers; j++) {
            if (sh->offers[j].len == len
                && ngx_strncmp(sh->offers[j].name, offer[i]->name.data, len)
                   == 0)
            {
                break;
            }
        }

        if (j == sh->noffers) {
            if (j == NGX_HTTP_LOYALTY_OFFERS_MAX) {
                ngx_log_error(NGX_LOG_WARN, shm_zone->shm.log, 0,
                              "loyalty: more than %d offer names, "
                              "\"%V\" is not counted",
                              NGX_HTTP_LOYALTY_OFFERS_MAX, &offer[i]->name);
                offer[i]->slot = 0;
                continue;
            }

            ngx_memcpy(sh->offers[j].name, offer[i]->name.data, len);
            sh->offers[j].len = len;
            sh->noffers++;
        }

        offer[i]->slot = j + 1;
    }

    return NGX_OK;
}


/*
 * The events of the Redis connections.  Not ngx_http_loyalty_count(): a
 * gauge, the decrement on close paired with the increment when ready, and
 * written only by the process that owns the slot.
 */

static void
ngx_http_loyalty_count_ready(void *data)
{
    ngx_http_loyalty_shctx_t  *sh = data;

    sh->processes[ngx_process_slot].connections++;
}


static void
ngx_http_loyalty_count_close(void *data)
{
    ngx_http_loyalty_shctx_t  *sh = data;

    sh->processes[ngx_process_slot].connections--;
}


/* redirections, refreshes and failovers of a Redis Cluster */

static void
ngx_http_loyalty_count_cluster(void *data, ngx_uint_t what)
{
    ngx_http_loyalty_shctx_t  *sh = data;

    ngx_http_loyalty_count(sh, cluster[what]);
}


/*
 * A process takes over the gauges of its slot in ngx_processes[]: the
 * worker that ran there before (and may have died with connections open)
 * counts no more.  Slots, not ngx_worker numbers: after a reload the old
 * workers, still running, keep theirs.
 */

void
ngx_http_loyalty_status_init_process(ngx_http_loyalty_main_conf_t *lmcf)
{
    ngx_uint_t                   i;
    ngx_http_loyalty_server_t  **server;
    ngx_http_loyalty_process_t  *slot;

    if (lmcf->sh == NULL) {
        return;
    }

    slot = &lmcf->sh->processes[ngx_process_slot];

    slot->connections = 0;
    slot->pid = ngx_pid;

    server = lmcf->servers.elts;

    for (i = 0; i < lmcf->servers.nelts; i++) {
        server[i]->events.ready = ngx_http_loyalty_count_ready;
        server[i]->events.close = ngx_http_loyalty_count_close;
        server[i]->events.count = ngx_http_loyalty_count_cluster;
        server[i]->events.data = lmcf->sh;
    }
}


#if !(NGX_HTTP_LOYALTY_NO_COUNTERS)

void
ngx_http_loyalty_count_latency(ngx_http_loyalty_main_conf_t *lmcf,
    ngx_uint_t usec)
{
    ngx_uint_t                 i;
    ngx_http_loyalty_shctx_t  *sh;

    sh = lmcf->sh;

    if (sh == NULL) {
        return;
    }

    for (i = 0; i < NGX_HTTP_LOYALTY_BUCKETS; i++) {
        if (usec <= ngx_http_loyalty_buckets[i].usec) {
            break;
        }
    }

    (void) ngx_atomic_fetch_add(&sh->latency[i], 1);
    (void) ngx_atomic_fetch_add(&sh->latency_sum, usec);
}

#endif


char *
ngx_http_loyalty_status(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_loyalty_loc_conf_t *llcf = conf;

    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

    if (clcf->handler) {
        return "is duplicate";
    }

    clcf->handler = ngx_http_loyalty_status_handler;
    llcf->handler = ngx_http_loyalty_status_handler;

    /* a scrape is no checkout: an inherited "loyalty on" reads nothing */
    llcf->noread = 1;

    return NGX_CONF_OK;
}


/*
 * The counters in the Prometheus text format, one family after another:
 * requests, Redis connections and latency, credits, offers.
 */

static ngx_int_t
ngx_http_loyalty_status_handler(ngx_http_request_t *r)
{
    size_t                         size;
    u_char                        *p, *last;
    ngx_uint_t                     n;
    ngx_http_complex_value_t       cv;
    ngx_http_loyalty_shctx_t      *sh;
    ngx_http_loyalty_main_conf_t  *lmcf;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    lmcf = ngx_http_get_module_main_conf(r, ngx_http_loyalty_module);
    sh = lmcf->sh;

    if (sh == NULL) {
        return NGX_HTTP_SERVICE_UNAVAILABLE;
    }

    /* a reload may add offers meanwhile: the buffer is sized for these */

    n = sh->noffers;

    size = 6144 + (NGX_HTTP_LOYALTY_BUCKETS + 1) * 80
           + n * 2 * (NGX_HTTP_LOYALTY_NAME_MAX * NGX_HTTP_LOYALTY_LABEL_ESCAPE
                      + 80);

    p = ngx_pnalloc(r->pool, size);
    if (p == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    last = ngx_http_loyalty_status_requests(p, sh);
    last = ngx_http_loyalty_status_redis(last, sh);
    last = ngx_http_loyalty_status_latency(last, sh);
    last = ngx_http_loyalty_status_credits(last, sh);
    last = ngx_http_loyalty_status_api(last, sh);
    last = ngx_http_loyalty_status_offers(last, sh, n);

    ngx_memzero(&cv, sizeof(ngx_http_complex_value_t));

    cv.value.data = p;
    cv.value.len = last - p;

    return ngx_http_send_response(r, NGX_HTTP_OK,
                                  &ngx_http_loyalty_status_type, &cv);
}


static u_char *
ngx_http_loyalty_status_requests(u_char *p, ngx_http_loyalty_shctx_t *sh)
{
    ngx_uint_t  i;

    p = ngx_sprintf(p,
            "# HELP loyalty_requests_total Requests seen by the module, "
            "by status.\n"
            "# TYPE loyalty_requests_total counter\n");

    for (i = NGX_HTTP_LOYALTY_ANONYMOUS; i <= NGX_HTTP_LOYALTY_UNAVAILABLE;
         i++)
    {
        p = ngx_sprintf(p, "loyalty_requests_total{status=\"%V\"} %uA\n",
                        ngx_http_loyalty_status_name(i), sh->requests[i]);
    }

    return p;
}


static u_char *
ngx_http_loyalty_status_redis(u_char *p, ngx_http_loyalty_shctx_t *sh)
{
    ngx_uint_t  connections;

    connections = ngx_http_loyalty_connections(sh);

    return ngx_sprintf(p,
            "# HELP loyalty_redis_connections Open Redis connections, "
            "all workers.\n"
            "# TYPE loyalty_redis_connections gauge\n"
            "loyalty_redis_connections %ui\n"
            "# HELP loyalty_redis_up 1 when at least one Redis connection "
            "is open.\n"
            "# TYPE loyalty_redis_up gauge\n"
            "loyalty_redis_up %d\n"
            "# HELP loyalty_redis_redirects_total Redis Cluster "
            "redirections followed, by type.\n"
            "# TYPE loyalty_redis_redirects_total counter\n"
            "loyalty_redis_redirects_total{type=\"moved\"} %uA\n"
            "loyalty_redis_redirects_total{type=\"ask\"} %uA\n"
            "loyalty_redis_redirects_total{type=\"tryagain\"} %uA\n"
            "# HELP loyalty_cluster_refreshes_total Redis Cluster slot maps "
            "asked for.\n"
            "# TYPE loyalty_cluster_refreshes_total counter\n"
            "loyalty_cluster_refreshes_total %uA\n"
            "# HELP loyalty_redis_failovers_total New masters found for "
            "slots whose master was down.\n"
            "# TYPE loyalty_redis_failovers_total counter\n"
            "loyalty_redis_failovers_total %uA\n"
            "# HELP loyalty_redis_tls_handshakes_total TLS handshakes "
            "completed with Redis, by session: new or resumed.\n"
            "# TYPE loyalty_redis_tls_handshakes_total counter\n"
            "loyalty_redis_tls_handshakes_total{session=\"new\"} %uA\n"
            "loyalty_redis_tls_handshakes_total{session=\"reused\"} %uA\n",
            connections, connections ? 1 : 0,
            sh->cluster[NGX_HTTP_LOYALTY_COUNT_MOVED],
            sh->cluster[NGX_HTTP_LOYALTY_COUNT_ASK],
            sh->cluster[NGX_HTTP_LOYALTY_COUNT_TRYAGAIN],
            sh->cluster[NGX_HTTP_LOYALTY_COUNT_REFRESH],
            sh->cluster[NGX_HTTP_LOYALTY_COUNT_FAILOVER],
            sh->cluster[NGX_HTTP_LOYALTY_COUNT_TLS_NEW],
            sh->cluster[NGX_HTTP_LOYALTY_COUNT_TLS_REUSED]);
}


/* a histogram over ngx_http_loyalty_buckets[], cumulative as Prometheus' */

static u_char *
ngx_http_loyalty_status_latency(u_char *p, ngx_http_loyalty_shctx_t *sh)
{
    ngx_uint_t         i, cumulative;
    ngx_atomic_uint_t  sum;

    p = ngx_sprintf(p,
            "# HELP loyalty_redis_latency_seconds Time from sending a read "
            "to its reply.\n"
            "# TYPE loyalty_redis_latency_seconds histogram\n");

    cumulative = 0;

    for (i = 0; i < NGX_HTTP_LOYALTY_BUCKETS; i++) {
        cumulative += sh->latency[i];
        p = ngx_sprintf(p, "loyalty_redis_latency_seconds_bucket{le=\"%V\"}"
                        " %ui\n", &ngx_http_loyalty_buckets[i].le, cumulative);
    }

    cumulative += sh->latency[NGX_HTTP_LOYALTY_BUCKETS];

    /* read once: seconds and microseconds of two reads could go back */

    sum = sh->latency_sum;

    return ngx_sprintf(p,
            "loyalty_redis_latency_seconds_bucket{le=\"+Inf\"} %ui\n"
            "loyalty_redis_latency_seconds_sum %uA.%06uA\n"
            "loyalty_redis_latency_seconds_count %ui\n",
            cumulative, sum / 1000000, sum % 1000000, cumulative);
}


static u_char *
ngx_http_loyalty_status_credits(u_char *p, ngx_http_loyalty_shctx_t *sh)
{
    ngx_uint_t  i;

    p = ngx_sprintf(p,
            "# HELP loyalty_credits_total Credits of orders, by result.\n"
            "# TYPE loyalty_credits_total counter\n");

    for (i = 0; i < NGX_HTTP_LOYALTY_CREDIT_RESULTS; i++) {
        p = ngx_sprintf(p, "loyalty_credits_total{result=\"%V\"} %uA\n",
                        &ngx_http_loyalty_credit_results[i], sh->credits[i]);
    }

    return ngx_sprintf(p,
            "# HELP loyalty_redeem_shortfall_total Orders that redeemed "
            "more points than the balance.\n"
            "# TYPE loyalty_redeem_shortfall_total counter\n"
            "loyalty_redeem_shortfall_total %uA\n",
            sh->shortfall);
}


/* the calls of loyalty_api, by the status words each can answer */

static u_char *
ngx_http_loyalty_status_api(u_char *p, ngx_http_loyalty_shctx_t *sh)
{
    ngx_uint_t  op, status;

    static ngx_str_t   ops[] = {
        ngx_string("ledger"),
        ngx_string("refund"),
        ngx_string("adjust")
    };

    static ngx_uint_t  statuses[] = {
        (1 << NGX_HTTP_LOYALTY_API_OK)
        | (1 << NGX_HTTP_LOYALTY_API_INVALID)
        | (1 << NGX_HTTP_LOYALTY_API_UNAVAILABLE),

        (1 << NGX_HTTP_LOYALTY_API_APPLIED)
        | (1 << NGX_HTTP_LOYALTY_API_UNCHANGED)
        | (1 << NGX_HTTP_LOYALTY_API_UNKNOWN_ORDER)
        | (1 << NGX_HTTP_LOYALTY_API_INVALID)
        | (1 << NGX_HTTP_LOYALTY_API_UNAVAILABLE),

        (1 << NGX_HTTP_LOYALTY_API_APPLIED)
        | (1 << NGX_HTTP_LOYALTY_API_UNCHANGED)
        | (1 << NGX_HTTP_LOYALTY_API_INSUFFICIENT)
        | (1 << NGX_HTTP_LOYALTY_API_INVALID)
        | (1 << NGX_HTTP_LOYALTY_API_UNAVAILABLE)
    };

    p = ngx_sprintf(p,
            "# HELP loyalty_api_requests_total Calls of loyalty_api, by "
            "call and status.\n"
            "# TYPE loyalty_api_requests_total counter\n");

    for (op = 0; op < NGX_HTTP_LOYALTY_API_OPS; op++) {
        for (status = 0; status < NGX_HTTP_LOYALTY_API_STATUSES; status++) {
            if (!(statuses[op] & (1 << status))) {
                continue;
            }

            p = ngx_sprintf(p, "loyalty_api_requests_total{op=\"%V\","
                            "status=\"%V\"} %uA\n", &ops[op],
                            &ngx_http_loyalty_api_statuses[status].word,
                            sh->api[op][status]);
        }
    }

    return ngx_sprintf(p,
            "# HELP loyalty_points_reversed_total Points that refunds took "
            "back.\n"
            "# TYPE loyalty_points_reversed_total counter\n"
            "loyalty_points_reversed_total %uA\n"
            "# HELP loyalty_points_forgiven_total Points that refunds could "
            "not take back, the balance being lower.\n"
            "# TYPE loyalty_points_forgiven_total counter\n"
            "loyalty_points_forgiven_total %uA\n",
            sh->reversed, sh->forgiven);
}


/*
 * The first n offers of the zone.  A request counts an offer shown before
 * its order can count it converted, so the converted counts are read
 * first: read after the shown ones, a credit finishing in between would
 * show more conversions than showings.
 */

static u_char *
ngx_http_loyalty_status_offers(u_char *p, ngx_http_loyalty_shctx_t *sh,
    ngx_uint_t n)
{
    ngx_uint_t         i;
    ngx_atomic_uint_t  converted[NGX_HTTP_LOYALTY_OFFERS_MAX];

    for (i = 0; i < n; i++) {
        converted[i] = sh->offers[i].converted;
    }

    ngx_memory_barrier();

    p = ngx_sprintf(p,
            "# HELP loyalty_offers_shown_total Requests that carried the "
            "offer.\n"
            "# TYPE loyalty_offers_shown_total counter\n");

    for (i = 0; i < n; i++) {
        p = ngx_http_loyalty_status_offer(p, "loyalty_offers_shown_total",
                                          sh->offers[i].name,
                                          sh->offers[i].len,
                                          sh->offers[i].shown);
    }

    p = ngx_sprintf(p,
            "# HELP loyalty_offers_converted_total Orders credited on a "
            "request that carried the offer.\n"
            "# TYPE loyalty_offers_converted_total counter\n");

    for (i = 0; i < n; i++) {
        p = ngx_http_loyalty_status_offer(p, "loyalty_offers_converted_total",
                                          sh->offers[i].name,
                                          sh->offers[i].len,
                                          converted[i]);
    }

    return p;
}


static u_char *
ngx_http_loyalty_status_offer(u_char *p, char *metric, u_char *name,
    size_t len, ngx_atomic_uint_t value)
{
    p = ngx_sprintf(p, "%s{offer=\"", metric);
    p = ngx_http_loyalty_label_value(p, name, len);

    return ngx_sprintf(p, "\"} %uA\n", value);
}


/*
 * The ready connections of the live processes.  A worker that died still
 * has its count in its slot until the master starts another process
 * there; kill(pid, 0) tells that it is gone meanwhile.
 */

static ngx_uint_t
ngx_http_loyalty_connections(ngx_http_loyalty_shctx_t *sh)
{
    ngx_uint_t                   i, n;
    ngx_http_loyalty_process_t  *slot;

    n = 0;

    for (i = 0; i < NGX_MAX_PROCESSES; i++) {
        slot = &sh->processes[i];

        if (slot->connections == 0 || slot->pid <= 0) {
            continue;
        }

        if (slot->pid != ngx_pid
            && kill(slot->pid, 0) == -1
            && ngx_errno == NGX_ESRCH)
        {
            continue;
        }

        n += slot->connections;
    }

    return n;
}
