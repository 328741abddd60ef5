
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


/*
 * The arguments of loyalty_api, as ngx_http_loyalty_api.c reads them:
 * ngx_http_loyalty_form_arg() finds an argument of a query string or a
 * form body, ngx_http_loyalty_form_decode() decodes it, and the value is
 * checked as a customer id, an order or adjustment id, a reason, signed
 * points, a refunded amount or "all"; and the "pending" field of a record,
 * ngx_http_loyalty_parse_pending().  Each against a reference written
 * here from the specification.
 *
 * Input: "<name>\n<query>": the argument name up to the first "\n", the
 * query string or body after it; with no "\n" all of it is the query.
 * The query is searched for that name and for the names the API uses;
 * every value found and decoded goes through every check, and so does the
 * query itself, as it is (the checks fuzzed directly).
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include "ngx_http_loyalty_rules.h"
#include "fuzz.h"
#include "ref_pending.h"



static const char  *names[] = {
    "customer", "order", "id", "refunded", "points", "reason", "count"
};


/* first "name=value" (or "name" alone: empty) of the &-separated parts */

static int
ref_form_arg(const u_char *p, size_t len, const u_char *name, size_t nlen,
    size_t *off, size_t *vlen)
{
    size_t         start, end, klen;
    const u_char  *amp, *eq;

    for (start = 0; start < len; start = end + 1) {

        amp = memchr(p + start, '&', len - start);
        end = amp ? (size_t) (amp - p) : len;

        eq = memchr(p + start, '=', end - start);
        klen = eq ? (size_t) (eq - p) - start : end - start;

        if (klen == nlen && memcmp(p + start, name, nlen) == 0) {
            *off = eq ? (size_t) (eq - p) + 1 : end;
            *vlen = end - *off;
            return 1;
        }
    }

    return 0;
}


static int
ref_hex(u_char c)
{
    static const char  digits[] = "0123456789abcdef";
    const char        *d;

    if (c >= 'A' && c <= 'F') {
        c = (u_char) (c - 'A' + 'a');
    }

    for (d = digits; *d; d++) {
        if (*d == c) {
            return (int) (d - digits);
        }
    }

    return -1;
}


/* "+" a space, "%" and 2 hex digits a byte, a "%" without them refused */

static int
ref_decode(const u_char *p, size_t len, u_char *out, size_t *n)
{
    int     hi, lo;
    size_t  i, k;

    for (i = 0, k = 0; i < len; i++) {
        if (p[i] == '%') {
            if (len - i < 3) {
                return 0;
            }

            hi = ref_hex(p[i + 1]);
            lo = ref_hex(p[i + 2]);

            if (hi < 0 || lo < 0) {
                return 0;
            }

            out[k++] = (u_char) (hi * 16 + lo);
            i += 2;

        } else {
            out[k++] = (p[i] == '+') ? ' ' : p[i];
        }
    }

    *n = k;
    return 1;
}


/* A-Z a-z 0-9 . _ - @ : +, 1 to 128 bytes */

static int
ref_valid_id(const u_char *p, size_t len)
{
    size_t  i;

    if (len < 1 || len > 128) {
        return 0;
    }

    for (i = 0; i < len; i++) {
        if (!((p[i] >= 'A' && p[i] <= 'Z') || (p[i] >= 'a' && p[i] <= 'z')
              || (p[i] >= '0' && p[i] <= '9') || p[i] == '.' || p[i] == '_'
              || p[i] == '-' || p[i] == '@' || p[i] == ':' || p[i] == '+'))
        {
            return 0;
        }
    }

    return 1;
}


/* 1 to 128 bytes of 0x21 to 0x7e */

static int
ref_valid_order(const u_char *p, size_t len)
{
    size_t  i;

    if (len < 1 || len > 128) {
        return 0;
    }

    for (i = 0; i < len; i++) {
        if (p[i] < 0x21 || p[i] > 0x7e) {
            return 0;
        }
    }

    return 1;
}


/*
 * 1 to 200 characters of well-formed UTF-8 (the Unicode Standard's
 * table 3-7 of well-formed byte sequences), none of them U+0000-U+001F,
 * U+007F or U+0080-U+009F
 */

