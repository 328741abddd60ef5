
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include "ngx_http_loyalty_redis.h"


/*
 * Redis Sentinel ("loyalty_redis ... sentinel=NAME"): the addresses are
 * sentinels, and the master they monitor as NAME is found through them.
 * Each worker keeps one connection to a sentinel, with the sentinels'
 * own credentials, made as a server of its own whose handshake asks
 *
 *     SENTINEL get-master-addr-by-name NAME
 *     SUBSCRIBE +switch-master
 *
 * so that the answer to the first names the master, and the connection
 * then stays subscribed: a "+switch-master" message for NAME moves the
 * master's connection to the new address at once, the old one dropped.
 * A sentinel that does not answer, refuses, or does not know NAME fails
 * that connection, and the next sentinel is asked after the backoff.
 * When the master's connection fails (lost, READONLY, ROLE not master),
 * the sentinels are asked again: the subscribed connection is made anew.
 * A PING every second keeps a reply due on the subscribed connection, so
 * that a sentinel cut off without a reset is found silent (no reply for
 * 10 times the timeout, at least a second) and the next one asked.
 */


#define NGX_HTTP_LOYALTY_SENTINEL_CHANNEL  "+switch-master"
#define NGX_HTTP_LOYALTY_SENTINEL_PING     1000


struct ngx_http_loyalty_sentinel_s {
    ngx_http_loyalty_server_t  *server;         /* the master */
    ngx_http_loyalty_server_t  *credits;        /* its copy for credits */
    ngx_http_loyalty_server_t   sentinels;
    ngx_pool_t                 *pool;
    ngx_event_t                 ping;

    ngx_addr_t                  addr;           /* of the master */
    ngx_sockaddr_t              sockaddr;
    ngx_str_t                   host;           /* its IP, a C string */
    u_char                      name[NGX_SOCKADDR_STRLEN];
    u_char                      ip[NGX_SOCKADDR_STRLEN + 1];

    unsigned                    known:1;
};


static ngx_int_t ngx_http_loyalty_sentinel_join(
    ngx_http_loyalty_server_t *server);
static ngx_int_t ngx_http_loyalty_sentinel_master(
    ngx_http_loyalty_reply_t *reply, void *data, ngx_log_t *log);
static ngx_int_t ngx_http_loyalty_sentinel_subscribed(
    ngx_http_loyalty_reply_t *reply, void *data, ngx_log_t *log);
static ngx_int_t ngx_http_loyalty_sentinel_message(void *data,
    ngx_http_loyalty_reply_t *reply, ngx_log_t *log);
static ngx_int_t ngx_http_loyalty_sentinel_set(
    ngx_http_loyalty_sentinel_t *sn, ngx_str_t *ip, ngx_str_t *port,
    ngx_uint_t switched, ngx_log_t *log);
static ngx_uint_t ngx_http_loyalty_sentinel_is(ngx_http_loyalty_reply_t *r,
    char *s, size_t len);
static void ngx_http_loyalty_sentinel_ping(ngx_event_t *ev);


