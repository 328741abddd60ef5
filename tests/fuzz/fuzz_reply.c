
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


/*
 * Redis replies, read as ngx_http_loyalty_redis.c reads them: the bytes
 * fed to the reader in chunks, every complete reply taken out, handed to
 * what the module does with replies, and the reply pool reset whenever the
 * reader is idle; a protocol error ends the connection.
 *
 * Input: one byte, then the bytes "from Redis".  The first byte sets the
 * chunking: 0 feeds everything at once, n feeds chunks of 1 to n bytes
 * (pseudo-random sizes, reproducible).
 *
 * Checked for every reply: no allocation is far larger than the input (see
 * ngx_shim_alloc_max); the tree the module's reply functions built is
 * whole (an array of n elements has n non-NULL elements: the credit and
 * lookup handlers index them without further checks), strings are
 * NUL-terminated, and ngx_http_loyalty_reply_uint() and
 * ngx_http_loyalty_reply_record() agree with a reference: the record of an
 * HMGET of 6 fields (5 counts, then "pending", parsed by a reference of
 * its own), at several times around the release times in "pending".
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include "ngx_http_loyalty_redis.h"
#include "fuzz.h"
#include "ref_pending.h"


#define DEPTH_MAX  16

/* NGX_HTTP_LOYALTY_REPLY_ELTS_MAX, ngx_http_loyalty_proto.c */
#define ELTS_MAX   16384


static size_t             nodes;
static volatile unsigned  sink;


static void
walk(ngx_http_loyalty_reply_t *reply, size_t depth, size_t input)
{
    size_t    i;
    unsigned  sum;

    check(reply != NULL);
    check(depth < DEPTH_MAX);

    /* every node came from at least 3 bytes of input (":\r\n") */
    check(++nodes <= input / 3);

    switch (reply->type) {

    case NGX_HTTP_LOYALTY_REPLY_STRING:
    case NGX_HTTP_LOYALTY_REPLY_STATUS:
    case NGX_HTTP_LOYALTY_REPLY_ERROR:
        check(reply->str.data != NULL);
        check(reply->str.len <= input);

        /* touch every byte: AddressSanitizer checks the allocation */

        for (sum = 0, i = 0; i < reply->str.len; i++) {
            sum += reply->str.data[i];
        }

        check(reply->str.data[reply->str.len] == '\0');
        sink += sum;
        break;

    case NGX_HTTP_LOYALTY_REPLY_ARRAY:
        check(reply->nelts <= input / 3);
        check(reply->nelts <= ELTS_MAX);

        if (reply->nelts) {
            check(reply->element != NULL);
        }

        for (i = 0; i < reply->nelts; i++) {
            walk(reply->element[i], depth + 1, input);
        }

        break;

    case NGX_HTTP_LOYALTY_REPLY_INTEGER:
    case NGX_HTTP_LOYALTY_REPLY_NIL:
        break;

    default:
        check(0 && "unknown reply type");
    }
}


/* what ngx_http_loyalty_reply_uint() must say */

static ngx_int_t
ref_uint(ngx_http_loyalty_reply_t *reply, uint64_t *value)
{
    size_t    i;
    uint64_t  v;

    switch (reply->type) {

    case NGX_HTTP_LOYALTY_REPLY_NIL:
        *value = 0;
        return NGX_DECLINED;

    case NGX_HTTP_LOYALTY_REPLY_INTEGER:
        if (reply->integer < 0) {
            return NGX_ERROR;
        }

        *value = (uint64_t) reply->integer;
        return NGX_OK;

    case NGX_HTTP_LOYALTY_REPLY_STRING:
        if (reply->str.len < 1 || reply->str.len > 19) {
            return NGX_ERROR;
        }

        v = 0;

        for (i = 0; i < reply->str.len; i++) {
            if (reply->str.data[i] < '0' || reply->str.data[i] > '9') {
                return NGX_ERROR;
            }

            v = v * 10 + (reply->str.data[i] - '0');
        }

        if (reply->str.len == 19
            && memcmp(reply->str.data, "9223372036854775807", 19) > 0)
        {
            return NGX_ERROR;
        }

        *value = v;
        return NGX_OK;

    default:
        return NGX_ERROR;
    }
}


