
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


#ifndef _NGX_HTTP_LOYALTY_REDIS_H_INCLUDED_
#define _NGX_HTTP_LOYALTY_REDIS_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include "ngx_http_loyalty_rules.h"


/*
 * The Redis layer: per-worker connections to the configured servers
 * (ngx_http_loyalty_redis.c), and the protocol with the keys and fields of
 * a customer record (ngx_http_loyalty_proto.c).  Nothing here knows of
 * requests, credits or counters: their owners register setup commands and
 * events.
 */


/* reply types, numbered as hiredis' REDIS_REPLY_* */
#define NGX_HTTP_LOYALTY_REPLY_STRING  1
#define NGX_HTTP_LOYALTY_REPLY_ARRAY   2
#define NGX_HTTP_LOYALTY_REPLY_INTEGER 3
#define NGX_HTTP_LOYALTY_REPLY_NIL     4
#define NGX_HTTP_LOYALTY_REPLY_STATUS  5
#define NGX_HTTP_LOYALTY_REPLY_ERROR   6

#define NGX_HTTP_LOYALTY_ADDRESS_MAX   260      /* a host name and a port */
#define NGX_HTTP_LOYALTY_PREFIX_MAX    64
#define NGX_HTTP_LOYALTY_SEEDS_MAX     16

/* "<prefix>{<id>}" */
#define NGX_HTTP_LOYALTY_KEY_LEN                                             \
    (NGX_HTTP_LOYALTY_PREFIX_MAX + NGX_HTTP_LOYALTY_ID_MAX + 2)
#define NGX_HTTP_LOYALTY_SHA1_LEN      40

/* the fields of a customer hash, in HMGET order */
#define NGX_HTTP_LOYALTY_NCOUNTS       5        /* points ... last_order */
#define NGX_HTTP_LOYALTY_NFIELDS       6        /* and pending */


typedef struct ngx_http_loyalty_conn_s  ngx_http_loyalty_conn_t;
typedef struct ngx_http_loyalty_cmd_s   ngx_http_loyalty_cmd_t;
typedef struct ngx_http_loyalty_reply_s ngx_http_loyalty_reply_t;


/*
 * A setup command's reply, in a connection's handshake: NGX_ERROR fails
 * the connection.  The log names the server.
 */
typedef ngx_int_t (*ngx_http_loyalty_redis_setup_pt)(
    ngx_http_loyalty_reply_t *reply, void *data, ngx_log_t *log);

typedef struct {
    ngx_str_t                        command;   /* encoded */
    ngx_http_loyalty_redis_setup_pt  handler;
    void                            *data;
} ngx_http_loyalty_redis_setup_t;


typedef void (*ngx_http_loyalty_redis_event_pt)(void *data);
typedef void (*ngx_http_loyalty_redis_count_pt)(void *data, ngx_uint_t what);

/* what ngx_http_loyalty_redis_events_t.count counts */
#define NGX_HTTP_LOYALTY_COUNT_MOVED     0
#define NGX_HTTP_LOYALTY_COUNT_ASK       1
#define NGX_HTTP_LOYALTY_COUNT_TRYAGAIN  2
#define NGX_HTTP_LOYALTY_COUNT_REFRESH   3
#define NGX_HTTP_LOYALTY_COUNT_FAILOVER  4
#define NGX_HTTP_LOYALTY_COUNT_TLS_NEW   5      /* TLS handshakes */
#define NGX_HTTP_LOYALTY_COUNT_TLS_REUSED 6
#define NGX_HTTP_LOYALTY_COUNT_EVENTS    7

/*
 * A reply that no command waits for, on a subscribed connection: data is
 * the server's message_data; NGX_ERROR fails the connection.
 */
typedef ngx_int_t (*ngx_http_loyalty_redis_message_pt)(void *data,
    ngx_http_loyalty_reply_t *reply, ngx_log_t *log);

/* what a server's connections tell whoever keeps count of them */
typedef struct {
    ngx_http_loyalty_redis_event_pt  ready;     /* one got ready */
    ngx_http_loyalty_redis_event_pt  close;     /* a ready one closed */
    ngx_http_loyalty_redis_count_pt  count;     /* Redis Cluster events */
    void                            *data;
} ngx_http_loyalty_redis_events_t;