ngx_int_t
ngx_http_loyalty_sentinel_init_process(ngx_cycle_t *cycle,
    ngx_http_loyalty_server_t *server)
{
    ngx_str_t                     argv[3];
    ngx_pool_t                   *pool;
    ngx_http_loyalty_server_t    *s;
    ngx_http_loyalty_sentinel_t  *sn;

    if (server->sentinel) {
        return ngx_http_loyalty_sentinel_join(server);
    }

    pool = ngx_create_pool(1024, cycle->log);
    if (pool == NULL) {
        return NGX_ERROR;
    }

    sn = ngx_pcalloc(pool, sizeof(ngx_http_loyalty_sentinel_t));
    if (sn == NULL) {
        goto failed;
    }

    sn->pool = pool;
    sn->server = server;

    /* the sentinels: a server whose connection asks and listens */

    s = &sn->sentinels;

    s->name = server->name;
    s->master = server->master;
    s->addr = server->seeds[0];
    s->addrs = server->seeds;
    s->naddrs = server->nseeds;
    s->hosts = server->hosts;
    s->host = server->hosts[0];
    s->user = server->sentinel_user;
    s->password = server->sentinel_password;
    s->connect_timeout = server->connect_timeout;
    s->tls = server->tls;
#if (NGX_SSL)
    s->ssl = server->ssl;
#endif
    s->sentinels = 1;

    /* the TLS handshakes are counted with the master's */

    s->events.count = server->events.count;
    s->events.data = server->events.data;

    s->message = ngx_http_loyalty_sentinel_message;
    s->message_data = sn;

    ngx_str_set(&argv[0], "SENTINEL");
    ngx_str_set(&argv[1], "get-master-addr-by-name");
    argv[2] = server->master;

    if (ngx_http_loyalty_redis_add_setup(s, pool, 3, argv,
                                         ngx_http_loyalty_sentinel_master, sn)
        != NGX_OK)
    {
        goto failed;
    }

    ngx_str_set(&argv[0], "SUBSCRIBE");
    ngx_str_set(&argv[1], NGX_HTTP_LOYALTY_SENTINEL_CHANNEL);

    if (ngx_http_loyalty_redis_add_setup(s, pool, 2, argv,
                                         ngx_http_loyalty_sentinel_subscribed,
                                         sn)
        != NGX_OK)
    {
        goto failed;
    }

    if (ngx_http_loyalty_redis_init_process(cycle, s) != NGX_OK) {
        goto failed;
    }

    /* the master: no address until a sentinel names it */

    sn->addr.sockaddr = &sn->sockaddr.sockaddr;
    sn->addr.name.data = sn->name;
    sn->host.data = sn->ip;

    server->addrs = &sn->addr;
    server->naddrs = 1;
    server->hosts = NULL;

    server->conn = ngx_http_loyalty_redis_conn_create(server, NULL, NULL);
    if (server->conn == NULL) {
        ngx_http_loyalty_redis_exit_process(s);
        goto failed;
    }

    server->sentinel = sn;

    if (server->credits) {
        /* initialized next: its master's connection follows this one */
        sn->credits = server->credits;
        server->credits->sentinel = sn;
    }

    /*
     * asked now, so that the first requests find the master known; not by
     * the cache manager and loader, which serve no request
     */

    if (ngx_process != NGX_PROCESS_HELPER) {
        ngx_http_loyalty_redis_reconnect(s->conn);

        sn->ping.handler = ngx_http_loyalty_sentinel_ping;
        sn->ping.data = sn;
        sn->ping.log = cycle->log;
        sn->ping.cancelable = 1;

        ngx_add_timer(&sn->ping, NGX_HTTP_LOYALTY_SENTINEL_PING);
    }

    return NGX_OK;

failed:

    ngx_destroy_pool(pool);

    return NGX_ERROR;
}


/*
 * The copy of a server that runs credits under loyalty_credit_wait asks
 * no sentinel of its own: one subscribed connection per worker moves the
 * master's connections of both.
 */

static ngx_int_t
ngx_http_loyalty_sentinel_join(ngx_http_loyalty_server_t *server)
{
    ngx_http_loyalty_sentinel_t  *sn;

    sn = server->sentinel;

    server->addrs = &sn->addr;
    server->naddrs = 1;
    server->hosts = NULL;

    server->conn = ngx_http_loyalty_redis_conn_create(server, NULL, NULL);
    if (server->conn == NULL) {
        server->sentinel = NULL;
        sn->credits = NULL;
        return NGX_ERROR;
    }

    if (sn->known) {
        ngx_http_loyalty_redis_conn_move(server->conn, &sn->addr, &sn->host);
    }

    return NGX_OK;
}


void
ngx_http_loyalty_sentinel_exit_process(ngx_http_loyalty_server_t *server)
{
    ngx_http_loyalty_sentinel_t  *sn;

    sn = server->sentinel;
    server->sentinel = NULL;

    if (sn->server != server) {
        /* the copy, if it goes first */
        sn->credits = NULL;
        ngx_http_loyalty_redis_conn_destroy(server->conn);
        server->conn = NULL;
        return;
    }

    if (sn->credits) {
        /* the copy's connection uses the master's address, freed here */

        sn->credits->sentinel = NULL;

        if (sn->credits->conn) {
            ngx_http_loyalty_redis_conn_destroy(sn->credits->conn);
            sn->credits->conn = NULL;
        }
    }

    if (sn->ping.timer_set) {
        ngx_del_timer(&sn->ping);
    }

    ngx_http_loyalty_redis_exit_process(&sn->sentinels);

    /* the master's connection goes with the server, its address with us */

    if (server->conn) {
        ngx_http_loyalty_redis_conn_destroy(server->conn);
        server->conn = NULL;
    }

    ngx_destroy_pool(sn->pool);
}


/*
 * The master's connection failed: a sentinel is asked again, unless a
 * connection to one is being made already.
 */

void
ngx_http_loyalty_sentinel_lost(ngx_http_loyalty_server_t *server)
{
    ngx_http_loyalty_conn_t  *conn;

    conn = server->sentinel->sentinels.conn;

    if (ngx_http_loyalty_redis_conn_usable(conn, 1)) {
        ngx_http_loyalty_redis_reconnect(conn);
    }
}


/* the reply to SENTINEL get-master-addr-by-name: the master's IP and port */

