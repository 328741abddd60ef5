
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include "ngx_http_loyalty_module.h"
#include "ngx_http_loyalty_redis.h"
#include "ngx_http_loyalty_credit.h"
#include "ngx_http_loyalty_script.h"


#define NGX_HTTP_LOYALTY_REDIS_PORT     6379
#define NGX_HTTP_LOYALTY_SENTINEL_PORT  26379
#define NGX_HTTP_LOYALTY_REDIS_DEFAULT  "127.0.0.1:6379"


static ngx_int_t ngx_http_loyalty_preconfiguration(ngx_conf_t *cf);
static ngx_int_t ngx_http_loyalty_postconfiguration(ngx_conf_t *cf);
static void *ngx_http_loyalty_create_main_conf(ngx_conf_t *cf);
static void *ngx_http_loyalty_create_srv_conf(ngx_conf_t *cf);
static void *ngx_http_loyalty_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_loyalty_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child);
static ngx_int_t ngx_http_loyalty_merge_server(ngx_conf_t *cf,
    ngx_http_loyalty_loc_conf_t *prev, ngx_http_loyalty_loc_conf_t *conf);
static char *ngx_http_loyalty_merge_offers(ngx_conf_t *cf,
    ngx_http_loyalty_loc_conf_t *conf);
static char *ngx_http_loyalty_redis(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static ngx_http_loyalty_server_t *ngx_http_loyalty_add_server(ngx_conf_t *cf,
    ngx_str_t **names, ngx_uint_t n, ngx_http_loyalty_server_t *key);
static ngx_uint_t ngx_http_loyalty_same_server(ngx_http_loyalty_server_t *a,
    ngx_http_loyalty_server_t *b);
#if (NGX_SSL)
static ngx_http_loyalty_server_t *ngx_http_loyalty_tls_server(ngx_conf_t *cf,
    ngx_http_loyalty_loc_conf_t *conf);
#endif
static char *ngx_http_loyalty_tier(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_loyalty_offer(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_loyalty_offer_inactive(ngx_http_loyalty_offer_t *offer,
    ngx_str_t *param);
static char *ngx_http_loyalty_offer_if(ngx_conf_t *cf,
    ngx_http_loyalty_offer_t *offer, ngx_str_t *param);
static void ngx_http_loyalty_offer_invalid(ngx_conf_t *cf, ngx_str_t *param,
    char *err);
static ngx_int_t ngx_http_loyalty_count_offers(ngx_conf_t *cf,
    ngx_array_t *offers);
static char *ngx_http_loyalty_set_enum_slot(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_loyalty_secret(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_loyalty_earn_rate(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_loyalty_time_off(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_loyalty_ledger(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_loyalty_credit_wait(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static ngx_int_t ngx_http_loyalty_credit_servers(ngx_conf_t *cf,
    ngx_http_loyalty_main_conf_t *lmcf);
static char *ngx_http_loyalty_prefix_check(ngx_conf_t *cf, void *post,
    void *data);
static char *ngx_http_loyalty_positive(ngx_conf_t *cf, void *post,
    void *data);
static ngx_int_t ngx_http_loyalty_init_module(ngx_cycle_t *cycle);
static ngx_int_t ngx_http_loyalty_init_process(ngx_cycle_t *cycle);
static void ngx_http_loyalty_exit_process(ngx_cycle_t *cycle);


static ngx_conf_post_t  ngx_http_loyalty_prefix_post =
    { ngx_http_loyalty_prefix_check };

static ngx_conf_post_t  ngx_http_loyalty_order_ttl_post =
    { ngx_http_loyalty_positive };


static ngx_conf_enum_t  ngx_http_loyalty_fail_values[] = {
    { ngx_string("pass"), NGX_HTTP_LOYALTY_FAIL_PASS },
    { ngx_string("reject"), NGX_HTTP_LOYALTY_FAIL_REJECT },
    { ngx_null_string, 0 }
};


static ngx_command_t  ngx_http_loyalty_commands[] = {

    { ngx_string("loyalty"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_loyalty_loc_conf_t, enable),
      NULL },

    { ngx_string("loyalty_customer"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_set_complex_value_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_loyalty_loc_conf_t, customer),
      NULL },

    { ngx_string("loyalty_secret"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_loyalty_secret,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("loyalty_redis"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_http_loyalty_redis,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("loyalty_redis_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_loyalty_loc_conf_t, timeout),
      NULL },

    { ngx_string("loyalty_redis_prefix"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_loyalty_loc_conf_t, prefix),
      &ngx_http_loyalty_prefix_post },

#if (NGX_SSL)

    { ngx_string("loyalty_redis_ssl_trusted_certificate"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_loyalty_ssl_file,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_loyalty_loc_conf_t, ssl.trusted_certificate),
      NULL },

    { ngx_string("loyalty_redis_ssl_verify"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_loyalty_loc_conf_t, ssl.verify),
      &ngx_http_loyalty_ssl_verify_post },

    { ngx_string("loyalty_redis_ssl_verify_depth"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_loyalty_loc_conf_t, ssl.verify_depth),
      &ngx_http_loyalty_ssl_depth_post },

    { ngx_string("loyalty_redis_ssl_name"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_loyalty_loc_conf_t, ssl.name),
      NULL },

    { ngx_string("loyalty_redis_ssl_server_name"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_loyalty_loc_conf_t, ssl.server_name),
      NULL },

    { ngx_string("loyalty_redis_ssl_certificate"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_loyalty_ssl_file,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_loyalty_loc_conf_t, ssl.certificate),
      NULL },

    { ngx_string("loyalty_redis_ssl_certificate_key"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_loyalty_ssl_file,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_loyalty_loc_conf_t, ssl.certificate_key),
      NULL },

    { ngx_string("loyalty_redis_ssl_protocols"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_http_loyalty_ssl_protocols_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_loyalty_loc_conf_t, ssl.protocols),
      ngx_http_loyalty_ssl_protocols },
#endif

    { ngx_string("loyalty_tier"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE23,
      ngx_http_loyalty_tier,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("loyalty_offer"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_http_loyalty_offer,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("loyalty_fail"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_loyalty_set_enum_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_loyalty_loc_conf_t, fail),
      &ngx_http_loyalty_fail_values },

    { ngx_string("loyalty_request_headers"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_loyalty_loc_conf_t, request_headers),
      NULL },

    { ngx_string("loyalty_response_headers"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_loyalty_loc_conf_t, response_headers),
      NULL },

    { ngx_string("loyalty_earn"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_set_complex_value_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_loyalty_loc_conf_t, earn),
      NULL },

    { ngx_string("loyalty_earn_rate"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_loyalty_earn_rate,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("loyalty_redeem"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_set_complex_value_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_loyalty_loc_conf_t, redeem),
      NULL },

    { ngx_string("loyalty_order_id"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_set_complex_value_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_loyalty_loc_conf_t, order_id),
      NULL },

    { ngx_string("loyalty_expire"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_loyalty_time_off,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_loyalty_loc_conf_t, expire),
      NULL },

    { ngx_string("loyalty_pending"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_loyalty_time_off,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_loyalty_loc_conf_t, pending),
      NULL },

    { ngx_string("loyalty_order_ttl"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_loyalty_loc_conf_t, order_ttl),
      &ngx_http_loyalty_order_ttl_post },

    { ngx_string("loyalty_ledger"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_loyalty_ledger,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("loyalty_status"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_loyalty_status,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("loyalty_api"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_loyalty_api,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("loyalty_balance"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_loyalty_balance,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("loyalty_credit_wait"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE12,
      ngx_http_loyalty_credit_wait,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("loyalty_journal"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_loyalty_journal_directive,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_loyalty_module_ctx = {
    ngx_http_loyalty_preconfiguration,     /* preconfiguration */
    ngx_http_loyalty_postconfiguration,    /* postconfiguration */

    ngx_http_loyalty_create_main_conf,     /* create main configuration */
    NULL,                                  /* init main configuration */

    ngx_http_loyalty_create_srv_conf,      /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_loyalty_create_loc_conf,      /* create location configuration */
    ngx_http_loyalty_merge_loc_conf        /* merge location configuration */
};


ngx_module_t  ngx_http_loyalty_module = {
    NGX_MODULE_V1,
    &ngx_http_loyalty_module_ctx,          /* module context */
    ngx_http_loyalty_commands,             /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    ngx_http_loyalty_init_module,          /* init module */
    ngx_http_loyalty_init_process,         /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_loyalty_exit_process,         /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


static ngx_int_t
ngx_http_loyalty_preconfiguration(ngx_conf_t *cf)
{
    ngx_str_t                          name;
    ngx_http_loyalty_main_conf_t      *lmcf;
    ngx_http_compile_complex_value_t   ccv;

    if (ngx_http_loyalty_add_variables(cf) != NGX_OK) {
        return NGX_ERROR;
    }

    lmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_loyalty_module);

    ngx_str_set(&name, "$request_id");

    ngx_memzero(&ccv, sizeof(ngx_http_compile_complex_value_t));

    ccv.cf = cf;
    ccv.value = &name;
    ccv.complex_value = &lmcf->request_id;

    return ngx_http_compile_complex_value(&ccv);
}


static ngx_int_t
ngx_http_loyalty_postconfiguration(ngx_conf_t *cf)
{
    ngx_http_handler_pt           *h;
    ngx_http_core_main_conf_t     *cmcf;
    ngx_http_loyalty_main_conf_t  *lmcf;

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_POST_READ_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_loyalty_post_read_handler;

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_SERVER_REWRITE_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_loyalty_server_rewrite_handler;

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_PRECONTENT_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_loyalty_handler;

    lmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_loyalty_module);

    if (ngx_http_loyalty_credit_servers(cf, lmcf) != NGX_OK) {
        return NGX_ERROR;
    }

    if (ngx_http_loyalty_status_zone(cf, lmcf) != NGX_OK) {
        return NGX_ERROR;
    }

    return ngx_http_loyalty_filter_init(cf);
}


static void *
ngx_http_loyalty_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_loyalty_main_conf_t  *lmcf;

    lmcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_loyalty_main_conf_t));
    if (lmcf == NULL) {
        return NULL;
    }

    if (ngx_array_init(&lmcf->servers, cf->pool, 2,
                       sizeof(ngx_http_loyalty_server_t *))
        != NGX_OK)
    {
        return NULL;
    }

    if (ngx_array_init(&lmcf->offers, cf->pool, 4,
                       sizeof(ngx_http_loyalty_offer_t *))
        != NGX_OK)
    {
        return NULL;
    }

    if (ngx_array_init(&lmcf->header_vars, cf->pool, 4, sizeof(ngx_uint_t))
        != NGX_OK)
    {
        return NULL;
    }

    lmcf->script.data = ngx_http_loyalty_script;
    lmcf->script.len = sizeof(ngx_http_loyalty_script) - 1;

    lmcf->api_script.data = ngx_http_loyalty_api_script;
    lmcf->api_script.len = sizeof(ngx_http_loyalty_api_script) - 1;

    ngx_http_loyalty_script_sha1(&lmcf->api_script, lmcf->api_script_sha);

    ngx_http_loyalty_script_sha1(&lmcf->script, lmcf->script_sha);

    return lmcf;
}


static void *
ngx_http_loyalty_create_srv_conf(ngx_conf_t *cf)
{
    ngx_http_loyalty_srv_conf_t  *lscf;

    lscf = ngx_pcalloc(cf->pool, sizeof(ngx_http_loyalty_srv_conf_t));
    if (lscf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     lscf->strip = 0;
     */

    return lscf;
}


static void *
ngx_http_loyalty_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_loyalty_loc_conf_t  *conf;

    conf = ngx_pcalloc(cf->pool, sizeof(ngx_http_loyalty_loc_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     conf->secrets = NULL;
     *     conf->server = NULL;
     *     conf->prefix = { 0, NULL };
     *     conf->tiers = NULL;
     *     conf->offers = NULL;
     *     conf->balance = 0;
     *     conf->noread = 0;
     *     conf->handler = NULL;
     */

    conf->enable = NGX_CONF_UNSET;
    conf->customer = NGX_CONF_UNSET_PTR;
    conf->timeout = NGX_CONF_UNSET_MSEC;
    conf->fail = NGX_CONF_UNSET_UINT;
    conf->request_headers = NGX_CONF_UNSET;
    conf->response_headers = NGX_CONF_UNSET;
    conf->earn = NGX_CONF_UNSET_PTR;
    conf->earn_rate = NGX_CONF_UNSET_UINT;
    conf->redeem = NGX_CONF_UNSET_PTR;
    conf->order_id = NGX_CONF_UNSET_PTR;
    conf->expire = NGX_CONF_UNSET;
    conf->pending = NGX_CONF_UNSET;
    conf->order_ttl = NGX_CONF_UNSET;
    conf->ledger = NGX_CONF_UNSET;
    conf->journal = NGX_CONF_UNSET_PTR;
    conf->credit_wait = NGX_CONF_UNSET_UINT;
    conf->credit_wait_time = NGX_CONF_UNSET_MSEC;

#if (NGX_SSL)
    ngx_http_loyalty_ssl_init_conf(&conf->ssl);
#endif

    return conf;
}


static char *
ngx_http_loyalty_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_loyalty_loc_conf_t *prev = parent;
    ngx_http_loyalty_loc_conf_t *conf = child;

    ngx_http_core_loc_conf_t      *clcf;
    ngx_http_loyalty_srv_conf_t   *lscf;
    ngx_http_loyalty_main_conf_t  *lmcf;

    /*
     * an "if" or "limit_except" block in a location of loyalty_api,
     * loyalty_balance or loyalty_status answers as the location does,
     * and so reads no customer in the access phase either
     */

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

    if (clcf->noname && conf->handler == NULL) {
        conf->handler = prev->handler;
        conf->balance = prev->balance;
        conf->noread = prev->noread;

        if (clcf->lmt_excpt && clcf->handler == NULL) {
            clcf->handler = conf->handler;
        }
    }

    ngx_conf_merge_value(conf->enable, prev->enable, 0);

    if (conf->enable) {
        /* cf->ctx has the srv_conf of the server being merged */
        lscf = ngx_http_conf_get_module_srv_conf(cf, ngx_http_loyalty_module);
        lscf->strip = 1;
    }

    ngx_conf_merge_msec_value(conf->timeout, prev->timeout, 100);
    ngx_conf_merge_str_value(conf->prefix, prev->prefix, "loyalty:");
    ngx_conf_merge_uint_value(conf->fail, prev->fail,
                              NGX_HTTP_LOYALTY_FAIL_PASS);
    ngx_conf_merge_value(conf->request_headers, prev->request_headers, 1);
    ngx_conf_merge_value(conf->response_headers, prev->response_headers, 0);
    ngx_conf_merge_uint_value(conf->earn_rate, prev->earn_rate,
                              NGX_HTTP_LOYALTY_FRAC_ONE);
    ngx_conf_merge_value(conf->expire, prev->expire, 0);
    ngx_conf_merge_value(conf->pending, prev->pending, 0);
    ngx_conf_merge_sec_value(conf->order_ttl, prev->order_ttl,
                             NGX_HTTP_LOYALTY_ORDER_TTL);
    ngx_conf_merge_value(conf->ledger, prev->ledger, 100);

    /* a refund must find the order while its points may still be locked */

    if (conf->pending && conf->order_ttl < conf->pending) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"loyalty_order_ttl\" of %T s is shorter than "
                           "\"loyalty_pending\" of %T s: an order must "
                           "outlive its lock period",
                           conf->order_ttl, conf->pending);
        return NGX_CONF_ERROR;
    }

    /* and a record must not expire with points still locked in it */

    if (conf->pending && conf->expire && conf->expire < conf->pending) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"loyalty_expire\" of %T s is shorter than "
                           "\"loyalty_pending\" of %T s: a record must "
                           "outlive the points locked in it",
                           conf->expire, conf->pending);
        return NGX_CONF_ERROR;
    }

    lmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_loyalty_module);

    ngx_conf_merge_ptr_value(conf->customer, prev->customer, NULL);
    ngx_conf_merge_ptr_value(conf->earn, prev->earn, NULL);
    ngx_conf_merge_ptr_value(conf->redeem, prev->redeem, NULL);
    ngx_conf_merge_ptr_value(conf->order_id, prev->order_id,
                             &lmcf->request_id);
    ngx_conf_merge_ptr_value(conf->journal, prev->journal, NULL);

    /* the time goes with the replicas, and defaults to the timeout here */

    if (conf->credit_wait == NGX_CONF_UNSET_UINT) {
        conf->credit_wait = prev->credit_wait;
        conf->credit_wait_time = prev->credit_wait_time;
    }

    if (conf->credit_wait == NGX_CONF_UNSET_UINT) {
        conf->credit_wait = 0;
    }

    if (conf->credit_wait_time == NGX_CONF_UNSET_MSEC) {
        conf->credit_wait_time = conf->timeout;
    }

    /* lists are inherited whole when a level has none */

    if (conf->secrets == NULL) {
        conf->secrets = prev->secrets;
    }

    if (conf->tiers == NULL) {
        conf->tiers = prev->tiers;
    }

    if (conf->offers == NULL) {
        conf->offers = prev->offers;
    }

#if (NGX_SSL)
    ngx_http_loyalty_ssl_merge_conf(&conf->ssl, &prev->ssl);
#endif

    if (ngx_http_loyalty_merge_server(cf, prev, conf) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    if (conf->credit_wait && conf->server
        && conf->server->wait < conf->credit_wait_time)
    {
        conf->server->wait = conf->credit_wait_time;
    }

    return ngx_http_loyalty_merge_offers(cf, conf);
}


/*
 * A location whose requests read a record has a Redis, the documented
 * default when no level names one.  The parent is left as it is: what
 * a location gets must not depend on the locations merged before it.
 * An "if" block inherits the server of its location, which answers
 * with loyalty_balance there too.
 */

static ngx_int_t
ngx_http_loyalty_merge_server(ngx_conf_t *cf,
    ngx_http_loyalty_loc_conf_t *prev, ngx_http_loyalty_loc_conf_t *conf)
{
    ngx_str_t                  name, *names;
    ngx_http_loyalty_server_t  key, *server;
    ngx_http_core_loc_conf_t  *clcf;

    if (conf->server == NULL) {
        conf->server = prev->server;
    }

    if (conf->server == NULL && (conf->enable || conf->balance)) {
        ngx_str_set(&name, NGX_HTTP_LOYALTY_REDIS_DEFAULT);

        names = &name;

        ngx_memzero(&key, sizeof(ngx_http_loyalty_server_t));

        conf->server = ngx_http_loyalty_add_server(cf, &names, 1, &key);
        if (conf->server == NULL) {
            return NGX_ERROR;
        }
    }

    server = conf->server;

    /*
     * a host name is resolved again before reconnects with the "resolver"
     * of the first location that has one
     */

    if (server && server->named && !server->cluster && !server->master.len
        && server->resolver == NULL)
    {
        clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

        if (clcf->resolver && clcf->resolver->connections.nelts) {
            server->resolver = clcf->resolver;
            server->resolver_timeout = clcf->resolver_timeout;
        }
    }

#if (NGX_SSL)

    if (conf->server && conf->server->tls) {
        conf->server = ngx_http_loyalty_tls_server(cf, conf);
        if (conf->server == NULL) {
            return NGX_ERROR;
        }
    }

#endif

    /* a server's connect deadline is the longest timeout of those using it */

    if (conf->server && conf->server->connect_timeout < conf->timeout) {
        conf->server->connect_timeout = conf->timeout;
    }

    return NGX_OK;
}


#if (NGX_SSL)

/*
 * A "tls" server takes the SSL context of the first location merged with
 * it; a location whose settings differ gets a copy of the server with its
 * own context, shared with the locations that have the same settings.
 */

static ngx_http_loyalty_server_t *
ngx_http_loyalty_tls_server(ngx_conf_t *cf, ngx_http_loyalty_loc_conf_t *conf)
{
    ngx_uint_t                     i;
    ngx_http_loyalty_ssl_t        *ssl;
    ngx_http_loyalty_server_t     *server, *s, **servers;
    ngx_http_loyalty_main_conf_t  *lmcf;

    server = conf->server;

    ssl = ngx_http_loyalty_ssl_get(cf, &conf->ssl);
    if (ssl == NULL) {
        return NULL;
    }

    if (server->ssl == NULL) {
        server->ssl = ssl;
        return server;
    }

    if (server->ssl == ssl) {
        return server;
    }

    lmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_loyalty_module);

    servers = lmcf->servers.elts;

    for (i = 0; i < lmcf->servers.nelts; i++) {
        s = servers[i];

        if (s->ssl == ssl && ngx_http_loyalty_same_server(s, server)) {
            return s;
        }
    }

    s = ngx_palloc(cf->pool, sizeof(ngx_http_loyalty_server_t));
    if (s == NULL) {
        return NULL;
    }

    *s = *server;
    s->ssl = ssl;
    s->wait = 0;

    servers = ngx_array_push(&lmcf->servers);
    if (servers == NULL) {
        return NULL;
    }

    *servers = s;

    return s;
}

#endif


/* the offers get their counters; a tier they name must be one of the level */

static char *
ngx_http_loyalty_merge_offers(ngx_conf_t *cf,
    ngx_http_loyalty_loc_conf_t *conf)
{
    ngx_uint_t                 i, ntiers;
    ngx_http_loyalty_tier_t   *tiers;
    ngx_http_loyalty_offer_t  *offer;

    if (conf->offers == NULL) {
        return NGX_CONF_OK;
    }

    if (ngx_http_loyalty_count_offers(cf, conf->offers) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    tiers = conf->tiers ? conf->tiers->elts : NULL;
    ntiers = conf->tiers ? conf->tiers->nelts : 0;

    offer = conf->offers->elts;

    for (i = 0; i < conf->offers->nelts; i++) {

        if (offer[i].has_tier
            && ngx_http_loyalty_find_tier(tiers, ntiers, &offer[i].tier)
               == NULL)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"loyalty_offer\" \"%V\" refers to "
                               "unknown tier \"%V\"",
                               &offer[i].name, &offer[i].tier);
            return NGX_CONF_ERROR;
        }
    }

    return NGX_CONF_OK;
}


/*
 * The key of every record is "<prefix>{<id>}": a brace in the prefix would
 * move the hash tag, and a customer's keys would no longer share one
 * Redis Cluster slot.
 */

static char *
ngx_http_loyalty_prefix_check(ngx_conf_t *cf, void *post, void *data)
{
    ngx_str_t  *prefix = data;

    if (prefix->len > NGX_HTTP_LOYALTY_PREFIX_MAX) {
        return "is longer than 64 bytes";
    }

    if (ngx_strlchr(prefix->data, prefix->data + prefix->len, '{')
        || ngx_strlchr(prefix->data, prefix->data + prefix->len, '}'))
    {
        return "must not contain \"{\" or \"}\": they would move the "
               "hash tag of the keys";
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_loyalty_redis(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_loyalty_loc_conf_t *llcf = conf;

    ngx_str_t                   *value, *arg, *names[NGX_HTTP_LOYALTY_SEEDS_MAX];
    ngx_int_t                    db;
    ngx_uint_t                   i, n;
    ngx_http_loyalty_server_t    key;

    if (llcf->server) {
        return "is duplicate";
    }

    value = cf->args->elts;

    ngx_memzero(&key, sizeof(ngx_http_loyalty_server_t));

    n = 0;

    for (i = 1; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "db=", 3) == 0) {
            db = ngx_atoi(value[i].data + 3, value[i].len - 3);
            if (db == NGX_ERROR) {
                goto invalid;
            }

            key.db = db;
            continue;
        }

        arg = NULL;

        if (ngx_strncmp(value[i].data, "password=", 9) == 0) {
            arg = &key.password;

        } else if (ngx_strncmp(value[i].data, "user=", 5) == 0) {
            arg = &key.user;

        } else if (ngx_strncmp(value[i].data, "sentinel=", 9) == 0) {
            arg = &key.master;

        } else if (ngx_strncmp(value[i].data, "sentinel_password=", 18)
                   == 0)
        {
            arg = &key.sentinel_password;

        } else if (ngx_strncmp(value[i].data, "sentinel_user=", 14) == 0) {
            arg = &key.sentinel_user;
        }

        if (arg) {
            arg->data = (u_char *) ngx_strlchr(value[i].data,
                                               value[i].data + value[i].len,
                                               '=') + 1;
            arg->len = value[i].data + value[i].len - arg->data;

            if (arg->len == 0) {
                goto invalid;
            }

            continue;
        }

        if (value[i].len == sizeof("cluster") - 1
            && ngx_strncmp(value[i].data, "cluster", 7) == 0)
        {
            key.cluster = 1;
            continue;
        }

        if (value[i].len == sizeof("tls") - 1
            && ngx_strncmp(value[i].data, "tls", 3) == 0)
        {
#if (NGX_SSL)
            key.tls = 1;
            continue;
#else
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"tls\" in \"loyalty_redis\" requires nginx "
                               "built with OpenSSL");
            return NGX_CONF_ERROR;
#endif
        }

        if (ngx_strlchr(value[i].data, value[i].data + value[i].len, '=')) {
            goto invalid;
        }

        if (n == NGX_HTTP_LOYALTY_SEEDS_MAX) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "more than %d addresses in \"loyalty_redis\"",
                               NGX_HTTP_LOYALTY_SEEDS_MAX);
            return NGX_CONF_ERROR;
        }

        if (value[i].len > NGX_HTTP_LOYALTY_ADDRESS_MAX) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "address in \"loyalty_redis\" is longer "
                               "than %d bytes", NGX_HTTP_LOYALTY_ADDRESS_MAX);
            return NGX_CONF_ERROR;
        }

        names[n++] = &value[i];
    }

    if (n == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "no address in \"loyalty_redis\"");
        return NGX_CONF_ERROR;
    }

    if (key.cluster && key.master.len) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"cluster\" and \"sentinel=\" in "
                           "\"loyalty_redis\" do not go together: a Redis "
                           "Cluster fails over by itself");
        return NGX_CONF_ERROR;
    }

    if (n > 1 && !key.cluster && key.master.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"loyalty_redis\" takes one address "
                           "without \"cluster\" or \"sentinel=\", "
                           "\"%V\" is extra", names[1]);
        return NGX_CONF_ERROR;
    }

    if (key.cluster && key.db != 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"db=%ui\" in \"loyalty_redis\" with "
                           "\"cluster\": a Redis Cluster has only db 0",
                           key.db);
        return NGX_CONF_ERROR;
    }

    if (key.user.len && key.password.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"user=\" in \"loyalty_redis\" requires "
                           "\"password=\"");
        return NGX_CONF_ERROR;
    }

    if ((key.sentinel_password.len || key.sentinel_user.len)
        && key.master.len == 0)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%s\" in \"loyalty_redis\" requires "
                           "\"sentinel=\"",
                           key.sentinel_password.len ? "sentinel_password="
                                                     : "sentinel_user=");
        return NGX_CONF_ERROR;
    }

    if (key.sentinel_user.len && key.sentinel_password.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"sentinel_user=\" in \"loyalty_redis\" "
                           "requires \"sentinel_password=\"");
        return NGX_CONF_ERROR;
    }

    llcf->server = ngx_http_loyalty_add_server(cf, names, n, &key);
    if (llcf->server == NULL) {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\" in \"loyalty_redis\"",
                       &value[i]);

    return NGX_CONF_ERROR;
}


