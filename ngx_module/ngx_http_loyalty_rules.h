
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


#ifndef _NGX_HTTP_LOYALTY_RULES_H_INCLUDED_
#define _NGX_HTTP_LOYALTY_RULES_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>


/*
 * Pure logic: customer ids, tiers, offers, numbers, the escaping of JSON
 * strings and Prometheus labels, and the key slots and redirections of
 * Redis Cluster.  Nothing here takes a request, a
 * connection or a pool, and nothing calls into nginx, so the unit tests
 * link this file alone.
 */


#define NGX_HTTP_LOYALTY_ID_MAX        128
#define NGX_HTTP_LOYALTY_SIG_LEN       64       /* hex HMAC-SHA256 */
#define NGX_HTTP_LOYALTY_SECRETS_MAX   2

/* fixed-point decimals (amounts, rates, multipliers): value * 10^4 */
#define NGX_HTTP_LOYALTY_FRAC_DIGITS   4
#define NGX_HTTP_LOYALTY_FRAC_ONE      10000

/* at most 6 integer digits in rates and multipliers */
#define NGX_HTTP_LOYALTY_FIXED_DIGITS  6

/* at most 12 integer digits in an amount */
#define NGX_HTTP_LOYALTY_AMOUNT_DIGITS 12

/* an order or adjustment id, and the reason of one */
#define NGX_HTTP_LOYALTY_ORDER_MAX     128
#define NGX_HTTP_LOYALTY_REASON_MAX    200

/* at most 18 digits in points redeemed */
#define NGX_HTTP_LOYALTY_REDEEM_DIGITS 18

/*
 * The most points one order may earn: balances stay far below 2^53, where
 * the Lua numbers of the credit script are still exact.
 */
#define NGX_HTTP_LOYALTY_EARN_MAX      1000000000000000ULL

/* counts below 2^53 are exact in the Lua numbers of the scripts */
#define NGX_HTTP_LOYALTY_EXACT         9007199254740992ULL

/* at most 16 digits in a release time or points of a "pending" field */
#define NGX_HTTP_LOYALTY_PENDING_DIGITS 16

/* the most bytes one byte of a string becomes when escaped */
#define NGX_HTTP_LOYALTY_JSON_ESCAPE   6        /* \u001f */
#define NGX_HTTP_LOYALTY_LABEL_ESCAPE  2        /* \" */


typedef struct {
    ngx_str_t                  name;
    uint64_t                   min_lifetime;
    uint64_t                   multiplier;      /* fixed point, 10^4 */
} ngx_http_loyalty_tier_t;


typedef struct {
    ngx_str_t                  name;
    ngx_str_t                  code;
    ngx_str_t                  tier;
    uint64_t                   min_points;
    uint64_t                   max_points;
    uint64_t                   min_orders;
    uint64_t                   max_orders;
    uint64_t                   inactive;        /* seconds */

    void                      *cond;            /* if=, compiled by caller */
    ngx_uint_t                 slot;            /* counters, 0: none */

    unsigned                   has_tier:1;
    unsigned                   has_min_points:1;
    unsigned                   has_max_points:1;
    unsigned                   has_min_orders:1;
    unsigned                   has_max_orders:1;
    unsigned                   has_inactive:1;
    unsigned                   new_only:1;
} ngx_http_loyalty_offer_t;


/* Redis Cluster */
#define NGX_HTTP_LOYALTY_SLOTS         16384

/* "MOVED 3999 127.0.0.1:7002", "ASK ..." */
typedef struct {
    ngx_uint_t                 slot;
    ngx_str_t                  host;            /* may be empty */
    in_port_t                  port;
    unsigned                   ask:1;
} ngx_http_loyalty_redirect_t;