static ngx_int_t
ngx_http_loyalty_sentinel_master(ngx_http_loyalty_reply_t *reply,
    void *data, ngx_log_t *log)
{
    ngx_http_loyalty_sentinel_t *sn = data;

    if (reply->type == NGX_HTTP_LOYALTY_REPLY_NIL
        || (reply->type == NGX_HTTP_LOYALTY_REPLY_ARRAY && reply->nelts == 0))
    {
        ngx_log_error(NGX_LOG_ERR, log, 0,
                      "loyalty: sentinel does not know master \"%V\"",
                      &sn->server->master);
        return NGX_ERROR;
    }

    if (reply->type == NGX_HTTP_LOYALTY_REPLY_ERROR) {
        ngx_log_error(NGX_LOG_ERR, log, 0,
                      "loyalty: sentinel refused "
                      "SENTINEL get-master-addr-by-name: \"%V\"",
                      &reply->str);
        return NGX_ERROR;
    }

    if (reply->type != NGX_HTTP_LOYALTY_REPLY_ARRAY
        || reply->nelts != 2
        || reply->element[0]->type != NGX_HTTP_LOYALTY_REPLY_STRING
        || reply->element[1]->type != NGX_HTTP_LOYALTY_REPLY_STRING)
    {
        ngx_log_error(NGX_LOG_ERR, log, 0,
                      "loyalty: unexpected reply from sentinel to "
                      "SENTINEL get-master-addr-by-name");
        return NGX_ERROR;
    }

    return ngx_http_loyalty_sentinel_set(sn, &reply->element[0]->str,
                                         &reply->element[1]->str, 0, log);
}


static ngx_int_t
ngx_http_loyalty_sentinel_subscribed(ngx_http_loyalty_reply_t *reply,
    void *data, ngx_log_t *log)
{
    if (reply->type == NGX_HTTP_LOYALTY_REPLY_ARRAY
        && reply->nelts == 3
        && ngx_http_loyalty_sentinel_is(reply->element[0], "subscribe",
                                        sizeof("subscribe") - 1))
    {
        return NGX_OK;
    }

    if (reply->type == NGX_HTTP_LOYALTY_REPLY_ERROR) {
        ngx_log_error(NGX_LOG_ERR, log, 0,
                      "loyalty: sentinel refused SUBSCRIBE: \"%V\"",
                      &reply->str);

    } else {
        ngx_log_error(NGX_LOG_ERR, log, 0,
                      "loyalty: unexpected reply from sentinel to SUBSCRIBE");
    }

    return NGX_ERROR;
}


/*
 * A message on the subscribed connection:
 *
 *     "message" "+switch-master" "<name> <old ip> <old port> <ip> <port>"
 */

static ngx_int_t
ngx_http_loyalty_sentinel_message(void *data, ngx_http_loyalty_reply_t *reply,
    ngx_log_t *log)
{
    ngx_http_loyalty_sentinel_t *sn = data;

    u_char     *p, *last, *start;
    ngx_str_t   word[5];
    ngx_uint_t  n;

    if (reply->type != NGX_HTTP_LOYALTY_REPLY_ARRAY
        || reply->nelts != 3
        || !ngx_http_loyalty_sentinel_is(reply->element[0], "message",
                                         sizeof("message") - 1)
        || !ngx_http_loyalty_sentinel_is(reply->element[1],
                                  NGX_HTTP_LOYALTY_SENTINEL_CHANNEL,
                                  sizeof(NGX_HTTP_LOYALTY_SENTINEL_CHANNEL) - 1)
        || reply->element[2]->type != NGX_HTTP_LOYALTY_REPLY_STRING)
    {
        ngx_log_error(NGX_LOG_ERR, log, 0,
                      "loyalty: unexpected message from sentinel");
        return NGX_ERROR;
    }

    p = reply->element[2]->str.data;
    last = p + reply->element[2]->str.len;

    for (n = 0; n < 5; n++) {

        while (p < last && *p == ' ') {
            p++;
        }

        start = p;

        while (p < last && *p != ' ') {
            p++;
        }

        if (p == start) {
            break;
        }

        word[n].data = start;
        word[n].len = p - start;
    }

    if (n != 5) {
        ngx_log_error(NGX_LOG_ERR, log, 0,
                      "loyalty: sentinel sent an invalid +switch-master: "
                      "\"%V\"", &reply->element[2]->str);
        return NGX_ERROR;
    }

    if (word[0].len != sn->server->master.len
        || ngx_strncmp(word[0].data, sn->server->master.data, word[0].len)
           != 0)
    {
        /* another master of these sentinels */
        return NGX_OK;
    }

    return ngx_http_loyalty_sentinel_set(sn, &word[3], &word[4], 1, log);
}