/*
 * Servers are shared by every location that names the same addresses with
 * the same database, credentials and kind (a server, a cluster by its
 * seeds, a master by its sentinels, as written): one connection per worker
 * each (per node of a cluster).  The key has the settings of the line.
 */

static ngx_http_loyalty_server_t *
ngx_http_loyalty_add_server(ngx_conf_t *cf, ngx_str_t **names, ngx_uint_t n,
    ngx_http_loyalty_server_t *key)
{
    u_char                        *p;
    ngx_url_t                      u;
    ngx_str_t                      name, host;
    ngx_uint_t                     i;
    ngx_http_loyalty_server_t     *server, **s;
    ngx_http_loyalty_main_conf_t  *lmcf;

    name.len = n - 1;

    for (i = 0; i < n; i++) {
        name.len += names[i]->len;
    }

    name.data = ngx_pnalloc(cf->pool, name.len);
    if (name.data == NULL) {
        return NULL;
    }

    p = name.data;

    for (i = 0; i < n; i++) {
        if (i) {
            *p++ = ' ';
        }

        p = ngx_cpymem(p, names[i]->data, names[i]->len);
    }

    key->name = name;

    lmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_loyalty_module);

    s = lmcf->servers.elts;

    for (i = 0; i < lmcf->servers.nelts; i++) {
        server = s[i];

        if (ngx_http_loyalty_same_server(server, key)) {
            /* the first of them, whatever its SSL context */
            return server;
        }
    }

    server = ngx_palloc(cf->pool, sizeof(ngx_http_loyalty_server_t));
    if (server == NULL) {
        return NULL;
    }

    *server = *key;

    server->seeds = ngx_pcalloc(cf->pool, n * sizeof(ngx_addr_t));
    server->hosts = ngx_pcalloc(cf->pool, n * sizeof(ngx_str_t));
    if (server->seeds == NULL || server->hosts == NULL) {
        return NULL;
    }

    for (i = 0; i < n; i++) {
        ngx_memzero(&u, sizeof(ngx_url_t));

        u.url = *names[i];
        u.default_port = key->master.len ? NGX_HTTP_LOYALTY_SENTINEL_PORT
                                         : NGX_HTTP_LOYALTY_REDIS_PORT;

        if (ngx_parse_url(cf->pool, &u) != NGX_OK) {
            if (u.err) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "%s in \"loyalty_redis\" address \"%V\"",
                                   u.err, &u.url);
            }

            return NULL;
        }

        if (u.naddrs == 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "no addresses for \"%V\" in \"loyalty_redis\"",
                               &u.url);
            return NULL;
        }

        if ((key->cluster || key->master.len)
            && u.addrs[0].sockaddr->sa_family == AF_UNIX)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"%V\" in \"loyalty_redis\" with \"%s\": "
                               "%s are reached over TCP", &u.url,
                               key->cluster ? "cluster" : "sentinel=",
                               key->cluster ? "cluster nodes" : "sentinels");
            return NULL;
        }

        if (key->tls && u.addrs[0].sockaddr->sa_family == AF_UNIX) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"%V\" in \"loyalty_redis\" with \"tls\": "
                               "Redis serves TLS over TCP only", &u.url);
            return NULL;
        }

        server->seeds[i] = u.addrs[0];

        host = u.host;
        ngx_http_loyalty_unbracket(&host);

        server->hosts[i].data = ngx_pnalloc(cf->pool, host.len + 1);
        if (server->hosts[i].data == NULL) {
            return NULL;
        }

        server->hosts[i].len = host.len;
        *ngx_cpymem(server->hosts[i].data, host.data, host.len) = '\0';

        if (i == 0) {
            server->addrs = u.addrs;
            server->naddrs = u.naddrs;

            /* a host name, to be resolved again with nginx's "resolver" */

            server->named = (u.addrs[0].sockaddr->sa_family != AF_UNIX
                             && !ngx_http_loyalty_ip_literal(&u.host));
        }
    }

    server->host = server->hosts[0];
    server->addr = server->seeds[0];
    server->nseeds = n;

    if (!key->master.len) {
        /* the hosts of the seeds are those of the sentinels */
        server->hosts = NULL;
    }

    s = ngx_array_push(&lmcf->servers);
    if (s == NULL) {
        return NULL;
    }

    *s = server;

    return server;
}


