
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include "ngx_http_loyalty_module.h"
#include "ngx_http_loyalty_credit.h"


/*
 * The journal: one JSON line per credit that could not be applied, with
 * everything tools/loyalty-replay needs to apply it later.  The file is
 * opened by the master like an access_log, and reopened on USR1; with
 * "loyalty_journal off" the line goes to the error log instead.
 */


/*
 * Room for every field even when each byte of each string is escaped:
 * 6 * (address 260 + prefix 64 + customer 128 + order 128 + amount 17)
 * and about 400 bytes of names, numbers and the reason.
 */
#define NGX_HTTP_LOYALTY_JOURNAL_LINE  4608


static u_char *ngx_http_loyalty_journal_string(u_char *p, u_char *last,
    u_char *s, size_t len);


char *
ngx_http_loyalty_journal_directive(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_loyalty_loc_conf_t *llcf = conf;

    ngx_str_t  *value;

    if (llcf->journal != NGX_CONF_UNSET_PTR) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (ngx_strcmp(value[1].data, "off") == 0) {
        llcf->journal = NULL;
        return NGX_CONF_OK;
    }

    llcf->journal = ngx_conf_open_file(cf->cycle, &value[1]);
    if (llcf->journal == NULL) {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


void
ngx_http_loyalty_journal(ngx_http_loyalty_credit_t *cr, const char *reason,
    ngx_log_t *log)
{
    u_char                       *p, *last;
    ssize_t                       n;
    ngx_err_t                     err;
    ngx_http_loyalty_server_t    *server;
    ngx_http_loyalty_loc_conf_t  *llcf;
    u_char                        line[NGX_HTTP_LOYALTY_JOURNAL_LINE];

    llcf = cr->conf;
    server = llcf->server;

    ngx_http_loyalty_count(cr->lmcf->sh, credits[NGX_HTTP_LOYALTY_JOURNALED]);

    p = line;
    last = line + sizeof(line) - 1;

    p = ngx_slprintf(p, last, "{\"ts\":%T,\"redis\":", cr->ts);
    p = ngx_http_loyalty_journal_string(p, last, server->name.data,
                                        server->name.len);
    if (server->cluster) {
        p = ngx_slprintf(p, last, ",\"cluster\":true");
    }

    if (server->tls) {
        p = ngx_slprintf(p, last, ",\"tls\":true");
    }

    if (server->master.len) {
        p = ngx_slprintf(p, last, ",\"sentinel\":");
        p = ngx_http_loyalty_journal_string(p, last, server->master.data,
                                            server->master.len);
    }

    /* a replay is confirmed as the credit would have been */

    if (llcf->credit_wait) {
        p = ngx_slprintf(p, last, ",\"wait\":%ui,\"wait_ms\":%M",
                         llcf->credit_wait, llcf->credit_wait_time);
    }

    p = ngx_slprintf(p, last, ",\"db\":%ui,\"prefix\":", server->db);
    p = ngx_http_loyalty_journal_string(p, last, llcf->prefix.data,
                                        llcf->prefix.len);
    p = ngx_slprintf(p, last, ",\"customer\":");
    p = ngx_http_loyalty_journal_string(p, last, cr->customer,
                                        cr->customer_len);
    p = ngx_slprintf(p, last, ",\"order\":");
    p = ngx_http_loyalty_journal_string(p, last, cr->order,
                                        cr->order_len);
    p = ngx_slprintf(p, last, ",\"amount\":");
    p = ngx_http_loyalty_journal_string(p, last, cr->amount,
                                        cr->amount_len);
    p = ngx_slprintf(p, last,
                     ",\"earned\":%uL,\"redeem\":%uL,\"ledger\":%i,"
                     "\"expire\":%T,\"order_ttl\":%T,\"pending\":%T,"
                     "\"reason\":\"%s\"}",
                     cr->earned, cr->redeem, llcf->ledger, llcf->expire,
                     llcf->order_ttl, llcf->pending, reason);

    if (llcf->journal == NULL) {
        ngx_log_error(NGX_LOG_ERR, log, 0,
                      "loyalty: unapplied credit: %*s", p - line, line);
        return;
    }

    *p++ = LF;

    n = ngx_write_fd(llcf->journal->fd, line, p - line);

    if (n == p - line) {
        ngx_log_error(NGX_LOG_WARN, log, 0,
                      "loyalty: credit of order \"%*s\" for customer "
                      "\"%*s\" journaled: %s",
                      cr->order_len, cr->order, cr->customer_len,
                      cr->customer, reason);
        return;
    }

    err = (n == -1) ? ngx_errno : 0;

    ngx_log_error(NGX_LOG_ALERT, log, err,
                  "loyalty: writing the journal \"%V\" failed, "
                  "unapplied credit: %*s",
                  &llcf->journal->name, p - line - 1, line);
}


/* a JSON string; the line is sized so that it is never cut short */

static u_char *
ngx_http_loyalty_journal_string(u_char *p, u_char *last, u_char *s,
    size_t len)
{
    size_t  room;

    if (last - p < 2) {
        return p;
    }

    room = (last - p - 2) / NGX_HTTP_LOYALTY_JSON_ESCAPE;

    return ngx_http_loyalty_json_string(p, s, ngx_min(len, room));
}
