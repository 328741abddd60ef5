
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


#ifndef _NGX_HTTP_LOYALTY_MODULE_H_INCLUDED_
#define _NGX_HTTP_LOYALTY_MODULE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include "ngx_http_loyalty_rules.h"
#include "ngx_http_loyalty_redis.h"


#define NGX_HTTP_LOYALTY_OFF           0
#define NGX_HTTP_LOYALTY_ANONYMOUS     1
#define NGX_HTTP_LOYALTY_INVALID       2
#define NGX_HTTP_LOYALTY_NEW           3
#define NGX_HTTP_LOYALTY_OK            4
#define NGX_HTTP_LOYALTY_UNAVAILABLE   5

#define NGX_HTTP_LOYALTY_FAIL_PASS     0
#define NGX_HTTP_LOYALTY_FAIL_REJECT   1

#define NGX_HTTP_LOYALTY_REPLICAS_MAX  64      /* loyalty_credit_wait */
#define NGX_HTTP_LOYALTY_ORDER_TTL     (30 * 86400)
#define NGX_HTTP_LOYALTY_TIME_MAX      ((time_t) 100 * 365 * 86400)  /* s */


typedef struct ngx_http_loyalty_credits_s ngx_http_loyalty_credits_t;


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
#define NGX_HTTP_LOYALTY_VAR_PENDING     10
#define NGX_HTTP_LOYALTY_VAR_PENDING_AFTER  11  /* and with what it earned */

/* shared counters */
#define NGX_HTTP_LOYALTY_BUCKETS         13
#define NGX_HTTP_LOYALTY_OFFERS_MAX      64
#define NGX_HTTP_LOYALTY_NAME_MAX        64

#define NGX_HTTP_LOYALTY_APPLIED         0
#define NGX_HTTP_LOYALTY_DUPLICATE       1
#define NGX_HTTP_LOYALTY_RETRIED         2
#define NGX_HTTP_LOYALTY_JOURNALED       3
#define NGX_HTTP_LOYALTY_CREDIT_RESULTS  4

/* loyalty_api: the calls, and the status words of their answers */
#define NGX_HTTP_LOYALTY_API_LEDGER         0
#define NGX_HTTP_LOYALTY_API_REFUND         1
#define NGX_HTTP_LOYALTY_API_ADJUST         2
#define NGX_HTTP_LOYALTY_API_OPS            3

#define NGX_HTTP_LOYALTY_API_OK             0
#define NGX_HTTP_LOYALTY_API_APPLIED        1
#define NGX_HTTP_LOYALTY_API_UNCHANGED      2
#define NGX_HTTP_LOYALTY_API_UNKNOWN_ORDER  3
#define NGX_HTTP_LOYALTY_API_INVALID        4
#define NGX_HTTP_LOYALTY_API_INSUFFICIENT   5
#define NGX_HTTP_LOYALTY_API_UNAVAILABLE    6
#define NGX_HTTP_LOYALTY_API_STATUSES       7


typedef struct {
    ngx_str_t                  word;
    ngx_uint_t                 http;
} ngx_http_loyalty_api_status_t;


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
    ngx_atomic_t               api[NGX_HTTP_LOYALTY_API_OPS]
                                  [NGX_HTTP_LOYALTY_API_STATUSES];
    ngx_atomic_t               reversed;        /* points, by refunds */
    ngx_atomic_t               forgiven;
    ngx_atomic_t               latency[NGX_HTTP_LOYALTY_BUCKETS + 1];
    ngx_atomic_t               latency_sum;     /* microseconds */
    ngx_atomic_t               cluster[NGX_HTTP_LOYALTY_COUNT_EVENTS];

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


/* a warning that anyone can cause at any rate: at most one a second */
typedef struct {
    time_t                     logged;
    ngx_uint_t                 suppressed;
} ngx_http_loyalty_log_limit_t;