/* an IP address, [::1] included, not a host name */

/*
 * "[::1]" as "::1": the address that a certificate's IP entry names, and
 * that X509_check_ip_asc() takes
 */

void
ngx_http_loyalty_unbracket(ngx_str_t *host)
{
    if (host->len > 2
        && host->data[0] == '['
        && host->data[host->len - 1] == ']')
    {
        host->data++;
        host->len -= 2;
    }
}


ngx_uint_t
ngx_http_loyalty_ip_literal(ngx_str_t *host)
{
    u_char  *p;

    p = host->data;

    if (host->len && p[0] == '[') {
        return 1;
    }

    if (ngx_inet_addr(p, host->len) != INADDR_NONE) {
        return 1;
    }

#if (NGX_HAVE_INET6)
    {
    u_char  addr[16];

    if (ngx_inet6_addr(p, host->len, addr) == NGX_OK) {
        return 1;
    }
    }
#endif

    return 0;
}


static ngx_uint_t
ngx_http_loyalty_same_server(ngx_http_loyalty_server_t *a,
    ngx_http_loyalty_server_t *b)
{
    return ngx_http_loyalty_same_str(&a->name, &b->name)
           && a->cluster == b->cluster
           && a->tls == b->tls
           && a->db == b->db
           && ngx_http_loyalty_same_str(&a->user, &b->user)
           && ngx_http_loyalty_same_str(&a->password, &b->password)
           && ngx_http_loyalty_same_str(&a->master, &b->master)
           && ngx_http_loyalty_same_str(&a->sentinel_user, &b->sentinel_user)
           && ngx_http_loyalty_same_str(&a->sentinel_password,
                                        &b->sentinel_password);
}


