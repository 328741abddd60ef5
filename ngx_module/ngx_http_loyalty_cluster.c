
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include "ngx_http_loyalty_redis.h"


/*
 * Redis Cluster, in each worker: the master nodes, each with a connection
 * of its own (ngx_http_loyalty_redis.c) opened on first use, and the slot
 * map that says which node serves a key.
 *
 * The map comes from CLUSTER SLOTS, asked of any node that answers: on
 * first use, and again after MOVED, CLUSTERDOWN, or a node's connection
 * failing or being found down.  At most one such refresh is in flight and
 * at most one starts a second, however many requests ask for it.  Until
 * the first map arrives, and for slots that no node serves, commands go
 * to any node that answers, and follow its redirection.
 *
 * A node answers a command for a slot it does not serve with a
 * redirection, which the command follows on its own, keeping its bytes
 * and its deadline:
 *
 *     MOVED <slot> <ip>:<port>   the slot has moved: sent again there, and
 *                                the map is changed at once;
 *     ASK <slot> <ip>:<port>     the slot is being migrated and the key is
 *                                there: ASKING and the command go there,
 *                                the map is kept;
 *     TRYAGAIN                   some keys of the command are migrated and
 *                                some are not yet: sent again after 25ms,
 *                                doubling;
 *     CLUSTERDOWN                the command fails as a lost connection
 *                                does, and the map is looked at again.
 *
 * A command follows at most five redirections; beyond, it fails.  Node
 * addresses are IPs, from the map and from redirections: never a name to
 * resolve at run time.
 */


#define NGX_HTTP_LOYALTY_NODES_MAX      256
#define NGX_HTTP_LOYALTY_REDIRECTS_MAX  5
#define NGX_HTTP_LOYALTY_REFRESH_EVERY  1000    /* ms, at most one */
#define NGX_HTTP_LOYALTY_TRYAGAIN       25      /* ms, doubling */


typedef struct {
    ngx_addr_t                   addr;
    ngx_http_loyalty_conn_t     *conn;          /* opened on first use */
} ngx_http_loyalty_node_t;


struct ngx_http_loyalty_cluster_s {
    ngx_http_loyalty_server_t   *server;
    ngx_pool_t                  *pool;

    ngx_http_loyalty_node_t     *nodes[NGX_HTTP_LOYALTY_NODES_MAX];
    ngx_uint_t                   nnodes;
    ngx_uint_t                   next;          /* asked first, in turn */

    ngx_http_loyalty_node_t    **slots;         /* the map */
    ngx_http_loyalty_node_t    **spare;         /* the next one, built */

    ngx_http_loyalty_node_t     *asked;         /* for CLUSTER SLOTS */
    ngx_msec_t                   refreshed;     /* when last asked */
    ngx_event_t                  refresh;

    ngx_queue_t                  delayed;       /* after TRYAGAIN */
    ngx_event_t                  resend;

    time_t                       logged;

    unsigned                     refreshing:1;
    unsigned                     asked_once:1;
    unsigned                     failing:1;     /* refreshes fail */
};


static ngx_http_loyalty_node_t *ngx_http_loyalty_cluster_node(
    ngx_http_loyalty_cluster_t *cl, struct sockaddr *sockaddr,
    socklen_t socklen);
static ngx_http_loyalty_node_t *ngx_http_loyalty_cluster_address(
    ngx_http_loyalty_cluster_t *cl, ngx_str_t *host, in_port_t port,
    ngx_addr_t *known);
static ngx_http_loyalty_conn_t *ngx_http_loyalty_cluster_conn(
    ngx_http_loyalty_cluster_t *cl, ngx_http_loyalty_node_t *node);
static ngx_http_loyalty_node_t *ngx_http_loyalty_cluster_any(
    ngx_http_loyalty_cluster_t *cl);
static ngx_uint_t ngx_http_loyalty_cluster_usable(
    ngx_http_loyalty_node_t *node, ngx_uint_t ready);
