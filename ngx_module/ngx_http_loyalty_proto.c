
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_sha1.h>
#include <hiredis/read.h>
#include "ngx_http_loyalty_redis.h"


/*
 * The Redis protocol.  Commands are encoded here, into buffers the
 * connection keeps for them (hiredis' redisFormatCommand*() would malloc
 * a copy per command).  Replies are parsed by hiredis' redisReader, with
 * our own object functions: reply objects come from a pool that the
 * connection resets whenever no reply is half built.
 *
 * Only hiredis' public reader interface is used, the same in hiredis 0.14
 * and 1.x.  hiredis 1.0 changed the table of object functions (a size_t
 * array count, functions for the RESP3 double and boolean): it is filled
 * in by name.  The module never asks for RESP3 (HELLO 3), so the types
 * only RESP3 has are protocol errors here, as hiredis 0.14 takes them;
 * and replies are nested at most as deep as hiredis 0.14 allows.  Both
 * versions accept the same replies.
 */


#define NGX_HTTP_LOYALTY_REPLY_ELTS_MAX   16384   /* CLUSTER SLOTS ranges */
#define NGX_HTTP_LOYALTY_REPLY_DEPTH_MAX  8


#ifdef REDIS_REPLY_DOUBLE
#define NGX_HTTP_LOYALTY_HIREDIS_1  1
typedef size_t  ngx_http_loyalty_nelts_t;
#else
typedef int     ngx_http_loyalty_nelts_t;
#endif


static void *ngx_http_loyalty_reply_string(const redisReadTask *task,
    char *str, size_t len);
static void *ngx_http_loyalty_reply_array(const redisReadTask *task,
    ngx_http_loyalty_nelts_t elements);
static void *ngx_http_loyalty_reply_integer(const redisReadTask *task,
    long long value);
static void *ngx_http_loyalty_reply_nil(const redisReadTask *task);
#if (NGX_HTTP_LOYALTY_HIREDIS_1)
static void *ngx_http_loyalty_reply_double(const redisReadTask *task,
    double value, char *str, size_t len);
static void *ngx_http_loyalty_reply_bool(const redisReadTask *task,
    int value);
#endif
static void ngx_http_loyalty_reply_free(void *reply);
static ngx_http_loyalty_reply_t *ngx_http_loyalty_reply_create(
    const redisReadTask *task, ngx_uint_t type);
static void *ngx_http_loyalty_reply_refuse(const redisReadTask *task,
    const char *reason);


ngx_str_t  ngx_http_loyalty_record_fields[] = {
    ngx_string("points"),
    ngx_string("lifetime"),
    ngx_string("orders"),
    ngx_string("first_order"),
    ngx_string("last_order"),
    ngx_string("pending")
};


static redisReplyObjectFunctions  ngx_http_loyalty_reply_functions = {
    .createString = ngx_http_loyalty_reply_string,
    .createArray = ngx_http_loyalty_reply_array,
    .createInteger = ngx_http_loyalty_reply_integer,
    .createNil = ngx_http_loyalty_reply_nil,
#if (NGX_HTTP_LOYALTY_HIREDIS_1)
    .createDouble = ngx_http_loyalty_reply_double,
    .createBool = ngx_http_loyalty_reply_bool,
#endif
    .freeObject = ngx_http_loyalty_reply_free
};


/*
 * The customer's hash, "<prefix>{<id>}": the hash tag keeps all the keys
 * of one customer in one Cluster slot.  The caller reserves
 * NGX_HTTP_LOYALTY_KEY_LEN bytes.
 */

u_char *
ngx_http_loyalty_hash_key(u_char *p, ngx_str_t *prefix, u_char *id,
    size_t len)
{
    p = ngx_cpymem(p, prefix->data, prefix->len);
    *p++ = '{';
    p = ngx_cpymem(p, id, len);
    *p++ = '}';

    return p;
}


size_t
ngx_http_loyalty_command_len(ngx_uint_t argc, ngx_str_t *argv)
{
    size_t      len;
    ngx_uint_t  i;

    /* "*<argc>\r\n" then "$<len>\r\n<arg>\r\n" per argument */

    len = 1 + NGX_INT_T_LEN + 2;

    for (i = 0; i < argc; i++) {
        len += 1 + NGX_SIZE_T_LEN + 2 + argv[i].len + 2;
    }

    return len;
}


