
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


#ifndef _NGX_HTTP_LOYALTY_MODULE_H_INCLUDED_
#define _NGX_HTTP_LOYALTY_MODULE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include "ngx_http_loyalty_rules.h"


#define NGX_HTTP_LOYALTY_OFF           0
#define NGX_HTTP_LOYALTY_ANONYMOUS     1
#define NGX_HTTP_LOYALTY_INVALID       2
#define NGX_HTTP_LOYALTY_NEW           3
#define NGX_HTTP_LOYALTY_OK            4
#define NGX_HTTP_LOYALTY_UNAVAILABLE   5

/* reply types, numbered as hiredis' REDIS_REPLY_* */
#define NGX_HTTP_LOYALTY_REPLY_STRING  1
#define NGX_HTTP_LOYALTY_REPLY_ARRAY   2
#define NGX_HTTP_LOYALTY_REPLY_INTEGER 3
#define NGX_HTTP_LOYALTY_REPLY_NIL     4
#define NGX_HTTP_LOYALTY_REPLY_STATUS  5
#define NGX_HTTP_LOYALTY_REPLY_ERROR   6

#define NGX_HTTP_LOYALTY_FAIL_PASS     0
#define NGX_HTTP_LOYALTY_FAIL_REJECT   1


typedef struct ngx_http_loyalty_conn_s  ngx_http_loyalty_conn_t;
typedef struct ngx_http_loyalty_cmd_s   ngx_http_loyalty_cmd_t;
typedef struct ngx_http_loyalty_reply_s ngx_http_loyalty_reply_t;
typedef struct ngx_http_loyalty_credits_s ngx_http_loyalty_credits_t;


#define NGX_HTTP_LOYALTY_PREFIX_MAX    64
#define NGX_HTTP_LOYALTY_ADDRESS_MAX   260      /* a host name and a port */

/* "<prefix>{<id>}" */
#define NGX_HTTP_LOYALTY_KEY_LEN                                             \
    (NGX_HTTP_LOYALTY_PREFIX_MAX + NGX_HTTP_LOYALTY_ID_MAX + 2)
#define NGX_HTTP_LOYALTY_ORDER_MAX     128
#define NGX_HTTP_LOYALTY_SHA1_LEN      40

/* what variables, headers and the balance report */
#define NGX_HTTP_LOYALTY_VAR_STATUS      0
#define NGX_HTTP_LOYALTY_VAR_CUSTOMER    1
#define NGX_HTTP_LOYALTY_VAR_POINTS      2
#define NGX_HTTP_LOYALTY_VAR_LIFETIME    3
#define NGX_HTTP_LOYALTY_VAR_TIER        4
#define NGX_HTTP_LOYALTY_VAR_ORDERS      5
#define NGX_HTTP_LOYALTY_VAR_OFFER       6
#define NGX_HTTP_LOYALTY_VAR_OFFER_CODE  7
#define NGX_HTTP_LOYALTY_VAR_EARNED      8
#define NGX_HTTP_LOYALTY_VAR_BALANCE     9     /* points after the order */

/* shared counters */
#define NGX_HTTP_LOYALTY_BUCKETS         13
#define NGX_HTTP_LOYALTY_OFFERS_MAX      64
#define NGX_HTTP_LOYALTY_NAME_MAX        64

#define NGX_HTTP_LOYALTY_APPLIED         0
#define NGX_HTTP_LOYALTY_DUPLICATE       1
#define NGX_HTTP_LOYALTY_RETRIED         2
#define NGX_HTTP_LOYALTY_JOURNALED       3
#define NGX_HTTP_LOYALTY_CREDIT_RESULTS  4

/* the fields of a customer hash, in HMGET order */
#define NGX_HTTP_LOYALTY_NFIELDS       5


/*
 * The gauges of one process, in the slot of ngx_processes[] it runs in:
 * written by that process only, summed over the live ones when read.
 */
typedef struct {
    ngx_pid_t                  pid;
    ngx_atomic_t               connections;     /* ready ones */
} ngx_http_loyalty_process_t;