static ngx_int_t ngx_http_loyalty_cluster_redirect(
    ngx_http_loyalty_cluster_t *cl, ngx_http_loyalty_conn_t *conn,
    ngx_http_loyalty_cmd_t *cmd, ngx_http_loyalty_reply_t *reply);
static void ngx_http_loyalty_cluster_delay(ngx_http_loyalty_cluster_t *cl,
    ngx_http_loyalty_cmd_t *cmd);
static void ngx_http_loyalty_cluster_resend_handler(ngx_event_t *ev);
static void ngx_http_loyalty_cluster_fail(ngx_http_loyalty_cluster_t *cl,
    ngx_http_loyalty_cmd_t *cmd);
static void ngx_http_loyalty_cluster_refresh(ngx_http_loyalty_cluster_t *cl);
static void ngx_http_loyalty_cluster_refresh_handler(ngx_event_t *ev);
static void ngx_http_loyalty_cluster_slots_handler(void *data, ngx_int_t rc,
    ngx_http_loyalty_reply_t *reply);
static ngx_int_t ngx_http_loyalty_cluster_valid_map(
    ngx_http_loyalty_reply_t *reply);
static void ngx_http_loyalty_cluster_count(ngx_http_loyalty_cluster_t *cl,
    ngx_uint_t what);


ngx_int_t
ngx_http_loyalty_cluster_init_process(ngx_cycle_t *cycle,
    ngx_http_loyalty_server_t *server)
{
    ngx_uint_t                   i;
    ngx_pool_t                  *pool;
    ngx_http_loyalty_cluster_t  *cl;

    pool = ngx_create_pool(4096, cycle->log);
    if (pool == NULL) {
        return NGX_ERROR;
    }

    cl = ngx_pcalloc(pool, sizeof(ngx_http_loyalty_cluster_t));
    if (cl == NULL) {
        goto failed;
    }

    cl->server = server;
    cl->pool = pool;

    cl->slots = ngx_pcalloc(pool, NGX_HTTP_LOYALTY_SLOTS
                                  * sizeof(ngx_http_loyalty_node_t *));
    cl->spare = ngx_pcalloc(pool, NGX_HTTP_LOYALTY_SLOTS
                                  * sizeof(ngx_http_loyalty_node_t *));
    if (cl->slots == NULL || cl->spare == NULL) {
        goto failed;
    }

    ngx_queue_init(&cl->delayed);

    cl->refresh.handler = ngx_http_loyalty_cluster_refresh_handler;
    cl->refresh.data = cl;
    cl->refresh.log = cycle->log;
    cl->refresh.cancelable = 1;

    cl->resend.handler = ngx_http_loyalty_cluster_resend_handler;
    cl->resend.data = cl;
    cl->resend.log = cycle->log;

    for (i = 0; i < server->nseeds; i++) {
        if (ngx_http_loyalty_cluster_node(cl, server->seeds[i].sockaddr,
                                          server->seeds[i].socklen)
            == NULL)
        {
            goto failed;
        }
    }

    server->nodes = cl;

    return NGX_OK;

failed:

    ngx_destroy_pool(pool);

    return NGX_ERROR;
}


void
ngx_http_loyalty_cluster_exit_process(ngx_http_loyalty_server_t *server)
{
    ngx_uint_t                   i;
    ngx_queue_t                 *q;
    ngx_http_loyalty_cmd_t      *cmd;
    ngx_http_loyalty_cluster_t  *cl;

    cl = server->nodes;

    if (cl == NULL) {
        return;
    }

    if (cl->refresh.timer_set) {
        ngx_del_timer(&cl->refresh);
    }

    if (cl->resend.timer_set) {
        ngx_del_timer(&cl->resend);
    }

    while (!ngx_queue_empty(&cl->delayed)) {
        q = ngx_queue_head(&cl->delayed);
        ngx_queue_remove(q);

        cmd = ngx_queue_data(q, ngx_http_loyalty_cmd_t, queue);

        ngx_http_loyalty_redis_done(cmd, NGX_ABORT, NULL);
        ngx_http_loyalty_redis_free(server, cmd);
    }

    for (i = 0; i < cl->nnodes; i++) {
        if (cl->nodes[i]->conn) {
            ngx_http_loyalty_redis_conn_destroy(cl->nodes[i]->conn);
            cl->nodes[i]->conn = NULL;
        }
    }

    server->nodes = NULL;

    ngx_destroy_pool(cl->pool);
}