ngx_uint_t
ngx_http_loyalty_same_str(ngx_str_t *a, ngx_str_t *b)
{
    return a->len == b->len
           && (a->len == 0 || ngx_strncmp(a->data, b->data, a->len) == 0);
}


static char *
ngx_http_loyalty_tier(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_loyalty_loc_conf_t *llcf = conf;

    ngx_str_t                *value;
    ngx_uint_t                i;
    ngx_http_loyalty_tier_t  *tier;

    value = cf->args->elts;

    if (ngx_http_loyalty_valid_text(value[1].data, value[1].len) != NGX_OK) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid tier name in \"loyalty_tier\": "
                           "empty or with a control character");
        return NGX_CONF_ERROR;
    }

    if (llcf->tiers == NULL) {
        llcf->tiers = ngx_array_create(cf->pool, 4,
                                       sizeof(ngx_http_loyalty_tier_t));
        if (llcf->tiers == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    if (ngx_http_loyalty_find_tier(llcf->tiers->elts, llcf->tiers->nelts,
                                   &value[1])
        != NULL)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "duplicate tier \"%V\" in \"loyalty_tier\"",
                           &value[1]);
        return NGX_CONF_ERROR;
    }

    tier = ngx_array_push(llcf->tiers);
    if (tier == NULL) {
        return NGX_CONF_ERROR;
    }

    tier->name = value[1];
    tier->multiplier = NGX_HTTP_LOYALTY_FRAC_ONE;

    if (ngx_http_loyalty_parse_uint(value[2].data, value[2].len,
                                    &tier->min_lifetime)
        != NGX_OK)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid lifetime threshold \"%V\" in "
                           "\"loyalty_tier\"", &value[2]);
        return NGX_CONF_ERROR;
    }

    if (cf->args->nelts == 4) {
        if (ngx_strncmp(value[3].data, "multiplier=", 11) != 0
            || ngx_http_loyalty_parse_fixed(value[3].data + 11,
                                            value[3].len - 11,
                                            &tier->multiplier)
               != NGX_OK)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid parameter \"%V\" in "
                               "\"loyalty_tier\"", &value[3]);
            return NGX_CONF_ERROR;
        }
    }

    for (i = 0; i < llcf->tiers->nelts - 1; i++) {
        if (((ngx_http_loyalty_tier_t *) llcf->tiers->elts)[i].min_lifetime
            == tier->min_lifetime)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "tier \"%V\" in \"loyalty_tier\" has the same "
                               "threshold as another tier", &value[1]);
            return NGX_CONF_ERROR;
        }
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_loyalty_offer(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_loyalty_loc_conf_t *llcf = conf;

    char                      *err;
    ngx_str_t                 *value;
    ngx_uint_t                 i;
    ngx_http_loyalty_offer_t  *offer;

    value = cf->args->elts;

    if (ngx_http_loyalty_valid_text(value[1].data, value[1].len) != NGX_OK) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid offer name in \"loyalty_offer\": "
                           "empty or with a control character");
        return NGX_CONF_ERROR;
    }

    if (llcf->offers == NULL) {
        llcf->offers = ngx_array_create(cf->pool, 4,
                                        sizeof(ngx_http_loyalty_offer_t));
        if (llcf->offers == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    offer = ngx_array_push(llcf->offers);
    if (offer == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(offer, sizeof(ngx_http_loyalty_offer_t));

    offer->name = value[1];

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "inactive=", 9) == 0) {
            err = ngx_http_loyalty_offer_inactive(offer, &value[i]);

        } else if (ngx_strncmp(value[i].data, "if=", 3) == 0) {
            err = ngx_http_loyalty_offer_if(cf, offer, &value[i]);

        } else {
            err = ngx_http_loyalty_offer_param(offer, &value[i]);
        }

        if (err == NGX_CONF_ERROR) {
            return NGX_CONF_ERROR;
        }

        if (err) {
            ngx_http_loyalty_offer_invalid(cf, &value[i], err);
            return NGX_CONF_ERROR;
        }
    }

    err = ngx_http_loyalty_offer_check(offer);
    if (err) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "offer \"%V\" in \"loyalty_offer\": %s",
                           &offer->name, err);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/*
 * The loyalty_offer parameters that need nginx to parse them, "inactive="
 * and "if="; the others are ngx_http_loyalty_offer_param()'s, in rules.c.
 * Each returns NULL when the parameter is accepted, or why not.
 */

