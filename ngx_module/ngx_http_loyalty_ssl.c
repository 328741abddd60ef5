
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include "ngx_http_loyalty_module.h"


/*
 * TLS to Redis ("tls" in loyalty_redis): the loyalty_redis_ssl_*
 * directives, the SSL contexts they make, and what a connection checks
 * once its handshake is done.  The handshake itself runs in the
 * connection's life (ngx_http_loyalty_redis.c), through nginx's own
 * OpenSSL layer, as ngx_http_upstream.c runs it for proxy_ssl.
 *
 * As there, the context never verifies during the handshake: the
 * connection asks for the result after it, and checks the name itself,
 * matching an IP address against the certificate's IP entries, which
 * X509_check_host() (and so ngx_ssl_check_host()) never does.  Locations
 * with the same settings share one context, and so their connections;
 * a location whose settings differ gets a server of its own
 * (ngx_http_loyalty_merge_server()).
 */


#if (NGX_SSL)

static char *ngx_http_loyalty_ssl_verify(ngx_conf_t *cf, void *post,
    void *data);
static char *ngx_http_loyalty_ssl_depth(ngx_conf_t *cf, void *post,
    void *data);
static ngx_int_t ngx_http_loyalty_ssl_create(ngx_conf_t *cf,
    ngx_http_loyalty_ssl_t *ssl);
static int ngx_http_loyalty_ssl_client_cert(ngx_ssl_conn_t *ssl_conn,
    X509 **x509, EVP_PKEY **pkey);


/* set on an SSL connection whose server asked for a certificate in vain */
static int  ngx_http_loyalty_ssl_asked_index = -1;


ngx_conf_bitmask_t  ngx_http_loyalty_ssl_protocols[] = {
    { ngx_string("TLSv1"), NGX_SSL_TLSv1 },
    { ngx_string("TLSv1.1"), NGX_SSL_TLSv1_1 },
    { ngx_string("TLSv1.2"), NGX_SSL_TLSv1_2 },
    { ngx_string("TLSv1.3"), NGX_SSL_TLSv1_3 },
    { ngx_null_string, 0 }
};


ngx_conf_post_t  ngx_http_loyalty_ssl_verify_post =
    { ngx_http_loyalty_ssl_verify };

ngx_conf_post_t  ngx_http_loyalty_ssl_depth_post =
    { ngx_http_loyalty_ssl_depth };


/*
 * ngx_conf_set_bitmask_slot() names the value, not the directive: a
 * wrong protocol is reported with both.
 */

char *
ngx_http_loyalty_ssl_protocols_slot(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    char  *p = conf;

    ngx_str_t           *value;
    ngx_uint_t          *np, i, m;
    ngx_conf_bitmask_t  *mask;

    np = (ngx_uint_t *) (p + cmd->offset);

    if (*np) {
        return "is duplicate";
    }

    value = cf->args->elts;
    mask = cmd->post;

    for (i = 1; i < cf->args->nelts; i++) {

        for (m = 0; mask[m].name.len; m++) {
            if (mask[m].name.len == value[i].len
                && ngx_strcmp(mask[m].name.data, value[i].data) == 0)
            {
                break;
            }
        }

        if (mask[m].name.len == 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid protocol \"%V\" in \"%V\", "
                               "TLSv1, TLSv1.1, TLSv1.2 or TLSv1.3 expected",
                               &value[i], &cmd->name);
            return NGX_CONF_ERROR;
        }

        *np |= mask[m].mask;
    }

    *np |= NGX_CONF_BITMASK_SET;

    return NGX_CONF_OK;
}


/* a file that nginx -t can tell is missing, with the directive that names it */