static void
check_uint(ngx_http_loyalty_reply_t *reply)
{
    uint64_t   value, ref;
    ngx_int_t  rc, expect;

    value = 0xdeadbeef;
    ref = 0xdeadbeef;

    rc = ngx_http_loyalty_reply_uint(reply, &value);
    expect = ref_uint(reply, &ref);

    check(rc == expect);

    if (rc != NGX_ERROR) {
        check(value == ref);
    }
}


/*
 * The record of an HMGET reply of 6 elements: the 5 counts as
 * ref_uint() says (a bad one is 0, with its bit in "bad"), then
 * "pending": nil changes nothing; anything else is a field that exists
 * (NGX_OK); a string that ref_pending() accepts, with points and lifetime
 * each staying below 2^53 once its due points (if any) are added, is
 * released into both, its locked points and next release kept; anything else sets
 * bit 5 and is taken as empty.
 */

static void
check_record_at(ngx_http_loyalty_reply_t *reply, time_t now)
{
    int64_t                    next;
    uint64_t                   value[NGX_HTTP_LOYALTY_NCOUNTS], *field;
    uint64_t                   due, locked;
    ngx_int_t                  rc, frc;
    ngx_uint_t                 bad, i, found, pbad;
    ngx_http_loyalty_reply_t  *pending;
    ngx_http_loyalty_record_t  rec;

    memset(&rec, 0xa5, sizeof(rec));
    bad = 0xa5;

    rc = ngx_http_loyalty_reply_record(reply, &rec, now, &bad);

    if (reply->type != NGX_HTTP_LOYALTY_REPLY_ARRAY
        || reply->nelts != NGX_HTTP_LOYALTY_NFIELDS)
    {
        check(rc == NGX_ERROR);
        return;
    }

    check(NGX_HTTP_LOYALTY_NFIELDS == 6 && NGX_HTTP_LOYALTY_NCOUNTS == 5);

    found = 0;

    for (i = 0; i < NGX_HTTP_LOYALTY_NCOUNTS; i++) {
        frc = ref_uint(reply->element[i], &value[i]);

        if (frc == NGX_DECLINED) {
            check(!(bad & ((ngx_uint_t) 1 << i)));
            value[i] = 0;
            continue;
        }

        found = 1;

        if (frc == NGX_ERROR) {
            check(bad & ((ngx_uint_t) 1 << i));
            value[i] = 0;

        } else {
            check(!(bad & ((ngx_uint_t) 1 << i)));
        }
    }

    pending = reply->element[NGX_HTTP_LOYALTY_NCOUNTS];

    due = 0;
    locked = 0;
    next = 0;
    pbad = 0;

    if (pending->type != NGX_HTTP_LOYALTY_REPLY_NIL) {
        found = 1;

        if (pending->type != NGX_HTTP_LOYALTY_REPLY_STRING
            || !ref_pending(pending->str.data, pending->str.len,
                            (int64_t) now, &due, &locked, &next)
            || (due > 0
                && ((unsigned __int128) value[0] + due >= REF_EXACT
                    || (unsigned __int128) value[1] + due >= REF_EXACT)))
        {
            pbad = 1;
            due = 0;
            locked = 0;
            next = 0;
        }
    }

    check(!!(bad & ((ngx_uint_t) 1 << NGX_HTTP_LOYALTY_NCOUNTS)) == pbad);
    check(bad < (1 << NGX_HTTP_LOYALTY_NFIELDS));
    check(rc == (found ? NGX_OK : NGX_DECLINED));

    /* due points released into points and lifetime, nothing else */

    value[0] += due;
    value[1] += due;

    field = &rec.points;

    for (i = 0; i < NGX_HTTP_LOYALTY_NCOUNTS; i++) {
        check(field[i] == value[i]);
    }

    check(rec.pending == locked);
    check((int64_t) rec.pending_release == next);

    /* locked points have a release still to come */

    check(rec.pending == 0 || rec.pending_release > now);
    check(rec.pending_release == 0 || rec.pending_release > now);
}


/*
 * The record at fixed times, and just before, at and after the release
 * times of the first entries of "pending" (scanned loosely: a valid field
 * or not), where points go from locked to due.
 */