/*
 * The connection for a slot: its node's, or before the map (or for a slot
 * that no node serves) any node's that may answer, which redirects.  NULL
 * when no node may.
 */

ngx_http_loyalty_conn_t *
ngx_http_loyalty_cluster_route(ngx_http_loyalty_server_t *server,
    ngx_uint_t slot)
{
    ngx_http_loyalty_node_t     *node;
    ngx_http_loyalty_cluster_t  *cl;

    cl = server->nodes;
    node = cl->slots[slot];

    if (node == NULL) {
        ngx_http_loyalty_cluster_refresh(cl);

        node = ngx_http_loyalty_cluster_any(cl);
        if (node == NULL) {
            return NULL;
        }

    } else if (!ngx_http_loyalty_cluster_usable(node, 0)) {
        /* known down: its slots may have a new master by now */
        ngx_http_loyalty_cluster_refresh(cl);
    }

    return ngx_http_loyalty_cluster_conn(cl, node);
}


/*
 * An error reply from a node: NGX_DONE when it was a redirection, which
 * the command now follows (or fails of), NGX_DECLINED for any other error,
 * which is the command's owner's to judge.
 */

ngx_int_t
ngx_http_loyalty_cluster_reply(ngx_http_loyalty_server_t *server,
    ngx_http_loyalty_conn_t *conn, ngx_http_loyalty_cmd_t *cmd,
    ngx_http_loyalty_reply_t *reply)
{
    ngx_str_t                   *s;
    ngx_http_loyalty_cluster_t  *cl;

    cl = server->nodes;
    s = &reply->str;

    if ((s->len > sizeof("MOVED ") - 1
         && ngx_strncmp(s->data, "MOVED ", sizeof("MOVED ") - 1) == 0)
        || (s->len > sizeof("ASK ") - 1
            && ngx_strncmp(s->data, "ASK ", sizeof("ASK ") - 1) == 0))
    {
        return ngx_http_loyalty_cluster_redirect(cl, conn, cmd, reply);
    }

    if (s->len >= sizeof("TRYAGAIN") - 1
        && ngx_strncmp(s->data, "TRYAGAIN", sizeof("TRYAGAIN") - 1) == 0)
    {
        ngx_http_loyalty_cluster_count(cl, NGX_HTTP_LOYALTY_COUNT_TRYAGAIN);

        if (cmd->redirects++ == NGX_HTTP_LOYALTY_REDIRECTS_MAX) {
            ngx_http_loyalty_cluster_fail(cl, cmd);
            return NGX_DONE;
        }

        ngx_http_loyalty_cluster_delay(cl, cmd);
        return NGX_DONE;
    }

    if (s->len >= sizeof("CLUSTERDOWN") - 1
        && ngx_strncmp(s->data, "CLUSTERDOWN", sizeof("CLUSTERDOWN") - 1)
           == 0)
    {
        if (cl->logged != ngx_time()) {
            cl->logged = ngx_time();
            ngx_log_error(NGX_LOG_WARN, cl->pool->log, 0,
                          "loyalty: redis cluster %V: \"%V\"",
                          &server->name, s);
        }

        ngx_http_loyalty_cluster_refresh(cl);

        ngx_http_loyalty_redis_done(cmd, NGX_ERROR, NULL);
        ngx_http_loyalty_redis_free(server, cmd);

        return NGX_DONE;
    }

    return NGX_DECLINED;
}


/* a node's connection failed: the node may have failed over */

void
ngx_http_loyalty_cluster_failed(ngx_http_loyalty_server_t *server,
    void *node)
{
    if (server->nodes) {
        ngx_http_loyalty_cluster_refresh(server->nodes);
    }
}


