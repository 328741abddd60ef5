
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <ngx_event_connect.h>
#include "ngx_http_loyalty_redis.h"


/*
 * One connection per worker and Redis server (with Redis Cluster: per
 * worker and master node, ngx_http_loyalty_cluster.c), opened on first
 * use and kept.  Its life is a series of states, as ngx_mail_proxy_module
 * walks a backend through its greeting and AUTH:
 *
 *     closed -> connecting -> [tls] -> auth -> select -> role -> setup
 *                                         \___________________________/
 *                                                   handshake      -> ready
 *
 * and "down" after a failure, until the backoff timer reconnects (a
 * cluster node's connection goes back to "closed" then, and is opened
 * again on demand).  AUTH
 * (with a password) and SELECT (with a database) are sent only when a
 * connection opens, together with the setup commands that the server's
 * owners registered (ngx_http_loyalty_redis_add_setup(): the credits'
 * SCRIPT LOAD), and their replies are checked in that order, one state
 * each.  With "tls", the TLS handshake comes first, within the same
 * timeout, and the certificate and name are checked before anything is
 * sent (ngx_http_loyalty_ssl.c); the session is kept for the next
 * connection to resume.  Only "ready" counts as up: commands queued
 * before wait for it, and the backoff starts again from its minimum only
 * there, so that a Redis that accepts connections and then refuses AUTH,
 * or never answers, is backed off like one that refuses the connection.  The owners learn
 * when a connection gets ready and when a ready one closes through the
 * server's events.
 *
 * Commands of concurrent requests are copied back to back into one output
 * buffer, flushed once per event loop iteration, and replies are matched to
 * them in order.  Each command keeps its own encoded bytes until it is
 * answered, so that it can be sent again elsewhere (to the node a Redis
 * Cluster redirects it to); its owner may cancel it
 * (ngx_http_loyalty_redis_cancel()), and is told of its end once, through
 * its handler.  Commands and their buffers belong to the server, not to a
 * connection: a redirected command moves to another node's connection.  A command whose deadline passes fails alone: its request
 * goes on as "unavailable", and the command stays in the queue until its
 * late reply comes, which is read and dropped.  A connection that fails
 * (refused, reset, a handshake refused or unanswered, a protocol error, or
 * no reply at all for 10 times the timeout, at least a second, while
 * replies are due) is closed, every command on it fails at once, and the
 * server stays "down" until a reconnect succeeds: meanwhile commands fail
 * at once instead of waiting.
 */


#define NGX_HTTP_LOYALTY_OUT_SIZE    65536
#define NGX_HTTP_LOYALTY_IN_SIZE     16384
#define NGX_HTTP_LOYALTY_MAX_CMDS    8192
#define NGX_HTTP_LOYALTY_CMD_SIZE    512    /* a read, a credit by EVALSHA */

#define NGX_HTTP_LOYALTY_BACKOFF_MIN 100
#define NGX_HTTP_LOYALTY_BACKOFF_MAX 2000

#define NGX_HTTP_LOYALTY_DEAD_MIN    1000

#define NGX_HTTP_LOYALTY_RESOLVED_MAX  8     /* addresses of a host name */


typedef enum {
    ngx_http_loyalty_conn_closed = 0,
    ngx_http_loyalty_conn_connecting,
    ngx_http_loyalty_conn_tls,
    ngx_http_loyalty_conn_auth,
    ngx_http_loyalty_conn_select,
    ngx_http_loyalty_conn_role,
    ngx_http_loyalty_conn_setup,
    ngx_http_loyalty_conn_ready,
    ngx_http_loyalty_conn_down
} ngx_http_loyalty_conn_state_e;


struct ngx_http_loyalty_conn_s {
    ngx_http_loyalty_server_t  *server;
    ngx_addr_t                 *addr;
    ngx_str_t                   host;           /* a C string */
    void                       *node;           /* Redis Cluster */
    ngx_peer_connection_t       peer;
    ngx_connection_t           *connection;

    ngx_pool_t                 *pool;
    ngx_pool_t                 *reply_pool;
    ngx_http_loyalty_reader_t   reader;

    ngx_str_t                   handshake;      /* AUTH, SELECT, setup */
    ngx_buf_t                  *out;
    off_t                       queued;         /* bytes, since connected */
    off_t                       written;
    u_char                     *in;

    ngx_queue_t                 pending;        /* in order, timed out too */
    ngx_uint_t                  waiting;        /* pending, not timed out */

    ngx_event_t                 deadline;
    ngx_event_t                 backoff;
    ngx_msec_t                  delay;
    ngx_msec_t                  dead;           /* silence that fails it */
    ngx_msec_t                  heard;          /* last reply, or first due */

    ngx_log_t                   log;

    ngx_uint_t                  state;          /* ngx_http_loyalty_conn_* */
    ngx_uint_t                  step;           /* setup reply awaited */
    ngx_uint_t                  tried;          /* addresses, this time */
    time_t                      late_logged;
#if (NGX_SSL)
    ngx_ssl_session_t          *session;        /* to resume */
#endif

    ngx_resolver_ctx_t         *resolving;
    ngx_addr_t                 *resolved;       /* the host's, of late */
    u_char                     *names;          /* of those addresses */

    unsigned                    failed:1;
    unsigned                    role:1;         /* ROLE must say master */
};


static ngx_int_t ngx_http_loyalty_redis_handshake_init(
    ngx_http_loyalty_conn_t *conn);
static ngx_int_t ngx_http_loyalty_redis_connect(
    ngx_http_loyalty_conn_t *conn);
static void ngx_http_loyalty_redis_connect_handler(ngx_event_t *ev);
static ngx_int_t ngx_http_loyalty_redis_test_connect(ngx_connection_t *c);
static ngx_int_t ngx_http_loyalty_redis_next_address(
    ngx_http_loyalty_conn_t *conn);
static void ngx_http_loyalty_redis_use_addr(ngx_http_loyalty_conn_t *conn,
    ngx_uint_t n);
static ngx_int_t ngx_http_loyalty_redis_resolve(ngx_http_loyalty_conn_t *conn);
static void ngx_http_loyalty_redis_resolved(ngx_resolver_ctx_t *ctx);
static void ngx_http_loyalty_redis_resolved_addrs(
    ngx_http_loyalty_conn_t *conn, ngx_resolver_ctx_t *ctx);
#if (NGX_SSL)
static void ngx_http_loyalty_redis_ssl_init(ngx_http_loyalty_conn_t *conn);
static void ngx_http_loyalty_redis_ssl_handshake(ngx_connection_t *c);
static void ngx_http_loyalty_redis_ssl_save_session(ngx_connection_t *c);
#endif
static void ngx_http_loyalty_redis_handshake(ngx_http_loyalty_conn_t *conn);
static void ngx_http_loyalty_redis_next_step(ngx_http_loyalty_conn_t *conn);
static ngx_int_t ngx_http_loyalty_redis_handshake_reply(
    ngx_http_loyalty_conn_t *conn, ngx_http_loyalty_reply_t *reply);
static ngx_int_t ngx_http_loyalty_redis_role(ngx_http_loyalty_conn_t *conn,
    ngx_http_loyalty_reply_t *reply);
static void ngx_http_loyalty_redis_ready(ngx_http_loyalty_conn_t *conn);
static ngx_http_loyalty_cmd_t *ngx_http_loyalty_redis_alloc(
    ngx_http_loyalty_server_t *server, size_t len);
static void ngx_http_loyalty_redis_write_handler(ngx_event_t *wev);
static void ngx_http_loyalty_redis_read_handler(ngx_event_t *rev);
static ngx_int_t ngx_http_loyalty_redis_process(
    ngx_http_loyalty_conn_t *conn);
static ngx_int_t ngx_http_loyalty_redis_reply(ngx_http_loyalty_conn_t *conn,
    ngx_http_loyalty_reply_t *reply);
static ngx_uint_t ngx_http_loyalty_redis_pushed(
    ngx_http_loyalty_reply_t *reply);
static void ngx_http_loyalty_redis_dummy_handler(ngx_event_t *ev);
static void ngx_http_loyalty_redis_deadline_handler(ngx_event_t *ev);
static void ngx_http_loyalty_redis_backoff_handler(ngx_event_t *ev);
static void ngx_http_loyalty_redis_close(ngx_http_loyalty_conn_t *conn);
static void ngx_http_loyalty_redis_drop(ngx_http_loyalty_conn_t *conn);
static void ngx_http_loyalty_redis_close_connection(ngx_connection_t *c);
static void ngx_http_loyalty_redis_fail(ngx_http_loyalty_conn_t *conn);
static void ngx_http_loyalty_redis_fail_pending(
    ngx_http_loyalty_conn_t *conn);
static void ngx_http_loyalty_redis_exit(ngx_http_loyalty_conn_t *conn);
static u_char *ngx_http_loyalty_redis_log_error(ngx_log_t *log, u_char *buf,
    size_t len);