static char *
ngx_http_loyalty_offer_inactive(ngx_http_loyalty_offer_t *offer,
    ngx_str_t *param)
{
    time_t     t;
    ngx_str_t  v;

    if (offer->has_inactive) {
        return "is duplicate";
    }

    v.data = param->data + 9;
    v.len = param->len - 9;

    t = ngx_parse_time(&v, 1);
    if (t == (time_t) NGX_ERROR) {
        return "is not a valid time";
    }

    offer->inactive = t;
    offer->has_inactive = 1;

    return NULL;
}


static char *
ngx_http_loyalty_offer_if(ngx_conf_t *cf, ngx_http_loyalty_offer_t *offer,
    ngx_str_t *param)
{
    ngx_str_t                          v;
    ngx_http_complex_value_t          *cv;
    ngx_http_compile_complex_value_t   ccv;

    if (offer->cond) {
        return "is duplicate";
    }

    if (param->len < 5 || param->data[3] != '$') {
        return "must be a variable";
    }

    cv = ngx_palloc(cf->pool, sizeof(ngx_http_complex_value_t));
    if (cv == NULL) {
        return NGX_CONF_ERROR;
    }

    v.data = param->data + 3;
    v.len = param->len - 3;

    ngx_memzero(&ccv, sizeof(ngx_http_compile_complex_value_t));

    ccv.cf = cf;
    ccv.value = &v;
    ccv.complex_value = cv;

    if (ngx_http_compile_complex_value(&ccv) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    offer->cond = cv;

    return NULL;
}


static void
ngx_http_loyalty_offer_invalid(ngx_conf_t *cf, ngx_str_t *param, char *err)
{
    ngx_str_t  v;

    /* up to a control character, which must not reach the log as is */

    for (v = *param; v.len; v.len--) {
        if (ngx_http_loyalty_valid_text(v.data, v.len) == NGX_OK) {
            break;
        }
    }

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V%s\" in \"loyalty_offer\": %s",
                       &v, v.len < param->len ? "..." : "", err);
}