typedef struct {
    ngx_atomic_t               requests[NGX_HTTP_LOYALTY_UNAVAILABLE + 1];
    ngx_atomic_t               credits[NGX_HTTP_LOYALTY_CREDIT_RESULTS];
    ngx_atomic_t               shortfall;
    ngx_atomic_t               latency[NGX_HTTP_LOYALTY_BUCKETS + 1];
    ngx_atomic_t               latency_sum;     /* microseconds */

    ngx_uint_t                 noffers;
    struct {
        u_char                 name[NGX_HTTP_LOYALTY_NAME_MAX];
        size_t                 len;
        ngx_atomic_t           shown;
        ngx_atomic_t           converted;
    }                          offers[NGX_HTTP_LOYALTY_OFFERS_MAX];

    ngx_http_loyalty_process_t processes[NGX_MAX_PROCESSES];
} ngx_http_loyalty_shctx_t;


/*
 * Lock-free updates of the shared counters.  NGX_HTTP_LOYALTY_NO_COUNTERS
 * compiles them out: the benchmark measures what they cost.
 */

#if (NGX_HTTP_LOYALTY_NO_COUNTERS)

#define ngx_http_loyalty_count(sh, counter)  (void) (sh)
#define ngx_http_loyalty_count_latency(lmcf, usec)  (void) (lmcf)

#else

#define ngx_http_loyalty_count(sh, counter)                                  \
    do {                                                                     \
        ngx_http_loyalty_shctx_t  *sh_ = (sh);                               \
                                                                             \
        if (sh_) {                                                           \
            (void) ngx_atomic_fetch_add(&sh_->counter, 1);                   \
        }                                                                    \
    } while (0)

#endif


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

/* what a server's connections tell whoever keeps count of them */
typedef struct {
    ngx_http_loyalty_redis_event_pt  ready;     /* one got ready */
    ngx_http_loyalty_redis_event_pt  close;     /* a ready one closed */
    void                            *data;
} ngx_http_loyalty_redis_events_t;


/*
 * A Redis server as configured: one connection per worker.  Its owners
 * add setup commands and set events as the worker starts.
 */
typedef struct {
    ngx_str_t                  name;            /* as written, for logs */
    ngx_addr_t                 addr;
    ngx_uint_t                 db;
    ngx_str_t                  user;
    ngx_str_t                  password;
    ngx_msec_t                 connect_timeout;

    ngx_array_t                setup;   /* ngx_http_loyalty_redis_setup_t */
    ngx_http_loyalty_redis_events_t  events;

    ngx_http_loyalty_conn_t   *conn;            /* per worker */
} ngx_http_loyalty_server_t;


/* a warning that anyone can cause at any rate: at most one a second */
typedef struct {
    time_t                     logged;
    ngx_uint_t                 suppressed;
} ngx_http_loyalty_log_limit_t;


typedef struct {
    ngx_array_t                servers;   /* ngx_http_loyalty_server_t * */
    ngx_str_t                  script;
    u_char                     script_sha[NGX_HTTP_LOYALTY_SHA1_LEN];
    ngx_http_complex_value_t   request_id;      /* the default order id */

    ngx_http_loyalty_credits_t *credits;        /* per worker */
    ngx_http_loyalty_shctx_t  *sh;
    ngx_array_t                offers;   /* ngx_http_loyalty_offer_t * */
    ngx_array_t                header_vars; /* indexes, $http_x_loyalty_* */

    /* per worker: warnings about invalid ids and Redis error replies */
    ngx_http_loyalty_log_limit_t  invalid_log;
    ngx_http_loyalty_log_limit_t  error_reply_log;
} ngx_http_loyalty_main_conf_t;


typedef struct {
    ngx_flag_t                 strip;     /* "loyalty on" in the server */
} ngx_http_loyalty_srv_conf_t;