static ngx_int_t
ngx_http_loyalty_cluster_redirect(ngx_http_loyalty_cluster_t *cl,
    ngx_http_loyalty_conn_t *conn, ngx_http_loyalty_cmd_t *cmd,
    ngx_http_loyalty_reply_t *reply)
{
    ngx_str_t                     asking;
    ngx_addr_t                   *from;
    ngx_msec_int_t                left;
    ngx_http_loyalty_cmd_t       *ask;
    ngx_http_loyalty_node_t      *node;
    ngx_http_loyalty_conn_t      *to;
    ngx_http_loyalty_redirect_t   rd;

    if (ngx_http_loyalty_parse_redirect(reply->str.data, reply->str.len, &rd)
        != NGX_OK)
    {
        /* the owner sees the error as it is */
        return NGX_DECLINED;
    }

    ngx_http_loyalty_cluster_count(cl, rd.ask ? NGX_HTTP_LOYALTY_COUNT_ASK
                                              : NGX_HTTP_LOYALTY_COUNT_MOVED);

    if (cmd->redirects++ == NGX_HTTP_LOYALTY_REDIRECTS_MAX) {
        ngx_http_loyalty_cluster_fail(cl, cmd);
        return NGX_DONE;
    }

    from = ngx_http_loyalty_redis_conn_addr(conn);

    node = ngx_http_loyalty_cluster_address(cl, &rd.host, rd.port, from);
    if (node == NULL) {
        if (cl->logged != ngx_time()) {
            cl->logged = ngx_time();
            ngx_log_error(NGX_LOG_WARN, cl->pool->log, 0,
                          "loyalty: redis cluster %V redirects to \"%V\", "
                          "which is not an IP address, or to too many "
                          "nodes", &cl->server->name, &reply->str);
        }

        ngx_http_loyalty_redis_done(cmd, NGX_ERROR, NULL);
        ngx_http_loyalty_redis_free(cl->server, cmd);

        return NGX_DONE;
    }

    if (!rd.ask) {
        cl->slots[rd.slot] = node;
        ngx_http_loyalty_cluster_refresh(cl);
    }

    to = ngx_http_loyalty_cluster_conn(cl, node);
    if (to == NULL) {
        goto failed;
    }

    if (rd.ask) {

        /* ASKING holds for the next command on the connection only */

        left = (ngx_msec_int_t) (cmd->deadline - ngx_current_msec);

        if (left <= 0) {
            goto failed;
        }

        ngx_str_set(&asking, "ASKING");

        ask = ngx_http_loyalty_redis_command(cl->server, 1, &asking,
                                             (ngx_msec_t) left, NULL, NULL);
        if (ask == NULL) {
            goto failed;
        }

        if (ngx_http_loyalty_redis_submit(to, ask) != NGX_OK) {
            ngx_http_loyalty_redis_free(cl->server, ask);
            goto failed;
        }
    }

    if (ngx_http_loyalty_redis_submit(to, cmd) == NGX_OK) {
        return NGX_DONE;
    }

failed:

    ngx_http_loyalty_redis_done(cmd, NGX_ERROR, NULL);
    ngx_http_loyalty_redis_free(cl->server, cmd);

    return NGX_DONE;
}


/* more redirections than a command follows: a loop, or a map in flux */

static void
ngx_http_loyalty_cluster_fail(ngx_http_loyalty_cluster_t *cl,
    ngx_http_loyalty_cmd_t *cmd)
{
    if (cl->logged != ngx_time()) {
        cl->logged = ngx_time();
        ngx_log_error(NGX_LOG_WARN, cl->pool->log, 0,
                      "loyalty: redis cluster %V redirected a command for "
                      "slot %ui more than %d times",
                      &cl->server->name, cmd->slot,
                      NGX_HTTP_LOYALTY_REDIRECTS_MAX);
    }

    ngx_http_loyalty_redis_done(cmd, NGX_ERROR, NULL);
    ngx_http_loyalty_redis_free(cl->server, cmd);
}


/* TRYAGAIN: sent again later, to the slot's node then */