/*
 * The offers of a location, once its block is parsed and their array no
 * longer moves, get their counters in the shared zone: a location's
 * offers are all counted or, when inherited, all counted already.
 */

static ngx_int_t
ngx_http_loyalty_count_offers(ngx_conf_t *cf, ngx_array_t *offers)
{
    ngx_uint_t                     i;
    ngx_http_loyalty_offer_t      *offer, **o;
    ngx_http_loyalty_main_conf_t  *lmcf;

    if (offers->nelts == 0) {
        return NGX_OK;
    }

    lmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_loyalty_module);

    offer = offers->elts;
    o = lmcf->offers.elts;

    for (i = 0; i < lmcf->offers.nelts; i++) {
        if (o[i] == &offer[0]) {
            return NGX_OK;
        }
    }

    for (i = 0; i < offers->nelts; i++) {
        o = ngx_array_push(&lmcf->offers);
        if (o == NULL) {
            return NGX_ERROR;
        }

        *o = &offer[i];
    }

    return NGX_OK;
}


/*
 * ngx_conf_set_enum_slot(), whose message for an unknown value names the
 * value and the line but not the directive: such a value is refused here,
 * with the directive's name.
 */

static char *
ngx_http_loyalty_set_enum_slot(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_str_t        *value;
    ngx_conf_enum_t  *e;

    value = cf->args->elts;

    for (e = cmd->post; e->name.len; e++) {
        if (e->name.len == value[1].len
            && ngx_strcasecmp(e->name.data, value[1].data) == 0)
        {
            return ngx_conf_set_enum_slot(cf, cmd, conf);
        }
    }

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid value \"%V\" in \"%V\" directive",
                       &value[1], &cmd->name);

    return NGX_CONF_ERROR;
}