typedef struct ngx_http_loyalty_cluster_s   ngx_http_loyalty_cluster_t;
typedef struct ngx_http_loyalty_sentinel_s  ngx_http_loyalty_sentinel_t;


#if (NGX_SSL)

/* the loyalty_redis_ssl_* settings of a level */
typedef struct {
    ngx_str_t                  trusted_certificate;
    ngx_flag_t                 verify;
    ngx_int_t                  verify_depth;
    ngx_str_t                  name;
    ngx_flag_t                 server_name;
    ngx_str_t                  certificate;
    ngx_str_t                  certificate_key;
    ngx_uint_t                 protocols;
} ngx_http_loyalty_ssl_conf_t;


/* an SSL context, one per distinct settings */
typedef struct {
    ngx_ssl_t                  ssl;
    ngx_http_loyalty_ssl_conf_t  conf;          /* conf.name: C string */
} ngx_http_loyalty_ssl_t;

#endif


/*
 * A Redis server as configured, a Redis Cluster known by its seeds, or
 * the master that Sentinels name: one connection per worker, or one per
 * worker and master node.  Its owners add setup commands and set events as
 * the worker starts.
 */
typedef struct ngx_http_loyalty_server_s  ngx_http_loyalty_server_t;

struct ngx_http_loyalty_server_s {
    ngx_str_t                  name;            /* as written, for logs */
    ngx_addr_t                 addr;            /* the first seed */
    ngx_str_t                  host;            /* its host, a C string */
    ngx_addr_t                *addrs;           /* all of its addresses */
    ngx_uint_t                 naddrs;
    ngx_addr_t                *seeds;           /* cluster, sentinels */
    ngx_str_t                 *hosts;           /* of the seeds */
    ngx_uint_t                 nseeds;
    ngx_uint_t                 db;
    ngx_str_t                  user;
    ngx_str_t                  password;
    ngx_str_t                  master;          /* sentinel=NAME */
    ngx_str_t                  sentinel_user;
    ngx_str_t                  sentinel_password;
    ngx_msec_t                 connect_timeout;

    ngx_resolver_t            *resolver;        /* resolves host again */
    ngx_msec_t                 resolver_timeout;

    /*
     * loyalty_credit_wait: the longest WAIT of the locations, and the copy
     * of the server whose connections run their credits
     */
    ngx_msec_t                 wait;
    ngx_http_loyalty_server_t *credits;

    ngx_array_t                setup;   /* ngx_http_loyalty_redis_setup_t */
    ngx_http_loyalty_redis_events_t  events;
    ngx_http_loyalty_redis_message_pt  message;
    void                      *message_data;

    /* in each worker */
    ngx_pool_t                *pool;            /* commands */
    ngx_queue_t                free;
    ngx_uint_t                 ncmds;
    time_t                     full_logged;
    ngx_http_loyalty_conn_t   *conn;
    ngx_http_loyalty_cluster_t  *nodes;
    ngx_http_loyalty_sentinel_t  *sentinel;

#if (NGX_SSL)
    ngx_http_loyalty_ssl_t    *ssl;
#endif

    unsigned                   cluster:1;
    unsigned                   tls:1;
    unsigned                   named:1;         /* host is a name */
    unsigned                   sentinels:1;     /* a worker's sentinels */
};


/* a reply as built by our hiredis reader functions */
struct ngx_http_loyalty_reply_s {
    ngx_uint_t                 type;
    long long                  integer;
    ngx_str_t                  str;
    size_t                     nelts;
    ngx_http_loyalty_reply_t **element;
};


/* hiredis' reply reader, building our replies in a pool */
typedef struct {
    void                      *hiredis;
    ngx_pool_t                *pool;
    ngx_uint_t                 building;   /* a reply is half built */
    const char                *error;      /* why a reply was refused */
} ngx_http_loyalty_reader_t;