u_char *
ngx_http_loyalty_command_write(u_char *p, ngx_uint_t argc, ngx_str_t *argv)
{
    ngx_uint_t  i;

    *p++ = '*';
    p = ngx_http_loyalty_write_uint(p, argc);
    *p++ = CR; *p++ = LF;

    for (i = 0; i < argc; i++) {
        *p++ = '$';
        p = ngx_http_loyalty_write_uint(p, argv[i].len);
        *p++ = CR; *p++ = LF;
        p = ngx_cpymem(p, argv[i].data, argv[i].len);
        *p++ = CR; *p++ = LF;
    }

    return p;
}


ngx_int_t
ngx_http_loyalty_reader_init(ngx_http_loyalty_reader_t *rd, ngx_pool_t *pool)
{
    redisReader  *reader;

    reader = redisReaderCreateWithFunctions(&ngx_http_loyalty_reply_functions);
    if (reader == NULL) {
        return NGX_ERROR;
    }

    reader->privdata = rd;

    rd->hiredis = reader;
    rd->pool = pool;
    rd->building = 0;
    rd->error = NULL;

    return NGX_OK;
}


void
ngx_http_loyalty_reader_free(ngx_http_loyalty_reader_t *rd)
{
    if (rd->hiredis) {
        redisReaderFree(rd->hiredis);
        rd->hiredis = NULL;
    }
}