static char *
ngx_http_loyalty_secret(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_loyalty_loc_conf_t *llcf = conf;

    ngx_str_t  *value, *secret;

    value = cf->args->elts;

    if (value[1].len == 0) {
        return "takes a non-empty key";
    }

    if (llcf->secrets == NULL) {
        llcf->secrets = ngx_array_create(cf->pool,
                                         NGX_HTTP_LOYALTY_SECRETS_MAX,
                                         sizeof(ngx_str_t));
        if (llcf->secrets == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    if (llcf->secrets->nelts == NGX_HTTP_LOYALTY_SECRETS_MAX) {
        return "may be given at most twice (the new key and the old one)";
    }

    secret = ngx_array_push(llcf->secrets);
    if (secret == NULL) {
        return NGX_CONF_ERROR;
    }

    *secret = value[1];

    return NGX_CONF_OK;
}


static char *
ngx_http_loyalty_earn_rate(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_loyalty_loc_conf_t *llcf = conf;

    uint64_t    rate;
    ngx_str_t  *value;

    if (llcf->earn_rate != NGX_CONF_UNSET_UINT) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (ngx_http_loyalty_parse_fixed(value[1].data, value[1].len, &rate)
        != NGX_OK)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid rate \"%V\" in \"loyalty_earn_rate\", "
                           "expected a number such as 1 or 0.05 with at "
                           "most 6 digits before and 4 after the point",
                           &value[1]);
        return NGX_CONF_ERROR;
    }

    llcf->earn_rate = rate;

    return NGX_CONF_OK;
}


/* loyalty_expire, loyalty_pending: a time, or "off" */

static char *
ngx_http_loyalty_time_off(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    char  *p = conf;

    time_t     *tp, t;
    ngx_str_t  *value;

    tp = (time_t *) (p + cmd->offset);

    if (*tp != NGX_CONF_UNSET) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (ngx_strcmp(value[1].data, "off") == 0) {
        *tp = 0;
        return NGX_CONF_OK;
    }

    t = ngx_parse_time(&value[1], 1);

    if (t == (time_t) NGX_ERROR || t == 0
        || t > NGX_HTTP_LOYALTY_TIME_MAX)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid time \"%V\" in \"%V\", it must be "
                           "more than 0 and at most 100 years",
                           &value[1], &cmd->name);
        return NGX_CONF_ERROR;
    }

    *tp = t;

    return NGX_CONF_OK;
}


