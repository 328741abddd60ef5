
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


#ifndef _NGX_HTTP_LOYALTY_CREDIT_H_INCLUDED_
#define _NGX_HTTP_LOYALTY_CREDIT_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include "ngx_http_loyalty_module.h"


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
    uint64_t                      redeemed;     /* as the script says */
    ngx_uint_t                    attempts;
    ngx_http_loyalty_cmd_t       *cmd;          /* in flight */
    ngx_http_loyalty_cmd_t       *wait;         /* the WAIT behind it */
    size_t                        customer_len;
    size_t                        order_len;
    size_t                        amount_len;
    u_char                        customer[NGX_HTTP_LOYALTY_ID_MAX];
    u_char                        order[NGX_HTTP_LOYALTY_ORDER_MAX];
    u_char                        amount[NGX_HTTP_LOYALTY_AMOUNT_DIGITS
                                         + 1 + NGX_HTTP_LOYALTY_FRAC_DIGITS];
    unsigned                      eval:1;
    unsigned                      applied:1;    /* by one of its attempts */
    unsigned                      shortfall:1;
    unsigned                      replied:1;    /* its WAIT decides */
} ngx_http_loyalty_credit_t;


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


#endif /* _NGX_HTTP_LOYALTY_CREDIT_H_INCLUDED_ */