static int
ref_valid_reason(const u_char *p, size_t len)
{
    size_t  i, k, chars, n;
    u_char  lo, hi;

    chars = 0;

    for (i = 0; i < len; chars++) {

        if (p[i] < 0x80) {
            if (p[i] < 0x20 || p[i] == 0x7f) {
                return 0;
            }

            i++;
            continue;
        }

        /* the range of the second byte, and the length */

        lo = 0x80;
        hi = 0xbf;

        if (p[i] >= 0xc2 && p[i] <= 0xdf) {
            n = 2;

        } else if (p[i] == 0xe0) {
            n = 3;
            lo = 0xa0;

        } else if ((p[i] >= 0xe1 && p[i] <= 0xec) || p[i] == 0xee
                   || p[i] == 0xef)
        {
            n = 3;

        } else if (p[i] == 0xed) {
            n = 3;
            hi = 0x9f;

        } else if (p[i] == 0xf0) {
            n = 4;
            lo = 0x90;

        } else if (p[i] >= 0xf1 && p[i] <= 0xf3) {
            n = 4;

        } else if (p[i] == 0xf4) {
            n = 4;
            hi = 0x8f;

        } else {
            return 0;
        }

        if (len - i < n || p[i + 1] < lo || p[i + 1] > hi) {
            return 0;
        }

        for (k = 2; k < n; k++) {
            if (p[i + k] < 0x80 || p[i + k] > 0xbf) {
                return 0;
            }
        }

        /* C1: U+0080 to U+009F, \xc2\x80 to \xc2\x9f */

        if (p[i] == 0xc2 && p[i + 1] <= 0x9f) {
            return 0;
        }

        i += n;
    }

    return chars >= 1 && chars <= 200;
}


/* ^[+-]?[0-9]{1,18}$ */

static int
ref_signed(const u_char *p, size_t len, uint64_t *value, ngx_uint_t *negative)
{
    size_t  i, start;

    *negative = 0;
    start = 0;

    if (len > 0 && (p[0] == '+' || p[0] == '-')) {
        *negative = (p[0] == '-');
        start = 1;
    }

    if (len - start < 1 || len - start > 18) {
        return 0;
    }

    *value = 0;

    for (i = start; i < len; i++) {
        if (p[i] < '0' || p[i] > '9') {
            return 0;
        }

        *value = *value * 10 + (uint64_t) (p[i] - '0');
    }

    return 1;
}


/* ^[0-9]{1,12}(\.[0-9]{1,4})?$ into the value times 10^4 */

static int
ref_amount(const u_char *p, size_t len, uint64_t *value)
{
    size_t    i, n, f;
    uint64_t  v;

    for (n = 0; n < len && p[n] >= '0' && p[n] <= '9'; n++) {
        /* void */
    }

    if (n < 1 || n > 12) {
        return 0;
    }

    f = 0;

    if (n < len) {
        if (p[n] != '.') {
            return 0;
        }

        for (f = 0; n + 1 + f < len && p[n + 1 + f] >= '0'
                    && p[n + 1 + f] <= '9'; f++)
        {
            /* void */
        }

        if (f < 1 || f > 4 || n + 1 + f != len) {
            return 0;
        }
    }

    v = 0;

    for (i = 0; i < n; i++) {
        v = v * 10 + (uint64_t) (p[i] - '0');
    }

    for (i = 0; i < 4; i++) {
        v = v * 10 + (uint64_t) (i < f ? p[n + 1 + i] - '0' : 0);
    }

    *value = v;
    return 1;
}


static void
check_pending_at(u_char *p, size_t len, time_t now)
{
    time_t     next;
    int64_t    rnext;
    uint64_t   due, locked, rdue, rlocked;
    ngx_int_t  rc;

    due = 0xdeadbeef;
    locked = 0xdeadbeef;
    next = 0xdeadbeef;

    rc = ngx_http_loyalty_parse_pending(p, len, now, &due, &locked, &next);
    check(rc == NGX_OK || rc == NGX_ERROR);
    check((rc == NGX_OK)
          == ref_pending(p, len, (int64_t) now, &rdue, &rlocked, &rnext));

    if (rc == NGX_OK) {
        check(due == rdue);
        check(locked == rlocked);
        check((int64_t) next == rnext);
    }
}


/*
 * At fixed times, and just before, at and after the release times of the
 * first entries (scanned loosely: a valid field or not).
 */

static void
check_pending(u_char *p, size_t len)
{
    u_char    *q, *last;
    size_t     n, digits;
    uint64_t   release;

    check_pending_at(p, len, 0);
    check_pending_at(p, len, (time_t) 1700000000);
    check_pending_at(p, len, (time_t) INT64_MAX);

    q = p;
    last = p + len;

    for (n = 0; n < 4 && q < last; n++) {
        release = 0;

        for (digits = 0; q < last && *q >= '0' && *q <= '9'; q++, digits++) {
            if (digits < 18) {
                release = release * 10 + (*q - '0');
            }
        }

        if (release > 0) {
            check_pending_at(p, len, (time_t) release - 1);
        }

        check_pending_at(p, len, (time_t) release);
        check_pending_at(p, len, (time_t) release + 1);

        while (q < last && *q++ != ',') {
            /* void */
        }
    }
}