/*
 * The master is at ip:port: when that is news, its connection moves there.
 * A sentinel announcing host names ("resolve-hostnames") is not followed.
 */

static ngx_int_t
ngx_http_loyalty_sentinel_set(ngx_http_loyalty_sentinel_t *sn, ngx_str_t *ip,
    ngx_str_t *port, ngx_uint_t switched, ngx_log_t *log)
{
    in_addr_t                   inaddr;
    ngx_int_t                   n;
    socklen_t                   socklen;
    ngx_sockaddr_t              sa;
    ngx_http_loyalty_server_t  *server;

    server = sn->server;

    n = ngx_atoi(port->data, port->len);

    if (n < 1 || n > 65535) {
        goto invalid;
    }

    ngx_memzero(&sa, sizeof(ngx_sockaddr_t));

    inaddr = ngx_inet_addr(ip->data, ip->len);

    if (inaddr != INADDR_NONE) {
        sa.sockaddr_in.sin_family = AF_INET;
        sa.sockaddr_in.sin_addr.s_addr = inaddr;
        socklen = sizeof(struct sockaddr_in);

#if (NGX_HAVE_INET6)
    } else if (ngx_inet6_addr(ip->data, ip->len,
                              sa.sockaddr_in6.sin6_addr.s6_addr)
               == NGX_OK)
    {
        sa.sockaddr_in6.sin6_family = AF_INET6;
        socklen = sizeof(struct sockaddr_in6);
#endif

    } else {
        goto invalid;
    }

    ngx_inet_set_port(&sa.sockaddr, (in_port_t) n);

    if (sn->known
        && ngx_cmp_sockaddr(&sa.sockaddr, socklen, sn->addr.sockaddr,
                            sn->addr.socklen, 1)
           == NGX_OK)
    {
        ngx_log_debug1(NGX_LOG_DEBUG_HTTP, log, 0,
                       "loyalty sentinel: master still at %V",
                       &sn->addr.name);
        return NGX_OK;
    }

    ngx_memcpy(&sn->sockaddr, &sa, socklen);
    sn->addr.socklen = socklen;
    sn->addr.name.len = ngx_sock_ntop(sn->addr.sockaddr, socklen, sn->name,
                                      NGX_SOCKADDR_STRLEN, 1);

    sn->host.len = ngx_sock_ntop(sn->addr.sockaddr, socklen, sn->ip,
                                 NGX_SOCKADDR_STRLEN, 0);
    sn->ip[sn->host.len] = '\0';

    if (switched) {
        ngx_log_error(NGX_LOG_WARN, log, 0,
                      "loyalty: +switch-master: the master of \"%V\" is "
                      "%V now", &server->master, &sn->addr.name);

    } else {
        ngx_log_error(NGX_LOG_INFO, log, 0,
                      "loyalty: sentinel says the master of \"%V\" is %V",
                      &server->master, &sn->addr.name);
    }

    if (sn->known && server->events.count) {
        server->events.count(server->events.data,
                             NGX_HTTP_LOYALTY_COUNT_FAILOVER);
    }

    sn->known = 1;

    ngx_http_loyalty_redis_conn_move(server->conn, &sn->addr, &sn->host);

    if (sn->credits) {
        ngx_http_loyalty_redis_conn_move(sn->credits->conn, &sn->addr,
                                         &sn->host);
    }

    return NGX_OK;

invalid:

    ngx_log_error(NGX_LOG_ERR, log, 0,
                  "loyalty: sentinel named the master of \"%V\" at \"%V\" "
                  "port \"%V\", which is not an IP address and port",
                  &server->master, ip, port);

    return NGX_ERROR;
}


static ngx_uint_t
ngx_http_loyalty_sentinel_is(ngx_http_loyalty_reply_t *r, char *s, size_t len)
{
    return r->type == NGX_HTTP_LOYALTY_REPLY_STRING
           && r->str.len == len
           && ngx_strncmp(r->str.data, s, len) == 0;
}


/* a PING on the subscribed connection, its reply dropped when it comes */

static void
ngx_http_loyalty_sentinel_ping(ngx_event_t *ev)
{
    ngx_str_t                     ping;
    ngx_http_loyalty_sentinel_t  *sn;

    sn = ev->data;

    if (ngx_exiting) {
        return;
    }

    if (ngx_http_loyalty_redis_conn_usable(sn->sentinels.conn, 1)) {
        ngx_str_set(&ping, "PING");

        (void) ngx_http_loyalty_redis_send(&sn->sentinels, &ping, 1, &ping,
                                           sn->sentinels.connect_timeout,
                                           NULL, NULL, ev->log);
    }

    ngx_add_timer(ev, NGX_HTTP_LOYALTY_SENTINEL_PING);
}