char *
ngx_http_loyalty_ssl_file(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    char  *p = conf;

    char             *rv;
    ngx_str_t        *field, name;
    ngx_file_info_t   fi;

    rv = ngx_conf_set_str_slot(cf, cmd, conf);
    if (rv != NGX_CONF_OK) {
        return rv;
    }

    field = (ngx_str_t *) (p + cmd->offset);

    if (field->len == 0) {
        return "takes a file name";
    }

    if (field->len > 5 && ngx_strncmp(field->data, "data:", 5) == 0) {
        return NGX_CONF_OK;
    }

    name = *field;

    if (ngx_conf_full_name(cf->cycle, &name, 1) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    if (ngx_file_info(name.data, &fi) == NGX_FILE_ERROR) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           "\"%V\": cannot read \"%V\"", &cmd->name, &name);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_loyalty_ssl_verify(ngx_conf_t *cf, void *post, void *data)
{
    ngx_flag_t  *fp = data;

    if (*fp == 0) {
        ngx_conf_log_error(NGX_LOG_WARN, cf, 0,
                           "\"loyalty_redis_ssl_verify off\": neither the "
                           "certificates of Redis servers nor their names "
                           "are checked here");
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_loyalty_ssl_depth(ngx_conf_t *cf, void *post, void *data)
{
    ngx_int_t  *np = data;

    if (*np < 1 || *np > 100) {
        return "must be from 1 to 100";
    }

    return NGX_CONF_OK;
}


void
ngx_http_loyalty_ssl_init_conf(ngx_http_loyalty_ssl_conf_t *conf)
{
    /*
     * set by ngx_pcalloc():
     *
     *     conf->trusted_certificate = { 0, NULL };
     *     conf->name = { 0, NULL };
     *     conf->certificate = { 0, NULL };
     *     conf->certificate_key = { 0, NULL };
     *     conf->protocols = 0;
     */

    conf->verify = NGX_CONF_UNSET;
    conf->verify_depth = NGX_CONF_UNSET;
    conf->server_name = NGX_CONF_UNSET;
}


void
ngx_http_loyalty_ssl_merge_conf(ngx_http_loyalty_ssl_conf_t *conf,
    ngx_http_loyalty_ssl_conf_t *prev)
{
    ngx_conf_merge_str_value(conf->trusted_certificate,
                             prev->trusted_certificate, "");
    ngx_conf_merge_value(conf->verify, prev->verify, 1);
    ngx_conf_merge_value(conf->verify_depth, prev->verify_depth, 4);
    ngx_conf_merge_str_value(conf->name, prev->name, "");
    ngx_conf_merge_value(conf->server_name, prev->server_name, 1);
    ngx_conf_merge_str_value(conf->certificate, prev->certificate, "");
    ngx_conf_merge_str_value(conf->certificate_key, prev->certificate_key,
                             "");
    ngx_conf_merge_bitmask_value(conf->protocols, prev->protocols,
                                 (NGX_CONF_BITMASK_SET|NGX_SSL_TLSv1_2
                                  |NGX_SSL_TLSv1_3));
}


/*
 * The SSL context for a location's merged settings: one per distinct set
 * of settings in the configuration.
 */

ngx_http_loyalty_ssl_t *
ngx_http_loyalty_ssl_get(ngx_conf_t *cf, ngx_http_loyalty_ssl_conf_t *conf)
{
    ngx_uint_t                     i;
    ngx_http_loyalty_ssl_t        *ssl, **s;
    ngx_http_loyalty_main_conf_t  *lmcf;

    lmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_loyalty_module);

    if (lmcf->ssl.elts == NULL
        && ngx_array_init(&lmcf->ssl, cf->pool, 1,
                          sizeof(ngx_http_loyalty_ssl_t *))
           != NGX_OK)
    {
        return NULL;
    }

    s = lmcf->ssl.elts;

    for (i = 0; i < lmcf->ssl.nelts; i++) {
        ssl = s[i];

        if (ssl->conf.verify == conf->verify
            && ssl->conf.verify_depth == conf->verify_depth
            && ssl->conf.server_name == conf->server_name
            && ssl->conf.protocols == conf->protocols
            && ngx_http_loyalty_same_str(&ssl->conf.trusted_certificate,
                                         &conf->trusted_certificate)
            && ngx_http_loyalty_same_str(&ssl->conf.name, &conf->name)
            && ngx_http_loyalty_same_str(&ssl->conf.certificate,
                                         &conf->certificate)
            && ngx_http_loyalty_same_str(&ssl->conf.certificate_key,
                                         &conf->certificate_key))
        {
            return ssl;
        }
    }

    ssl = ngx_pcalloc(cf->pool, sizeof(ngx_http_loyalty_ssl_t));
    if (ssl == NULL) {
        return NULL;
    }

    ssl->conf = *conf;

    if (ngx_http_loyalty_ssl_create(cf, ssl) != NGX_OK) {
        return NULL;
    }

    s = ngx_array_push(&lmcf->ssl);
    if (s == NULL) {
        return NULL;
    }

    *s = ssl;

    return ssl;
}


static ngx_int_t
ngx_http_loyalty_ssl_create(ngx_conf_t *cf, ngx_http_loyalty_ssl_t *ssl)
{
    u_char               *p;
    ngx_str_t            *name;
    ngx_pool_cleanup_t   *cln;

    ssl->ssl.log = cf->log;

    if (ngx_ssl_create(&ssl->ssl, ssl->conf.protocols, NULL) != NGX_OK) {
        return NGX_ERROR;
    }

    cln = ngx_pool_cleanup_add(cf->pool, 0);
    if (cln == NULL) {
        ngx_ssl_cleanup_ctx(&ssl->ssl);
        return NGX_ERROR;
    }

    cln->handler = ngx_ssl_cleanup_ctx;
    cln->data = &ssl->ssl;

    if (ssl->conf.certificate.len) {

        if (ssl->conf.certificate_key.len == 0) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "no \"loyalty_redis_ssl_certificate_key\" is "
                          "defined for certificate \"%V\"",
                          &ssl->conf.certificate);
            return NGX_ERROR;
        }

        if (ngx_ssl_certificate(cf, &ssl->ssl, &ssl->conf.certificate,
                                &ssl->conf.certificate_key, NULL)
            != NGX_OK)
        {
            return NGX_ERROR;
        }

    } else if (ssl->conf.certificate_key.len) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "\"loyalty_redis_ssl_certificate_key\" is defined "
                      "without \"loyalty_redis_ssl_certificate\"");
        return NGX_ERROR;

    } else {
        /*
         * A Redis with "tls-auth-clients yes" asks for a certificate; in
         * TLS 1.3 it refuses the connection only after the handshake,
         * with an alert that nginx logs at "crit".  The request is noted
         * here, and the connection fails with its reason at once.
         */

        if (ngx_http_loyalty_ssl_asked_index == -1) {
            ngx_http_loyalty_ssl_asked_index = SSL_get_ex_new_index(0, NULL,
                                                                    NULL, NULL,
                                                                    NULL);
            if (ngx_http_loyalty_ssl_asked_index == -1) {
                ngx_ssl_error(NGX_LOG_EMERG, cf->log, 0,
                              "SSL_get_ex_new_index() failed");
                return NGX_ERROR;
            }
        }

        SSL_CTX_set_client_cert_cb(ssl->ssl.ctx,
                                   ngx_http_loyalty_ssl_client_cert);
    }

    if (ssl->conf.verify) {

        if (ssl->conf.trusted_certificate.len == 0
            && SSL_CTX_set_default_verify_paths(ssl->ssl.ctx) != 1)
        {
            ngx_ssl_error(NGX_LOG_EMERG, cf->log, 0,
                          "SSL_CTX_set_default_verify_paths() failed "
                          "for redis");
            return NGX_ERROR;
        }

        if (ngx_ssl_trusted_certificate(cf, &ssl->ssl,
                                        &ssl->conf.trusted_certificate,
                                        ssl->conf.verify_depth)
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    if (ngx_ssl_client_session_cache(cf, &ssl->ssl, 1) != NGX_OK) {
        return NGX_ERROR;
    }

    /* the name as a C string, for SNI and X509_check_ip_asc() */

    name = &ssl->conf.name;

    ngx_http_loyalty_unbracket(name);

    if (name->len) {
        p = ngx_pnalloc(cf->pool, name->len + 1);
        if (p == NULL) {
            return NGX_ERROR;
        }

        *ngx_cpymem(p, name->data, name->len) = '\0';
        name->data = p;
    }

    return NGX_OK;
}


/*
 * The name a connection checks: loyalty_redis_ssl_name, else the host of
 * its address; a cluster node's own IP.
 */

ngx_int_t
ngx_http_loyalty_ssl_start(ngx_connection_t *c, ngx_http_loyalty_ssl_t *ssl,
    ngx_str_t *host, ngx_ssl_session_t *session)
{
    ngx_str_t  *name;

    if (ngx_ssl_create_connection(&ssl->ssl, c, NGX_SSL_CLIENT) != NGX_OK) {
        return NGX_ERROR;
    }

    name = ssl->conf.name.len ? &ssl->conf.name : host;

    if (ssl->conf.server_name
        && name->len
        && !ngx_http_loyalty_ip_literal(name)
        && SSL_set_tlsext_host_name(c->ssl->connection, (char *) name->data)
           != 1)
    {
        ngx_ssl_error(NGX_LOG_ERR, c->log, 0,
                      "SSL_set_tlsext_host_name(\"%V\") failed", name);
        return NGX_ERROR;
    }

    if (session && ngx_ssl_set_session(c, session) != NGX_OK) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


static int
ngx_http_loyalty_ssl_client_cert(ngx_ssl_conn_t *ssl_conn, X509 **x509,
    EVP_PKEY **pkey)
{
    SSL_set_ex_data(ssl_conn, ngx_http_loyalty_ssl_asked_index, ssl_conn);

    /* no certificate */
    return 0;
}


/*
 * Whether the server asked for a client certificate that is not
 * configured: logged, with the directive that would give one.
 */

ngx_int_t
ngx_http_loyalty_ssl_asked(ngx_connection_t *c)
{
    if (ngx_http_loyalty_ssl_asked_index == -1
        || SSL_get_ex_data(c->ssl->connection,
                           ngx_http_loyalty_ssl_asked_index)
           == NULL)
    {
        return 0;
    }

    ngx_log_error(NGX_LOG_ERR, c->log, 0,
                  "loyalty: redis TLS handshake failed: redis asks for a "
                  "client certificate (\"tls-auth-clients\"), and no "
                  "\"loyalty_redis_ssl_certificate\" is set");

    return 1;
}


/*
 * After the handshake: the chain as verified, then the name.  NGX_ERROR
 * with an "error" line naming the reason.
 */

ngx_int_t
ngx_http_loyalty_ssl_check(ngx_connection_t *c, ngx_http_loyalty_ssl_t *ssl,
    ngx_str_t *host)
{
    int         ok;
    long        rc;
    X509       *cert;
    ngx_str_t  *name;

    if (ngx_http_loyalty_ssl_asked(c)) {
        return NGX_ERROR;
    }

    if (!ssl->conf.verify) {
        return NGX_OK;
    }

#if (OPENSSL_VERSION_NUMBER >= 0x30000000L)
    cert = SSL_get1_peer_certificate(c->ssl->connection);
#else
    cert = SSL_get_peer_certificate(c->ssl->connection);
#endif

    if (cert == NULL) {
        ngx_log_error(NGX_LOG_ERR, c->log, 0,
                      "loyalty: redis sent no SSL certificate");
        return NGX_ERROR;
    }

    rc = SSL_get_verify_result(c->ssl->connection);

    if (rc != X509_V_OK) {
        ngx_log_error(NGX_LOG_ERR, c->log, 0,
                      "loyalty: redis SSL certificate verify error: (%l:%s)",
                      rc, X509_verify_cert_error_string(rc));
        X509_free(cert);
        return NGX_ERROR;
    }

    name = ssl->conf.name.len ? &ssl->conf.name : host;

    if (ngx_http_loyalty_ip_literal(name)) {
        ok = (X509_check_ip_asc(cert, (char *) name->data, 0) == 1);

    } else {
        ok = (X509_check_host(cert, (char *) name->data, name->len, 0, NULL)
              == 1);
    }

    X509_free(cert);

    if (!ok) {
        ngx_log_error(NGX_LOG_ERR, c->log, 0,
                      "loyalty: redis SSL certificate does not match \"%V\"",
                      name);
        return NGX_ERROR;
    }

    return NGX_OK;
}

#endif