static char *
ngx_http_loyalty_positive(ngx_conf_t *cf, void *post, void *data)
{
    time_t  *tp = data;

    if (*tp == 0 || *tp > NGX_HTTP_LOYALTY_TIME_MAX) {
        return "must be more than 0 and at most 100 years";
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_loyalty_ledger(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_loyalty_loc_conf_t *llcf = conf;

    ngx_int_t   n;
    ngx_str_t  *value;

    if (llcf->ledger != NGX_CONF_UNSET) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (ngx_strcmp(value[1].data, "off") == 0) {
        llcf->ledger = 0;
        return NGX_CONF_OK;
    }

    n = ngx_atoi(value[1].data, value[1].len);

    if (n == NGX_ERROR || n == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid length \"%V\" in \"loyalty_ledger\"",
                           &value[1]);
        return NGX_CONF_ERROR;
    }

    llcf->ledger = n;

    return NGX_CONF_OK;
}


static char *
ngx_http_loyalty_credit_wait(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_loyalty_loc_conf_t *llcf = conf;

    ngx_int_t   n;
    ngx_msec_t  t;
    ngx_str_t  *value;

    if (llcf->credit_wait != NGX_CONF_UNSET_UINT) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (ngx_strcmp(value[1].data, "off") == 0) {

        if (cf->args->nelts > 2) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"loyalty_credit_wait off\" takes no time");
            return NGX_CONF_ERROR;
        }

        llcf->credit_wait = 0;
        return NGX_CONF_OK;
    }

    n = ngx_atoi(value[1].data, value[1].len);

    if (n == NGX_ERROR || n == 0 || n > NGX_HTTP_LOYALTY_REPLICAS_MAX) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid number of replicas \"%V\" in "
                           "\"loyalty_credit_wait\", it must be 1 to %d or "
                           "\"off\"", &value[1], NGX_HTTP_LOYALTY_REPLICAS_MAX);
        return NGX_CONF_ERROR;
    }

    llcf->credit_wait = n;

    if (cf->args->nelts == 2) {
        return NGX_CONF_OK;
    }

    /* WAIT with 0 would block the connection until the replicas answer */

    t = ngx_parse_time(&value[2], 0);

    if (t == (ngx_msec_t) NGX_ERROR || t == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid time \"%V\" in \"loyalty_credit_wait\"",
                           &value[2]);
        return NGX_CONF_ERROR;
    }

    llcf->credit_wait_time = t;

    return NGX_CONF_OK;
}


/*
 * A server that credits wait on (loyalty_credit_wait) gets a copy of its
 * own for them, made once every location is merged: its connections run
 * those credits and their WAITs, so that no read queues behind a WAIT.
 * The servers added here come after those they copy, which the worker
 * initializes first (a Sentinel master's copy joins its sentinels).
 */

static ngx_int_t
ngx_http_loyalty_credit_servers(ngx_conf_t *cf,
    ngx_http_loyalty_main_conf_t *lmcf)
{
    ngx_uint_t                  i, n;
    ngx_http_loyalty_server_t  *server, *s, **servers;

    n = lmcf->servers.nelts;

    for (i = 0; i < n; i++) {
        server = ((ngx_http_loyalty_server_t **) lmcf->servers.elts)[i];

        if (server->wait == 0) {
            continue;
        }

        s = ngx_palloc(cf->pool, sizeof(ngx_http_loyalty_server_t));
        if (s == NULL) {
            return NGX_ERROR;
        }

        *s = *server;
        s->credits = NULL;

        servers = ngx_array_push(&lmcf->servers);
        if (servers == NULL) {
            return NGX_ERROR;
        }

        *servers = s;

        server->credits = s;
    }

    return NGX_OK;
}


/*
 * The indexed variables that read a client's X-Loyalty-* header by name:
 * their values are cached in the request, and are forgotten whenever the
 * module changes those headers.  Every index exists once the
 * configuration is read, those of modules loaded after this one included.
 */

static ngx_int_t
ngx_http_loyalty_init_module(ngx_cycle_t *cycle)
{
    ngx_uint_t                     i, *index;
    ngx_http_variable_t           *v;
    ngx_http_core_main_conf_t     *cmcf;
    ngx_http_loyalty_main_conf_t  *lmcf;

    lmcf = ngx_http_cycle_get_module_main_conf(cycle,
                                               ngx_http_loyalty_module);
    if (lmcf == NULL) {
        return NGX_OK;
    }

    cmcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_core_module);

    v = cmcf->variables.elts;

    for (i = 0; i < cmcf->variables.nelts; i++) {

        /* the names are lowercase, and a header's "-" is a "_" in them */

        if (v[i].name.len < sizeof("http_x_loyalty_") - 1
            || ngx_strncmp(v[i].name.data, "http_x_loyalty_",
                           sizeof("http_x_loyalty_") - 1)
               != 0)
        {
            continue;
        }

        index = ngx_array_push(&lmcf->header_vars);
        if (index == NULL) {
            return NGX_ERROR;
        }

        *index = i;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_loyalty_init_process(ngx_cycle_t *cycle)
{
    ngx_uint_t                     i;
    ngx_http_loyalty_server_t    **server;
    ngx_http_loyalty_main_conf_t  *lmcf;

    lmcf = ngx_http_cycle_get_module_main_conf(cycle,
                                               ngx_http_loyalty_module);
    if (lmcf == NULL) {
        return NGX_OK;
    }

    ngx_http_loyalty_status_init_process(lmcf);

    server = lmcf->servers.elts;

    for (i = 0; i < lmcf->servers.nelts; i++) {
        if (ngx_http_loyalty_redis_init_process(cycle, server[i]) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    return ngx_http_loyalty_credit_init_process(cycle, lmcf);
}


static void
ngx_http_loyalty_exit_process(ngx_cycle_t *cycle)
{
    ngx_uint_t                     i;
    ngx_http_loyalty_server_t    **server;
    ngx_http_loyalty_main_conf_t  *lmcf;

    lmcf = ngx_http_cycle_get_module_main_conf(cycle,
                                               ngx_http_loyalty_module);
    if (lmcf == NULL) {
        return;
    }

    server = lmcf->servers.elts;

    /* credits still on a connection are journaled, then those queued */

    for (i = 0; i < lmcf->servers.nelts; i++) {
        ngx_http_loyalty_redis_exit_process(server[i]);
    }

    ngx_http_loyalty_credit_exit_process(lmcf);
}