typedef struct {
    ngx_flag_t                 enable;
    ngx_http_complex_value_t  *customer;
    ngx_array_t               *secrets;    /* ngx_str_t */
    ngx_http_loyalty_server_t *server;
    ngx_msec_t                 timeout;
    ngx_str_t                  prefix;
    ngx_array_t               *tiers;      /* ngx_http_loyalty_tier_t */
    ngx_array_t               *offers;     /* ngx_http_loyalty_offer_t */
    ngx_uint_t                 fail;
    ngx_flag_t                 request_headers;
    ngx_flag_t                 response_headers;

    ngx_http_complex_value_t  *earn;
    ngx_uint_t                 earn_rate;       /* fixed point, 10^4 */
    ngx_http_complex_value_t  *redeem;
    ngx_http_complex_value_t  *order_id;
    time_t                     expire;          /* 0: off */
    ngx_int_t                  ledger;          /* 0: off */
    ngx_open_file_t           *journal;         /* NULL: error log */
    ngx_flag_t                 journal_set;

    unsigned                   balance:1;       /* loyalty_balance here */
} ngx_http_loyalty_loc_conf_t;


/*
 * Per request, also found again after an internal redirect.  The request
 * stays bound to the location where its read ran: "conf" is what its
 * credit and response headers use, wherever the request ends.
 */
typedef struct {
    ngx_http_loyalty_loc_conf_t  *conf;
    ngx_uint_t                    status;
    ngx_str_t                     customer;
    ngx_http_loyalty_record_t     record;
    ngx_http_loyalty_tier_t      *tier;
    ngx_http_loyalty_offer_t     *offer;

    ngx_http_request_t           *request;
    ngx_http_loyalty_cmd_t       *cmd;          /* while waiting */
    ngx_int_t                     rc;           /* for the phase handler */

    uint64_t                      earned;
    uint64_t                      redeemed;

    uint64_t                      sent;         /* microseconds */

    unsigned                      started:1;
    unsigned                      waiting:1;
    unsigned                      done:1;
    unsigned                      content:1;    /* loyalty_balance */
    unsigned                      balance:1;    /* it answers */
    unsigned                      filtered:1;
    unsigned                      credited:1;
} ngx_http_loyalty_ctx_t;


/* a credit on its way to Redis; outlives its request */
typedef struct {
    ngx_queue_t                   queue;
    ngx_http_loyalty_credits_t   *credits;
    ngx_http_loyalty_main_conf_t *lmcf;
    ngx_http_loyalty_loc_conf_t  *conf;
    ngx_uint_t                    offer;        /* slot, 0: none */
    time_t                        ts;
    uint64_t                      earned;
    uint64_t                      redeem;
    ngx_uint_t                    attempts;
    size_t                        customer_len;
    size_t                        order_len;
    size_t                        amount_len;
    u_char                        customer[NGX_HTTP_LOYALTY_ID_MAX];
    u_char                        order[NGX_HTTP_LOYALTY_ORDER_MAX];
    u_char                        amount[NGX_HTTP_LOYALTY_AMOUNT_DIGITS
                                         + 1 + NGX_HTTP_LOYALTY_FRAC_DIGITS];
    unsigned                      eval:1;
} ngx_http_loyalty_credit_t;


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
 * Called once per command: with the reply, or with NULL when the command
 * failed (connection lost, deadline missed, worker exiting).
 */
typedef void (*ngx_http_loyalty_reply_pt)(ngx_http_loyalty_cmd_t *cmd,
    ngx_http_loyalty_reply_t *reply);


struct ngx_http_loyalty_cmd_s {
    ngx_queue_t                queue;
    ngx_http_loyalty_reply_pt  handler;
    void                      *data;       /* NULL once the owner is gone */
    ngx_msec_t                 deadline;
    off_t                      end;        /* its last byte, queued */
    unsigned                   exiting:1;  /* failed by the worker's exit */
    unsigned                   timedout:1; /* failed, its reply awaited */
};


/* ngx_http_loyalty_module.c */
extern ngx_module_t  ngx_http_loyalty_module;