/* every check on one value; v is an exact-size copy (ASan sees past it) */

static void
check_value(u_char *v, size_t len)
{
    uint64_t    value, ref;
    ngx_int_t   rc;
    ngx_uint_t  negative, rnegative, refused;

    rc = ngx_http_loyalty_valid_id(v, len);
    check(rc == NGX_OK || rc == NGX_ERROR);
    check((rc == NGX_OK) == ref_valid_id(v, len));

    rc = ngx_http_loyalty_valid_order(v, len);
    check(rc == NGX_OK || rc == NGX_ERROR);
    check((rc == NGX_OK) == ref_valid_order(v, len));

    rc = ngx_http_loyalty_valid_reason(v, len);
    check(rc == NGX_OK || rc == NGX_ERROR);
    check((rc == NGX_OK) == ref_valid_reason(v, len));

    value = 0xdeadbeef;
    negative = 7;
    rc = ngx_http_loyalty_parse_signed(v, len, &value, &negative);
    check(rc == NGX_OK || rc == NGX_ERROR);
    check((rc == NGX_OK) == ref_signed(v, len, &ref, &rnegative));

    if (rc == NGX_OK) {
        check(value == ref);
        check(negative == rnegative);
        check(value < 1000000000000000000ULL);
    }

    value = 0xdeadbeef;
    rc = ngx_http_loyalty_parse_amount(v, len, &value);
    check(rc == NGX_OK || rc == NGX_ERROR);
    check((rc == NGX_OK) == ref_amount(v, len, &ref));

    if (rc == NGX_OK) {
        check(value == ref);

    } else {
        check(value == 0xdeadbeef);
    }

    /* "refunded": an amount or "all", as the API tests the decoded bytes */

    refused = (len != 3 || ngx_strncmp(v, "all", 3) != 0)
              && ngx_http_loyalty_parse_amount(v, len, &value) != NGX_OK;

    check(!refused == ((len == 3 && memcmp(v, "all", 3) == 0)
                       || ref_amount(v, len, &ref)));

    check_pending(v, len);
}


/* one argument: found where the reference finds it, decoded, checked */

static void
check_arg(u_char *q, size_t qlen, const u_char *name, size_t nlen)
{
    u_char     *out, *ref, *v;
    size_t      off, vlen, n, rn;
    ngx_int_t   rc;
    ngx_str_t   raw;
    u_char     *nm;

    /* an exact-size copy of the name too */

    nm = malloc(nlen ? nlen : 1);
    check(nm != NULL);
    memcpy(nm, name, nlen);

    raw.data = (u_char *) "unset";
    raw.len = 5;

    rc = ngx_http_loyalty_form_arg(q, qlen, nm, nlen, &raw);
    check(rc == NGX_OK || rc == NGX_DECLINED);
    check((rc == NGX_OK) == ref_form_arg(q, qlen, name, nlen, &off, &vlen));

    free(nm);

    if (rc != NGX_OK) {
        check(raw.len == 5 && memcmp(raw.data, "unset", 5) == 0);
        return;
    }

    check(raw.data == q + off);
    check(raw.len == vlen);

    /* the destination has room for raw.len bytes, no more */

    out = malloc(raw.len ? raw.len : 1);
    ref = malloc(raw.len ? raw.len : 1);
    check(out != NULL && ref != NULL);

    n = 0xdead;

    rc = ngx_http_loyalty_form_decode(out, raw.data, raw.len, &n);
    check(rc == NGX_OK || rc == NGX_ERROR);
    check((rc == NGX_OK) == ref_decode(raw.data, raw.len, ref, &rn));

    if (rc == NGX_OK) {
        check(n == rn);
        check(n <= raw.len);
        check(memcmp(out, ref, n) == 0);

        v = malloc(n ? n : 1);
        check(v != NULL);
        memcpy(v, out, n);

        check_value(v, n);

        free(v);
    }

    free(out);
    free(ref);
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    u_char         *q;
    size_t          i, qlen, nlen;
    const uint8_t  *nl, *query;

    nl = memchr(data, '\n', size);

    if (nl) {
        nlen = nl - data;
        query = nl + 1;
        qlen = size - nlen - 1;

    } else {
        nlen = 0;
        query = data;
        qlen = size;
    }

    q = malloc(qlen ? qlen : 1);
    check(q != NULL);
    memcpy(q, query, qlen);

    if (nl) {
        check_arg(q, qlen, data, nlen);
    }

    for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        check_arg(q, qlen, (const u_char *) names[i], strlen(names[i]));
    }

    /* the query itself, as one value */

    check_value(q, qlen);

    free(q);

    return 0;
}