ngx_int_t
ngx_http_loyalty_redis_init_process(ngx_cycle_t *cycle,
    ngx_http_loyalty_server_t *server)
{
    server->pool = ngx_create_pool(4096, cycle->log);
    if (server->pool == NULL) {
        return NGX_ERROR;
    }

    ngx_queue_init(&server->free);

    if (server->cluster) {
        return ngx_http_loyalty_cluster_init_process(cycle, server);
    }

    if (server->master.len && !server->sentinels) {
        return ngx_http_loyalty_sentinel_init_process(cycle, server);
    }

    server->conn = ngx_http_loyalty_redis_conn_create(server,
                                                      &server->addrs[0], NULL);
    if (server->conn == NULL) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * A connection to the server's address, or to a node of its cluster; it
 * connects when the first command is submitted.  Without an address yet
 * (Sentinel has not named the master) it is down until moved.
 */

ngx_http_loyalty_conn_t *
ngx_http_loyalty_redis_conn_create(ngx_http_loyalty_server_t *server,
    ngx_addr_t *addr, void *node)
{
    ngx_pool_t               *pool;
    ngx_http_loyalty_conn_t  *conn;

    pool = ngx_create_pool(4096, server->pool->log);
    if (pool == NULL) {
        return NULL;
    }

    conn = ngx_pcalloc(pool, sizeof(ngx_http_loyalty_conn_t));
    if (conn == NULL) {
        goto failed;
    }

    conn->pool = pool;

    conn->out = ngx_create_temp_buf(pool, NGX_HTTP_LOYALTY_OUT_SIZE);
    if (conn->out == NULL) {
        goto failed;
    }

    conn->in = ngx_pnalloc(pool, NGX_HTTP_LOYALTY_IN_SIZE);
    if (conn->in == NULL) {
        goto failed;
    }

    conn->server = server;
    conn->addr = addr;
    conn->node = node;

    /*
     * ROLE is asked of a server as configured: a cluster node is known by
     * the slot map, a sentinel is not a master
     */

    conn->role = (node == NULL && !server->sentinels);

    if (node == NULL) {
        conn->host = server->hosts ? server->hosts[0] : server->host;

    } else {
        /* a cluster node is known by its IP */

        conn->host.data = ngx_pnalloc(pool, NGX_SOCKADDR_STRLEN + 1);
        if (conn->host.data == NULL) {
            goto failed;
        }

        conn->host.len = ngx_sock_ntop(addr->sockaddr, addr->socklen,
                                       conn->host.data, NGX_SOCKADDR_STRLEN,
                                       0);
        conn->host.data[conn->host.len] = '\0';
    }

    /* a WAIT is silent for as long as it may wait */

    conn->dead = ngx_max(10 * server->connect_timeout,
                         NGX_HTTP_LOYALTY_DEAD_MIN)
                 + (server->credits ? 0 : server->wait);

    ngx_queue_init(&conn->pending);

    conn->log = *server->pool->log;
    conn->log.handler = ngx_http_loyalty_redis_log_error;
    conn->log.data = conn;
    conn->log.action = NULL;

    conn->deadline.handler = ngx_http_loyalty_redis_deadline_handler;
    conn->deadline.data = conn;
    conn->deadline.log = &conn->log;

    conn->backoff.handler = ngx_http_loyalty_redis_backoff_handler;
    conn->backoff.data = conn;
    conn->backoff.log = &conn->log;
    conn->backoff.cancelable = 1;

    return conn;

failed:

    ngx_destroy_pool(pool);

    return NULL;
}


/*
 * Commands that every new connection sends in its handshake, after AUTH
 * and SELECT, in the order registered; registered as the worker starts,
 * before a connection opens.  The handler, if any, judges the reply: an
 * error fails the connection.
 */

ngx_int_t
ngx_http_loyalty_redis_add_setup(ngx_http_loyalty_server_t *server,
    ngx_pool_t *pool, ngx_uint_t argc, ngx_str_t *argv,
    ngx_http_loyalty_redis_setup_pt handler, void *data)
{
    u_char                          *p;
    ngx_http_loyalty_redis_setup_t  *setup;

    if (server->setup.elts == NULL
        && ngx_array_init(&server->setup, pool, 1,
                          sizeof(ngx_http_loyalty_redis_setup_t))
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    setup = ngx_array_push(&server->setup);
    if (setup == NULL) {
        return NGX_ERROR;
    }

    p = ngx_pnalloc(pool, ngx_http_loyalty_command_len(argc, argv));
    if (p == NULL) {
        return NGX_ERROR;
    }

    setup->command.data = p;
    setup->command.len = ngx_http_loyalty_command_write(p, argc, argv) - p;
    setup->handler = handler;
    setup->data = data;

    return NGX_OK;
}


/*
 * What every new connection sends first, built on the first connect: AUTH
 * and SELECT when configured, ROLE, then the setup commands.
 */

static ngx_int_t
ngx_http_loyalty_redis_handshake_init(ngx_http_loyalty_conn_t *conn)
{
    u_char                          *p;
    size_t                           len;
    ngx_str_t                        auth[3], select[2], role;
    ngx_uint_t                       i, nauth;
    ngx_http_loyalty_server_t       *server;
    ngx_http_loyalty_redis_setup_t  *setup;
    u_char                           db[NGX_INT_T_LEN];

    server = conn->server;

    nauth = 0;

    if (server->password.len) {
        ngx_str_set(&auth[nauth], "AUTH");
        nauth++;

        if (server->user.len) {
            auth[nauth++] = server->user;
        }

        auth[nauth++] = server->password;
    }

    ngx_str_set(&select[0], "SELECT");
    select[1].data = db;
    select[1].len = ngx_sprintf(db, "%ui", server->db) - db;

    ngx_str_set(&role, "ROLE");

    setup = server->setup.elts;

    len = 0;

    for (i = 0; i < server->setup.nelts; i++) {
        len += setup[i].command.len;
    }

    if (nauth) {
        len += ngx_http_loyalty_command_len(nauth, auth);
    }

    if (server->db) {
        len += ngx_http_loyalty_command_len(2, select);
    }

    if (conn->role) {
        len += ngx_http_loyalty_command_len(1, &role);
    }

    if (len == 0) {
        ngx_str_set(&conn->handshake, "");
        return NGX_OK;
    }

    p = ngx_pnalloc(conn->pool, len);
    if (p == NULL) {
        return NGX_ERROR;
    }

    conn->handshake.data = p;

    if (nauth) {
        p = ngx_http_loyalty_command_write(p, nauth, auth);
    }

    if (server->db) {
        p = ngx_http_loyalty_command_write(p, 2, select);
    }

    if (conn->role) {
        p = ngx_http_loyalty_command_write(p, 1, &role);
    }

    for (i = 0; i < server->setup.nelts; i++) {
        p = ngx_cpymem(p, setup[i].command.data, setup[i].command.len);
    }

    conn->handshake.len = p - conn->handshake.data;

    return NGX_OK;
}


/*
 * The worker exits: what is still on a connection fails with NGX_ABORT
 * (credits go to the journal), and everything is freed.
 */

void
ngx_http_loyalty_redis_exit_process(ngx_http_loyalty_server_t *server)
{
    if (server->pool == NULL) {
        return;
    }

    if (server->sentinel) {
        ngx_http_loyalty_sentinel_exit_process(server);
    }

    if (server->cluster) {
        ngx_http_loyalty_cluster_exit_process(server);

    } else if (server->conn) {
        ngx_http_loyalty_redis_conn_destroy(server->conn);
        server->conn = NULL;
    }

    ngx_destroy_pool(server->pool);
    server->pool = NULL;
}


void
ngx_http_loyalty_redis_conn_destroy(ngx_http_loyalty_conn_t *conn)
{
    ngx_http_loyalty_redis_exit(conn);

#if (NGX_SSL)
    if (conn->session) {
        ngx_ssl_free_session(conn->session);
        conn->session = NULL;
    }
#endif

    ngx_destroy_pool(conn->pool);
}


/*
 * Queues a command; NULL when it cannot be sent now (the server is down,
 * or too much is queued).  The key routes it in a Redis Cluster.  The
 * handler is never called from here.
 */

ngx_http_loyalty_cmd_t *
ngx_http_loyalty_redis_send(ngx_http_loyalty_server_t *server, ngx_str_t *key,
    ngx_uint_t argc, ngx_str_t *argv, ngx_msec_t timeout,
    ngx_http_loyalty_reply_pt handler, void *data, ngx_log_t *log)
{
    ngx_int_t                 rc;
    ngx_http_loyalty_cmd_t   *cmd;
    ngx_http_loyalty_conn_t  *conn;

    if (server->pool == NULL) {
        return NULL;
    }

    cmd = ngx_http_loyalty_redis_command(server, argc, argv, timeout, handler,
                                         data);
    if (cmd == NULL) {
        rc = NGX_BUSY;
        goto failed;
    }

    if (server->cluster) {
        cmd->slot = ngx_http_loyalty_key_slot(key->data, key->len);
        conn = ngx_http_loyalty_cluster_route(server, cmd->slot);

    } else {
        conn = server->conn;
    }

    rc = (conn == NULL) ? NGX_DECLINED
                        : ngx_http_loyalty_redis_submit(conn, cmd);

    if (rc == NGX_OK) {
        return cmd;
    }

    ngx_http_loyalty_redis_free(server, cmd);

failed:

    /* an overload: one line a second */

    if (rc == NGX_BUSY && server->full_logged != ngx_time()) {
        server->full_logged = ngx_time();

        ngx_log_error(NGX_LOG_WARN, log, 0,
                      "loyalty: too many commands queued for redis %V",
                      &server->name);
    }

    return NULL;
}


/*
 * Queues a command right behind one just sent, on the connection that
 * took it: the WAIT that follows a credit.  NULL when it cannot be sent
 * there now.
 */

ngx_http_loyalty_cmd_t *
ngx_http_loyalty_redis_send_after(ngx_http_loyalty_cmd_t *prev,
    ngx_uint_t argc, ngx_str_t *argv, ngx_msec_t timeout,
    ngx_http_loyalty_reply_pt handler, void *data)
{
    ngx_http_loyalty_cmd_t     *cmd;
    ngx_http_loyalty_server_t  *server;

    server = prev->conn->server;

    cmd = ngx_http_loyalty_redis_command(server, argc, argv, timeout, handler,
                                         data);
    if (cmd == NULL) {
        return NULL;
    }

    if (ngx_http_loyalty_redis_submit(prev->conn, cmd) != NGX_OK) {
        ngx_http_loyalty_redis_free(server, cmd);
        return NULL;
    }

    return cmd;
}


/* a command, encoded, that is yet to be submitted */

ngx_http_loyalty_cmd_t *
ngx_http_loyalty_redis_command(ngx_http_loyalty_server_t *server,
    ngx_uint_t argc, ngx_str_t *argv, ngx_msec_t timeout,
    ngx_http_loyalty_reply_pt handler, void *data)
{
    u_char                  *p;
    ngx_http_loyalty_cmd_t  *cmd;

    cmd = ngx_http_loyalty_redis_alloc(server,
                                       ngx_http_loyalty_command_len(argc,
                                                                    argv));
    if (cmd == NULL) {
        return NULL;
    }

    p = cmd->command.data;
    cmd->command.len = ngx_http_loyalty_command_write(p, argc, argv) - p;

    cmd->handler = handler;
    cmd->data = data;
    cmd->deadline = ngx_current_msec + timeout;
    cmd->slot = 0;
    cmd->redirects = 0;
    cmd->timedout = 0;

    return cmd;
}


/*
 * Puts a command on a connection, connecting it if need be: NGX_DECLINED
 * when the connection is down, NGX_BUSY when its output buffer is full,
 * NGX_ABORT when the command's deadline has passed.
 */

ngx_int_t
ngx_http_loyalty_redis_submit(ngx_http_loyalty_conn_t *conn,
    ngx_http_loyalty_cmd_t *cmd)
{
    size_t           len;
    ngx_buf_t       *b;
    ngx_msec_int_t   left;

    switch (conn->state) {

    case ngx_http_loyalty_conn_ready:
        break;

    case ngx_http_loyalty_conn_down:
        return NGX_DECLINED;

    case ngx_http_loyalty_conn_closed:
        if (conn->addr == NULL) {
            /* Sentinel has not named the master yet */
            return NGX_DECLINED;
        }

        if (ngx_http_loyalty_redis_connect(conn) != NGX_OK) {
            ngx_http_loyalty_redis_fail(conn);
            return NGX_DECLINED;
        }

        break;

    default: /* connecting or in the handshake */

        /* a reconnect after a failure is not waited for */

        if (conn->failed) {
            return NGX_DECLINED;
        }

        break;
    }

    left = (ngx_msec_int_t) (cmd->deadline - ngx_current_msec);

    if (left <= 0) {
        return NGX_ABORT;
    }

    b = conn->out;
    len = cmd->command.len;

    if ((size_t) (b->end - b->last) < len) {

        if (b->pos != b->start) {
            b->last = ngx_movemem(b->start, b->pos, b->last - b->pos);
            b->pos = b->start;
        }

        if ((size_t) (b->end - b->last) < len) {
            return NGX_BUSY;
        }
    }

    /* what goes out is a copy: the command keeps its bytes until answered */

    b->last = ngx_cpymem(b->last, cmd->command.data, len);
    conn->queued += len;

    cmd->end = conn->queued;
    cmd->conn = conn;
    cmd->timedout = 0;

    if (ngx_queue_empty(&conn->pending)) {
        /* silence counts from the first reply due */
        conn->heard = ngx_current_msec;
    }

    ngx_queue_insert_tail(&conn->pending, &cmd->queue);
    conn->waiting++;

    /* a graceful shutdown waits for the replies of live commands */

    conn->deadline.cancelable = 0;

    /* the deadline timer never fires later than the earliest deadline */

    if (conn->deadline.timer_set) {
        if ((ngx_msec_int_t) (cmd->deadline - conn->deadline.timer.key) < 0) {
            ngx_del_timer(&conn->deadline);
            ngx_add_timer(&conn->deadline, (ngx_msec_t) left);
        }

    } else {
        ngx_add_timer(&conn->deadline, (ngx_msec_t) left);
    }

    if (conn->state == ngx_http_loyalty_conn_ready
        && !conn->connection->write->posted)
    {
        ngx_post_event(conn->connection->write, &ngx_posted_events);
    }

    return NGX_OK;
}


/* whether commands can be submitted, or (ready) are answered at once */

ngx_uint_t
ngx_http_loyalty_redis_conn_usable(ngx_http_loyalty_conn_t *conn,
    ngx_uint_t ready)
{
    switch (conn->state) {

    case ngx_http_loyalty_conn_ready:
        return 1;

    case ngx_http_loyalty_conn_down:
        return 0;

    case ngx_http_loyalty_conn_closed:
        return !ready;

    default: /* as ngx_http_loyalty_redis_submit() judges */
        return !ready && !conn->failed;
    }
}


/* the last connection failed, and no new one has got ready since */

ngx_uint_t
ngx_http_loyalty_redis_conn_failed(ngx_http_loyalty_conn_t *conn)
{
    return conn->failed;
}


ngx_addr_t *
ngx_http_loyalty_redis_conn_addr(ngx_http_loyalty_conn_t *conn)
{
    return conn->addr;
}


static ngx_int_t
ngx_http_loyalty_redis_connect(ngx_http_loyalty_conn_t *conn)
{
    ngx_err_t                   err;
    ngx_int_t                   rc;
    ngx_uint_t                  level;
    ngx_connection_t           *c;
    ngx_peer_connection_t      *pc;
    ngx_http_loyalty_server_t  *server;

    server = conn->server;
    pc = &conn->peer;

    ngx_memzero(pc, sizeof(ngx_peer_connection_t));

    pc->sockaddr = conn->addr->sockaddr;
    pc->socklen = conn->addr->socklen;
    pc->name = &conn->addr->name;
    pc->get = ngx_event_get_peer;
    pc->log = &conn->log;
    pc->log_error = NGX_ERROR_INFO;

    if (conn->handshake.data == NULL
        && ngx_http_loyalty_redis_handshake_init(conn) != NGX_OK)
    {
        return NGX_ERROR;
    }

    conn->reply_pool = ngx_create_pool(4096, &conn->log);
    if (conn->reply_pool == NULL) {
        return NGX_ERROR;
    }

    if (ngx_http_loyalty_reader_init(&conn->reader, conn->reply_pool)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    /*
     * A unix socket fails at once, and nginx logs that at "error" or
     * "crit": silenced here, logged as a lost Redis is, below.
     */

    level = conn->log.log_level;
    conn->log.log_level = NGX_LOG_ALERT;

    rc = ngx_event_connect_peer(pc);

    err = ngx_socket_errno;
    conn->log.log_level = level;

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, &conn->log, 0,
                   "loyalty redis connect: %i", rc);

    if (rc == NGX_ERROR || rc == NGX_BUSY || rc == NGX_DECLINED) {
        level = conn->failed ? NGX_LOG_INFO : NGX_LOG_WARN;
        ngx_log_error(level, &conn->log, err,
                      "loyalty: connect() to redis failed");
        return NGX_ERROR;
    }

    c = pc->connection;
    conn->connection = c;

    /* pipelined commands go out at once, not after the last one's ACK */

    if (pc->sockaddr->sa_family != AF_UNIX && ngx_tcp_nodelay(c) != NGX_OK) {
        return NGX_ERROR;
    }

    c->data = conn;
    c->log = &conn->log;
    c->read->log = c->log;
    c->write->log = c->log;
    c->read->handler = ngx_http_loyalty_redis_connect_handler;
    c->write->handler = ngx_http_loyalty_redis_connect_handler;

    conn->state = ngx_http_loyalty_conn_connecting;

    if (rc == NGX_AGAIN) {
        ngx_add_timer(c->write, server->connect_timeout);
        return NGX_OK;
    }

    /* a unix socket may connect at once */

    ngx_post_event(c->write, &ngx_posted_events);

    return NGX_OK;
}


/* connecting: both events learn how the connect went */

static void
ngx_http_loyalty_redis_connect_handler(ngx_event_t *ev)
{
    ngx_connection_t         *c;
    ngx_http_loyalty_conn_t  *conn;

    c = ev->data;
    conn = c->data;

    ngx_log_debug0(NGX_LOG_DEBUG_HTTP, ev->log, 0,
                   "loyalty redis connect handler");

    if (c->close) {
        ngx_http_loyalty_redis_exit(conn);
        return;
    }

    if (ev->timedout) {
        ngx_log_error(NGX_LOG_WARN, c->log, NGX_ETIMEDOUT,
                      "loyalty: redis connect timed out");

        if (ngx_http_loyalty_redis_next_address(conn) != NGX_OK) {
            ngx_http_loyalty_redis_fail(conn);
        }

        return;
    }

    if (c->write->timer_set) {
        ngx_del_timer(c->write);
    }

    if (ngx_http_loyalty_redis_test_connect(c) != NGX_OK) {

        if (ngx_http_loyalty_redis_next_address(conn) != NGX_OK) {
            ngx_http_loyalty_redis_fail(conn);
        }

        return;
    }

    conn->tried = 0;

#if (NGX_SSL)

    if (conn->server->tls) {
        ngx_http_loyalty_redis_ssl_init(conn);
        return;
    }

#endif

    ngx_http_loyalty_redis_handshake(conn);
}


/*
 * A host name with several addresses ("localhost": ::1 and 127.0.0.1):
 * a connect that fails goes on to the next one at once, what is queued
 * kept, until each was tried once.
 */

static ngx_int_t
ngx_http_loyalty_redis_next_address(ngx_http_loyalty_conn_t *conn)
{
    ngx_http_loyalty_server_t  *server;

    server = conn->server;

    if (conn->node
        || server->naddrs < 2
        || conn->tried + 1 >= server->naddrs
        || ngx_exiting || ngx_terminate)
    {
        conn->tried = 0;
        return NGX_DECLINED;
    }

    conn->tried++;

    ngx_http_loyalty_redis_use_addr(conn,
                                    (conn->addr - server->addrs + 1)
                                    % server->naddrs);

    ngx_log_error(NGX_LOG_INFO, &conn->log, 0,
                  "loyalty: trying the next address of redis, %V",
                  &conn->addr->name);

    /* nothing was written yet: what is queued stays for the next one */

    ngx_http_loyalty_redis_drop(conn);

    if (ngx_http_loyalty_redis_connect(conn) != NGX_OK) {
        return ngx_http_loyalty_redis_next_address(conn);
    }

    return NGX_OK;
}


static void
ngx_http_loyalty_redis_use_addr(ngx_http_loyalty_conn_t *conn, ngx_uint_t n)
{
    ngx_http_loyalty_server_t  *server;

    server = conn->server;

    conn->addr = &server->addrs[n];

    if (server->hosts) {
        conn->host = server->hosts[n];
    }
}


#if (NGX_SSL)

static void
ngx_http_loyalty_redis_ssl_init(ngx_http_loyalty_conn_t *conn)
{
    ngx_int_t                   rc;
    ngx_connection_t           *c;
    ngx_http_loyalty_server_t  *server;

    c = conn->connection;
    server = conn->server;

    if (server->ssl == NULL) {
        /* a "tls" line that no location uses */
        ngx_http_loyalty_redis_fail(conn);
        return;
    }

    /* the SSL connection lives in the connection's pool */

    c->pool = ngx_create_pool(1024, c->log);
    if (c->pool == NULL) {
        ngx_http_loyalty_redis_fail(conn);
        return;
    }

    if (ngx_http_loyalty_ssl_start(c, server->ssl, &conn->host,
                                   conn->session)
        != NGX_OK)
    {
        ngx_http_loyalty_redis_fail(conn);
        return;
    }

    c->ssl->save_session = ngx_http_loyalty_redis_ssl_save_session;

    /* what OpenSSL says of a failed handshake is logged at "error" */

    c->log_error = NGX_ERROR_ERR;
    c->log->action = "SSL handshaking to redis";

    conn->state = ngx_http_loyalty_conn_tls;

    rc = ngx_ssl_handshake(c);

    if (rc == NGX_AGAIN) {
        ngx_add_timer(c->read, server->connect_timeout);
        c->ssl->handler = ngx_http_loyalty_redis_ssl_handshake;
        return;
    }

    ngx_http_loyalty_redis_ssl_handshake(c);
}


static void
ngx_http_loyalty_redis_ssl_handshake(ngx_connection_t *c)
{
    ngx_http_loyalty_conn_t    *conn;
    ngx_http_loyalty_server_t  *server;

    conn = c->data;
    server = conn->server;

    c->log->action = NULL;
    c->log_error = NGX_ERROR_INFO;

    if (c->close) {
        ngx_http_loyalty_redis_exit(conn);
        return;
    }

    if (c->read->timedout || c->write->timedout) {
        ngx_log_error(NGX_LOG_WARN, c->log, NGX_ETIMEDOUT,
                      "loyalty: redis TLS handshake timed out");
        ngx_http_loyalty_redis_fail(conn);
        return;
    }

    if (c->read->timer_set) {
        ngx_del_timer(c->read);
    }

    if (!c->ssl->handshaked) {
        if (!ngx_http_loyalty_ssl_asked(c)) {
            ngx_log_error(NGX_LOG_ERR, c->log, 0,
                          "loyalty: redis TLS handshake failed");
        }

        ngx_http_loyalty_redis_fail(conn);
        return;
    }

    if (ngx_http_loyalty_ssl_check(c, server->ssl, &conn->host) != NGX_OK) {
        ngx_http_loyalty_redis_fail(conn);
        return;
    }

    if (server->events.count) {
        server->events.count(server->events.data,
                             SSL_session_reused(c->ssl->connection)
                             ? NGX_HTTP_LOYALTY_COUNT_TLS_REUSED
                             : NGX_HTTP_LOYALTY_COUNT_TLS_NEW);
    }

    /* TLS 1.2 has its session now; TLS 1.3 sends it later, to the callback */

    ngx_http_loyalty_redis_ssl_save_session(c);

    ngx_http_loyalty_redis_handshake(conn);
}


static void
ngx_http_loyalty_redis_ssl_save_session(ngx_connection_t *c)
{
    ngx_ssl_session_t        *session;
    ngx_http_loyalty_conn_t  *conn;

    conn = c->data;

    session = ngx_ssl_get_session(c);

    if (session == NULL) {
        return;
    }

    if (conn->session) {
        ngx_ssl_free_session(conn->session);
    }

    conn->session = session;
}

#endif


static ngx_int_t
ngx_http_loyalty_redis_test_connect(ngx_connection_t *c)
{
    int                       err;
    socklen_t                 len;
    ngx_uint_t                level;
    ngx_http_loyalty_conn_t  *conn;

    err = 0;
    len = sizeof(int);

    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, (void *) &err, &len) == -1) {
        err = ngx_socket_errno;
    }

    if (err) {
        conn = c->data;
        level = conn->failed ? NGX_LOG_INFO : NGX_LOG_WARN;

        ngx_log_error(level, c->log, err,
                      "loyalty: connect() to redis failed");
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * Connected: AUTH, SELECT and the setup commands go out in one write, and
 * each reply must come within the connect timeout.
 */

static void
ngx_http_loyalty_redis_handshake(ngx_http_loyalty_conn_t *conn)
{
    ssize_t            n;
    ngx_connection_t  *c;

    c = conn->connection;

    if (conn->handshake.len) {
        n = c->send(c, conn->handshake.data, conn->handshake.len);

        if (n != (ssize_t) conn->handshake.len) {
            /*
             * an incomplete write is an error too: a new socket takes a
             * few kilobytes at once
             */
            ngx_http_loyalty_redis_fail(conn);
            return;
        }
    }

    c->read->handler = ngx_http_loyalty_redis_read_handler;
    c->write->handler = ngx_http_loyalty_redis_dummy_handler;

    ngx_http_loyalty_redis_next_step(conn);

    if (conn->state == ngx_http_loyalty_conn_ready) {
        /* nothing to wait for */
        ngx_http_loyalty_redis_ready(conn);

    } else {
        ngx_add_timer(c->read, conn->server->connect_timeout);
    }

    if (ngx_handle_read_event(c->read, 0) != NGX_OK) {
        ngx_http_loyalty_redis_fail(conn);
    }
}


/*
 * The state after the one the connection is in: auth, select, role and
 * each setup command when there are any, then ready.
 */

static void
ngx_http_loyalty_redis_next_step(ngx_http_loyalty_conn_t *conn)
{
    ngx_http_loyalty_server_t  *server;

    server = conn->server;

    switch (conn->state) {

    case ngx_http_loyalty_conn_connecting:
    case ngx_http_loyalty_conn_tls:

        if (server->password.len) {
            conn->state = ngx_http_loyalty_conn_auth;
            return;
        }

        /* fall through */

    case ngx_http_loyalty_conn_auth:

        if (server->db) {
            conn->state = ngx_http_loyalty_conn_select;
            return;
        }

        /* fall through */

    case ngx_http_loyalty_conn_select:

        if (conn->role) {
            conn->state = ngx_http_loyalty_conn_role;
            return;
        }

        /* fall through */

    case ngx_http_loyalty_conn_role:

        conn->step = 0;
        break;

    default: /* ngx_http_loyalty_conn_setup */

        conn->step++;
        break;
    }

    conn->state = (conn->step < server->setup.nelts)
                  ? ngx_http_loyalty_conn_setup : ngx_http_loyalty_conn_ready;
}


/*
 * Moves the handshake on by one reply.  An error reply to AUTH or SELECT
 * fails the connection; the reply to a setup command is its handler's to
 * judge.  NGX_ERROR: the connection failed.
 */

static ngx_int_t
ngx_http_loyalty_redis_handshake_reply(ngx_http_loyalty_conn_t *conn,
    ngx_http_loyalty_reply_t *reply)
{
    ngx_uint_t                       error;
    ngx_http_loyalty_redis_setup_t  *setup;

    error = (reply->type == NGX_HTTP_LOYALTY_REPLY_ERROR);

    switch (conn->state) {

    case ngx_http_loyalty_conn_auth:

        if (error) {
            ngx_log_error(NGX_LOG_ERR, &conn->log, 0,
                          "loyalty: redis refused AUTH: \"%V\"", &reply->str);
            goto failed;
        }

        break;

    case ngx_http_loyalty_conn_select:

        if (error) {
            ngx_log_error(NGX_LOG_ERR, &conn->log, 0,
                          "loyalty: redis refused SELECT: \"%V\"",
                          &reply->str);
            goto failed;
        }

        break;

    case ngx_http_loyalty_conn_role:

        if (ngx_http_loyalty_redis_role(conn, reply) != NGX_OK) {
            goto failed;
        }

        break;

    default: /* ngx_http_loyalty_conn_setup */

        setup = conn->server->setup.elts;
        setup = &setup[conn->step];

        if (setup->handler
            && setup->handler(reply, setup->data, &conn->log) != NGX_OK)
        {
            goto failed;
        }

        break;
    }

    ngx_http_loyalty_redis_next_step(conn);

    if (conn->state == ngx_http_loyalty_conn_ready) {
        ngx_http_loyalty_redis_ready(conn);
        return NGX_OK;
    }

    /* each reply within the timeout */

    ngx_add_timer(conn->connection->read, conn->server->connect_timeout);

    return NGX_OK;

failed:

    ngx_http_loyalty_redis_fail(conn);

    return NGX_ERROR;
}


/*
 * A server that is not the master is not used: a replica where the master
 * was, after a failover that nothing told us of, or a sentinel named
 * without "sentinel=".  A Redis that refuses ROLE (renamed, or not allowed
 * by the user's ACL) is taken at its word.
 */

static ngx_int_t
ngx_http_loyalty_redis_role(ngx_http_loyalty_conn_t *conn,
    ngx_http_loyalty_reply_t *reply)
{
    ngx_str_t  *role;

    if (reply->type == NGX_HTTP_LOYALTY_REPLY_ERROR) {
        ngx_log_debug1(NGX_LOG_DEBUG_HTTP, &conn->log, 0,
                       "loyalty redis ROLE refused: \"%V\"", &reply->str);
        return NGX_OK;
    }

    if (reply->type != NGX_HTTP_LOYALTY_REPLY_ARRAY
        || reply->nelts == 0
        || reply->element[0]->type != NGX_HTTP_LOYALTY_REPLY_STRING)
    {
        ngx_log_error(NGX_LOG_ERR, &conn->log, 0,
                      "loyalty: unexpected reply from redis to ROLE");
        return NGX_ERROR;
    }

    role = &reply->element[0]->str;

    if (role->len == sizeof("master") - 1
        && ngx_strncmp(role->data, "master", role->len) == 0)
    {
        return NGX_OK;
    }

    if (role->len == sizeof("sentinel") - 1
        && ngx_strncmp(role->data, "sentinel", role->len) == 0)
    {
        ngx_log_error(NGX_LOG_ERR, &conn->log, 0,
                      "loyalty: redis is a sentinel: name its master with "
                      "\"sentinel=\" in \"loyalty_redis\"");
        return NGX_ERROR;
    }

    ngx_log_error(NGX_LOG_ERR, &conn->log, 0,
                  "loyalty: redis is not the master (ROLE \"%V\")", role);

    return NGX_ERROR;
}


/* the handshake is answered: the connection is up */

static void
ngx_http_loyalty_redis_ready(ngx_http_loyalty_conn_t *conn)
{
    ngx_connection_t           *c;
    ngx_http_loyalty_server_t  *server;

    c = conn->connection;
    server = conn->server;

    if (c->read->timer_set) {
        ngx_del_timer(c->read);
    }

    if (conn->failed) {
        ngx_log_error(NGX_LOG_INFO, c->log, 0,
                      "loyalty: redis connection restored");
    }

    conn->failed = 0;
    conn->delay = 0;
    conn->heard = ngx_current_msec;

    if (server->events.ready) {
        server->events.ready(server->events.data);
    }

    c->write->handler = ngx_http_loyalty_redis_write_handler;

    /*
     * what was queued meanwhile goes out now, and replies are due: also
     * those of commands already failed at their deadlines
     */

    if (conn->out->pos < conn->out->last) {
        ngx_post_event(c->write, &ngx_posted_events);
    }

    if (!ngx_queue_empty(&conn->pending) && !conn->deadline.timer_set) {
        conn->deadline.cancelable = 1;
        ngx_add_timer(&conn->deadline, conn->dead);
    }
}


/*
 * A command from the free list, or a new one, with room for len bytes.
 * Commands keep their buffers on the free list: a buffer too small is
 * replaced by one at least twice as large, so that most commands never
 * outgrow their first.  A large old buffer (an EVAL with the whole
 * script) goes back to the system; a small one stays in the pool, and all
 * that a command leaves behind so is less than the buffer it ends with.
 */

static ngx_http_loyalty_cmd_t *
ngx_http_loyalty_redis_alloc(ngx_http_loyalty_server_t *server, size_t len)
{
    u_char                  *p;
    size_t                   size;
    ngx_queue_t             *q;
    ngx_http_loyalty_cmd_t  *cmd;

    if (ngx_queue_empty(&server->free)) {
        if (server->ncmds == NGX_HTTP_LOYALTY_MAX_CMDS) {
            return NULL;
        }

        cmd = ngx_pcalloc(server->pool, sizeof(ngx_http_loyalty_cmd_t));
        if (cmd == NULL) {
            return NULL;
        }

        ngx_queue_insert_head(&server->free, &cmd->queue);
        server->ncmds++;
    }

    /* it leaves the free list only with a buffer large enough */

    q = ngx_queue_head(&server->free);
    cmd = ngx_queue_data(q, ngx_http_loyalty_cmd_t, queue);

    if (cmd->size < len) {
        size = ngx_max(2 * cmd->size, NGX_HTTP_LOYALTY_CMD_SIZE);
        size = ngx_max(size, len);

        p = ngx_pnalloc(server->pool, size);
        if (p == NULL) {
            return NULL;
        }

        if (cmd->command.data) {
            ngx_pfree(server->pool, cmd->command.data);
        }

        cmd->command.data = p;
        cmd->size = size;
    }

    ngx_queue_remove(q);

    return cmd;
}


void
ngx_http_loyalty_redis_free(ngx_http_loyalty_server_t *server,
    ngx_http_loyalty_cmd_t *cmd)
{
    cmd->handler = NULL;
    cmd->data = NULL;

    ngx_queue_insert_head(&server->free, &cmd->queue);
}


/*
 * The owner of a command is gone (its request was aborted): its handler
 * is not called, and the reply, when it comes, is read and dropped.
 */

void
ngx_http_loyalty_redis_cancel(ngx_http_loyalty_cmd_t *cmd)
{
    cmd->handler = NULL;
    cmd->data = NULL;
}


/* the outcome of a command, told its owner once */

void
ngx_http_loyalty_redis_done(ngx_http_loyalty_cmd_t *cmd, ngx_int_t rc,
    ngx_http_loyalty_reply_t *reply)
{
    ngx_http_loyalty_reply_pt  handler;

    handler = cmd->handler;

    if (handler) {
        cmd->handler = NULL;
        handler(cmd->data, rc, reply);
    }
}


static void
ngx_http_loyalty_redis_write_handler(ngx_event_t *wev)
{
    ssize_t                   n;
    ngx_buf_t                *b;
    ngx_connection_t         *c;
    ngx_http_loyalty_conn_t  *conn;

    c = wev->data;
    conn = c->data;

    b = conn->out;

    while (b->pos < b->last) {
        n = c->send(c, b->pos, b->last - b->pos);

        if (n == NGX_ERROR) {
            ngx_http_loyalty_redis_fail(conn);
            return;
        }

        if (n == NGX_AGAIN) {
            break;
        }

        b->pos += n;
        conn->written += n;
    }

    if (b->pos == b->last) {
        b->pos = b->start;
        b->last = b->start;
    }

    if (ngx_handle_write_event(wev, 0) != NGX_OK) {
        ngx_http_loyalty_redis_fail(conn);
    }
}


/*
 * One read path for the whole life of a connection: the replies go to the
 * handshake while it lasts, then to the commands.
 */

static void
ngx_http_loyalty_redis_read_handler(ngx_event_t *rev)
{
    ssize_t                   n;
    ngx_uint_t                state;
    ngx_connection_t         *c;
    ngx_http_loyalty_conn_t  *conn;

    c = rev->data;
    conn = c->data;

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, rev->log, 0,
                   "loyalty redis read handler, state: %ui", conn->state);

    /* worker_shutdown_timeout: nginx closes every connection this way */

    if (c->close) {
        ngx_http_loyalty_redis_exit(conn);
        return;
    }

    /* only the handshake sets a read timer */

    if (rev->timedout) {
        ngx_log_error(NGX_LOG_WARN, c->log, NGX_ETIMEDOUT,
                      "loyalty: redis did not answer the handshake in time");
        ngx_http_loyalty_redis_fail(conn);
        return;
    }

    state = conn->state;

    /*
     * Read until the socket is drained: with edge-triggered events,
     * bytes left behind would raise no further event.
     */

    for ( ;; ) {
        n = c->recv(c, conn->in, NGX_HTTP_LOYALTY_IN_SIZE);

        if (n == NGX_AGAIN) {
            break;
        }

        if (n == 0) {
            if (state == ngx_http_loyalty_conn_ready
                && ngx_queue_empty(&conn->pending)
                && conn->server->message == NULL)
            {
                /* an idle connection closed by the server's "timeout" */
                ngx_log_error(NGX_LOG_INFO, c->log, 0,
                              "loyalty: redis closed an idle connection");
                ngx_http_loyalty_redis_close(conn);
                return;
            }

            ngx_log_error(NGX_LOG_WARN, c->log, 0,
                          "loyalty: redis closed the connection");
            ngx_http_loyalty_redis_fail(conn);
            return;
        }

        if (n == NGX_ERROR) {
#if (NGX_SSL)
            if (c->ssl && state != ngx_http_loyalty_conn_ready) {
                /*
                 * in TLS 1.3 a server refuses a client's certificate
                 * after the handshake
                 */
                ngx_log_error(NGX_LOG_ERR, c->log, 0,
                              "loyalty: redis TLS handshake failed: the "
                              "connection broke before the first reply");
            }
#endif
            ngx_http_loyalty_redis_fail(conn);
            return;
        }

        if (ngx_http_loyalty_reader_feed(&conn->reader, conn->in, n)
            != NGX_OK)
        {
            ngx_log_error(NGX_LOG_ERR, c->log, 0,
                          "loyalty: redis reader failed");
            ngx_http_loyalty_redis_fail(conn);
            return;
        }

        if (ngx_http_loyalty_redis_process(conn) != NGX_OK) {
            return;
        }
    }

    if (ngx_handle_read_event(rev, 0) != NGX_OK) {
        ngx_http_loyalty_redis_fail(conn);
    }
}


/*
 * Hands every complete reply on, as the connection's state says: to the
 * step of the handshake, or to the oldest command.  NGX_ERROR: the
 * connection failed.
 */

static ngx_int_t
ngx_http_loyalty_redis_process(ngx_http_loyalty_conn_t *conn)
{
    ngx_int_t                  rc;
    ngx_str_t                  err;
    ngx_http_loyalty_reply_t  *reply;

    for ( ;; ) {
        rc = ngx_http_loyalty_reader_next(&conn->reader, &reply, &err);

        if (rc == NGX_AGAIN) {
            break;
        }

        if (rc == NGX_ERROR) {
            ngx_log_error(NGX_LOG_ERR, &conn->log, 0,
                          "loyalty: redis protocol error: %V", &err);
            ngx_http_loyalty_redis_fail(conn);
            return NGX_ERROR;
        }

        if (conn->state == ngx_http_loyalty_conn_ready) {
            rc = ngx_http_loyalty_redis_reply(conn, reply);

        } else {
            rc = ngx_http_loyalty_redis_handshake_reply(conn, reply);
        }

        if (rc != NGX_OK) {
            return NGX_ERROR;
        }
    }

    if (ngx_http_loyalty_reader_idle(&conn->reader) == NGX_OK) {
        ngx_reset_pool(conn->reply_pool);
    }

    if (conn->state != ngx_http_loyalty_conn_ready) {
        return NGX_OK;
    }

    if (ngx_queue_empty(&conn->pending)) {
        if (conn->deadline.timer_set) {
            ngx_del_timer(&conn->deadline);
        }

    } else {
        conn->deadline.cancelable = (conn->waiting == 0);
    }

    return NGX_OK;
}


/*
 * The reply of the oldest command, which must have gone out whole, or a
 * subscriber's message.  A READONLY reply says that the server is a
 * replica now: the command fails as if the connection broke, and the
 * connection does.  NGX_ERROR: the connection failed.
 */

static ngx_int_t
ngx_http_loyalty_redis_reply(ngx_http_loyalty_conn_t *conn,
    ngx_http_loyalty_reply_t *reply)
{
    ngx_queue_t                *q;
    ngx_connection_t           *c;
    ngx_http_loyalty_cmd_t     *cmd;
    ngx_http_loyalty_server_t  *server;

    c = conn->connection;
    server = conn->server;

    /*
     * on a subscribed connection, a message comes whenever it is sent,
     * between the replies to commands (PING)
     */

    if (ngx_queue_empty(&conn->pending)
        || (server->message && ngx_http_loyalty_redis_pushed(reply)))
    {
        if (server->message == NULL) {
            goto unexpected;
        }

        if (server->message(server->message_data, reply, &conn->log)
            != NGX_OK)
        {
            ngx_http_loyalty_redis_fail(conn);
            return NGX_ERROR;
        }

        return NGX_OK;
    }

    q = ngx_queue_head(&conn->pending);
    cmd = ngx_queue_data(q, ngx_http_loyalty_cmd_t, queue);

    if (cmd->end > conn->written) {
        /* Redis answers only what it has read */
        goto unexpected;
    }

    ngx_queue_remove(q);

    conn->heard = ngx_current_msec;

    if (!cmd->timedout) {
        conn->waiting--;
    }

    if (reply->type == NGX_HTTP_LOYALTY_REPLY_ERROR
        && conn->node == NULL
        && reply->str.len >= sizeof("READONLY") - 1
        && ngx_strncmp(reply->str.data, "READONLY", sizeof("READONLY") - 1)
           == 0)
    {
        ngx_log_error(NGX_LOG_WARN, c->log, 0,
                      "loyalty: redis answered READONLY, looking for the "
                      "master again");

        ngx_http_loyalty_redis_done(cmd, NGX_ERROR, NULL);
        ngx_http_loyalty_redis_free(server, cmd);

        if (conn->connection == c) {
            ngx_http_loyalty_redis_fail(conn);
        }

        return NGX_ERROR;
    }

    if (cmd->timedout) {
        ngx_log_debug0(NGX_LOG_DEBUG_HTTP, c->log, 0,
                       "loyalty redis late reply dropped");

    } else {

        /* a cluster node redirects: the command goes on elsewhere */

        if (conn->node
            && reply->type == NGX_HTTP_LOYALTY_REPLY_ERROR
            && cmd->handler
            && ngx_http_loyalty_cluster_reply(server, conn, cmd, reply)
               == NGX_DONE)
        {
            goto next;
        }

        ngx_http_loyalty_redis_done(cmd, NGX_OK, reply);
    }

    ngx_http_loyalty_redis_free(server, cmd);

next:

    if (conn->connection != c) {
        /* the handler failed the connection */
        return NGX_ERROR;
    }

    return NGX_OK;

unexpected:

    ngx_log_error(NGX_LOG_ERR, c->log, 0,
                  "loyalty: unexpected reply from redis");
    ngx_http_loyalty_redis_fail(conn);

    return NGX_ERROR;
}


/* a published message: ["message", channel, text] */

static ngx_uint_t
ngx_http_loyalty_redis_pushed(ngx_http_loyalty_reply_t *reply)
{
    ngx_http_loyalty_reply_t  *e;

    if (reply->type != NGX_HTTP_LOYALTY_REPLY_ARRAY || reply->nelts != 3) {
        return 0;
    }

    e = reply->element[0];

    return e->type == NGX_HTTP_LOYALTY_REPLY_STRING
           && e->str.len == sizeof("message") - 1
           && ngx_strncmp(e->str.data, "message", e->str.len) == 0;
}


static void
ngx_http_loyalty_redis_dummy_handler(ngx_event_t *ev)
{
    ngx_log_debug0(NGX_LOG_DEBUG_HTTP, ev->log, 0,
                   "loyalty redis dummy handler");
}


/*
 * The timer is armed no later than the earliest deadline of the live
 * commands, nor than the moment the connection counts as dead.  A command
 * past its deadline fails alone and stays queued for its late reply; the
 * connection fails only when no reply at all has come for conn->dead
 * while replies are due (bytes that never make a reply do not count).
 */

static void
ngx_http_loyalty_redis_deadline_handler(ngx_event_t *ev)
{
    ngx_uint_t                late;
    ngx_queue_t              *q;
    ngx_msec_int_t            left, next;
    ngx_connection_t         *c;
    ngx_http_loyalty_cmd_t   *cmd;
    ngx_http_loyalty_conn_t  *conn;

    conn = ev->data;
    c = conn->connection;

    if (ngx_queue_empty(&conn->pending)) {
        return;
    }

    next = -1;

    if (conn->state == ngx_http_loyalty_conn_ready) {
        left = (ngx_msec_int_t) (conn->heard + conn->dead - ngx_current_msec);

        if (left <= 0) {
            ngx_log_error(NGX_LOG_WARN, &conn->log, NGX_ETIMEDOUT,
                          "loyalty: no reply from redis for %M ms, "
                          "closing the connection", conn->dead);
            ngx_http_loyalty_redis_fail(conn);
            return;
        }

        next = left;
    }

    late = 0;

    for (q = ngx_queue_head(&conn->pending);
         q != ngx_queue_sentinel(&conn->pending);
         q = ngx_queue_next(q))
    {
        cmd = ngx_queue_data(q, ngx_http_loyalty_cmd_t, queue);

        if (cmd->timedout) {
            continue;
        }

        left = (ngx_msec_int_t) (cmd->deadline - ngx_current_msec);

        if (left > 0) {
            if (next == -1 || left < next) {
                next = left;
            }

            continue;
        }

        cmd->timedout = 1;
        conn->waiting--;
        late++;

        ngx_http_loyalty_redis_done(cmd, NGX_ERROR, NULL);

        if (conn->connection != c) {
            /* the handler failed the connection */
            return;
        }
    }

    /* a slow Redis times out many commands: one line a second */

    if (late && conn->late_logged != ngx_time()) {
        conn->late_logged = ngx_time();

        ngx_log_error(NGX_LOG_WARN, &conn->log, NGX_ETIMEDOUT,
                      "loyalty: redis did not answer in time");
    }

    if (next != -1) {
        ev->cancelable = (conn->waiting == 0);
        ngx_add_timer(ev, (ngx_msec_t) next);
    }
}


static void
ngx_http_loyalty_redis_backoff_handler(ngx_event_t *ev)
{
    ngx_http_loyalty_conn_t  *conn;

    conn = ev->data;

    if (conn->state != ngx_http_loyalty_conn_down
        || ngx_exiting || ngx_terminate)
    {
        return;
    }

    if (conn->node || conn->addr == NULL) {
        /*
         * a cluster node is connected again on demand: after a failover
         * it may serve no slot any more; a master that Sentinel has not
         * named yet, once it has
         */
        conn->state = ngx_http_loyalty_conn_closed;
        return;
    }

    if (conn->server->resolver
        && ngx_http_loyalty_redis_resolve(conn) == NGX_OK)
    {
        /* the connection stays down until the name is resolved */
        return;
    }

    conn->state = ngx_http_loyalty_conn_closed;

    if (ngx_http_loyalty_redis_connect(conn) != NGX_OK) {
        ngx_http_loyalty_redis_fail(conn);
    }
}


/*
 * With nginx's "resolver" in force, a host name is resolved again, without
 * blocking, before each reconnect: a managed Redis that fails over behind
 * its name is followed.  NGX_OK: the reconnect waits for the answer.
 */

static ngx_int_t
ngx_http_loyalty_redis_resolve(ngx_http_loyalty_conn_t *conn)
{
    ngx_resolver_ctx_t         *ctx;
    ngx_http_loyalty_server_t  *server;

    server = conn->server;

    ctx = ngx_resolve_start(server->resolver, NULL);

    if (ctx == NULL) {
        return NGX_ERROR;
    }

    if (ctx == NGX_NO_RESOLVER) {
        /* a "resolver" without addresses: never again */
        server->resolver = NULL;
        return NGX_DECLINED;
    }

    ctx->name = server->host;
    ctx->handler = ngx_http_loyalty_redis_resolved;
    ctx->data = conn;
    ctx->timeout = server->resolver_timeout;

    conn->resolving = ctx;

    /* the handler may be called from here, with a cached answer */

    if (ngx_resolve_name(ctx) != NGX_OK) {
        conn->resolving = NULL;
        return NGX_ERROR;
    }

    return NGX_OK;
}


static void
ngx_http_loyalty_redis_resolved(ngx_resolver_ctx_t *ctx)
{
    ngx_http_loyalty_conn_t  *conn;

    conn = ctx->data;

    if (ctx->state) {
        ngx_log_error(NGX_LOG_WARN, &conn->log, 0,
                      "loyalty: could not resolve redis host \"%V\" "
                      "(%i: %s), trying its last addresses",
                      &ctx->name, ctx->state,
                      ngx_resolver_strerror(ctx->state));

    } else {
        ngx_http_loyalty_redis_resolved_addrs(conn, ctx);
    }

    ngx_resolve_name_done(ctx);
    conn->resolving = NULL;

    if (conn->state != ngx_http_loyalty_conn_down
        || ngx_exiting || ngx_terminate)
    {
        return;
    }

    conn->state = ngx_http_loyalty_conn_closed;

    if (ngx_http_loyalty_redis_connect(conn) != NGX_OK) {
        ngx_http_loyalty_redis_fail(conn);
    }
}


/*
 * The addresses of an answer replace those in use when they differ, the
 * port kept: in room of the connection's own, made once.
 */

static void
ngx_http_loyalty_redis_resolved_addrs(ngx_http_loyalty_conn_t *conn,
    ngx_resolver_ctx_t *ctx)
{
    u_char                     *p, *names, *last;
    in_port_t                   port;
    ngx_uint_t                  i, j, n;
    ngx_addr_t                 *addr;
    ngx_sockaddr_t             *sa;
    ngx_http_loyalty_server_t  *server;
    u_char                      text[NGX_HTTP_LOYALTY_RESOLVED_MAX
                                     * (NGX_SOCKADDR_STRLEN + 1)];

    server = conn->server;

    n = ngx_min(ctx->naddrs, NGX_HTTP_LOYALTY_RESOLVED_MAX);

    if (n == 0) {
        return;
    }

    /* the same addresses, in any order: nothing changes */

    if (n == server->naddrs) {
        for (i = 0; i < n; i++) {
            for (j = 0; j < n; j++) {
                if (ngx_cmp_sockaddr(ctx->addrs[i].sockaddr,
                                     ctx->addrs[i].socklen,
                                     server->addrs[j].sockaddr,
                                     server->addrs[j].socklen, 0)
                    == NGX_OK)
                {
                    break;
                }
            }

            if (j == n) {
                break;
            }
        }

        if (i == n) {
            return;
        }
    }

    if (conn->resolved == NULL) {
        p = ngx_pnalloc(conn->pool, NGX_HTTP_LOYALTY_RESOLVED_MAX
                                    * (sizeof(ngx_addr_t)
                                       + sizeof(ngx_sockaddr_t)
                                       + NGX_SOCKADDR_STRLEN));
        if (p == NULL) {
            return;
        }

        conn->resolved = (ngx_addr_t *) p;
        conn->names = p + NGX_HTTP_LOYALTY_RESOLVED_MAX
                          * (sizeof(ngx_addr_t) + sizeof(ngx_sockaddr_t));
    }

    port = ngx_inet_get_port(server->addr.sockaddr);

    sa = (ngx_sockaddr_t *) (conn->resolved + NGX_HTTP_LOYALTY_RESOLVED_MAX);
    names = conn->names;

    p = text;
    last = text + sizeof(text);

    for (i = 0; i < n; i++) {
        addr = &conn->resolved[i];

        ngx_memcpy(&sa[i], ctx->addrs[i].sockaddr, ctx->addrs[i].socklen);
        ngx_inet_set_port(&sa[i].sockaddr, port);

        addr->sockaddr = &sa[i].sockaddr;
        addr->socklen = ctx->addrs[i].socklen;
        addr->name.data = names + i * NGX_SOCKADDR_STRLEN;
        addr->name.len = ngx_sock_ntop(addr->sockaddr, addr->socklen,
                                       addr->name.data, NGX_SOCKADDR_STRLEN,
                                       1);

        p = ngx_slprintf(p, last, "%s%V", i ? " " : "", &addr->name);
    }

    ngx_log_error(NGX_LOG_INFO, &conn->log, 0,
                  "loyalty: redis host \"%V\" resolves to %*s now",
                  &ctx->name, (size_t) (p - text), text);

    server->addrs = conn->resolved;
    server->naddrs = n;

    conn->addr = &server->addrs[0];
    conn->tried = 0;
}


/*
 * The server is elsewhere now (Sentinel named another master): what is
 * queued fails, as when a connection breaks, and the new address is
 * connected at once.
 */

void
ngx_http_loyalty_redis_conn_move(ngx_http_loyalty_conn_t *conn,
    ngx_addr_t *addr, ngx_str_t *host)
{
    conn->addr = addr;
    conn->host = *host;
    conn->tried = 0;

    ngx_http_loyalty_redis_reconnect(conn);
}


/*
 * Connects again at once, the connection open or not; what was queued on
 * it fails.
 */

void
ngx_http_loyalty_redis_reconnect(ngx_http_loyalty_conn_t *conn)
{
    if (ngx_exiting || ngx_terminate) {
        return;
    }

    if (conn->resolving) {
        ngx_resolve_name_done(conn->resolving);
        conn->resolving = NULL;
    }

    if (conn->backoff.timer_set) {
        ngx_del_timer(&conn->backoff);
    }

    ngx_http_loyalty_redis_close(conn);

    if (conn->addr == NULL) {
        return;
    }

    /*
     * the new connection first: handlers of the failed commands that
     * send again find it connecting
     */

    if (ngx_http_loyalty_redis_connect(conn) != NGX_OK) {
        ngx_http_loyalty_redis_fail(conn);
        return;
    }

    ngx_http_loyalty_redis_fail_pending(conn);
}


static void
ngx_http_loyalty_redis_close(ngx_http_loyalty_conn_t *conn)
{
    ngx_http_loyalty_server_t  *server;

    server = conn->server;

    if (conn->state == ngx_http_loyalty_conn_ready && server->events.close) {
        server->events.close(server->events.data);
    }

    ngx_http_loyalty_redis_drop(conn);

    if (conn->deadline.timer_set) {
        ngx_del_timer(&conn->deadline);
    }

    conn->out->pos = conn->out->start;
    conn->out->last = conn->out->start;
    conn->queued = 0;
    conn->written = 0;

    conn->state = ngx_http_loyalty_conn_closed;
}


/* the socket and the reader go; the queue and its buffer stay */

static void
ngx_http_loyalty_redis_drop(ngx_http_loyalty_conn_t *conn)
{
    if (conn->connection) {
        ngx_http_loyalty_redis_close_connection(conn->connection);
        conn->connection = NULL;
    }

    ngx_http_loyalty_reader_free(&conn->reader);

    if (conn->reply_pool) {
        ngx_destroy_pool(conn->reply_pool);
        conn->reply_pool = NULL;
    }
}


/*
 * Neither a close_notify is sent nor the peer's awaited: Redis needs none,
 * and a close never waits.
 */

static void
ngx_http_loyalty_redis_close_connection(ngx_connection_t *c)
{
#if (NGX_SSL)
    ngx_pool_t  *pool;

    if (c->ssl) {
        c->ssl->no_wait_shutdown = 1;
        c->ssl->no_send_shutdown = 1;

        (void) ngx_ssl_shutdown(c);
    }

    pool = c->pool;

    ngx_close_connection(c);

    if (pool) {
        ngx_destroy_pool(pool);
    }

#else

    ngx_close_connection(c);

#endif
}


/*
 * Closes the connection, schedules a reconnect (about 100ms doubling to
 * at most 2s, less up to a quarter at random so that workers do not
 * reconnect in step), then fails every queued command.  Only a connection
 * that gets ready starts the backoff again from 100ms.
 */

static void
ngx_http_loyalty_redis_fail(ngx_http_loyalty_conn_t *conn)
{
    ngx_msec_t                  delay;
    ngx_http_loyalty_server_t  *server;

    server = conn->server;

    ngx_http_loyalty_redis_close(conn);

    if (!conn->failed) {
        ngx_log_error(NGX_LOG_WARN, &conn->log, 0,
                      "loyalty: redis unavailable, requests get "
                      "\"unavailable\" until it is back");
    }

    conn->state = ngx_http_loyalty_conn_down;
    conn->failed = 1;

    if (conn->node == NULL && server->naddrs > 1) {
        /* the reconnect starts from another address of the name */
        ngx_http_loyalty_redis_use_addr(conn, (conn->addr - server->addrs + 1)
                                              % server->naddrs);
    }

    if (conn->delay == 0) {
        conn->delay = NGX_HTTP_LOYALTY_BACKOFF_MIN;

    } else {
        conn->delay = ngx_min(conn->delay * 2, NGX_HTTP_LOYALTY_BACKOFF_MAX);
    }

    delay = conn->delay - ngx_random() % (conn->delay / 4 + 1);

    if (conn->backoff.timer_set) {
        ngx_del_timer(&conn->backoff);
    }

    ngx_add_timer(&conn->backoff, delay);

    if (conn->node) {
        /* the node may have failed over: the slot map is looked at again */
        ngx_http_loyalty_cluster_failed(server, conn->node);

    } else if (server->sentinel) {
        /* so may the master: the sentinels are asked again */
        ngx_http_loyalty_sentinel_lost(server);
    }

    ngx_http_loyalty_redis_fail_pending(conn);
}


/* every command queued on a connection just closed fails */

static void
ngx_http_loyalty_redis_fail_pending(ngx_http_loyalty_conn_t *conn)
{
    ngx_queue_t             *q, pending;
    ngx_http_loyalty_cmd_t  *cmd;

    if (ngx_queue_empty(&conn->pending)) {
        return;
    }

    pending = conn->pending;
    pending.next->prev = &pending;
    pending.prev->next = &pending;

    ngx_queue_init(&conn->pending);
    conn->waiting = 0;

    while (!ngx_queue_empty(&pending)) {
        q = ngx_queue_head(&pending);
        ngx_queue_remove(q);

        cmd = ngx_queue_data(q, ngx_http_loyalty_cmd_t, queue);

        ngx_http_loyalty_redis_done(cmd, NGX_ERROR, NULL);

        ngx_http_loyalty_redis_free(conn->server, cmd);
    }
}


/*
 * The worker exits, or nginx closes its connections at the end of
 * worker_shutdown_timeout: no reconnect.  Requests are gone with the
 * worker; credits go to the journal: the handlers see NGX_ABORT.
 */

static void
ngx_http_loyalty_redis_exit(ngx_http_loyalty_conn_t *conn)
{
    ngx_queue_t             *q;
    ngx_http_loyalty_cmd_t  *cmd;

    if (conn->waiting) {
        ngx_log_error(NGX_LOG_INFO, &conn->log, 0,
                      "loyalty: worker exiting, %ui redis replies not "
                      "waited for", conn->waiting);
    }

    ngx_http_loyalty_redis_close(conn);

    conn->state = ngx_http_loyalty_conn_down;

    if (conn->backoff.timer_set) {
        ngx_del_timer(&conn->backoff);
    }

    if (conn->resolving) {
        ngx_resolve_name_done(conn->resolving);
        conn->resolving = NULL;
    }

    while (!ngx_queue_empty(&conn->pending)) {
        q = ngx_queue_head(&conn->pending);
        ngx_queue_remove(q);

        cmd = ngx_queue_data(q, ngx_http_loyalty_cmd_t, queue);

        ngx_http_loyalty_redis_done(cmd, NGX_ABORT, NULL);

        ngx_http_loyalty_redis_free(conn->server, cmd);
    }

    conn->waiting = 0;
}


static u_char *
ngx_http_loyalty_redis_log_error(ngx_log_t *log, u_char *buf, size_t len)
{
    ngx_http_loyalty_conn_t  *conn;

    conn = log->data;

    if (conn->node) {
        return ngx_snprintf(buf, len, ", redis: %V, cluster: %V",
                            &conn->addr->name, &conn->server->name);
    }

    if (conn->server->sentinels) {
        return ngx_snprintf(buf, len, ", sentinel: %V, master: \"%V\"",
                            &conn->addr->name, &conn->server->master);
    }

    if (conn->server->master.len && conn->addr) {
        return ngx_snprintf(buf, len, ", redis: %V, master: \"%V\"",
                            &conn->addr->name, &conn->server->master);
    }

    return ngx_snprintf(buf, len, ", redis: %V", &conn->server->name);
}