typedef struct {
    ngx_array_t                servers;   /* ngx_http_loyalty_server_t * */
    ngx_str_t                  script;
    u_char                     script_sha[NGX_HTTP_LOYALTY_SHA1_LEN];
    ngx_str_t                  api_script;      /* refunds, adjustments */
    u_char                     api_script_sha[NGX_HTTP_LOYALTY_SHA1_LEN];
    ngx_http_complex_value_t   request_id;      /* the default order id */

    ngx_http_loyalty_credits_t *credits;        /* per worker */
    ngx_http_loyalty_shctx_t  *sh;
    ngx_array_t                offers;   /* ngx_http_loyalty_offer_t * */
    ngx_array_t                header_vars; /* indexes, $http_x_loyalty_* */

    /* per worker: warnings about invalid ids and Redis error replies */
    ngx_http_loyalty_log_limit_t  invalid_log;
    ngx_http_loyalty_log_limit_t  error_reply_log;
    ngx_http_loyalty_log_limit_t  wait_log;     /* credits unconfirmed */

    ngx_array_t                ssl;       /* ngx_http_loyalty_ssl_t * */
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
    time_t                     pending;         /* lock period, 0: off */
    time_t                     order_ttl;       /* an order's marker */
    ngx_int_t                  ledger;          /* 0: off */
    ngx_open_file_t           *journal;         /* NULL: error log */
    ngx_uint_t                 credit_wait;     /* replicas, 0: off */
    ngx_msec_t                 credit_wait_time;

#if (NGX_SSL)
    ngx_http_loyalty_ssl_conf_t  ssl;
#endif

    ngx_http_handler_pt        handler;         /* of the three below */

    unsigned                   balance:1;       /* loyalty_balance here */
    unsigned                   noread:1;        /* not "loyalty on" here */
} ngx_http_loyalty_loc_conf_t;


typedef struct ngx_http_loyalty_ctx_s  ngx_http_loyalty_ctx_t;

/* a content handler that answers once the record is read */
typedef ngx_int_t (*ngx_http_loyalty_content_pt)(ngx_http_request_t *r,
    ngx_http_loyalty_ctx_t *ctx);


/*
 * Per request, also found again after an internal redirect.  The request
 * stays bound to the location where its read ran: "conf" is what its
 * credit and response headers use, wherever the request ends.
 */
struct ngx_http_loyalty_ctx_s {
    ngx_http_loyalty_loc_conf_t  *conf;
    ngx_uint_t                    status;
    ngx_str_t                     customer;
    ngx_http_loyalty_record_t     record;
    ngx_http_loyalty_tier_t      *tier;
    ngx_http_loyalty_offer_t     *offer;

    ngx_http_request_t           *request;
    ngx_http_loyalty_cmd_t       *cmd;          /* while waiting */
    ngx_int_t                     rc;           /* for the phase handler */
    ngx_http_loyalty_content_pt   content;      /* loyalty_balance */

    uint64_t                      earned;
    uint64_t                      redeemed;

    uint64_t                      sent;         /* microseconds */

    unsigned                      started:1;
    unsigned                      waiting:1;
    unsigned                      done:1;
    unsigned                      balance:1;    /* it answers */
    unsigned                      filtered:1;
    unsigned                      credited:1;
};


/* ngx_http_loyalty_module.c */
extern ngx_module_t  ngx_http_loyalty_module;


/* ngx_http_loyalty_handler.c */
ngx_int_t ngx_http_loyalty_post_read_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_loyalty_server_rewrite_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_loyalty_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_loyalty_lookup(ngx_http_request_t *r,
    ngx_http_loyalty_content_pt content);
uint64_t ngx_http_loyalty_usec(void);
ngx_http_loyalty_ctx_t *ngx_http_loyalty_get_ctx(ngx_http_request_t *r);
ngx_int_t ngx_http_loyalty_log_limit(ngx_http_loyalty_log_limit_t *limit,
    ngx_uint_t *suppressed);
ngx_int_t ngx_http_loyalty_filter_init(ngx_conf_t *cf);


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


#if (NGX_SSL)

/* ngx_http_loyalty_ssl.c */
extern ngx_conf_bitmask_t  ngx_http_loyalty_ssl_protocols[];
extern ngx_conf_post_t     ngx_http_loyalty_ssl_verify_post;
extern ngx_conf_post_t     ngx_http_loyalty_ssl_depth_post;
char *ngx_http_loyalty_ssl_file(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_loyalty_ssl_protocols_slot(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
void ngx_http_loyalty_ssl_init_conf(ngx_http_loyalty_ssl_conf_t *conf);
void ngx_http_loyalty_ssl_merge_conf(ngx_http_loyalty_ssl_conf_t *conf,
    ngx_http_loyalty_ssl_conf_t *prev);
ngx_http_loyalty_ssl_t *ngx_http_loyalty_ssl_get(ngx_conf_t *cf,
    ngx_http_loyalty_ssl_conf_t *conf);

#endif


/* ngx_http_loyalty_balance.c */
char *ngx_http_loyalty_balance(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
ngx_int_t ngx_http_loyalty_no_store(ngx_http_request_t *r);


/* ngx_http_loyalty_api.c */
extern ngx_http_loyalty_api_status_t  ngx_http_loyalty_api_statuses[];
char *ngx_http_loyalty_api(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
void ngx_http_loyalty_api_count(ngx_http_request_t *r, ngx_uint_t op,
    ngx_uint_t status);


#endif /* _NGX_HTTP_LOYALTY_MODULE_H_INCLUDED_ */