static void
ngx_http_loyalty_cluster_delay(ngx_http_loyalty_cluster_t *cl,
    ngx_http_loyalty_cmd_t *cmd)
{
    ngx_msec_t  delay;

    delay = NGX_HTTP_LOYALTY_TRYAGAIN << (cmd->redirects - 1);

    cmd->resend = ngx_current_msec + delay;

    ngx_queue_insert_tail(&cl->delayed, &cmd->queue);

    /* a graceful shutdown waits for them */

    cl->resend.cancelable = 0;

    if (cl->resend.timer_set
        && (ngx_msec_int_t) (cmd->resend - cl->resend.timer.key) >= 0)
    {
        return;
    }

    if (cl->resend.timer_set) {
        ngx_del_timer(&cl->resend);
    }

    ngx_add_timer(&cl->resend, delay);
}


static void
ngx_http_loyalty_cluster_resend_handler(ngx_event_t *ev)
{
    ngx_int_t                    rc;
    ngx_queue_t                 *q, *next;
    ngx_msec_int_t               left, wait;
    ngx_http_loyalty_cmd_t      *cmd;
    ngx_http_loyalty_conn_t     *conn;
    ngx_http_loyalty_cluster_t  *cl;

    cl = ev->data;

    wait = -1;

    for (q = ngx_queue_head(&cl->delayed);
         q != ngx_queue_sentinel(&cl->delayed);
         q = next)
    {
        next = ngx_queue_next(q);
        cmd = ngx_queue_data(q, ngx_http_loyalty_cmd_t, queue);

        if (cmd->handler == NULL) {
            /* cancelled meanwhile */
            ngx_queue_remove(q);
            ngx_http_loyalty_redis_free(cl->server, cmd);
            continue;
        }

        left = (ngx_msec_int_t) (cmd->resend - ngx_current_msec);

        if (left > 0
            && (ngx_msec_int_t) (cmd->deadline - ngx_current_msec) > 0)
        {
            if (wait == -1 || left < wait) {
                wait = left;
            }

            continue;
        }

        ngx_queue_remove(q);

        conn = ngx_http_loyalty_cluster_route(cl->server, cmd->slot);

        rc = (conn == NULL) ? NGX_DECLINED
                            : ngx_http_loyalty_redis_submit(conn, cmd);

        if (rc != NGX_OK) {
            ngx_http_loyalty_redis_done(cmd, NGX_ERROR, NULL);
            ngx_http_loyalty_redis_free(cl->server, cmd);

            /* the handler may have changed the queue */
            next = ngx_queue_head(&cl->delayed);
        }
    }

    if (wait != -1) {
        ngx_add_timer(ev, (ngx_msec_t) wait);
    }
}


/*
 * Asks a node for the slot map, unless one is asked already or was in the
 * last second: then the timer asks when that second is over.
 */

static void
ngx_http_loyalty_cluster_refresh(ngx_http_loyalty_cluster_t *cl)
{
    ngx_str_t                 argv[2];
    ngx_msec_int_t            elapsed;
    ngx_http_loyalty_cmd_t   *cmd;
    ngx_http_loyalty_node_t  *node;
    ngx_http_loyalty_conn_t  *conn;

    if (cl->refreshing || ngx_exiting || ngx_terminate) {
        return;
    }

    elapsed = (ngx_msec_int_t) (ngx_current_msec - cl->refreshed);

    if (cl->asked_once && elapsed < NGX_HTTP_LOYALTY_REFRESH_EVERY) {
        if (!cl->refresh.timer_set) {
            ngx_add_timer(&cl->refresh,
                          NGX_HTTP_LOYALTY_REFRESH_EVERY - elapsed);
        }

        return;
    }

    cl->refreshed = ngx_current_msec;
    cl->asked_once = 1;

    node = ngx_http_loyalty_cluster_any(cl);
    if (node == NULL) {
        return;
    }

    conn = ngx_http_loyalty_cluster_conn(cl, node);
    if (conn == NULL) {
        return;
    }

    ngx_str_set(&argv[0], "CLUSTER");
    ngx_str_set(&argv[1], "SLOTS");

    cmd = ngx_http_loyalty_redis_command(cl->server, 2, argv,
                                         cl->server->connect_timeout,
                                         ngx_http_loyalty_cluster_slots_handler,
                                         cl);
    if (cmd == NULL) {
        return;
    }

    if (ngx_http_loyalty_redis_submit(conn, cmd) != NGX_OK) {
        ngx_http_loyalty_redis_free(cl->server, cmd);
        return;
    }

    cl->refreshing = 1;
    cl->asked = node;

    ngx_http_loyalty_cluster_count(cl, NGX_HTTP_LOYALTY_COUNT_REFRESH);
}