ngx_int_t
ngx_http_loyalty_reader_feed(ngx_http_loyalty_reader_t *rd, u_char *buf,
    size_t n)
{
    if (redisReaderFeed(rd->hiredis, (const char *) buf, n) != REDIS_OK) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * NGX_OK and a reply, NGX_AGAIN when no complete reply is buffered, or
 * NGX_ERROR on a protocol error (or no memory), described in "err".
 */

ngx_int_t
ngx_http_loyalty_reader_next(ngx_http_loyalty_reader_t *rd,
    ngx_http_loyalty_reply_t **reply, ngx_str_t *err)
{
    void         *obj;
    redisReader  *reader;

    reader = rd->hiredis;

    if (redisReaderGetReply(reader, &obj) != REDIS_OK) {

        /* a reply our functions refused, or hiredis' own reason */

        err->data = (u_char *) (rd->error ? rd->error : reader->errstr);
        err->len = ngx_strlen(err->data);
        return NGX_ERROR;
    }

    if (obj == NULL) {
        return NGX_AGAIN;
    }

    /*
     * redisReaderGetReply() returns as soon as a reply is whole: every
     * object built so far belongs to it
     */

    rd->building = 0;

    *reply = obj;

    return NGX_OK;
}


/* no reply is half built: the pool's objects may all be released */

ngx_int_t
ngx_http_loyalty_reader_idle(ngx_http_loyalty_reader_t *rd)
{
    return rd->building ? NGX_DECLINED : NGX_OK;
}


/* a bulk string or integer reply holding a non-negative integer */

ngx_int_t
ngx_http_loyalty_reply_uint(ngx_http_loyalty_reply_t *reply, uint64_t *value)
{
    switch (reply->type) {

    case NGX_HTTP_LOYALTY_REPLY_NIL:
        *value = 0;
        return NGX_DECLINED;

    case NGX_HTTP_LOYALTY_REPLY_INTEGER:
        if (reply->integer < 0) {
            return NGX_ERROR;
        }

        *value = reply->integer;
        return NGX_OK;

    case NGX_HTTP_LOYALTY_REPLY_STRING:
        return ngx_http_loyalty_parse_uint(reply->str.data, reply->str.len,
                                           value);

    default:
        return NGX_ERROR;
    }
}


/*
 * The reply to HMGET of the record fields: NGX_OK for a customer, with
 * the bits of "bad" set for fields that are not counts (taken as 0),
 * NGX_DECLINED when no field exists, NGX_ERROR for any other reply.
 * Pending points due by "now" are counted as released, into points and
 * lifetime, as the next write will store them; a "pending" field that is
 * not a list is taken as empty.
 */

ngx_int_t
ngx_http_loyalty_reply_record(ngx_http_loyalty_reply_t *reply,
    ngx_http_loyalty_record_t *record, time_t now, ngx_uint_t *bad)
{
    uint64_t                  *field[NGX_HTTP_LOYALTY_NCOUNTS], due;
    ngx_int_t                  rc;
    ngx_uint_t                 i, found;
    ngx_http_loyalty_reply_t  *pending;

    *bad = 0;

    if (reply->type != NGX_HTTP_LOYALTY_REPLY_ARRAY
        || reply->nelts != NGX_HTTP_LOYALTY_NFIELDS)
    {
        return NGX_ERROR;
    }

    field[0] = &record->points;
    field[1] = &record->lifetime;
    field[2] = &record->orders;
    field[3] = &record->first_order;
    field[4] = &record->last_order;

    found = 0;

    for (i = 0; i < NGX_HTTP_LOYALTY_NCOUNTS; i++) {
        rc = ngx_http_loyalty_reply_uint(reply->element[i], field[i]);

        if (rc == NGX_DECLINED) {
            continue;
        }

        found = 1;

        if (rc == NGX_ERROR) {
            *field[i] = 0;
            *bad |= (ngx_uint_t) 1 << i;
        }
    }

    record->pending = 0;
    record->pending_release = 0;

    pending = reply->element[NGX_HTTP_LOYALTY_NCOUNTS];

    if (pending->type == NGX_HTTP_LOYALTY_REPLY_NIL) {
        return found ? NGX_OK : NGX_DECLINED;
    }

    if (pending->type != NGX_HTTP_LOYALTY_REPLY_STRING
        || ngx_http_loyalty_parse_pending(pending->str.data, pending->str.len,
                                          now, &due, &record->pending,
                                          &record->pending_release)
           != NGX_OK
        || (due
            && (record->points + due >= NGX_HTTP_LOYALTY_EXACT
                || record->lifetime + due >= NGX_HTTP_LOYALTY_EXACT)))
    {
        record->pending = 0;
        record->pending_release = 0;
        *bad |= (ngx_uint_t) 1 << NGX_HTTP_LOYALTY_NCOUNTS;
        return NGX_OK;
    }

    record->points += due;
    record->lifetime += due;

    return NGX_OK;
}


/* the hex SHA1 that EVALSHA names a script by */

ngx_int_t
ngx_http_loyalty_script_sha1(ngx_str_t *script, u_char *sha)
{
    ngx_sha1_t  sha1;
    u_char      digest[20];

    ngx_sha1_init(&sha1);
    ngx_sha1_update(&sha1, script->data, script->len);
    ngx_sha1_final(digest, &sha1);

    ngx_hex_dump(sha, digest, sizeof(digest));

    return NGX_OK;
}


static void *
ngx_http_loyalty_reply_string(const redisReadTask *task, char *str,
    size_t len)
{
    ngx_uint_t                  type;
    ngx_http_loyalty_reply_t   *reply;
    ngx_http_loyalty_reader_t  *rd;

    switch (task->type) {

    case REDIS_REPLY_STRING:
        type = NGX_HTTP_LOYALTY_REPLY_STRING;
        break;

    case REDIS_REPLY_STATUS:
        type = NGX_HTTP_LOYALTY_REPLY_STATUS;
        break;

    case REDIS_REPLY_ERROR:
        type = NGX_HTTP_LOYALTY_REPLY_ERROR;
        break;

    default:
        /* hiredis 1.x: a RESP3 verbatim string or big number */
        return ngx_http_loyalty_reply_refuse(task, "RESP3 string");
    }

    reply = ngx_http_loyalty_reply_create(task, type);
    if (reply == NULL) {
        return NULL;
    }

    rd = task->privdata;

    reply->str.data = ngx_pnalloc(rd->pool, len + 1);
    if (reply->str.data == NULL) {
        return NULL;
    }

    ngx_memcpy(reply->str.data, str, len);
    reply->str.data[len] = '\0';
    reply->str.len = len;

    return reply;
}


static void *
ngx_http_loyalty_reply_array(const redisReadTask *task,
    ngx_http_loyalty_nelts_t elements)
{
    ngx_uint_t                  depth;
    redisReadTask              *parent;
    ngx_http_loyalty_reply_t   *reply;
    ngx_http_loyalty_reader_t  *rd;

    if (task->type != REDIS_REPLY_ARRAY) {
        /* hiredis 1.x: a RESP3 map, set, push or attribute */
        return ngx_http_loyalty_reply_refuse(task, "RESP3 aggregate");
    }

    /*
     * No reply of ours has more elements than CLUSTER SLOTS can have
     * ranges, one per slot at most: a larger count is refused before
     * anything is allocated for it, and the reader fails.
     */

    if (elements > NGX_HTTP_LOYALTY_REPLY_ELTS_MAX) {
        return ngx_http_loyalty_reply_refuse(task, "array too long");
    }

    depth = 0;

    for (parent = task->parent; parent; parent = parent->parent) {
        if (++depth == NGX_HTTP_LOYALTY_REPLY_DEPTH_MAX) {
            return ngx_http_loyalty_reply_refuse(task, "arrays nested "
                                                 "too deep");
        }
    }

    reply = ngx_http_loyalty_reply_create(task, NGX_HTTP_LOYALTY_REPLY_ARRAY);
    if (reply == NULL) {
        return NULL;
    }

    if (elements > 0) {
        rd = task->privdata;

        reply->element = ngx_pcalloc(rd->pool, elements * sizeof(void *));
        if (reply->element == NULL) {
            return NULL;
        }
    }

    reply->nelts = elements;

    return reply;
}


static void *
ngx_http_loyalty_reply_integer(const redisReadTask *task, long long value)
{
    ngx_http_loyalty_reply_t  *reply;

    reply = ngx_http_loyalty_reply_create(task,
                                          NGX_HTTP_LOYALTY_REPLY_INTEGER);
    if (reply == NULL) {
        return NULL;
    }

    reply->integer = value;

    return reply;
}


static void *
ngx_http_loyalty_reply_nil(const redisReadTask *task)
{
    /*
     * A RESP2 nil is a bulk string or an array of length -1: only RESP3's
     * "_" has a task of its own type, and only in hiredis 1.x
     */

    if (task->type == REDIS_REPLY_NIL) {
        return ngx_http_loyalty_reply_refuse(task, "RESP3 null");
    }

    return ngx_http_loyalty_reply_create(task, NGX_HTTP_LOYALTY_REPLY_NIL);
}


#if (NGX_HTTP_LOYALTY_HIREDIS_1)

static void *
ngx_http_loyalty_reply_double(const redisReadTask *task, double value,
    char *str, size_t len)
{
    return ngx_http_loyalty_reply_refuse(task, "RESP3 double");
}


static void *
ngx_http_loyalty_reply_bool(const redisReadTask *task, int value)
{
    return ngx_http_loyalty_reply_refuse(task, "RESP3 boolean");
}

#endif


static void
ngx_http_loyalty_reply_free(void *reply)
{
    /* replies live in the connection's reply pool */
}


static ngx_http_loyalty_reply_t *
ngx_http_loyalty_reply_create(const redisReadTask *task, ngx_uint_t type)
{
    ngx_http_loyalty_reply_t   *reply, *parent;
    ngx_http_loyalty_reader_t  *rd;

    rd = task->privdata;
    rd->building = 1;

    reply = ngx_pcalloc(rd->pool, sizeof(ngx_http_loyalty_reply_t));
    if (reply == NULL) {
        return NULL;
    }

    reply->type = type;

    if (task->parent) {
        parent = task->parent->obj;

        if ((size_t) task->idx >= parent->nelts) {
            return NULL;
        }

        parent->element[task->idx] = reply;
    }

    return reply;
}


/* NULL fails the reader; the reason is what the connection logs */

static void *
ngx_http_loyalty_reply_refuse(const redisReadTask *task, const char *reason)
{
    ngx_http_loyalty_reader_t  *rd;

    rd = task->privdata;
    rd->error = reason;

    return NULL;
}