/*
 * Called once per command, unless it was cancelled: rc is NGX_OK with the
 * reply; NGX_ERROR when the command failed (connection lost, deadline
 * missed), NGX_ABORT when the worker exits, both with reply NULL.
 */
typedef void (*ngx_http_loyalty_reply_pt)(void *data, ngx_int_t rc,
    ngx_http_loyalty_reply_t *reply);


/*
 * A command keeps its encoded bytes until it is answered (or fails), so
 * that it can be sent again elsewhere; commands, with their buffers, are
 * reused from the server's free list.
 */
struct ngx_http_loyalty_cmd_s {
    ngx_queue_t                 queue;
    ngx_http_loyalty_conn_t    *conn;           /* the last it was put on */
    ngx_str_t                   command;        /* encoded */
    size_t                      size;           /* of command.data */
    off_t                       end;            /* in the bytes queued */
    ngx_msec_t                  deadline;
    ngx_http_loyalty_reply_pt   handler;        /* NULL: cancelled or done */
    void                       *data;
    ngx_uint_t                  slot;           /* Redis Cluster */
    ngx_uint_t                  redirects;
    ngx_msec_t                  resend;         /* after TRYAGAIN */
    unsigned                    timedout:1;     /* failed, reply awaited */
};


/* ngx_http_loyalty_redis.c */
ngx_int_t ngx_http_loyalty_redis_init_process(ngx_cycle_t *cycle,
    ngx_http_loyalty_server_t *server);
ngx_int_t ngx_http_loyalty_redis_add_setup(ngx_http_loyalty_server_t *server,
    ngx_pool_t *pool, ngx_uint_t argc, ngx_str_t *argv,
    ngx_http_loyalty_redis_setup_pt handler, void *data);
void ngx_http_loyalty_redis_exit_process(ngx_http_loyalty_server_t *server);
ngx_http_loyalty_cmd_t *ngx_http_loyalty_redis_send(
    ngx_http_loyalty_server_t *server, ngx_str_t *key, ngx_uint_t argc,
    ngx_str_t *argv, ngx_msec_t timeout, ngx_http_loyalty_reply_pt handler,
    void *data, ngx_log_t *log);
ngx_http_loyalty_cmd_t *ngx_http_loyalty_redis_send_after(
    ngx_http_loyalty_cmd_t *prev, ngx_uint_t argc, ngx_str_t *argv,
    ngx_msec_t timeout, ngx_http_loyalty_reply_pt handler, void *data);
void ngx_http_loyalty_redis_cancel(ngx_http_loyalty_cmd_t *cmd);

/* for ngx_http_loyalty_cluster.c: the connections to nodes */
ngx_http_loyalty_conn_t *ngx_http_loyalty_redis_conn_create(
    ngx_http_loyalty_server_t *server, ngx_addr_t *addr, void *node);
void ngx_http_loyalty_redis_conn_destroy(ngx_http_loyalty_conn_t *conn);
ngx_uint_t ngx_http_loyalty_redis_conn_usable(ngx_http_loyalty_conn_t *conn,
    ngx_uint_t ready);
ngx_uint_t ngx_http_loyalty_redis_conn_failed(ngx_http_loyalty_conn_t *conn);
ngx_addr_t *ngx_http_loyalty_redis_conn_addr(ngx_http_loyalty_conn_t *conn);
void ngx_http_loyalty_redis_conn_move(ngx_http_loyalty_conn_t *conn,
    ngx_addr_t *addr, ngx_str_t *host);
void ngx_http_loyalty_redis_reconnect(ngx_http_loyalty_conn_t *conn);
ngx_int_t ngx_http_loyalty_redis_submit(ngx_http_loyalty_conn_t *conn,
    ngx_http_loyalty_cmd_t *cmd);
ngx_http_loyalty_cmd_t *ngx_http_loyalty_redis_command(
    ngx_http_loyalty_server_t *server, ngx_uint_t argc, ngx_str_t *argv,
    ngx_msec_t timeout, ngx_http_loyalty_reply_pt handler, void *data);