/* a customer record as read from Redis */
typedef struct {
    uint64_t                   points;
    uint64_t                   lifetime;
    uint64_t                   orders;
    uint64_t                   first_order;
    uint64_t                   last_order;
    uint64_t                   pending;         /* points still locked */
    time_t                     pending_release; /* the next release, 0 */
} ngx_http_loyalty_record_t;


/* the result of an if= condition, supplied by the caller */
typedef ngx_int_t (*ngx_http_loyalty_cond_pt)(void *data, void *cond);


ngx_int_t ngx_http_loyalty_valid_id(u_char *p, size_t len);
ngx_int_t ngx_http_loyalty_valid_text(u_char *p, size_t len);
ngx_int_t ngx_http_loyalty_verify(ngx_str_t *value, ngx_str_t *secrets,
    ngx_uint_t nsecrets, ngx_str_t *id);
void ngx_http_loyalty_sign(ngx_str_t *secret, u_char *id, size_t len,
    u_char *sig);
ngx_int_t ngx_http_loyalty_parse_uint(u_char *p, size_t len, uint64_t *value);
ngx_int_t ngx_http_loyalty_parse_pending(u_char *p, size_t len, time_t now,
    uint64_t *due, uint64_t *locked, time_t *next);
ngx_int_t ngx_http_loyalty_parse_fixed(u_char *p, size_t len,
    uint64_t *value);
ngx_int_t ngx_http_loyalty_parse_amount(u_char *p, size_t len,
    uint64_t *value);
ngx_int_t ngx_http_loyalty_parse_redeem(u_char *p, size_t len,
    uint64_t *value);
ngx_int_t ngx_http_loyalty_parse_signed(u_char *p, size_t len,
    uint64_t *value, ngx_uint_t *negative);
ngx_int_t ngx_http_loyalty_valid_order(u_char *p, size_t len);
ngx_int_t ngx_http_loyalty_valid_reason(u_char *p, size_t len);
ngx_int_t ngx_http_loyalty_form_arg(u_char *p, size_t len, u_char *name,
    size_t nlen, ngx_str_t *value);
ngx_int_t ngx_http_loyalty_form_decode(u_char *dst, u_char *src, size_t len,
    size_t *n);
ngx_int_t ngx_http_loyalty_earned(uint64_t amount, uint64_t rate,
    uint64_t multiplier, uint64_t *earned);

ngx_http_loyalty_tier_t *ngx_http_loyalty_select_tier(
    ngx_http_loyalty_tier_t *tiers, ngx_uint_t n, uint64_t lifetime);
ngx_http_loyalty_tier_t *ngx_http_loyalty_find_tier(
    ngx_http_loyalty_tier_t *tiers, ngx_uint_t n, ngx_str_t *name);
ngx_http_loyalty_offer_t *ngx_http_loyalty_select_offer(
    ngx_http_loyalty_offer_t *offers, ngx_uint_t n,
    ngx_http_loyalty_record_t *rec, ngx_http_loyalty_tier_t *tier,
    time_t now, ngx_http_loyalty_cond_pt cond, void *data);

u_char *ngx_http_loyalty_write_uint(u_char *p, uint64_t n);
u_char *ngx_http_loyalty_json_string(u_char *p, u_char *src, size_t len);
u_char *ngx_http_loyalty_json_field(u_char *p, ngx_str_t *name,
    ngx_str_t *value, ngx_uint_t quote);
u_char *ngx_http_loyalty_label_value(u_char *p, u_char *src, size_t len);

char *ngx_http_loyalty_offer_param(ngx_http_loyalty_offer_t *offer,
    ngx_str_t *param);
char *ngx_http_loyalty_offer_check(ngx_http_loyalty_offer_t *offer);
ngx_uint_t ngx_http_loyalty_key_slot(u_char *key, size_t len);
ngx_int_t ngx_http_loyalty_parse_redirect(u_char *p, size_t len,
    ngx_http_loyalty_redirect_t *rd);


#endif /* _NGX_HTTP_LOYALTY_RULES_H_INCLUDED_ */