static void
ngx_http_loyalty_cluster_refresh_handler(ngx_event_t *ev)
{
    ngx_http_loyalty_cluster_refresh(ev->data);
}


/*
 * The reply to CLUSTER SLOTS: an array of slot ranges, each
 * [start, end, [ip, port, id, ...], replicas...].  A map that does not
 * parse is not used at all; a range whose master has no IP is left out.
 */

static void
ngx_http_loyalty_cluster_slots_handler(void *data, ngx_int_t rc,
    ngx_http_loyalty_reply_t *reply)
{
    ngx_http_loyalty_cluster_t *cl = data;

    ngx_str_t                    host;
    ngx_uint_t                   i, s, start, end, failover, level, ranges,
                                 skipped;
    ngx_http_loyalty_node_t     *node, *old, **map;
    ngx_http_loyalty_reply_t    *range, *master;

    if (rc == NGX_ABORT) {
        return;
    }

    cl->refreshing = 0;

    level = cl->failing ? NGX_LOG_INFO : NGX_LOG_WARN;

    if (rc != NGX_OK) {
        ngx_log_error(level, cl->pool->log, 0,
                      "loyalty: redis cluster %V: CLUSTER SLOTS to %V "
                      "failed", &cl->server->name, &cl->asked->addr.name);
        cl->failing = 1;
        return;
    }

    if (reply->type == NGX_HTTP_LOYALTY_REPLY_ERROR) {
        ngx_log_error(level, cl->pool->log, 0,
                      "loyalty: redis cluster %V: CLUSTER SLOTS to %V "
                      "refused: \"%V\"", &cl->server->name,
                      &cl->asked->addr.name, &reply->str);
        cl->failing = 1;
        return;
    }

    if (ngx_http_loyalty_cluster_valid_map(reply) != NGX_OK) {
        ngx_log_error(level, cl->pool->log, 0,
                      "loyalty: redis cluster %V: invalid reply to "
                      "CLUSTER SLOTS from %V",
                      &cl->server->name, &cl->asked->addr.name);
        cl->failing = 1;
        return;
    }

    map = cl->spare;
    ngx_memzero(map,
                NGX_HTTP_LOYALTY_SLOTS * sizeof(ngx_http_loyalty_node_t *));

    ranges = 0;
    skipped = 0;

    for (i = 0; i < reply->nelts; i++) {
        range = reply->element[i];
        master = range->element[2];

        start = (ngx_uint_t) range->element[0]->integer;
        end = (ngx_uint_t) range->element[1]->integer;

        /* no endpoint ("", "?" or nil): the node asked, on that port */

        if (master->element[0]->type == NGX_HTTP_LOYALTY_REPLY_STRING
            && !(master->element[0]->str.len == 1
                 && master->element[0]->str.data[0] == '?'))
        {
            host = master->element[0]->str;

        } else {
            ngx_str_null(&host);
        }

        node = ngx_http_loyalty_cluster_address(cl, &host,
                                     (in_port_t) master->element[1]->integer,
                                     &cl->asked->addr);
        if (node == NULL) {
            /* one line for the map, however many ranges */

            if (skipped++ == 0) {
                ngx_log_error(NGX_LOG_WARN, cl->pool->log, 0,
                              "loyalty: redis cluster %V: slots %ui-%ui are "
                              "on \"%V\", which is not an IP address, or "
                              "on too many nodes", &cl->server->name, start,
                              end, &master->element[0]->str);
            }

            continue;
        }

        for (s = start; s <= end; s++) {
            map[s] = node;
        }

        ranges++;
    }

    /* a slot whose master was known down is served by another: failover */

    failover = 0;

    for (s = 0; s < NGX_HTTP_LOYALTY_SLOTS; s++) {
        old = cl->slots[s];

        if (old && map[s] && old != map[s]
            && old->conn && ngx_http_loyalty_redis_conn_failed(old->conn))
        {
            failover = 1;
            break;
        }
    }

    cl->spare = cl->slots;
    cl->slots = map;

    if (failover) {
        ngx_http_loyalty_cluster_count(cl, NGX_HTTP_LOYALTY_COUNT_FAILOVER);
    }

    if (cl->failing || failover) {
        ngx_log_error(NGX_LOG_INFO, cl->pool->log, 0,
                      "loyalty: redis cluster %V: slot map of %ui ranges "
                      "from %V%s", &cl->server->name, ranges,
                      &cl->asked->addr.name,
                      failover ? ", after a failover" : "");
    }

    cl->failing = 0;
}


