
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


/*
 * Amounts: ngx_http_loyalty_parse_amount() accepts exactly
 * ^[0-9]{1,12}(\.[0-9]{1,4})?$ (matched here by hand) with the value
 * scaled by 10^4, and ngx_http_loyalty_earned() equals
 * floor(amount * rate * multiplier / 10^12), computed here in decimal
 * digit arrays (no __int128), for a table of rates and multipliers and
 * for three numbers taken from the input.  ngx_http_loyalty_parse_fixed()
 * (rates and multipliers: ^[0-9]{1,6}(\.[0-9]{1,4})?$) is checked alike.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include "ngx_http_loyalty_rules.h"
#include "fuzz.h"


#define DIGITS_MAX  64


/* rate, multiplier; both scaled by 10^4 */
static uint64_t  rates[][2] = {
    { 10000, 10000 },                   /* 1 x 1 */
    { 1000, 15000 },                    /* 0.1 x 1.5 */
    { 12345, 20000 },                   /* 1.2345 x 2 */
    { 1, 1 },                           /* 0.0001 x 0.0001 */
    { 0, 10000 },
    { 10000, 0 },
    { 9999999999ULL, 10000 },           /* 999999.9999 x 1 */
    { 9999999999ULL, 9999999999ULL }    /* the largest of both */
};


/* ^[0-9]{1,intdigits}(\.[0-9]{1,4})?$ into the value times 10^4 */

static int
ref_decimal(const u_char *p, size_t len, size_t intdigits, uint64_t *value)
{
    size_t  i, n, f;
    char    digits[32];

    for (n = 0; n < len && p[n] >= '0' && p[n] <= '9'; n++) {
        /* void */
    }

    if (n < 1 || n > intdigits) {
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

    /* the digits without the dot, padded with zeros to 4 decimals */

    memcpy(digits, p, n);
    memcpy(digits + n, p + n + 1, f);
    memset(digits + n + f, '0', 4 - f);

    *value = 0;

    for (i = 0; i < n + 4; i++) {
        *value = *value * 10 + (uint64_t) (digits[i] - '0');
    }

    return 1;
}


/* little-endian decimal digits */

typedef struct {
    size_t   n;
    uint8_t  d[DIGITS_MAX];
} bigdec_t;


static void
bigdec_set(bigdec_t *a, uint64_t v)
{
    a->n = 0;

    while (v) {
        a->d[a->n++] = v % 10;
        v /= 10;
    }
}


static void
bigdec_mul(bigdec_t *r, bigdec_t *a, bigdec_t *b)
{
    size_t    i, j;
    unsigned  acc[DIGITS_MAX];

    check(a->n + b->n <= DIGITS_MAX);

    memset(acc, 0, sizeof(acc));

    for (i = 0; i < a->n; i++) {
        for (j = 0; j < b->n; j++) {
            acc[i + j] += a->d[i] * b->d[j];
        }
    }

    r->n = 0;

    for (i = 0; i < a->n + b->n; i++) {
        if (i + 1 < DIGITS_MAX) {
            acc[i + 1] += acc[i] / 10;
        } else {
            check(acc[i] < 10);
        }

        r->d[i] = acc[i] % 10;
    }

    r->n = a->n + b->n;

    while (r->n && r->d[r->n - 1] == 0) {
        r->n--;
    }
}


/* floor(amount * rate * multiplier / 10^12) when at most EARN_MAX */

static int
ref_earned(uint64_t amount, uint64_t rate, uint64_t multiplier,
    uint64_t *earned)
{
    size_t    i;
    bigdec_t  a, b, c, ab, abc;

    bigdec_set(&a, amount);
    bigdec_set(&b, rate);
    bigdec_set(&c, multiplier);

    bigdec_mul(&ab, &a, &b);
    bigdec_mul(&abc, &ab, &c);

    /* EARN_MAX is 10^15: 16 digits after dropping 12 means too many */

    if (abc.n <= 12) {
        *earned = 0;
        return 1;
    }

    if (abc.n - 12 > 16) {
        return 0;
    }

    *earned = 0;

    for (i = abc.n; i > 12; i--) {
        *earned = *earned * 10 + abc.d[i - 1];
    }

    return *earned <= 1000000000000000ULL;
}


static void
check_earned(uint64_t amount, uint64_t rate, uint64_t multiplier)
{
    int        ok;
    uint64_t   earned, ref;
    ngx_int_t  rc;

    earned = 0xdeadbeef;
    ref = 0;

    rc = ngx_http_loyalty_earned(amount, rate, multiplier, &earned);
    ok = ref_earned(amount, rate, multiplier, &ref);

    check(rc == NGX_OK || rc == NGX_ERROR);
    check((rc == NGX_OK) == ok);

    if (ok) {
        check(earned == ref);
        check(earned <= NGX_HTTP_LOYALTY_EARN_MAX);

    } else {
        check(earned == 0xdeadbeef);
    }
}


static uint64_t
get64(const uint8_t *p)
{
    uint64_t  v;

    memcpy(&v, p, sizeof(v));

    return v;
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    u_char     *v;
    size_t      i;
    uint64_t    value, ref;
    ngx_int_t   rc;

    v = malloc(size ? size : 1);
    check(v != NULL);
    memcpy(v, data, size);

    /* amount */

    value = 0xdeadbeef;
    rc = ngx_http_loyalty_parse_amount(v, size, &value);
    check(rc == NGX_OK || rc == NGX_ERROR);
    check((rc == NGX_OK) == ref_decimal(data, size, 12, &ref));

    if (rc == NGX_OK) {
        check(value == ref);
        check(value < 10000000000000000ULL);

        for (i = 0; i < sizeof(rates) / sizeof(rates[0]); i++) {
            check_earned(value, rates[i][0], rates[i][1]);
        }

    } else {
        check(value == 0xdeadbeef);
    }

    /* rate or multiplier */

    value = 0xdeadbeef;
    rc = ngx_http_loyalty_parse_fixed(v, size, &value);
    check(rc == NGX_OK || rc == NGX_ERROR);
    check((rc == NGX_OK) == ref_decimal(data, size, 6, &ref));

    if (rc == NGX_OK) {
        check(value == ref);
        check_earned(10000, value, 10000);
        check_earned(9999999999999999ULL, value, 9999999999ULL);

    } else {
        check(value == 0xdeadbeef);
    }

    free(v);

    /* three numbers from the input, within what the parsers let through */

    if (size >= 24) {
        check_earned(get64(data) % 10000000000000000ULL,
                     get64(data + 8) % 10000000000ULL,
                     get64(data + 16) % 10000000000ULL);
    }

    return 0;
}