static void
check_record(ngx_http_loyalty_reply_t *reply)
{
    u_char                    *p, *last;
    size_t                     n, digits;
    uint64_t                   release;
    ngx_http_loyalty_reply_t  *pending;

    check_record_at(reply, 0);
    check_record_at(reply, (time_t) 1700000000);
    check_record_at(reply, (time_t) INT64_MAX);

    if (reply->type != NGX_HTTP_LOYALTY_REPLY_ARRAY
        || reply->nelts != NGX_HTTP_LOYALTY_NFIELDS)
    {
        return;
    }

    pending = reply->element[NGX_HTTP_LOYALTY_NCOUNTS];

    if (pending->type != NGX_HTTP_LOYALTY_REPLY_STRING) {
        return;
    }

    p = pending->str.data;
    last = p + pending->str.len;

    for (n = 0; n < 4 && p < last; n++) {
        release = 0;

        for (digits = 0; p < last && *p >= '0' && *p <= '9'; p++, digits++) {
            if (digits < 18) {
                release = release * 10 + (*p - '0');
            }
        }

        if (release > 0) {
            check_record_at(reply, (time_t) release - 1);
        }

        check_record_at(reply, (time_t) release);
        check_record_at(reply, (time_t) release + 1);

        while (p < last && *p++ != ',') {
            /* void */
        }
    }
}


/* ngx_http_loyalty_redis_process() without the commands */

static ngx_int_t
process(ngx_http_loyalty_reader_t *reader, ngx_pool_t *pool,
    size_t input)
{
    ngx_int_t                  rc;
    ngx_str_t                  err;
    ngx_http_loyalty_reply_t  *reply;

    for ( ;; ) {
        reply = NULL;
        rc = ngx_http_loyalty_reader_next(reader, &reply, &err);

        if (rc == NGX_AGAIN) {
            break;
        }

        if (rc == NGX_ERROR) {
            check(err.data != NULL && err.len == strlen((char *) err.data));
            return NGX_ERROR;
        }

        check(rc == NGX_OK);

        nodes = 0;
        walk(reply, 0, input);
        check_uint(reply);
        check_record(reply);
    }

    if (ngx_http_loyalty_reader_idle(reader) == NGX_OK) {
        ngx_reset_pool(pool);
    }

    return NGX_OK;
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    u_char                     *buf;
    size_t                      n, chunk, fed;
    uint32_t                    rnd;
    ngx_pool_t                 *pool;
    ngx_http_loyalty_reader_t   reader;

    if (size == 0) {
        return 0;
    }

    chunk = data[0];
    data++;
    size--;

    /*
     * Nothing built from n bytes needs more than a few times n in one
     * allocation (an array of n/4 pointers, a string of n bytes): a
     * declared count or length trusted before its data arrived aborts here
     * rather than as a 16 GB calloc().  Except an array's elements,
     * allocated when its header arrives: the module lets through up to
     * ELTS_MAX (one CLUSTER SLOTS range per slot), 128 KB of pointers for
     * the 9 bytes of "*16384\r\n", and refuses more.
     */
    ngx_shim_alloc_max = ngx_max(16 * size + 1024,
                                 ELTS_MAX * sizeof(void *));

    pool = ngx_create_pool(4096, NULL);
    check(pool != NULL);

    check(ngx_http_loyalty_reader_init(&reader, pool) == NGX_OK);

    fed = 0;
    rnd = 2463534242U ^ (uint32_t) (chunk * 2654435761U) ^ (uint32_t) size;

    while (size) {
        if (chunk == 0) {
            n = size;

        } else {
            rnd ^= rnd << 13;
            rnd ^= rnd >> 17;
            rnd ^= rnd << 5;

            n = 1 + rnd % chunk;
            n = ngx_min(n, size);
        }

        /* an exact-size copy, as a recv() into conn->in */

        buf = malloc(n);
        check(buf != NULL);
        memcpy(buf, data, n);

        if (ngx_http_loyalty_reader_feed(&reader, buf, n) != NGX_OK) {
            free(buf);
            break;
        }

        free(buf);

        data += n;
        size -= n;
        fed += n;

        if (process(&reader, pool, fed) != NGX_OK) {
            break;
        }
    }

    ngx_http_loyalty_reader_free(&reader);
    ngx_destroy_pool(pool);

    return 0;
}