static ngx_int_t
ngx_http_loyalty_cluster_valid_map(ngx_http_loyalty_reply_t *reply)
{
    ngx_uint_t                 i;
    ngx_http_loyalty_reply_t  *range, *master;

    if (reply->type != NGX_HTTP_LOYALTY_REPLY_ARRAY) {
        return NGX_ERROR;
    }

    for (i = 0; i < reply->nelts; i++) {
        range = reply->element[i];

        if (range->type != NGX_HTTP_LOYALTY_REPLY_ARRAY
            || range->nelts < 3
            || range->element[0]->type != NGX_HTTP_LOYALTY_REPLY_INTEGER
            || range->element[1]->type != NGX_HTTP_LOYALTY_REPLY_INTEGER
            || range->element[0]->integer < 0
            || range->element[0]->integer > range->element[1]->integer
            || range->element[1]->integer >= NGX_HTTP_LOYALTY_SLOTS)
        {
            return NGX_ERROR;
        }

        master = range->element[2];

        if (master->type != NGX_HTTP_LOYALTY_REPLY_ARRAY
            || master->nelts < 2
            || (master->element[0]->type != NGX_HTTP_LOYALTY_REPLY_STRING
                && master->element[0]->type != NGX_HTTP_LOYALTY_REPLY_NIL)
            || master->element[1]->type != NGX_HTTP_LOYALTY_REPLY_INTEGER
            || master->element[1]->integer <= 0
            || master->element[1]->integer > 65535)
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/* the node at an address, known or new; NULL when there are too many */

static ngx_http_loyalty_node_t *
ngx_http_loyalty_cluster_node(ngx_http_loyalty_cluster_t *cl,
    struct sockaddr *sockaddr, socklen_t socklen)
{
    u_char                   *p;
    size_t                    len;
    ngx_uint_t                i;
    ngx_http_loyalty_node_t  *node;

    for (i = 0; i < cl->nnodes; i++) {
        node = cl->nodes[i];

        if (ngx_cmp_sockaddr(node->addr.sockaddr, node->addr.socklen,
                             sockaddr, socklen, 1)
            == NGX_OK)
        {
            return node;
        }
    }

    if (cl->nnodes == NGX_HTTP_LOYALTY_NODES_MAX) {
        return NULL;
    }

    node = ngx_pcalloc(cl->pool, sizeof(ngx_http_loyalty_node_t));
    if (node == NULL) {
        return NULL;
    }

    node->addr.sockaddr = ngx_palloc(cl->pool, socklen);
    if (node->addr.sockaddr == NULL) {
        return NULL;
    }

    ngx_memcpy(node->addr.sockaddr, sockaddr, socklen);
    node->addr.socklen = socklen;

    p = ngx_pnalloc(cl->pool, NGX_SOCKADDR_STRLEN);
    if (p == NULL) {
        return NULL;
    }

    len = ngx_sock_ntop(sockaddr, socklen, p, NGX_SOCKADDR_STRLEN, 1);

    node->addr.name.data = p;
    node->addr.name.len = len;

    cl->nodes[cl->nnodes++] = node;

    return node;
}


/*
 * The node at "host:port" as a redirection or the map names it: an IP
 * address, IPv4 or IPv6, never a name to resolve; an empty host is the
 * host of the node that answered.
 */

static ngx_http_loyalty_node_t *
ngx_http_loyalty_cluster_address(ngx_http_loyalty_cluster_t *cl,
    ngx_str_t *host, in_port_t port, ngx_addr_t *known)
{
    socklen_t             socklen;
    in_addr_t             inaddr;
    ngx_sockaddr_t        sa;
#if (NGX_HAVE_INET6)
    struct in6_addr       inaddr6;
#endif

    ngx_memzero(&sa, sizeof(ngx_sockaddr_t));

    if (host->len == 0) {
        if (known->socklen > sizeof(ngx_sockaddr_t)
            || known->sockaddr->sa_family == AF_UNIX)
        {
            return NULL;
        }

        socklen = known->socklen;
        ngx_memcpy(&sa, known->sockaddr, socklen);

        ngx_inet_set_port(&sa.sockaddr, port);

        return ngx_http_loyalty_cluster_node(cl, &sa.sockaddr, socklen);
    }

    inaddr = ngx_inet_addr(host->data, host->len);

    if (inaddr != INADDR_NONE) {
        sa.sockaddr_in.sin_family = AF_INET;
        sa.sockaddr_in.sin_addr.s_addr = inaddr;
        sa.sockaddr_in.sin_port = htons(port);
        socklen = sizeof(struct sockaddr_in);

        return ngx_http_loyalty_cluster_node(cl, &sa.sockaddr, socklen);
    }

#if (NGX_HAVE_INET6)

    if (ngx_inet6_addr(host->data, host->len, inaddr6.s6_addr) == NGX_OK) {
        sa.sockaddr_in6.sin6_family = AF_INET6;
        sa.sockaddr_in6.sin6_addr = inaddr6;
        sa.sockaddr_in6.sin6_port = htons(port);
        socklen = sizeof(struct sockaddr_in6);

        return ngx_http_loyalty_cluster_node(cl, &sa.sockaddr, socklen);
    }

#endif

    return NULL;
}


static ngx_http_loyalty_conn_t *
ngx_http_loyalty_cluster_conn(ngx_http_loyalty_cluster_t *cl,
    ngx_http_loyalty_node_t *node)
{
    if (node->conn == NULL) {
        node->conn = ngx_http_loyalty_redis_conn_create(cl->server,
                                                        &node->addr, node);
    }

    return node->conn;
}


/* a node that answers at once, else one that may; in turn */

static ngx_http_loyalty_node_t *
ngx_http_loyalty_cluster_any(ngx_http_loyalty_cluster_t *cl)
{
    ngx_uint_t                i, n, pass;
    ngx_http_loyalty_node_t  *node;

    for (pass = 0; pass < 2; pass++) {

        for (n = 0; n < cl->nnodes; n++) {
            i = (cl->next + n) % cl->nnodes;
            node = cl->nodes[i];

            if (ngx_http_loyalty_cluster_usable(node, pass == 0)) {
                cl->next = (i + 1) % cl->nnodes;
                return node;
            }
        }
    }

    return NULL;
}


static ngx_uint_t
ngx_http_loyalty_cluster_usable(ngx_http_loyalty_node_t *node,
    ngx_uint_t ready)
{
    if (node->conn == NULL) {
        return !ready;
    }

    return ngx_http_loyalty_redis_conn_usable(node->conn, ready);
}


static void
ngx_http_loyalty_cluster_count(ngx_http_loyalty_cluster_t *cl,
    ngx_uint_t what)
{
    ngx_http_loyalty_server_t  *server;

    server = cl->server;

    if (server->events.count) {
        server->events.count(server->events.data, what);
    }
}