/* ngx_http_loyalty_handler.c */
ngx_int_t ngx_http_loyalty_post_read_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_loyalty_server_rewrite_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_loyalty_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_loyalty_lookup(ngx_http_request_t *r, ngx_uint_t content);
uint64_t ngx_http_loyalty_usec(void);
ngx_http_loyalty_ctx_t *ngx_http_loyalty_get_ctx(ngx_http_request_t *r);
ngx_int_t ngx_http_loyalty_log_limit(ngx_http_loyalty_log_limit_t *limit,
    ngx_uint_t *suppressed);
ngx_int_t ngx_http_loyalty_filter_init(ngx_conf_t *cf);


/* ngx_http_loyalty_redis.c */
ngx_int_t ngx_http_loyalty_redis_init_process(ngx_cycle_t *cycle,
    ngx_http_loyalty_server_t *server);
ngx_int_t ngx_http_loyalty_redis_add_setup(ngx_http_loyalty_server_t *server,
    ngx_pool_t *pool, ngx_uint_t argc, ngx_str_t *argv,
    ngx_http_loyalty_redis_setup_pt handler, void *data);
void ngx_http_loyalty_redis_exit_process(ngx_http_loyalty_server_t *server);
ngx_http_loyalty_cmd_t *ngx_http_loyalty_redis_send(
    ngx_http_loyalty_server_t *server, ngx_uint_t argc, ngx_str_t *argv,
    ngx_msec_t timeout, ngx_http_loyalty_reply_pt handler, void *data,
    ngx_log_t *log);


/* ngx_http_loyalty_credit.c */
ngx_int_t ngx_http_loyalty_credit(ngx_http_request_t *r,
    ngx_http_loyalty_ctx_t *ctx);
ngx_int_t ngx_http_loyalty_credit_init_process(ngx_cycle_t *cycle,
    ngx_http_loyalty_main_conf_t *lmcf);
void ngx_http_loyalty_credit_exit_process(ngx_http_loyalty_main_conf_t *lmcf);


/* ngx_http_loyalty_journal.c */
char *ngx_http_loyalty_journal_directive(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
void ngx_http_loyalty_journal(ngx_http_loyalty_credit_t *cr,
    const char *reason, ngx_log_t *log);


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
    ngx_http_loyalty_record_t *record, ngx_uint_t *bad);
ngx_int_t ngx_http_loyalty_script_sha1(ngx_str_t *script, u_char *sha);


/* ngx_http_loyalty_variables.c */
ngx_int_t ngx_http_loyalty_add_variables(ngx_conf_t *cf);
ngx_int_t ngx_http_loyalty_strip_headers(ngx_http_request_t *r);
ngx_int_t ngx_http_loyalty_set_request_headers(ngx_http_request_t *r,
    ngx_http_loyalty_ctx_t *ctx);
ngx_int_t ngx_http_loyalty_set_response_headers(ngx_http_request_t *r,
    ngx_http_loyalty_ctx_t *ctx);
ngx_str_t *ngx_http_loyalty_status_name(ngx_uint_t status);
ngx_int_t ngx_http_loyalty_value(ngx_http_request_t *r,
    ngx_http_loyalty_ctx_t *ctx, ngx_uint_t var, ngx_str_t *value);


/* ngx_http_loyalty_status.c */
ngx_int_t ngx_http_loyalty_status_zone(ngx_conf_t *cf,
    ngx_http_loyalty_main_conf_t *lmcf);
void ngx_http_loyalty_status_init_process(ngx_http_loyalty_main_conf_t *lmcf);
#if !(NGX_HTTP_LOYALTY_NO_COUNTERS)
void ngx_http_loyalty_count_latency(ngx_http_loyalty_main_conf_t *lmcf,
    ngx_uint_t usec);
#endif
char *ngx_http_loyalty_status(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_loyalty_balance(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
ngx_int_t ngx_http_loyalty_balance_send(ngx_http_request_t *r,
    ngx_http_loyalty_ctx_t *ctx);


#endif /* _NGX_HTTP_LOYALTY_MODULE_H_INCLUDED_ */