void ngx_http_loyalty_redis_done(ngx_http_loyalty_cmd_t *cmd, ngx_int_t rc,
    ngx_http_loyalty_reply_t *reply);
void ngx_http_loyalty_redis_free(ngx_http_loyalty_server_t *server,
    ngx_http_loyalty_cmd_t *cmd);


/* ngx_http_loyalty_cluster.c */
ngx_int_t ngx_http_loyalty_cluster_init_process(ngx_cycle_t *cycle,
    ngx_http_loyalty_server_t *server);
void ngx_http_loyalty_cluster_exit_process(ngx_http_loyalty_server_t *server);
ngx_http_loyalty_conn_t *ngx_http_loyalty_cluster_route(
    ngx_http_loyalty_server_t *server, ngx_uint_t slot);
ngx_int_t ngx_http_loyalty_cluster_reply(ngx_http_loyalty_server_t *server,
    ngx_http_loyalty_conn_t *conn, ngx_http_loyalty_cmd_t *cmd,
    ngx_http_loyalty_reply_t *reply);
void ngx_http_loyalty_cluster_failed(ngx_http_loyalty_server_t *server,
    void *node);


/* ngx_http_loyalty_module.c */
ngx_uint_t ngx_http_loyalty_ip_literal(ngx_str_t *host);
void ngx_http_loyalty_unbracket(ngx_str_t *host);
ngx_uint_t ngx_http_loyalty_same_str(ngx_str_t *a, ngx_str_t *b);


/* ngx_http_loyalty_sentinel.c */
ngx_int_t ngx_http_loyalty_sentinel_init_process(ngx_cycle_t *cycle,
    ngx_http_loyalty_server_t *server);
void ngx_http_loyalty_sentinel_exit_process(ngx_http_loyalty_server_t *server);
void ngx_http_loyalty_sentinel_lost(ngx_http_loyalty_server_t *server);


#if (NGX_SSL)

/* ngx_http_loyalty_ssl.c */
ngx_int_t ngx_http_loyalty_ssl_start(ngx_connection_t *c,
    ngx_http_loyalty_ssl_t *ssl, ngx_str_t *host, ngx_ssl_session_t *session);
ngx_int_t ngx_http_loyalty_ssl_check(ngx_connection_t *c,
    ngx_http_loyalty_ssl_t *ssl, ngx_str_t *host);
ngx_int_t ngx_http_loyalty_ssl_asked(ngx_connection_t *c);

#endif


/* ngx_http_loyalty_proto.c */
extern ngx_str_t  ngx_http_loyalty_record_fields[];
u_char *ngx_http_loyalty_hash_key(u_char *p, ngx_str_t *prefix, u_char *id,
    size_t len);
size_t ngx_http_loyalty_command_len(ngx_uint_t argc, ngx_str_t *argv);
u_char *ngx_http_loyalty_command_write(u_char *p, ngx_uint_t argc,
    ngx_str_t *argv);
ngx_int_t ngx_http_loyalty_reader_init(ngx_http_loyalty_reader_t *rd,
    ngx_pool_t *pool);
void ngx_http_loyalty_reader_free(ngx_http_loyalty_reader_t *rd);
ngx_int_t ngx_http_loyalty_reader_feed(ngx_http_loyalty_reader_t *rd,
    u_char *buf, size_t n);
ngx_int_t ngx_http_loyalty_reader_next(ngx_http_loyalty_reader_t *rd,
    ngx_http_loyalty_reply_t **reply, ngx_str_t *err);
ngx_int_t ngx_http_loyalty_reader_idle(ngx_http_loyalty_reader_t *rd);
ngx_int_t ngx_http_loyalty_reply_uint(ngx_http_loyalty_reply_t *reply,
    uint64_t *value);
ngx_int_t ngx_http_loyalty_reply_record(ngx_http_loyalty_reply_t *reply,
    ngx_http_loyalty_record_t *record, time_t now, ngx_uint_t *bad);
ngx_int_t ngx_http_loyalty_script_sha1(ngx_str_t *script, u_char *sha);


#endif /* _NGX_HTTP_LOYALTY_REDIS_H_INCLUDED_ */
