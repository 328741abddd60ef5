
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


/*
 * Unit tests of the pure logic in ngx_http_loyalty_rules.c: customer ids
 * and their signatures, numbers, points earned, tiers, offers, the
 * loyalty_offer parameters, the escaping of JSON strings and Prometheus
 * labels, Redis Cluster's key slots and redirections, the "pending"
 * field of a record, and the arguments of the API (form arguments, their
 * decoding, adjustment points, order ids and reasons).  Table-driven:
 * a failing row is printed with its input, and every row runs even when
 * an earlier one failed, so one run shows all the failures of a test.
 */


#include <ngx_config.h>
#include <ngx_core.h>

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include "ngx_http_loyalty_rules.h"


#define T_NOW       ((time_t) 1700000000)
#define T_DAY       86400

#define T_NONE      -1

#define t_nelts(a)  (sizeof(a) / sizeof(a[0]))

/* HMAC-SHA256 in hex, computed with Python's hmac module */
#define T_SIG_ALICE          /* "s3cret", "alice" */                        \
    "765542af1f1d587bc60c218dca532a258f56b9c21a427cc819de2a1ff6d3e146"
#define T_SIG_ALICE_UPPER                                                   \
    "765542AF1F1D587BC60C218DCA532A258F56B9C21A427CC819DE2A1FF6D3E146"
#define T_SIG_ALICE_FLIPPED                                                 \
    "765542af1f1d587bc60c218dca532a258f56b9c21a427cc819de2a1ff6d3e147"
#define T_SIG_ALICE_63                                                      \
    "765542af1f1d587bc60c218dca532a258f56b9c21a427cc819de2a1ff6d3e14"
#define T_OLD_ALICE          /* "old-secret", "alice" */                    \
    "5cd71e4d1c738c13db1977164add8a6a37e23b771c5d2473fec57d349dae8277"
#define T_SIG_ABC            /* "s3cret", "a.b.c" */                        \
    "9104f2b6631a4a5f8245a3978ab728a64b133b8da226f21f4e7d0959679ff5e3"
#define T_SIG_BOB            /* "s3cret", "bob" */                          \
    "222da4508f426b355e5ae578455c357940ed063d77bb975142ddd0ef9eb2b645"
#define T_SIG_EMPTY          /* "s3cret", "" */                             \
    "91dfac70c5348b04e1babb8b421ac92cec08b565b49ca16130dccb72503647b7"

#define T_KEYS_NONE  0
#define T_KEYS_NEW   1      /* "s3cret" */
#define T_KEYS_OLD   2      /* "old-secret" */
#define T_KEYS_BOTH  3


typedef struct {
    ngx_str_t                   in;
    ngx_int_t                   rc;
} t_id_case_t;


typedef struct {
    ngx_str_t                   in;
    char                       *out;
} t_escape_case_t;


typedef struct {
    ngx_str_t                   in;
    ngx_int_t                   rc;
    uint64_t                    value;
} t_number_case_t;


typedef struct {
    char                       *amount;
    char                       *rate;
    char                       *multiplier;
    ngx_int_t                   rc;
    uint64_t                    earned;
} t_earn_case_t;


typedef struct {
    ngx_str_t                   value;
    ngx_uint_t                  keys;
    ngx_int_t                   rc;
    ngx_str_t                   id;
} t_verify_case_t;


typedef struct {
    uint64_t                    lifetime;
    char                       *tier;
} t_tier_case_t;


typedef struct {
    char                       *what;
    ngx_http_loyalty_offer_t    offer;
    ngx_http_loyalty_record_t   rec;
    char                       *tier;
    ngx_uint_t                  match;
} t_cond_case_t;


typedef struct {
    char                       *what;
    ngx_http_loyalty_record_t   rec;
    char                       *tier;
    char                       *offer;
} t_first_case_t;


typedef struct {
    char                       *params[8];
    ngx_int_t                   bad;        /* index of the rejected one */
    char                       *err;
    unsigned                    inactive:1; /* set by the caller, as "if=" */
    char                       *check;
} t_param_case_t;


typedef struct {
    ngx_uint_t                  calls;
} t_cond_data_t;


static char *t_escape(u_char *p, size_t len);
static ngx_uint_t t_id_char(u_char c);
static ngx_uint_t t_run_numbers(char *name, t_number_case_t *cases,
    ngx_uint_t n, ngx_int_t (*parse)(u_char *p, size_t len, uint64_t *value));
static char *t_tier_name(ngx_http_loyalty_tier_t *tier);
static ngx_http_loyalty_tier_t *t_tier(ngx_http_loyalty_tier_t *tier,
    char *name);
static char *t_offer_name(ngx_http_loyalty_offer_t *offer);
static ngx_int_t t_cond(void *data, void *cond);
static char *t_offer_parse(ngx_http_loyalty_offer_t *offer, char **params,
    ngx_int_t *at);


static char  t_yes[] = "yes";
static char  t_no[] = "no";
static char  t_error[] = "error";


/* ngx_http_loyalty_valid_id() */

static t_id_case_t  t_id_cases[] = {
    { ngx_string("a"), NGX_OK },
    { ngx_string("alice"), NGX_OK },
    { ngx_string("0"), NGX_OK },
    { ngx_string("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), NGX_OK },
    { ngx_string("abcdefghijklmnopqrstuvwxyz"), NGX_OK },
    { ngx_string("0123456789"), NGX_OK },
    { ngx_string("._-@:+"), NGX_OK },
    { ngx_string("alice@example.com"), NGX_OK },
    { ngx_string("shop:eu+42_a-b.c"), NGX_OK },
    { ngx_string(""), NGX_ERROR },
    { ngx_string(" alice"), NGX_ERROR },
    { ngx_string("alice "), NGX_ERROR },
    { ngx_string("al ice"), NGX_ERROR },
    { ngx_string("alice\n"), NGX_ERROR },
    { ngx_string("alice\r\n"), NGX_ERROR },
    { ngx_string("ali\0ce"), NGX_ERROR },
    { ngx_string("{alice}"), NGX_ERROR },
    { ngx_string("alice}:x"), NGX_ERROR },
    { ngx_string("a/b"), NGX_ERROR },
    { ngx_string("a%20b"), NGX_ERROR },
    { ngx_string("a*"), NGX_ERROR },
    { ngx_string("a,b"), NGX_ERROR },
    { ngx_string("\"a\""), NGX_ERROR },
    { ngx_string("caf\xc3\xa9"), NGX_ERROR },
    { ngx_string("\xff"), NGX_ERROR },
    { ngx_string("\x80"), NGX_ERROR },
};


static void
test_valid_id_table(void **state)
{
    ngx_int_t     rc;
    ngx_uint_t    i, failed;
    t_id_case_t  *t;

    failed = 0;

    for (i = 0; i < t_nelts(t_id_cases); i++) {
        t = &t_id_cases[i];

        rc = ngx_http_loyalty_valid_id(t->in.data, t->in.len);

        if (rc != t->rc) {
            print_error("valid_id(\"%s\") = %ld, expected %ld\n",
                        t_escape(t->in.data, t->in.len),
                        (long) rc, (long) t->rc);
            failed++;
        }
    }

    assert_int_equal(failed, 0);
}


static void
test_valid_id_length(void **state)
{
    u_char      buf[NGX_HTTP_LOYALTY_ID_MAX + 8];
    size_t      len;
    ngx_int_t   rc, expect;
    ngx_uint_t  failed;

    ngx_memset(buf, 'x', sizeof(buf));

    failed = 0;

    for (len = 0; len <= NGX_HTTP_LOYALTY_ID_MAX + 2; len++) {
        rc = ngx_http_loyalty_valid_id(buf, len);
        expect = (len >= 1 && len <= 128) ? NGX_OK : NGX_ERROR;

        if (rc != expect) {
            print_error("valid_id(%zu x \"x\") = %ld, expected %ld\n",
                        len, (long) rc, (long) expect);
            failed++;
        }
    }

    assert_int_equal(NGX_HTTP_LOYALTY_ID_MAX, 128);
    assert_int_equal(failed, 0);
}


/* every byte value, alone, inside an id, and last in a 128-byte id */

static void
test_valid_id_bytes(void **state)
{
    u_char      one[1], mid[5], full[NGX_HTTP_LOYALTY_ID_MAX];
    ngx_int_t   expect;
    ngx_uint_t  c, failed, allowed;

    failed = 0;
    allowed = 0;

    for (c = 0; c < 256; c++) {
        expect = t_id_char((u_char) c) ? NGX_OK : NGX_ERROR;

        if (expect == NGX_OK) {
            allowed++;
        }

        one[0] = (u_char) c;

        ngx_memcpy(mid, "ab?cd", 5);
        mid[2] = (u_char) c;

        ngx_memset(full, 'z', sizeof(full));
        full[sizeof(full) - 1] = (u_char) c;

        if (ngx_http_loyalty_valid_id(one, 1) != expect
            || ngx_http_loyalty_valid_id(mid, 5) != expect
            || ngx_http_loyalty_valid_id(full, sizeof(full)) != expect)
        {
            print_error("byte 0x%02x ('%s'): expected %s\n", (unsigned) c,
                        t_escape(one, 1),
                        expect == NGX_OK ? "valid" : "invalid");
            failed++;
        }
    }

    /* 26 + 26 + 10 letters and digits, and . _ - @ : + */
    assert_int_equal(allowed, 68);
    assert_int_equal(failed, 0);
}


/* ngx_http_loyalty_parse_uint() */

static t_number_case_t  t_uint_cases[] = {
    { ngx_string("0"), NGX_OK, 0 },
    { ngx_string("7"), NGX_OK, 7 },
    { ngx_string("42"), NGX_OK, 42 },
    { ngx_string("007"), NGX_OK, 7 },
    { ngx_string("1250"), NGX_OK, 1250 },
    { ngx_string("4294967296"), NGX_OK, 4294967296ULL },
    { ngx_string("999999999999999999"), NGX_OK, 999999999999999999ULL },
    { ngx_string("1000000000000000000"), NGX_OK, 1000000000000000000ULL },
    { ngx_string("0000000000000000001"), NGX_OK, 1 },
    { ngx_string("9223372036854775807"), NGX_OK, INT64_MAX },
    { ngx_string("9223372036854775808"), NGX_ERROR, 0 },
    { ngx_string("9999999999999999999"), NGX_ERROR, 0 },
    { ngx_string("10000000000000000000"), NGX_ERROR, 0 },
    { ngx_string("18446744073709551615"), NGX_ERROR, 0 },
    { ngx_string("18446744073709551616"), NGX_ERROR, 0 },
    { ngx_string("00000000000000000001"), NGX_ERROR, 0 },
    { ngx_string(""), NGX_ERROR, 0 },
    { ngx_string("-1"), NGX_ERROR, 0 },
    { ngx_string("-0"), NGX_ERROR, 0 },
    { ngx_string("+1"), NGX_ERROR, 0 },
    { ngx_string(" 1"), NGX_ERROR, 0 },
    { ngx_string("1 "), NGX_ERROR, 0 },
    { ngx_string("1\n"), NGX_ERROR, 0 },
    { ngx_string("1\0"), NGX_ERROR, 0 },
    { ngx_string("1a"), NGX_ERROR, 0 },
    { ngx_string("0x10"), NGX_ERROR, 0 },
    { ngx_string("1.0"), NGX_ERROR, 0 },
    { ngx_string("1e3"), NGX_ERROR, 0 },
    { ngx_string("1,000"), NGX_ERROR, 0 },
    { ngx_string("1_000"), NGX_ERROR, 0 },
    { ngx_string("\xd9\xa1"), NGX_ERROR, 0 },
};


static void
test_parse_uint(void **state)
{
    assert_int_equal(t_run_numbers("parse_uint", t_uint_cases,
                                   t_nelts(t_uint_cases),
                                   ngx_http_loyalty_parse_uint),
                     0);
}


/* ngx_http_loyalty_parse_fixed() */

static t_number_case_t  t_fixed_cases[] = {
    { ngx_string("1"), NGX_OK, 10000 },
    { ngx_string("0.1"), NGX_OK, 1000 },
    { ngx_string("2.5"), NGX_OK, 25000 },
    { ngx_string("1.0005"), NGX_OK, 10005 },
    { ngx_string("0"), NGX_OK, 0 },
    { ngx_string("0.0"), NGX_OK, 0 },
    { ngx_string("0.0001"), NGX_OK, 1 },
    { ngx_string("1.5"), NGX_OK, 15000 },
    { ngx_string("1.50"), NGX_OK, 15000 },
    { ngx_string("1.5000"), NGX_OK, 15000 },
    { ngx_string("2"), NGX_OK, 20000 },
    { ngx_string("01"), NGX_OK, 10000 },
    { ngx_string("0.10"), NGX_OK, 1000 },
    { ngx_string("12.34"), NGX_OK, 123400 },
    { ngx_string("59.90"), NGX_OK, 599000 },
    { ngx_string("123456"), NGX_OK, 1234560000ULL },
    { ngx_string("999999.9999"), NGX_OK, 9999999999ULL },
    { ngx_string(""), NGX_ERROR, 0 },
    { ngx_string("."), NGX_ERROR, 0 },
    { ngx_string("1."), NGX_ERROR, 0 },
    { ngx_string(".5"), NGX_ERROR, 0 },
    { ngx_string("1.23456"), NGX_ERROR, 0 },
    { ngx_string("0.00001"), NGX_ERROR, 0 },
    { ngx_string("-1"), NGX_ERROR, 0 },
    { ngx_string("+1"), NGX_ERROR, 0 },
    { ngx_string("1e3"), NGX_ERROR, 0 },
    { ngx_string(" 1"), NGX_ERROR, 0 },
    { ngx_string("1 "), NGX_ERROR, 0 },
    { ngx_string("1\0"), NGX_ERROR, 0 },
    { ngx_string("1,5"), NGX_ERROR, 0 },
    { ngx_string("1..5"), NGX_ERROR, 0 },
    { ngx_string("1.2.3"), NGX_ERROR, 0 },
    { ngx_string("1.5x"), NGX_ERROR, 0 },
    { ngx_string("0x1"), NGX_ERROR, 0 },
    { ngx_string("1234567"), NGX_ERROR, 0 },
    { ngx_string("1234567.5"), NGX_ERROR, 0 },
    { ngx_string("1234567890"), NGX_ERROR, 0 },
};


static void
test_parse_fixed(void **state)
{
    assert_int_equal(NGX_HTTP_LOYALTY_FRAC_ONE, 10000);
    assert_int_equal(t_run_numbers("parse_fixed", t_fixed_cases,
                                   t_nelts(t_fixed_cases),
                                   ngx_http_loyalty_parse_fixed),
                     0);
}


/* ngx_http_loyalty_parse_amount(): ^[0-9]{1,12}(\.[0-9]{1,4})?$ */

static t_number_case_t  t_amount_cases[] = {
    { ngx_string("59.90"), NGX_OK, 599000 },
    { ngx_string("19.99"), NGX_OK, 199900 },
    { ngx_string("0"), NGX_OK, 0 },
    { ngx_string("0.0001"), NGX_OK, 1 },
    { ngx_string("1"), NGX_OK, 10000 },
    { ngx_string("100"), NGX_OK, 1000000 },
    { ngx_string("000000000001"), NGX_OK, 10000 },
    { ngx_string("999999999999.9999"), NGX_OK, 9999999999999999ULL },
    { ngx_string(""), NGX_ERROR, 0 },
    { ngx_string("."), NGX_ERROR, 0 },
    { ngx_string("1."), NGX_ERROR, 0 },
    { ngx_string(".5"), NGX_ERROR, 0 },
    { ngx_string("1.23456"), NGX_ERROR, 0 },
    { ngx_string("-1"), NGX_ERROR, 0 },
    { ngx_string("-0.5"), NGX_ERROR, 0 },
    { ngx_string("+1"), NGX_ERROR, 0 },
    { ngx_string("1e3"), NGX_ERROR, 0 },
    { ngx_string(" 1"), NGX_ERROR, 0 },
    { ngx_string("1 "), NGX_ERROR, 0 },
    { ngx_string("1,5"), NGX_ERROR, 0 },
    { ngx_string("59.90 EUR"), NGX_ERROR, 0 },
    { ngx_string("0x10"), NGX_ERROR, 0 },
    { ngx_string("NaN"), NGX_ERROR, 0 },
    { ngx_string("inf"), NGX_ERROR, 0 },
    { ngx_string("1234567890123"), NGX_ERROR, 0 },
    { ngx_string("1234567890123.5"), NGX_ERROR, 0 },
};


static void
test_parse_amount(void **state)
{
    assert_int_equal(t_run_numbers("parse_amount", t_amount_cases,
                                   t_nelts(t_amount_cases),
                                   ngx_http_loyalty_parse_amount),
                     0);
}


/* ngx_http_loyalty_parse_redeem(): ^[0-9]{1,18}$ */

static t_number_case_t  t_redeem_cases[] = {
    { ngx_string("0"), NGX_OK, 0 },
    { ngx_string("1"), NGX_OK, 1 },
    { ngx_string("250"), NGX_OK, 250 },
    { ngx_string("999999999999999999"), NGX_OK, 999999999999999999ULL },
    { ngx_string("000000000000000001"), NGX_OK, 1 },
    { ngx_string(""), NGX_ERROR, 0 },
    { ngx_string("1000000000000000000"), NGX_ERROR, 0 },
    { ngx_string("9223372036854775807"), NGX_ERROR, 0 },
    { ngx_string("0000000000000000001"), NGX_ERROR, 0 },
    { ngx_string("-5"), NGX_ERROR, 0 },
    { ngx_string("+5"), NGX_ERROR, 0 },
    { ngx_string("5.0"), NGX_ERROR, 0 },
    { ngx_string(" 5"), NGX_ERROR, 0 },
    { ngx_string("5 "), NGX_ERROR, 0 },
    { ngx_string("1e3"), NGX_ERROR, 0 },
};


static void
test_parse_redeem(void **state)
{
    assert_int_equal(t_run_numbers("parse_redeem", t_redeem_cases,
                                   t_nelts(t_redeem_cases),
                                   ngx_http_loyalty_parse_redeem),
                     0);
}


/*
 * ngx_http_loyalty_earned(): floor(amount * rate * multiplier), exactly;
 * several rows are where binary floating point is off by one (0.57 * 100
 * is 56.99999999999999 in a double)
 */

static t_earn_case_t  t_earn_cases[] = {
    { "59.90", "0.1", "1", NGX_OK, 5 },
    { "19.99", "1", "1", NGX_OK, 19 },
    { "59.90", "1", "1", NGX_OK, 59 },
    { "59.90", "1", "1.5", NGX_OK, 89 },
    { "59.90", "1", "2", NGX_OK, 119 },
    { "0", "1", "1", NGX_OK, 0 },
    { "0.9999", "1", "1", NGX_OK, 0 },
    { "1", "1", "1", NGX_OK, 1 },
    { "0.57", "100", "1", NGX_OK, 57 },
    { "4.35", "100", "1", NGX_OK, 435 },
    { "0.29", "1", "100", NGX_OK, 29 },
    { "1.1", "1", "3", NGX_OK, 3 },
    { "33.33", "3", "1", NGX_OK, 99 },
    { "10", "0", "1", NGX_OK, 0 },
    { "10", "1", "0", NGX_OK, 0 },
    { "0.0001", "0.0001", "0.0001", NGX_OK, 0 },
    { "9999", "0.0001", "1", NGX_OK, 0 },
    { "10000", "0.0001", "1", NGX_OK, 1 },
    { "999999999999", "1", "1", NGX_OK, 999999999999ULL },
    { "100000000000", "10000", "1", NGX_OK, 1000000000000000ULL },
    { "100000000000", "10000", "1.0001", NGX_ERROR, 0 },
    { "999999999999", "1001", "1", NGX_ERROR, 0 },
    { "999999999999.9999", "999999.9999", "999999.9999", NGX_ERROR, 0 },
};


static void
test_earned(void **state)
{
    uint64_t        amount, rate, multiplier, earned;
    ngx_int_t       rc;
    ngx_uint_t      i, failed;
    t_earn_case_t  *t;

    assert_true(NGX_HTTP_LOYALTY_EARN_MAX == 1000000000000000ULL);

    failed = 0;

    for (i = 0; i < t_nelts(t_earn_cases); i++) {
        t = &t_earn_cases[i];

        if (ngx_http_loyalty_parse_amount((u_char *) t->amount,
                                          ngx_strlen(t->amount), &amount)
            != NGX_OK
            || ngx_http_loyalty_parse_fixed((u_char *) t->rate,
                                            ngx_strlen(t->rate), &rate)
               != NGX_OK
            || ngx_http_loyalty_parse_fixed((u_char *) t->multiplier,
                                            ngx_strlen(t->multiplier),
                                            &multiplier)
               != NGX_OK)
        {
            print_error("earned(%s, %s, %s): bad row\n", t->amount,
                        t->rate, t->multiplier);
            failed++;
            continue;
        }

        earned = 0xdeadbeef;

        rc = ngx_http_loyalty_earned(amount, rate, multiplier, &earned);

        if (rc != t->rc || (rc == NGX_OK && earned != t->earned)) {
            print_error("earned(%s, %s, %s) = %ld, %llu, expected %ld, "
                        "%llu\n", t->amount, t->rate, t->multiplier,
                        (long) rc, (unsigned long long) earned,
                        (long) t->rc, (unsigned long long) t->earned);
            failed++;
        }
    }

    assert_int_equal(failed, 0);
}


/* ngx_http_loyalty_sign(): lowercase hex HMAC-SHA256 */

static void
test_sign(void **state)
{
    u_char     sig[NGX_HTTP_LOYALTY_SIG_LEN];
    ngx_str_t  secret;

    assert_int_equal(NGX_HTTP_LOYALTY_SIG_LEN, 64);

    /* RFC 4231, test case 2 */

    ngx_str_set(&secret, "Jefe");
    ngx_http_loyalty_sign(&secret, (u_char *) "what do ya want for nothing?",
                          sizeof("what do ya want for nothing?") - 1, sig);
    assert_memory_equal(sig, "5bdcc146bf60754e6a042426089575c7"
                             "5a003f089d2739839dec58b964ec3843", 64);

    ngx_str_set(&secret, "s3cret");
    ngx_http_loyalty_sign(&secret, (u_char *) "alice", 5, sig);
    assert_memory_equal(sig, T_SIG_ALICE, 64);

    ngx_str_set(&secret, "old-secret");
    ngx_http_loyalty_sign(&secret, (u_char *) "alice", 5, sig);
    assert_memory_equal(sig, T_OLD_ALICE, 64);
}


/* ngx_http_loyalty_verify(): "<id>.<sig>" under one of up to two keys */

static t_verify_case_t  t_verify_cases[] = {
    { ngx_string("alice." T_SIG_ALICE), T_KEYS_BOTH, NGX_OK,
      ngx_string("alice") },
    { ngx_string("alice." T_SIG_ALICE), T_KEYS_NEW, NGX_OK,
      ngx_string("alice") },
    { ngx_string("alice." T_OLD_ALICE), T_KEYS_BOTH, NGX_OK,
      ngx_string("alice") },
    { ngx_string("alice." T_OLD_ALICE), T_KEYS_OLD, NGX_OK,
      ngx_string("alice") },
    { ngx_string("a.b.c." T_SIG_ABC), T_KEYS_BOTH, NGX_OK,
      ngx_string("a.b.c") },

    /* another key, no key */
    { ngx_string("alice." T_SIG_ALICE), T_KEYS_OLD, NGX_ERROR,
      ngx_null_string },
    { ngx_string("alice." T_OLD_ALICE), T_KEYS_NEW, NGX_ERROR,
      ngx_null_string },
    { ngx_string("alice." T_SIG_ALICE), T_KEYS_NONE, NGX_ERROR,
      ngx_null_string },

    /* another id's signature */
    { ngx_string("bob." T_SIG_ALICE), T_KEYS_BOTH, NGX_ERROR,
      ngx_null_string },
    { ngx_string("alice." T_SIG_BOB), T_KEYS_BOTH, NGX_ERROR,
      ngx_null_string },
    { ngx_string("alice.." T_SIG_ALICE), T_KEYS_BOTH, NGX_ERROR,
      ngx_null_string },
    { ngx_string("a.b." T_SIG_ABC), T_KEYS_BOTH, NGX_ERROR,
      ngx_null_string },

    /* malformed */
    { ngx_string("alice." T_SIG_ALICE_UPPER), T_KEYS_BOTH, NGX_ERROR,
      ngx_null_string },
    { ngx_string("alice." T_SIG_ALICE_FLIPPED), T_KEYS_BOTH, NGX_ERROR,
      ngx_null_string },
    { ngx_string("alice." T_SIG_ALICE_63), T_KEYS_BOTH, NGX_ERROR,
      ngx_null_string },
    { ngx_string("alice." T_SIG_ALICE "0"), T_KEYS_BOTH, NGX_ERROR,
      ngx_null_string },
    { ngx_string("alice." T_SIG_ALICE "."), T_KEYS_BOTH, NGX_ERROR,
      ngx_null_string },
    { ngx_string("alice" T_SIG_ALICE), T_KEYS_BOTH, NGX_ERROR,
      ngx_null_string },
    { ngx_string("alice:" T_SIG_ALICE), T_KEYS_BOTH, NGX_ERROR,
      ngx_null_string },
    { ngx_string("." T_SIG_EMPTY), T_KEYS_BOTH, NGX_ERROR,
      ngx_null_string },
    { ngx_string(T_SIG_ALICE), T_KEYS_BOTH, NGX_ERROR, ngx_null_string },
    { ngx_string("alice"), T_KEYS_BOTH, NGX_ERROR, ngx_null_string },
    { ngx_string("alice."), T_KEYS_BOTH, NGX_ERROR, ngx_null_string },
    { ngx_string(""), T_KEYS_BOTH, NGX_ERROR, ngx_null_string },
};


static void
test_verify(void **state)
{
    ngx_str_t         id, secrets[2];
    ngx_int_t         rc;
    ngx_uint_t        i, n, failed;
    t_verify_case_t  *t;

    failed = 0;

    for (i = 0; i < t_nelts(t_verify_cases); i++) {
        t = &t_verify_cases[i];

        n = 0;

        if (t->keys & T_KEYS_NEW) {
            ngx_str_set(&secrets[n], "s3cret");
            n++;
        }

        if (t->keys & T_KEYS_OLD) {
            ngx_str_set(&secrets[n], "old-secret");
            n++;
        }

        ngx_str_null(&id);

        rc = ngx_http_loyalty_verify(&t->value, secrets, n, &id);

        if (rc != t->rc
            || (rc == NGX_OK
                && (id.len != t->id.len
                    || ngx_memcmp(id.data, t->id.data, id.len) != 0)))
        {
            print_error("verify(\"%s\", keys %lu) = %ld, expected %ld\n",
                        t_escape(t->value.data, t->value.len),
                        (unsigned long) t->keys, (long) rc, (long) t->rc);
            failed++;
        }
    }

    assert_int_equal(failed, 0);
}


/* ngx_http_loyalty_select_tier() */

static t_tier_case_t  t_tier_cases[] = {
    { 0, "bronze" },
    { 1, "bronze" },
    { 999, "bronze" },
    { 1000, "silver" },
    { 1001, "silver" },
    { 4999, "silver" },
    { 5000, "gold" },
    { 5400, "gold" },
    { INT64_MAX, "gold" },
    { UINT64_MAX, "gold" },
};


/* without a tier at 0: customers below the lowest threshold have none */

static t_tier_case_t  t_tier_gap_cases[] = {
    { 0, NULL },
    { 999, NULL },
    { 1000, "silver" },
    { 5000, "gold" },
};


static void
test_select_tier(void **state)
{
    ngx_uint_t                i, j, k, failed;
    ngx_http_loyalty_tier_t  *tier, tiers[3];

    static ngx_http_loyalty_tier_t  base[3] = {
        { ngx_string("bronze"), 0, 10000 },
        { ngx_string("silver"), 1000, 15000 },
        { ngx_string("gold"), 5000, 20000 },
    };

    static ngx_uint_t  orders[6][3] = {
        { 0, 1, 2 }, { 0, 2, 1 }, { 1, 0, 2 },
        { 1, 2, 0 }, { 2, 0, 1 }, { 2, 1, 0 },
    };

    failed = 0;

    /* the result does not depend on the order of the loyalty_tier lines */

    for (k = 0; k < 6; k++) {
        for (j = 0; j < 3; j++) {
            tiers[j] = base[orders[k][j]];
        }

        for (i = 0; i < t_nelts(t_tier_cases); i++) {
            tier = ngx_http_loyalty_select_tier(tiers, 3,
                                                t_tier_cases[i].lifetime);

            if (tier != NULL && (tier < tiers || tier >= tiers + 3)) {
                print_error("select_tier: pointer outside the array\n");
                failed++;
                continue;
            }

            if (ngx_strcmp(t_tier_name(tier), t_tier_cases[i].tier) != 0) {
                print_error("select_tier(%llu), order %lu%lu%lu: \"%s\", "
                            "expected \"%s\"\n",
                            (unsigned long long) t_tier_cases[i].lifetime,
                            (unsigned long) orders[k][0],
                            (unsigned long) orders[k][1],
                            (unsigned long) orders[k][2],
                            t_tier_name(tier), t_tier_cases[i].tier);
                failed++;
            }
        }

        /* the same without bronze: the two others, in both orders */

        if (orders[k][0] == 0) {
            continue;
        }

        tiers[0] = base[orders[k][0]];
        tiers[1] = base[3 - orders[k][0]];

        for (i = 0; i < t_nelts(t_tier_gap_cases); i++) {
            tier = ngx_http_loyalty_select_tier(tiers, 2,
                                                t_tier_gap_cases[i].lifetime);

            if ((t_tier_gap_cases[i].tier == NULL && tier != NULL)
                || (t_tier_gap_cases[i].tier != NULL
                    && ngx_strcmp(t_tier_name(tier),
                                  t_tier_gap_cases[i].tier) != 0))
            {
                print_error("select_tier(%llu) without bronze: \"%s\"\n",
                            (unsigned long long)
                                t_tier_gap_cases[i].lifetime,
                            t_tier_name(tier));
                failed++;
            }
        }
    }

    assert_int_equal(failed, 0);

    /* no tiers at all */

    assert_null(ngx_http_loyalty_select_tier(NULL, 0, 0));
    assert_null(ngx_http_loyalty_select_tier(NULL, 0, UINT64_MAX));

    /* a single tier */

    assert_ptr_equal(ngx_http_loyalty_select_tier(&base[1], 1, 1000),
                     &base[1]);
    assert_null(ngx_http_loyalty_select_tier(&base[1], 1, 999));
}


/* ngx_http_loyalty_find_tier(): the whole name, bytes as they are */

static void
test_find_tier(void **state)
{
    ngx_str_t  name;

    static ngx_http_loyalty_tier_t  tiers[3] = {
        { ngx_string("gold"), 0, 10000 },
        { ngx_string("gold2"), 1000, 10000 },
        { ngx_string("Silver"), 5000, 10000 },
    };

    ngx_str_set(&name, "gold");
    assert_ptr_equal(ngx_http_loyalty_find_tier(tiers, 3, &name), &tiers[0]);

    ngx_str_set(&name, "gold2");
    assert_ptr_equal(ngx_http_loyalty_find_tier(tiers, 3, &name), &tiers[1]);

    ngx_str_set(&name, "Silver");
    assert_ptr_equal(ngx_http_loyalty_find_tier(tiers, 3, &name), &tiers[2]);

    ngx_str_set(&name, "gol");
    assert_null(ngx_http_loyalty_find_tier(tiers, 3, &name));

    ngx_str_set(&name, "silver");
    assert_null(ngx_http_loyalty_find_tier(tiers, 3, &name));

    ngx_str_set(&name, "gold2");
    assert_null(ngx_http_loyalty_find_tier(tiers, 1, &name));

    ngx_str_set(&name, "gold");
    assert_null(ngx_http_loyalty_find_tier(NULL, 0, &name));
}


/* ngx_http_loyalty_select_offer(): one condition at a time */

static t_cond_case_t  t_cond_cases[] = {

    /* no condition: always */
    { "always, new", { .code = ngx_string("X") },
      { .orders = 0 }, NULL, 1 },
    { "always, gold", { .code = ngx_string("X") },
      { .points = 1250, .lifetime = 5400, .orders = 12,
        .last_order = T_NOW - 3 * T_DAY }, "gold", 1 },

    /* tier= */
    { "tier=gold, gold", { .has_tier = 1, .tier = ngx_string("gold") },
      { .orders = 1 }, "gold", 1 },
    { "tier=gold, silver", { .has_tier = 1, .tier = ngx_string("gold") },
      { .orders = 1 }, "silver", 0 },
    { "tier=gold, no tier", { .has_tier = 1, .tier = ngx_string("gold") },
      { .orders = 1 }, NULL, 0 },
    { "tier=gold, gol", { .has_tier = 1, .tier = ngx_string("gold") },
      { .orders = 1 }, "gol", 0 },
    { "tier=gold, golden", { .has_tier = 1, .tier = ngx_string("gold") },
      { .orders = 1 }, "golden", 0 },
    { "tier=gold, empty", { .has_tier = 1, .tier = ngx_string("gold") },
      { .orders = 1 }, "", 0 },

    /* min_points= and max_points=, inclusive */
    { "min_points=100, 99", { .has_min_points = 1, .min_points = 100 },
      { .points = 99 }, NULL, 0 },
    { "min_points=100, 100", { .has_min_points = 1, .min_points = 100 },
      { .points = 100 }, NULL, 1 },
    { "min_points=100, 101", { .has_min_points = 1, .min_points = 100 },
      { .points = 101 }, NULL, 1 },
    { "min_points=0, 0", { .has_min_points = 1, .min_points = 0 },
      { .points = 0 }, NULL, 1 },
    { "max_points=100, 99", { .has_max_points = 1, .max_points = 100 },
      { .points = 99 }, NULL, 1 },
    { "max_points=100, 100", { .has_max_points = 1, .max_points = 100 },
      { .points = 100 }, NULL, 1 },
    { "max_points=100, 101", { .has_max_points = 1, .max_points = 100 },
      { .points = 101 }, NULL, 0 },
    { "max_points=0, 0", { .has_max_points = 1, .max_points = 0 },
      { .points = 0 }, NULL, 1 },
    { "max_points=0, 1", { .has_max_points = 1, .max_points = 0 },
      { .points = 1 }, NULL, 0 },
    { "points 100-200, 150", { .has_min_points = 1, .min_points = 100,
                               .has_max_points = 1, .max_points = 200 },
      { .points = 150 }, NULL, 1 },
    { "points 100-200, 201", { .has_min_points = 1, .min_points = 100,
                               .has_max_points = 1, .max_points = 200 },
      { .points = 201 }, NULL, 0 },

    /* min_orders= and max_orders=, inclusive */
    { "min_orders=2, 1", { .has_min_orders = 1, .min_orders = 2 },
      { .orders = 1 }, NULL, 0 },
    { "min_orders=2, 2", { .has_min_orders = 1, .min_orders = 2 },
      { .orders = 2 }, NULL, 1 },
    { "max_orders=2, 2", { .has_max_orders = 1, .max_orders = 2 },
      { .orders = 2 }, NULL, 1 },
    { "max_orders=2, 3", { .has_max_orders = 1, .max_orders = 2 },
      { .orders = 3 }, NULL, 0 },
    { "max_orders=0, 0", { .has_max_orders = 1, .max_orders = 0 },
      { .orders = 0 }, NULL, 1 },
    { "orders 3-3, 3", { .has_min_orders = 1, .min_orders = 3,
                         .has_max_orders = 1, .max_orders = 3 },
      { .orders = 3 }, NULL, 1 },
    { "orders 3-3, 4", { .has_min_orders = 1, .min_orders = 3,
                         .has_max_orders = 1, .max_orders = 3 },
      { .orders = 4 }, NULL, 0 },

    /* inactive=90d: at least one order, the last one 90 days ago or more */
    { "inactive, no order", { .has_inactive = 1, .inactive = 90 * T_DAY },
      { .orders = 0 }, NULL, 0 },
    { "inactive, no order but a date",
      { .has_inactive = 1, .inactive = 90 * T_DAY },
      { .orders = 0, .last_order = T_NOW - 120 * T_DAY }, NULL, 0 },
    { "inactive, 3 days", { .has_inactive = 1, .inactive = 90 * T_DAY },
      { .orders = 12, .last_order = T_NOW - 3 * T_DAY }, NULL, 0 },
    { "inactive, 90 days - 1s",
      { .has_inactive = 1, .inactive = 90 * T_DAY },
      { .orders = 1, .last_order = T_NOW - 90 * T_DAY + 1 }, NULL, 0 },
    { "inactive, exactly 90 days",
      { .has_inactive = 1, .inactive = 90 * T_DAY },
      { .orders = 1, .last_order = T_NOW - 90 * T_DAY }, NULL, 1 },
    { "inactive, 120 days", { .has_inactive = 1, .inactive = 90 * T_DAY },
      { .orders = 3, .last_order = T_NOW - 120 * T_DAY }, NULL, 1 },
    { "inactive, epoch", { .has_inactive = 1, .inactive = 90 * T_DAY },
      { .orders = 1, .last_order = 0 }, NULL, 1 },
    { "inactive, order in the future",
      { .has_inactive = 1, .inactive = 90 * T_DAY },
      { .orders = 1, .last_order = T_NOW + 60 }, NULL, 0 },
    { "inactive=0, one order now", { .has_inactive = 1, .inactive = 0 },
      { .orders = 1, .last_order = T_NOW }, NULL, 1 },

    /* new: no order yet */
    { "new, 0 orders", { .new_only = 1 },
      { .orders = 0 }, NULL, 1 },
    { "new, 0 orders, bonus points", { .new_only = 1 },
      { .points = 500, .orders = 0 }, "bronze", 1 },
    { "new, 1 order", { .new_only = 1 },
      { .orders = 1, .last_order = T_NOW - T_DAY }, NULL, 0 },

    /* if=: the caller's callback decides */
    { "if= true", { .cond = t_yes }, { .orders = 1 }, NULL, 1 },
    { "if= false", { .cond = t_no }, { .orders = 1 }, NULL, 0 },
    { "if= error", { .cond = t_error }, { .orders = 1 }, NULL, 0 },

    /* conditions AND */
    { "gold + min_points, both", { .has_tier = 1, .tier = ngx_string("gold"),
                                   .has_min_points = 1, .min_points = 1000 },
      { .points = 1000, .orders = 1 }, "gold", 1 },
    { "gold + min_points, points", { .has_tier = 1,
                                     .tier = ngx_string("gold"),
                                     .has_min_points = 1,
                                     .min_points = 1000 },
      { .points = 999, .orders = 1 }, "gold", 0 },
    { "gold + min_points, tier", { .has_tier = 1, .tier = ngx_string("gold"),
                                   .has_min_points = 1, .min_points = 1000 },
      { .points = 5000, .orders = 1 }, "silver", 0 },
    { "new + if, both", { .new_only = 1, .cond = t_yes },
      { .orders = 0 }, NULL, 1 },
    { "new + if, if", { .new_only = 1, .cond = t_no },
      { .orders = 0 }, NULL, 0 },
    { "new + if, new", { .new_only = 1, .cond = t_yes },
      { .orders = 2 }, NULL, 0 },
    { "inactive + gold", { .has_inactive = 1, .inactive = 90 * T_DAY,
                           .has_tier = 1, .tier = ngx_string("gold") },
      { .orders = 5, .last_order = T_NOW - 100 * T_DAY }, "gold", 1 },
    { "inactive + gold, silver", { .has_inactive = 1,
                                   .inactive = 90 * T_DAY,
                                   .has_tier = 1,
                                   .tier = ngx_string("gold") },
      { .orders = 5, .last_order = T_NOW - 100 * T_DAY }, "silver", 0 },
};


static void
test_select_offer_conditions(void **state)
{
    ngx_uint_t                 i, failed;
    t_cond_case_t             *t;
    t_cond_data_t              data;
    ngx_http_loyalty_tier_t    tier;
    ngx_http_loyalty_offer_t  *offer;

    failed = 0;

    for (i = 0; i < t_nelts(t_cond_cases); i++) {
        t = &t_cond_cases[i];

        ngx_str_set(&t->offer.name, "o");
        data.calls = 0;

        offer = ngx_http_loyalty_select_offer(&t->offer, 1, &t->rec,
                                              t_tier(&tier, t->tier),
                                              T_NOW, t_cond, &data);

        if ((offer != NULL) != (t->match != 0)
            || (offer != NULL && offer != &t->offer))
        {
            print_error("select_offer \"%s\": %s, expected %s\n", t->what,
                        offer ? "match" : "no match",
                        t->match ? "match" : "no match");
            failed++;
        }

        if (t->offer.cond == NULL && data.calls != 0) {
            print_error("select_offer \"%s\": callback called without "
                        "if=\n", t->what);
            failed++;
        }
    }

    assert_int_equal(failed, 0);
}


/* ngx_http_loyalty_select_offer(): the first matching offer wins */

static ngx_http_loyalty_offer_t  t_demo_offers[] = {
    { .name = ngx_string("welcome"), .code = ngx_string("WELCOME10"),
      .new_only = 1 },
    { .name = ngx_string("winback"), .code = ngx_string("COMEBACK20"),
      .has_inactive = 1, .inactive = 90 * T_DAY },
    { .name = ngx_string("gold_perk"), .code = ngx_string("FREESHIP"),
      .has_tier = 1, .tier = ngx_string("gold") },
    { .name = ngx_string("holdout"), .cond = t_yes },
    { .name = ngx_string("fallback") },
};


static t_first_case_t  t_first_cases[] = {
    { "unknown customer", { 0 }, "bronze", "welcome" },
    { "new with points", { .points = 100, .lifetime = 100 }, "bronze",
      "welcome" },
    { "gold, active", { .points = 1250, .lifetime = 5400, .orders = 12,
                        .last_order = T_NOW - 3 * T_DAY }, "gold",
      "gold_perk" },
    { "lapsed", { .points = 80, .lifetime = 300, .orders = 2,
                  .last_order = T_NOW - 120 * T_DAY }, "bronze", "winback" },
    { "gold, lapsed", { .points = 1250, .lifetime = 5400, .orders = 12,
                        .last_order = T_NOW - 120 * T_DAY }, "gold",
      "winback" },
    { "silver, active", { .points = 300, .lifetime = 1500, .orders = 4,
                          .last_order = T_NOW - T_DAY }, "silver",
      "holdout" },
};


static void
test_select_offer_first(void **state)
{
    ngx_uint_t                 i, failed;
    t_cond_data_t              data;
    t_first_case_t            *t;
    ngx_http_loyalty_tier_t    tier;
    ngx_http_loyalty_offer_t  *offer, offers[2];

    failed = 0;
    data.calls = 0;

    for (i = 0; i < t_nelts(t_first_cases); i++) {
        t = &t_first_cases[i];

        offer = ngx_http_loyalty_select_offer(t_demo_offers,
                                              t_nelts(t_demo_offers),
                                              &t->rec,
                                              t_tier(&tier, t->tier),
                                              T_NOW, t_cond, &data);

        if (ngx_strcmp(t_offer_name(offer), t->offer) != 0) {
            print_error("select_offer \"%s\": \"%s\", expected \"%s\"\n",
                        t->what, t_offer_name(offer), t->offer);
            failed++;
        }
    }

    assert_int_equal(failed, 0);

    /* the if= offer declined: the next one */

    t_demo_offers[3].cond = t_no;

    offer = ngx_http_loyalty_select_offer(t_demo_offers,
                                          t_nelts(t_demo_offers),
                                          &t_first_cases[5].rec,
                                          t_tier(&tier, "silver"),
                                          T_NOW, t_cond, &data);
    assert_string_equal(t_offer_name(offer), "fallback");

    t_demo_offers[3].cond = t_yes;

    /* without the fallback nothing matches */

    offer = ngx_http_loyalty_select_offer(t_demo_offers, 3,
                                          &t_first_cases[5].rec,
                                          t_tier(&tier, "silver"),
                                          T_NOW, t_cond, &data);
    assert_null(offer);

    /* no offers */

    assert_null(ngx_http_loyalty_select_offer(NULL, 0, &t_first_cases[0].rec,
                                              NULL, T_NOW, t_cond, &data));

    /* two offers that both match: the first, by address */

    ngx_memzero(offers, sizeof(offers));
    ngx_str_set(&offers[0].name, "a");
    ngx_str_set(&offers[1].name, "a");

    offer = ngx_http_loyalty_select_offer(offers, 2, &t_first_cases[0].rec,
                                          NULL, T_NOW, t_cond, &data);
    assert_ptr_equal(offer, &offers[0]);
}


/* the callback gets the caller's data and the offer's condition */

static void
test_select_offer_callback(void **state)
{
    t_cond_data_t              data;
    ngx_http_loyalty_record_t  rec;
    ngx_http_loyalty_offer_t  *offer, offers[3];

    ngx_memzero(offers, sizeof(offers));
    ngx_memzero(&rec, sizeof(rec));

    ngx_str_set(&offers[0].name, "first");
    offers[0].cond = t_no;
    ngx_str_set(&offers[1].name, "second");
    offers[1].cond = t_yes;
    ngx_str_set(&offers[2].name, "third");
    offers[2].cond = t_yes;

    data.calls = 0;

    offer = ngx_http_loyalty_select_offer(offers, 3, &rec, NULL, T_NOW,
                                          t_cond, &data);

    assert_ptr_equal(offer, &offers[1]);

    /* called for the first two only: evaluation stops at the match */
    assert_int_equal(data.calls, 2);
}


/* ngx_http_loyalty_offer_param(), ngx_http_loyalty_offer_check() */

static t_param_case_t  t_param_cases[] = {

    /* valid */
    { { NULL }, T_NONE, NULL, 0, NULL },
    { { "code=WELCOME10", "new" }, T_NONE, NULL, 0, NULL },
    { { "code=FREESHIP", "tier=gold" }, T_NONE, NULL, 0, NULL },
    { { "tier=silver", "min_points=100", "max_points=200",
        "min_orders=1", "max_orders=5" }, T_NONE, NULL, 0, NULL },
    { { "min_points=0", "max_points=0" }, T_NONE, NULL, 0, NULL },
    { { "min_points=7", "max_points=7", "min_orders=3", "max_orders=3" },
      T_NONE, NULL, 0, NULL },
    { { "min_points=9223372036854775807" }, T_NONE, NULL, 0, NULL },
    { { "code=A", "new", "min_orders=0", "max_orders=0" },
      T_NONE, NULL, 0, NULL },
    { { "code=COMEBACK20" }, T_NONE, NULL, 1, NULL },
    { { "code=x:y=z" }, T_NONE, NULL, 0, NULL },

    /* unknown */
    { { "colour=red" }, 0, "is unknown", 0, NULL },
    { { "code=A", "bogus" }, 1, "is unknown", 0, NULL },
    { { "" }, 0, "is unknown", 0, NULL },
    { { "code" }, 0, "is unknown", 0, NULL },
    { { "tier" }, 0, "is unknown", 0, NULL },
    { { "min_points" }, 0, "is unknown", 0, NULL },
    { { "Code=A" }, 0, "is unknown", 0, NULL },
    { { "NEW" }, 0, "is unknown", 0, NULL },
    { { "news" }, 0, "is unknown", 0, NULL },
    { { "ne" }, 0, "is unknown", 0, NULL },
    { { "new=1" }, 0, "is unknown", 0, NULL },
    { { "=new" }, 0, "is unknown", 0, NULL },
    { { " code=A" }, 0, "is unknown", 0, NULL },
    { { "min_point=1" }, 0, "is unknown", 0, NULL },
    { { "min_points:1" }, 0, "is unknown", 0, NULL },

    /* duplicates */
    { { "new", "new" }, 1, "is duplicate", 0, NULL },
    { { "code=A", "code=B" }, 1, "is duplicate", 0, NULL },
    { { "code=A", "code=A" }, 1, "is duplicate", 0, NULL },
    { { "tier=gold", "tier=silver" }, 1, "is duplicate", 0, NULL },
    { { "min_points=1", "min_points=2" }, 1, "is duplicate", 0, NULL },
    { { "max_points=1", "code=A", "max_points=1" }, 2, "is duplicate", 0,
      NULL },
    { { "min_orders=1", "min_orders=1" }, 1, "is duplicate", 0, NULL },
    { { "max_orders=1", "max_orders=9" }, 1, "is duplicate", 0, NULL },

    /* empty values */
    { { "code=" }, 0, "has an empty value", 0, NULL },
    { { "code=A\r\nX-Evil: 1" }, 0, "contains a control character", 0,
      NULL },
    { { "new", "code=TAB\t" }, 1, "contains a control character", 0, NULL },
    { { "code=DEL\x7f" }, 0, "contains a control character", 0, NULL },
    { { "tier=" }, 0, "has an empty value", 0, NULL },

    /* bounds that are not non-negative integers */
    { { "min_points=" }, 0, "is not a non-negative integer", 0, NULL },
    { { "min_points=abc" }, 0, "is not a non-negative integer", 0, NULL },
    { { "max_points=-1" }, 0, "is not a non-negative integer", 0, NULL },
    { { "min_orders=1.5" }, 0, "is not a non-negative integer", 0, NULL },
    { { "max_orders=+3" }, 0, "is not a non-negative integer", 0, NULL },
    { { "min_points= 1" }, 0, "is not a non-negative integer", 0, NULL },
    { { "min_points=1k" }, 0, "is not a non-negative integer", 0, NULL },
    { { "max_points=9223372036854775808" }, 0,
      "is not a non-negative integer", 0, NULL },

    /* contradictions, found once the whole line is read */
    { { "min_points=200", "max_points=100" }, T_NONE, NULL, 0,
      "min_points is greater than max_points" },
    { { "max_points=0", "min_points=1" }, T_NONE, NULL, 0,
      "min_points is greater than max_points" },
    { { "min_orders=3", "max_orders=2" }, T_NONE, NULL, 0,
      "min_orders is greater than max_orders" },
    { { "new", "min_orders=1" }, T_NONE, NULL, 0,
      "\"new\" cannot be combined with min_orders or inactive" },
    { { "min_orders=5", "code=A", "new" }, T_NONE, NULL, 0,
      "\"new\" cannot be combined with min_orders or inactive" },
    { { "new" }, T_NONE, NULL, 1,
      "\"new\" cannot be combined with min_orders or inactive" },
};


static void
test_offer_param(void **state)
{
    char                      *err;
    ngx_int_t                  at;
    ngx_uint_t                 i, failed;
    t_param_case_t            *t;
    ngx_http_loyalty_offer_t   offer;

    failed = 0;

    for (i = 0; i < t_nelts(t_param_cases); i++) {
        t = &t_param_cases[i];

        ngx_memzero(&offer, sizeof(offer));
        ngx_str_set(&offer.name, "o");

        if (t->inactive) {
            offer.has_inactive = 1;
            offer.inactive = 90 * T_DAY;
        }

        err = t_offer_parse(&offer, t->params, &at);

        if (at != t->bad
            || (err == NULL) != (t->err == NULL)
            || (err && ngx_strcmp(err, t->err) != 0))
        {
            print_error("row %lu, \"%s\"...: param %ld \"%s\", expected "
                        "param %ld \"%s\"\n", (unsigned long) i,
                        t->params[0] ? t->params[0] : "",
                        (long) at, err ? err : "(accepted)",
                        (long) t->bad, t->err ? t->err : "(accepted)");
            failed++;
            continue;
        }

        if (err) {
            continue;
        }

        err = ngx_http_loyalty_offer_check(&offer);

        if ((err == NULL) != (t->check == NULL)
            || (err && ngx_strcmp(err, t->check) != 0))
        {
            print_error("row %lu, \"%s\"...: check \"%s\", expected "
                        "\"%s\"\n", (unsigned long) i,
                        t->params[0] ? t->params[0] : "",
                        err ? err : "(accepted)",
                        t->check ? t->check : "(accepted)");
            failed++;
        }
    }

    assert_int_equal(failed, 0);
}


/* what the accepted parameters store */

static void
test_offer_param_values(void **state)
{
    ngx_int_t                 at;
    ngx_http_loyalty_offer_t  offer;

    static char  *all[] = {
        "code=WELCOME10", "tier=gold", "min_points=100", "max_points=200",
        "min_orders=1", "max_orders=9223372036854775807", NULL
    };

    static char  *none[] = { NULL };
    static char  *fresh[] = { "new", "code=NEW", NULL };

    ngx_memzero(&offer, sizeof(offer));

    assert_null(t_offer_parse(&offer, all, &at));
    assert_null(ngx_http_loyalty_offer_check(&offer));

    assert_int_equal(offer.code.len, sizeof("WELCOME10") - 1);
    assert_memory_equal(offer.code.data, "WELCOME10", offer.code.len);
    assert_true(offer.has_tier);
    assert_int_equal(offer.tier.len, sizeof("gold") - 1);
    assert_memory_equal(offer.tier.data, "gold", offer.tier.len);
    assert_true(offer.has_min_points);
    assert_int_equal(offer.min_points, 100);
    assert_true(offer.has_max_points);
    assert_int_equal(offer.max_points, 200);
    assert_true(offer.has_min_orders);
    assert_int_equal(offer.min_orders, 1);
    assert_true(offer.has_max_orders);
    assert_true(offer.max_orders == (uint64_t) INT64_MAX);
    assert_false(offer.new_only);
    assert_false(offer.has_inactive);
    assert_null(offer.cond);

    ngx_memzero(&offer, sizeof(offer));

    assert_null(t_offer_parse(&offer, none, &at));
    assert_null(ngx_http_loyalty_offer_check(&offer));

    assert_int_equal(offer.code.len, 0);
    assert_false(offer.has_tier || offer.has_min_points
                 || offer.has_max_points || offer.has_min_orders
                 || offer.has_max_orders || offer.has_inactive
                 || offer.new_only);

    ngx_memzero(&offer, sizeof(offer));

    assert_null(t_offer_parse(&offer, fresh, &at));
    assert_null(ngx_http_loyalty_offer_check(&offer));

    assert_true(offer.new_only);
    assert_int_equal(offer.code.len, sizeof("NEW") - 1);
    assert_false(offer.has_min_orders || offer.has_max_orders);
}


/* helpers */

static char *
t_escape(u_char *p, size_t len)
{
    u_char         *d, *last;
    static u_char   buf[1024];

    d = buf;

    for (last = p + len; p < last && d < buf + sizeof(buf) - 5; p++) {
        if (*p >= 0x20 && *p < 0x7f && *p != '"' && *p != '\\') {
            *d++ = *p;

        } else {
            d += snprintf((char *) d, 5, "\\x%02x", (unsigned) *p);
        }
    }

    *d = '\0';

    return (char *) buf;
}


/* the id alphabet, spelled out independently of the module's bitmap */

static ngx_uint_t
t_id_char(u_char c)
{
    return (c >= 'A' && c <= 'Z')
           || (c >= 'a' && c <= 'z')
           || (c >= '0' && c <= '9')
           || c == '.' || c == '_' || c == '-'
           || c == '@' || c == ':' || c == '+';
}


static ngx_uint_t
t_run_numbers(char *name, t_number_case_t *cases, ngx_uint_t n,
    ngx_int_t (*parse)(u_char *p, size_t len, uint64_t *value))
{
    uint64_t          value;
    ngx_int_t         rc;
    ngx_uint_t        i, failed;
    t_number_case_t  *t;

    failed = 0;

    for (i = 0; i < n; i++) {
        t = &cases[i];

        value = 0xdeadbeef;

        rc = parse(t->in.data, t->in.len, &value);

        if (rc != t->rc || (rc == NGX_OK && value != t->value)) {
            print_error("%s(\"%s\") = %ld, value %llu, expected %ld, "
                        "value %llu\n", name,
                        t_escape(t->in.data, t->in.len), (long) rc,
                        (unsigned long long) value, (long) t->rc,
                        (unsigned long long) t->value);
            failed++;
        }
    }

    return failed;
}


static char *
t_tier_name(ngx_http_loyalty_tier_t *tier)
{
    static char  buf[64];

    if (tier == NULL) {
        return "(none)";
    }

    snprintf(buf, sizeof(buf), "%.*s", (int) tier->name.len,
             tier->name.data);

    return buf;
}


static ngx_http_loyalty_tier_t *
t_tier(ngx_http_loyalty_tier_t *tier, char *name)
{
    if (name == NULL) {
        return NULL;
    }

    ngx_memzero(tier, sizeof(ngx_http_loyalty_tier_t));

    tier->name.data = (u_char *) name;
    tier->name.len = ngx_strlen(name);
    tier->multiplier = NGX_HTTP_LOYALTY_FRAC_ONE;

    return tier;
}

/* ngx_http_loyalty_write_uint(): as "%uL", at the edges of each width */

static void
test_write_uint(void **state)
{
    u_char      *p;
    uint64_t     n;
    ngx_uint_t   i, failed;
    char         want[NGX_INT64_LEN + 1];
    u_char       buf[NGX_INT64_LEN + 1];

    static uint64_t  values[] = {
        0, 1, 9, 10, 99, 100, 12345, 4294967295ULL, 4294967296ULL,
        999999999999999999ULL, 1000000000000000000ULL,
        9007199254740992ULL, 18446744073709551615ULL
    };

    failed = 0;

    for (i = 0; i < t_nelts(values) + 64; i++) {
        n = (i < t_nelts(values)) ? values[i]
                                  : (1ULL << (i - t_nelts(values))) - 1;

        ngx_memset(buf, 0xa5, sizeof(buf));
        snprintf(want, sizeof(want), "%llu", (unsigned long long) n);

        p = ngx_http_loyalty_write_uint(buf, n);

        if ((size_t) (p - buf) != ngx_strlen(want)
            || ngx_memcmp(buf, want, p - buf) != 0
            || *p != 0xa5)
        {
            print_error("write_uint(%s) = [%.*s]\n", want,
                        (int) (p - buf), buf);
            failed++;
        }
    }

    assert_int_equal(failed, 0);
}


/* ngx_http_loyalty_valid_text(): names and codes that go into headers */

static t_id_case_t  t_text_cases[] = {
    { ngx_string("gold"), NGX_OK },
    { ngx_string("we\"l\\come"), NGX_OK },
    { ngx_string("caf\xc3\xa9 10%"), NGX_OK },
    { ngx_string(" "), NGX_OK },
    { ngx_string(""), NGX_DECLINED },
    { ngx_string("two\nlines"), NGX_DECLINED },
    { ngx_string("cr\r"), NGX_DECLINED },
    { ngx_string("\ttab"), NGX_DECLINED },
    { ngx_string("del\x7f"), NGX_DECLINED },
    { { 3, (u_char *) "a\0b" }, NGX_DECLINED }
};


static void
test_valid_text(void **state)
{
    size_t        i;
    ngx_int_t     rc;
    ngx_uint_t    failed;
    t_id_case_t  *t;

    failed = 0;

    for (i = 0; i < t_nelts(t_text_cases); i++) {
        t = &t_text_cases[i];

        rc = ngx_http_loyalty_valid_text(t->in.data, t->in.len);

        if (rc != t->rc) {
            print_error("valid_text(row %zu) = %ld, expected %ld\n",
                        i, (long) rc, (long) t->rc);
            failed++;
        }
    }

    assert_int_equal(failed, 0);
}


/* ngx_http_loyalty_json_string(): RFC 8259 strings, within the bound */

static t_escape_case_t  t_json_cases[] = {
    { ngx_string(""), "\"\"" },
    { ngx_string("alice"), "\"alice\"" },
    { ngx_string("a\"b"), "\"a\\\"b\"" },
    { ngx_string("a\\b"), "\"a\\\\b\"" },
    { ngx_string("\"\\\""), "\"\\\"\\\\\\\"\"" },
    { ngx_string("\b\f\n\r\t"), "\"\\b\\f\\n\\r\\t\"" },
    { ngx_string("\x01\x1f"), "\"\\u0001\\u001f\"" },
    { { 3, (u_char *) "a\0b" }, "\"a\\u0000b\"" },
    { ngx_string("</script>"), "\"</script>\"" },
    { ngx_string("\x7f \xc3\xa9"), "\"\x7f \xc3\xa9\"" },
    { ngx_string("\",\"points\":1e9,\"x\":\""),
      "\"\\\",\\\"points\\\":1e9,\\\"x\\\":\\\"\"" }
};


static void
test_json_string(void **state)
{
    u_char           *p;
    size_t            i, len;
    ngx_uint_t        failed;
    t_escape_case_t  *t;
    u_char            in[64];
    u_char            buf[2 + 64 * NGX_HTTP_LOYALTY_JSON_ESCAPE + 1];

    failed = 0;

    for (i = 0; i < t_nelts(t_json_cases); i++) {
        t = &t_json_cases[i];

        ngx_memset(buf, 0xa5, sizeof(buf));

        p = ngx_http_loyalty_json_string(buf, t->in.data, t->in.len);
        len = p - buf;

        if (len != ngx_strlen(t->out)
            || ngx_memcmp(buf, t->out, len) != 0
            || len > 2 + t->in.len * NGX_HTTP_LOYALTY_JSON_ESCAPE
            || buf[len] != 0xa5)
        {
            print_error("json_string(row %zu) = [%.*s], expected [%s]\n",
                        i, (int) len, buf, t->out);
            failed++;
        }
    }

    assert_int_equal(failed, 0);

    /* the worst case, every byte a control character, fills the bound */

    for (i = 0; i < sizeof(in); i++) {
        in[i] = (u_char) (i % 0x20);
    }

    ngx_memset(buf, 0xa5, sizeof(buf));

    p = ngx_http_loyalty_json_string(buf, in, sizeof(in));

    assert_true(p <= buf + 2 + sizeof(in) * NGX_HTTP_LOYALTY_JSON_ESCAPE);
    assert_int_equal(buf[sizeof(buf) - 1], 0xa5);
    assert_memory_equal(buf, "\"\\u0000\\u0001", 13);
}


/* ngx_http_loyalty_json_field(): "name":"value" or "name":number */

static void
test_json_field(void **state)
{
    u_char     *p;
    ngx_str_t   name, value;
    u_char      buf[128];

    ngx_str_set(&name, "offer_code");
    ngx_str_set(&value, "SAVE\"10\\");

    p = ngx_http_loyalty_json_field(buf, &name, &value, 1);
    *p = '\0';
    assert_string_equal((char *) buf, "\"offer_code\":\"SAVE\\\"10\\\\\"");

    ngx_str_set(&name, "points");
    ngx_str_set(&value, "139");

    p = ngx_http_loyalty_json_field(buf, &name, &value, 0);
    *p = '\0';
    assert_string_equal((char *) buf, "\"points\":139");
}


/* ngx_http_loyalty_label_value(): the Prometheus text format's escapes */

static t_escape_case_t  t_label_cases[] = {
    { ngx_string(""), "" },
    { ngx_string("gold_perk"), "gold_perk" },
    { ngx_string("we\"l\\come"), "we\\\"l\\\\come" },
    { ngx_string("a\nb"), "a\\nb" },
    { ngx_string("tab\there\r"), "tab\there\r" },
    { ngx_string("\"} 1\nevil_total 9"), "\\\"} 1\\nevil_total 9" },
    { ngx_string("caf\xc3\xa9"), "caf\xc3\xa9" }
};


static void
test_label_value(void **state)
{
    u_char           *p;
    size_t            i, len;
    ngx_uint_t        failed;
    t_escape_case_t  *t;
    u_char            buf[64 * NGX_HTTP_LOYALTY_LABEL_ESCAPE + 1];

    failed = 0;

    for (i = 0; i < t_nelts(t_label_cases); i++) {
        t = &t_label_cases[i];

        ngx_memset(buf, 0xa5, sizeof(buf));

        p = ngx_http_loyalty_label_value(buf, t->in.data, t->in.len);
        len = p - buf;

        if (len != ngx_strlen(t->out)
            || ngx_memcmp(buf, t->out, len) != 0
            || len > t->in.len * NGX_HTTP_LOYALTY_LABEL_ESCAPE
            || buf[len] != 0xa5)
        {
            print_error("label_value(row %zu) = [%.*s], expected [%s]\n",
                        i, (int) len, buf, t->out);
            failed++;
        }
    }

    assert_int_equal(failed, 0);
}



static char *
t_offer_name(ngx_http_loyalty_offer_t *offer)
{
    static char  buf[64];

    if (offer == NULL) {
        return "(none)";
    }

    snprintf(buf, sizeof(buf), "%.*s", (int) offer->name.len,
             offer->name.data);

    return buf;
}


/* if=: "yes" holds, "no" does not, "error" fails */

static ngx_int_t
t_cond(void *data, void *cond)
{
    t_cond_data_t  *d;

    d = data;

    if (d == NULL) {
        fail_msg("if= callback without its data");
    }

    d->calls++;

    if (cond == t_yes) {
        return NGX_OK;
    }

    if (cond == t_no) {
        return NGX_DECLINED;
    }

    if (cond == t_error) {
        return NGX_ERROR;
    }

    fail_msg("if= callback with an unknown condition %p", cond);

    return NGX_ERROR;
}


/* feeds the parameters in order, as the directive handler does */

static char *
t_offer_parse(ngx_http_loyalty_offer_t *offer, char **params, ngx_int_t *at)
{
    char       *err;
    ngx_str_t   param;
    ngx_int_t   i;

    *at = T_NONE;

    for (i = 0; params[i]; i++) {
        param.data = (u_char *) params[i];
        param.len = ngx_strlen(params[i]);

        err = ngx_http_loyalty_offer_param(offer, &param);
        if (err) {
            *at = i;
            return err;
        }
    }

    return NULL;
}


/*
 * Redis Cluster key slots: the expected slots are Redis 7.0's own
 * CLUSTER KEYSLOT answers, hash tags and their corner cases included.
 */

typedef struct {
    ngx_str_t     key;
    ngx_uint_t    slot;
} t_slot_case_t;


static t_slot_case_t  t_slot_cases[] = {
    { ngx_string(""), 0 },
    { ngx_string("foo"), 12182 },
    { ngx_string("bar"), 5061 },
    { ngx_string("123456789"), 12739 },             /* CRC16 0x31c3 */
    { ngx_string("loyalty:{alice}"), 749 },
    { ngx_string("loyalty:{alice}:order:o1"), 749 },
    { ngx_string("loyalty:{c000001}"), 593 },
    { ngx_string("{}"), 15257 },                    /* empty tag: whole key */
    { ngx_string("a{}b"), 13694 },
    { ngx_string("{a}{b}"), 15495 },                /* the first tag */
    { ngx_string("prefix{a}}b"), 15495 },
    { ngx_string("x{y"), 2740 },                    /* no "}": whole key */
    { ngx_string("x}y{z}"), 8157 },
    { ngx_string("{{a}}"), 10276 },                 /* tag "{a" */
    { ngx_string("}{q}"), 11958 },
};


static void
test_key_slot(void **state)
{
    ngx_uint_t      i, slot, failed;
    t_slot_case_t  *t;

    failed = 0;

    for (i = 0; i < t_nelts(t_slot_cases); i++) {
        t = &t_slot_cases[i];

        slot = ngx_http_loyalty_key_slot(t->key.data, t->key.len);

        if (slot != t->slot) {
            print_error("key_slot(\"%s\") = %lu, expected %lu\n",
                        t_escape(t->key.data, t->key.len),
                        (unsigned long) slot, (unsigned long) t->slot);
            failed++;
        }
    }

    assert_int_equal(failed, 0);
}


typedef struct {
    ngx_str_t     in;
    ngx_int_t     rc;
    ngx_uint_t    ask;
    ngx_uint_t    slot;
    char         *host;
    in_port_t     port;
} t_redirect_case_t;


static t_redirect_case_t  t_redirect_cases[] = {
    { ngx_string("MOVED 3999 127.0.0.1:6381"), NGX_OK, 0, 3999,
      "127.0.0.1", 6381 },
    { ngx_string("ASK 0 10.0.0.5:7000"), NGX_OK, 1, 0, "10.0.0.5", 7000 },
    { ngx_string("MOVED 16383 ::1:7002"), NGX_OK, 0, 16383, "::1", 7002 },
    { ngx_string("MOVED 12 :7002"), NGX_OK, 0, 12, "", 7002 },
    { ngx_string("MOVED 12 redis-1.example:7002"), NGX_OK, 0, 12,
      "redis-1.example", 7002 },
    { ngx_string("MOVED 16384 127.0.0.1:7000"), NGX_ERROR, 0, 0, NULL, 0 },
    { ngx_string("MOVED -1 127.0.0.1:7000"), NGX_ERROR, 0, 0, NULL, 0 },
    { ngx_string("MOVED 12 127.0.0.1"), NGX_ERROR, 0, 0, NULL, 0 },
    { ngx_string("MOVED 12 127.0.0.1:"), NGX_ERROR, 0, 0, NULL, 0 },
    { ngx_string("MOVED 12 127.0.0.1:0"), NGX_ERROR, 0, 0, NULL, 0 },
    { ngx_string("MOVED 12 127.0.0.1:65536"), NGX_ERROR, 0, 0, NULL, 0 },
    { ngx_string("MOVED 12"), NGX_ERROR, 0, 0, NULL, 0 },
    { ngx_string("MOVED  127.0.0.1:7000"), NGX_ERROR, 0, 0, NULL, 0 },
    { ngx_string("MOVED "), NGX_DECLINED, 0, 0, NULL, 0 },
    { ngx_string("MOVEDX 1 127.0.0.1:7000"), NGX_DECLINED, 0, 0, NULL, 0 },
    { ngx_string("TRYAGAIN Multiple keys request during rehashing of slot"),
      NGX_DECLINED, 0, 0, NULL, 0 },
    { ngx_string("CLUSTERDOWN The cluster is down"), NGX_DECLINED, 0, 0,
      NULL, 0 },
    { ngx_string("ERR unknown command"), NGX_DECLINED, 0, 0, NULL, 0 },
};


static void
test_parse_redirect(void **state)
{
    ngx_int_t                     rc;
    ngx_uint_t                    i, failed;
    t_redirect_case_t            *t;
    ngx_http_loyalty_redirect_t   rd;

    failed = 0;

    for (i = 0; i < t_nelts(t_redirect_cases); i++) {
        t = &t_redirect_cases[i];

        ngx_memzero(&rd, sizeof(rd));

        rc = ngx_http_loyalty_parse_redirect(t->in.data, t->in.len, &rd);

        if (rc != t->rc
            || (rc == NGX_OK
                && (rd.ask != t->ask || rd.slot != t->slot
                    || rd.port != t->port
                    || rd.host.len != strlen(t->host)
                    || ngx_strncmp(rd.host.data, t->host, rd.host.len) != 0)))
        {
            print_error("parse_redirect(\"%s\") = %ld ask %u slot %lu "
                        "host \"%.*s\" port %u, expected %ld\n",
                        t_escape(t->in.data, t->in.len), (long) rc,
                        (unsigned) rd.ask, (unsigned long) rd.slot,
                        (int) rd.host.len,
                        rd.host.data ? (char *) rd.host.data : "",
                        (unsigned) rd.port, (long) t->rc);
            failed++;
        }
    }

    assert_int_equal(failed, 0);
}


/*
 * ngx_http_loyalty_parse_pending(): "<release>:<points>[,...]", each of
 * 1 to 16 digits and below 2^53; released by "now" is due, the rest is
 * locked, "next" the earliest release of the locked points
 */

#define T_EXACT      "9007199254740992"      /* 2^53 */
#define T_EXACT_1    "9007199254740991"      /* 2^53 - 1 */
#define T_HALF       "4503599627370496"      /* 2^52 */
#define T_HALF_1     "4503599627370495"      /* 2^52 - 1 */
#define T_LATER      "1700000100"            /* T_NOW + 100 */

typedef struct {
    ngx_str_t                   in;
    time_t                      now;
    ngx_int_t                   rc;
    uint64_t                    due;
    uint64_t                    locked;
    time_t                      next;
} t_pending_case_t;


static t_pending_case_t  t_pending_cases[] = {
    { ngx_string(""), T_NOW, NGX_OK, 0, 0, 0 },
    { ngx_string(""), 0, NGX_OK, 0, 0, 0 },

    /* one entry: before, at and after now */
    { ngx_string("100:5"), T_NOW, NGX_OK, 5, 0, 0 },
    { ngx_string("1699999999:5"), T_NOW, NGX_OK, 5, 0, 0 },
    { ngx_string("1700000000:5"), T_NOW, NGX_OK, 5, 0, 0 },
    { ngx_string("1700000001:5"), T_NOW, NGX_OK, 0, 5, 1700000001 },
    { ngx_string("0:5"), T_NOW, NGX_OK, 5, 0, 0 },
    { ngx_string("0:5"), 0, NGX_OK, 5, 0, 0 },
    { ngx_string("1:5"), 0, NGX_OK, 0, 5, 1 },
    { ngx_string("1:0"), 0, NGX_OK, 0, 0, 1 },
    { ngx_string("100:0"), T_NOW, NGX_OK, 0, 0, 0 },

    /* several: sums, and the earliest locked release wherever it is */
    { ngx_string("1700000100:3,1700000050:4,100:2"), T_NOW, NGX_OK,
      2, 7, 1700000050 },
    { ngx_string("1700000050:4,1700000100:3"), T_NOW, NGX_OK,
      0, 7, 1700000050 },
    { ngx_string("1700000100:3,1700000050:4"), T_NOW, NGX_OK,
      0, 7, 1700000050 },
    { ngx_string("100:1,200:2,300:3"), T_NOW, NGX_OK, 6, 0, 0 },
    { ngx_string("100:1,200:2,300:3"), 200, NGX_OK, 3, 3, 300 },
    { ngx_string("100:1,200:2,300:3"), 199, NGX_OK, 1, 5, 200 },
    { ngx_string("100:1,200:2,300:3"), 99, NGX_OK, 0, 6, 100 },
    { ngx_string("1700000000:1,1700000000:2,1700000001:4"), T_NOW, NGX_OK,
      3, 4, 1700000001 },
    { ngx_string(T_LATER ":1," T_LATER ":2"), T_NOW, NGX_OK,
      0, 3, 1700000100 },

    /* leading zeros do not count, as in the scripts; 16 digits, not 17 */
    { ngx_string("0001700000100:007"), T_NOW, NGX_OK, 0, 7, 1700000100 },
    { ngx_string("0000001700000100:0000000000000007"), T_NOW, NGX_OK,
      0, 7, 1700000100 },
    { ngx_string("0000000000000000:0000000000000000"), T_NOW, NGX_OK,
      0, 0, 0 },
    { ngx_string("00000001700000100:7"), T_NOW, NGX_OK, 0, 7, 1700000100 },
    { ngx_string("1:00000000000000007"), T_NOW, NGX_OK, 7, 0, 0 },
    { ngx_string("00000000000000000000001796310408:50"), T_NOW, NGX_OK,
      0, 50, 1796310408 },
    { ngx_string("10000000000000000:7"), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string("1:10000000000000000"), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string("9999999999999999:1"), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string("1:9999999999999999"), T_NOW, NGX_ERROR, 0, 0, 0 },

    /* each below 2^53 */
    { ngx_string("1:" T_EXACT_1), T_NOW, NGX_OK, 9007199254740991ULL, 0, 0 },
    { ngx_string("1:" T_EXACT), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string(T_LATER ":" T_EXACT_1), T_NOW, NGX_OK,
      0, 9007199254740991ULL, 1700000100 },
    { ngx_string(T_LATER ":" T_EXACT), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string(T_EXACT_1 ":1"), T_NOW, NGX_OK,
      0, 1, (time_t) 9007199254740991LL },
    { ngx_string(T_EXACT ":1"), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string(T_EXACT_1 ":1"), (time_t) 9007199254740991LL, NGX_OK,
      1, 0, 0 },

    /* and so are the sums */
    { ngx_string("1:" T_HALF ",2:" T_HALF_1), T_NOW, NGX_OK,
      9007199254740991ULL, 0, 0 },
    { ngx_string("1:" T_HALF ",2:" T_HALF), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string("1:" T_EXACT_1 ",2:1"), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string("1:" T_EXACT_1 ",2:0"), T_NOW, NGX_OK,
      9007199254740991ULL, 0, 0 },
    { ngx_string(T_LATER ":" T_HALF "," T_LATER ":" T_HALF_1), T_NOW, NGX_OK,
      0, 9007199254740991ULL, 1700000100 },
    { ngx_string(T_LATER ":" T_HALF "," T_LATER ":" T_HALF), T_NOW,
      NGX_ERROR, 0, 0, 0 },
    { ngx_string("1:" T_EXACT_1 "," T_LATER ":" T_EXACT_1), T_NOW, NGX_OK,
      9007199254740991ULL, 9007199254740991ULL, 1700000100 },

    /* not a list */
    { ngx_string(","), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string(",,"), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string("1:2,"), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string(",1:2"), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string("1:2,,3:4"), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string("1:2;3:4"), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string("1:2, 3:4"), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string("12"), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string("1:2,34"), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string(":"), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string(":5"), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string("5:"), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string("5:,6:1"), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string("1:2:3"), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string("1::2"), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string("a:1"), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string("1:a"), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string(" 1:2"), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string("1:2 "), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string("1 :2"), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string("-1:2"), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string("1:-2"), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string("+1:2"), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string("1:+2"), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string("1.5:2"), T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string("1:2\n"), T_NOW, NGX_ERROR, 0, 0, 0 },
    { { 4, (u_char *) "1:2\0" }, T_NOW, NGX_ERROR, 0, 0, 0 },
    { ngx_string("1:0x2"), T_NOW, NGX_ERROR, 0, 0, 0 },
};


static void
test_parse_pending(void **state)
{
    time_t             next;
    uint64_t           due, locked;
    ngx_int_t          rc;
    ngx_uint_t         i, failed;
    t_pending_case_t  *t;

    assert_true(NGX_HTTP_LOYALTY_EXACT == 9007199254740992ULL);
    assert_int_equal(NGX_HTTP_LOYALTY_PENDING_DIGITS, 16);

    failed = 0;

    for (i = 0; i < t_nelts(t_pending_cases); i++) {
        t = &t_pending_cases[i];

        due = 0xdeadbeef;
        locked = 0xdeadbeef;
        next = 0xdeadbeef;

        rc = ngx_http_loyalty_parse_pending(t->in.data, t->in.len, t->now,
                                            &due, &locked, &next);

        if (rc != t->rc
            || (rc == NGX_OK
                && (due != t->due || locked != t->locked
                    || next != t->next)))
        {
            print_error("parse_pending(\"%s\", now %lld) = %ld, due %llu "
                        "locked %llu next %lld, expected %ld, due %llu "
                        "locked %llu next %lld\n",
                        t_escape(t->in.data, t->in.len), (long long) t->now,
                        (long) rc, (unsigned long long) due,
                        (unsigned long long) locked, (long long) next,
                        (long) t->rc, (unsigned long long) t->due,
                        (unsigned long long) t->locked, (long long) t->next);
            failed++;
        }
    }

    assert_int_equal(failed, 0);
}


/* a long list: every entry counted, each one due once now reaches it */

static void
test_parse_pending_long(void **state)
{
    u_char      *p;
    time_t       next, now;
    uint64_t     due, locked, expect;
    ngx_uint_t   i;
    u_char       buf[64 * 32];

    p = buf;

    /* 64 entries, released at T_NOW + 64 ... T_NOW + 1, i + 1 points */

    for (i = 0; i < 64; i++) {
        p += sprintf((char *) p, "%s%lld:%lu", i ? "," : "",
                     (long long) (T_NOW + 64 - i), (unsigned long) (i + 1));
    }

    for (now = T_NOW; now <= T_NOW + 65; now++) {
        assert_int_equal(ngx_http_loyalty_parse_pending(buf, p - buf, now,
                                                        &due, &locked,
                                                        &next),
                         NGX_OK);

        /* released: the entries i >= 64 - (now - T_NOW) */

        for (expect = 0, i = 0; i < 64; i++) {
            if (T_NOW + 64 - (time_t) i <= now) {
                expect += i + 1;
            }
        }

        assert_int_equal(due, expect);
        assert_int_equal(due + locked, 64 * 65 / 2);

        if (now >= T_NOW + 64) {
            assert_int_equal(locked, 0);
            assert_int_equal(next, 0);

        } else {
            assert_int_equal(next, now + 1);
        }
    }

    /* the same with a trailing comma: refused */

    *p++ = ',';

    assert_int_equal(ngx_http_loyalty_parse_pending(buf, p - buf, T_NOW,
                                                    &due, &locked, &next),
                     NGX_ERROR);
}


/* ngx_http_loyalty_parse_signed(): ^[+-]?[0-9]{1,18}$ */

typedef struct {
    ngx_str_t                   in;
    ngx_int_t                   rc;
    uint64_t                    value;
    ngx_uint_t                  negative;
} t_signed_case_t;


static t_signed_case_t  t_signed_cases[] = {
    { ngx_string("0"), NGX_OK, 0, 0 },
    { ngx_string("+0"), NGX_OK, 0, 0 },
    { ngx_string("-0"), NGX_OK, 0, 1 },
    { ngx_string("5"), NGX_OK, 5, 0 },
    { ngx_string("+5"), NGX_OK, 5, 0 },
    { ngx_string("-5"), NGX_OK, 5, 1 },
    { ngx_string("-007"), NGX_OK, 7, 1 },
    { ngx_string("1250"), NGX_OK, 1250, 0 },
    { ngx_string("999999999999999999"), NGX_OK, 999999999999999999ULL, 0 },
    { ngx_string("+999999999999999999"), NGX_OK, 999999999999999999ULL, 0 },
    { ngx_string("-999999999999999999"), NGX_OK, 999999999999999999ULL, 1 },
    { ngx_string("-000000000000000001"), NGX_OK, 1, 1 },
    { ngx_string("1000000000000000000"), NGX_ERROR, 0, 0 },
    { ngx_string("-1000000000000000000"), NGX_ERROR, 0, 0 },
    { ngx_string("+0000000000000000001"), NGX_ERROR, 0, 0 },
    { ngx_string(""), NGX_ERROR, 0, 0 },
    { ngx_string("+"), NGX_ERROR, 0, 0 },
    { ngx_string("-"), NGX_ERROR, 0, 0 },
    { ngx_string("--1"), NGX_ERROR, 0, 0 },
    { ngx_string("+-1"), NGX_ERROR, 0, 0 },
    { ngx_string("-+1"), NGX_ERROR, 0, 0 },
    { ngx_string("++1"), NGX_ERROR, 0, 0 },
    { ngx_string("1-"), NGX_ERROR, 0, 0 },
    { ngx_string("1+"), NGX_ERROR, 0, 0 },
    { ngx_string("1-2"), NGX_ERROR, 0, 0 },
    { ngx_string(" 1"), NGX_ERROR, 0, 0 },
    { ngx_string("- 1"), NGX_ERROR, 0, 0 },
    { ngx_string("1 "), NGX_ERROR, 0, 0 },
    { ngx_string("-1\0"), NGX_ERROR, 0, 0 },
    { ngx_string("0x10"), NGX_ERROR, 0, 0 },
    { ngx_string("1.5"), NGX_ERROR, 0, 0 },
    { ngx_string("-1e3"), NGX_ERROR, 0, 0 },
    { ngx_string("\xe2\x88\x92" "1"), NGX_ERROR, 0, 0 },  /* U+2212 minus */
};


static void
test_parse_signed(void **state)
{
    uint64_t          value;
    ngx_int_t         rc;
    ngx_uint_t        i, failed, negative;
    t_signed_case_t  *t;

    failed = 0;

    for (i = 0; i < t_nelts(t_signed_cases); i++) {
        t = &t_signed_cases[i];

        value = 0xdeadbeef;
        negative = 7;

        rc = ngx_http_loyalty_parse_signed(t->in.data, t->in.len, &value,
                                           &negative);

        if (rc != t->rc
            || (rc == NGX_OK
                && (value != t->value || negative != t->negative)))
        {
            print_error("parse_signed(\"%s\") = %ld, value %llu, negative "
                        "%lu, expected %ld, value %llu, negative %lu\n",
                        t_escape(t->in.data, t->in.len), (long) rc,
                        (unsigned long long) value, (unsigned long) negative,
                        (long) t->rc, (unsigned long long) t->value,
                        (unsigned long) t->negative);
            failed++;
        }
    }

    assert_int_equal(failed, 0);
}


/* ngx_http_loyalty_valid_order(): 1 to 128 bytes of 0x21 to 0x7e */

static t_id_case_t  t_order_cases[] = {
    { ngx_string("o1"), NGX_OK },
    { ngx_string("A"), NGX_OK },
    { ngx_string("!"), NGX_OK },
    { ngx_string("~"), NGX_OK },
    { ngx_string("order-2024/01#42?x=\"y\"&z={}"), NGX_OK },
    { ngx_string("%20"), NGX_OK },
    { ngx_string(""), NGX_ERROR },
    { ngx_string(" "), NGX_ERROR },
    { ngx_string("o 1"), NGX_ERROR },
    { ngx_string(" o1"), NGX_ERROR },
    { ngx_string("o1 "), NGX_ERROR },
    { ngx_string("o1\t"), NGX_ERROR },
    { ngx_string("o1\n"), NGX_ERROR },
    { ngx_string("o1\r\n"), NGX_ERROR },
    { { 3, (u_char *) "o\0001" }, NGX_ERROR },
    { ngx_string("o1\x7f"), NGX_ERROR },
    { ngx_string("o\x80"), NGX_ERROR },
    { ngx_string("caf\xc3\xa9"), NGX_ERROR },
    { ngx_string("\xff"), NGX_ERROR },
};


static void
test_valid_order(void **state)
{
    u_char      one[1], full[NGX_HTTP_LOYALTY_ORDER_MAX + 8];
    size_t      len;
    ngx_int_t   rc, expect;
    ngx_uint_t  i, c, failed, allowed;

    assert_int_equal(NGX_HTTP_LOYALTY_ORDER_MAX, 128);

    failed = 0;

    for (i = 0; i < t_nelts(t_order_cases); i++) {
        rc = ngx_http_loyalty_valid_order(t_order_cases[i].in.data,
                                          t_order_cases[i].in.len);

        if (rc != t_order_cases[i].rc) {
            print_error("valid_order(\"%s\") = %ld, expected %ld\n",
                        t_escape(t_order_cases[i].in.data,
                                 t_order_cases[i].in.len),
                        (long) rc, (long) t_order_cases[i].rc);
            failed++;
        }
    }

    /* lengths 0 to 130 */

    ngx_memset(full, 'o', sizeof(full));

    for (len = 0; len <= NGX_HTTP_LOYALTY_ORDER_MAX + 2; len++) {
        rc = ngx_http_loyalty_valid_order(full, len);
        expect = (len >= 1 && len <= 128) ? NGX_OK : NGX_ERROR;

        if (rc != expect) {
            print_error("valid_order(%zu x \"o\") = %ld, expected %ld\n",
                        len, (long) rc, (long) expect);
            failed++;
        }
    }

    /* every byte, alone and last of 128 */

    allowed = 0;

    for (c = 0; c < 256; c++) {
        expect = (c >= 0x21 && c <= 0x7e) ? NGX_OK : NGX_ERROR;

        if (expect == NGX_OK) {
            allowed++;
        }

        one[0] = (u_char) c;
        full[NGX_HTTP_LOYALTY_ORDER_MAX - 1] = (u_char) c;

        if (ngx_http_loyalty_valid_order(one, 1) != expect
            || ngx_http_loyalty_valid_order(full, NGX_HTTP_LOYALTY_ORDER_MAX)
               != expect)
        {
            print_error("valid_order: byte 0x%02x: expected %s\n",
                        (unsigned) c, expect == NGX_OK ? "valid" : "invalid");
            failed++;
        }
    }

    assert_int_equal(allowed, 94);
    assert_int_equal(failed, 0);
}


/*
 * ngx_http_loyalty_valid_reason(): 1 to 200 code points of UTF-8 without
 * control characters (C0, DEL, C1)
 */

static t_id_case_t  t_reason_cases[] = {
    { ngx_string("a"), NGX_OK },
    { ngx_string(" "), NGX_OK },
    { ngx_string("~"), NGX_OK },
    { ngx_string("goodwill: late delivery (order #42)"), NGX_OK },
    { ngx_string("caf\xc3\xa9"), NGX_OK },
    { ngx_string("\xe2\x82\xac 5"), NGX_OK },                /* U+20AC */
    { ngx_string("\xf0\x9f\x98\x80"), NGX_OK },              /* U+1F600 */
    { ngx_string("\xe6\x97\xa5\xe6\x9c\xac"), NGX_OK },      /* CJK */
    { ngx_string("\xef\xbb\xbf" "bom"), NGX_OK },            /* U+FEFF */
    { ngx_string("\xe2\x80\xa8"), NGX_OK },                  /* U+2028 */

    /* the edges of each form and of the excluded ranges */
    { ngx_string("\xc2\xa0"), NGX_OK },                      /* U+00A0 */
    { ngx_string("\xdf\xbf"), NGX_OK },                      /* U+07FF */
    { ngx_string("\xe0\xa0\x80"), NGX_OK },                  /* U+0800 */
    { ngx_string("\xed\x9f\xbf"), NGX_OK },                  /* U+D7FF */
    { ngx_string("\xee\x80\x80"), NGX_OK },                  /* U+E000 */
    { ngx_string("\xef\xbf\xbd"), NGX_OK },                  /* U+FFFD */
    { ngx_string("\xef\xbf\xbf"), NGX_OK },                  /* U+FFFF */
    { ngx_string("\xf0\x90\x80\x80"), NGX_OK },              /* U+10000 */
    { ngx_string("\xf4\x8f\xbf\xbf"), NGX_OK },              /* U+10FFFF */

    { ngx_string(""), NGX_ERROR },

    /* C0 controls and DEL */
    { { 1, (u_char *) "\0" }, NGX_ERROR },
    { { 3, (u_char *) "a\0b" }, NGX_ERROR },
    { ngx_string("\x01"), NGX_ERROR },
    { ngx_string("a\tb"), NGX_ERROR },
    { ngx_string("line\n"), NGX_ERROR },
    { ngx_string("\rx"), NGX_ERROR },
    { ngx_string("\x1b[31m"), NGX_ERROR },
    { ngx_string("\x1f"), NGX_ERROR },
    { ngx_string("\x7f"), NGX_ERROR },
    { ngx_string("ab\x7f"), NGX_ERROR },

    /* C1 controls, U+0080 to U+009F */
    { ngx_string("\xc2\x80"), NGX_ERROR },
    { ngx_string("\xc2\x85"), NGX_ERROR },                   /* NEL */
    { ngx_string("\xc2\x9f"), NGX_ERROR },
    { ngx_string("ok\xc2\x9b" "31m"), NGX_ERROR },           /* CSI */

    /* overlong forms */
    { ngx_string("\xc0\x80"), NGX_ERROR },
    { ngx_string("\xc0\xaf"), NGX_ERROR },
    { ngx_string("\xc1\xbf"), NGX_ERROR },
    { ngx_string("\xe0\x80\x80"), NGX_ERROR },
    { ngx_string("\xe0\x81\x81"), NGX_ERROR },
    { ngx_string("\xe0\x9f\xbf"), NGX_ERROR },               /* U+07FF */
    { ngx_string("\xf0\x80\x80\x80"), NGX_ERROR },
    { ngx_string("\xf0\x8f\xbf\xbf"), NGX_ERROR },           /* U+FFFF */

    /* surrogates */
    { ngx_string("\xed\xa0\x80"), NGX_ERROR },               /* U+D800 */
    { ngx_string("\xed\xaf\xbf"), NGX_ERROR },               /* U+DBFF */
    { ngx_string("\xed\xb0\x80"), NGX_ERROR },               /* U+DC00 */
    { ngx_string("\xed\xbf\xbf"), NGX_ERROR },               /* U+DFFF */
    { ngx_string("\xed\xa0\xbd\xed\xb8\x80"), NGX_ERROR },   /* CESU-8 */

    /* beyond U+10FFFF, and bytes that never start a sequence */
    { ngx_string("\xf4\x90\x80\x80"), NGX_ERROR },           /* U+110000 */
    { ngx_string("\xf4\xbf\xbf\xbf"), NGX_ERROR },
    { ngx_string("\xf5\x80\x80\x80"), NGX_ERROR },
    { ngx_string("\xf7\xbf\xbf\xbf"), NGX_ERROR },
    { ngx_string("\xf8\x88\x80\x80\x80"), NGX_ERROR },
    { ngx_string("\xfc\x84\x80\x80\x80\x80"), NGX_ERROR },
    { ngx_string("\xfe"), NGX_ERROR },
    { ngx_string("\xff"), NGX_ERROR },

    /* truncated sequences, at the end and before another character */
    { ngx_string("\xc3"), NGX_ERROR },
    { ngx_string("caf\xc3"), NGX_ERROR },
    { ngx_string("\xe2\x82"), NGX_ERROR },
    { ngx_string("\xe2"), NGX_ERROR },
    { ngx_string("\xf0\x9f\x98"), NGX_ERROR },
    { ngx_string("\xf0\x9f"), NGX_ERROR },
    { ngx_string("\xf0"), NGX_ERROR },
    { ngx_string("\xc3" "a"), NGX_ERROR },
    { ngx_string("\xe2\x82" "a"), NGX_ERROR },
    { ngx_string("\xf0\x9f\x98" "a"), NGX_ERROR },
    { ngx_string("\xe2" "(" "\xa1"), NGX_ERROR },
    { ngx_string("\xc3\xc3\xa9"), NGX_ERROR },

    /* stray continuation bytes */
    { ngx_string("\x80"), NGX_ERROR },
    { ngx_string("\xbf"), NGX_ERROR },
    { ngx_string("a\x80" "b"), NGX_ERROR },
    { ngx_string("\xc3\xa9\xa9"), NGX_ERROR },
    { ngx_string("\xf0\x9f\x98\x80\x80"), NGX_ERROR },
};


/* an exact-size copy: a read past the end is for ASan or valgrind */

static ngx_int_t
t_reason_bytes(u_char *data, size_t len)
{
    u_char     *p;
    ngx_int_t   rc;

    p = malloc(len ? len : 1);
    assert_non_null(p);
    ngx_memcpy(p, data, len);

    rc = ngx_http_loyalty_valid_reason(p, len);

    free(p);

    return rc;
}


/* n copies of the character c (its UTF-8 bytes), then the rest */

static ngx_int_t
t_reason_run(char *c, ngx_uint_t n, char *rest)
{
    u_char      *p;
    size_t       len, clen, rlen;
    ngx_int_t    rc;
    ngx_uint_t   i;

    clen = strlen(c);
    rlen = strlen(rest);
    len = clen * n + rlen;

    p = malloc(len ? len : 1);
    assert_non_null(p);

    for (i = 0; i < n; i++) {
        ngx_memcpy(p + i * clen, c, clen);
    }

    ngx_memcpy(p + n * clen, rest, rlen);

    rc = ngx_http_loyalty_valid_reason(p, len);

    free(p);

    return rc;
}


static void
test_valid_reason(void **state)
{
    ngx_int_t     rc;
    ngx_uint_t    i, c, failed;
    t_id_case_t  *t;
    u_char        b[2];

    static char  *chars[] = {
        "r",                    /* 1 byte */
        "\xc3\xa9",             /* 2 */
        "\xe2\x82\xac",         /* 3 */
        "\xf0\x9f\x98\x80",     /* 4 */
    };

    assert_int_equal(NGX_HTTP_LOYALTY_REASON_MAX, 200);

    failed = 0;

    for (i = 0; i < t_nelts(t_reason_cases); i++) {
        t = &t_reason_cases[i];

        rc = t_reason_bytes(t->in.data, t->in.len);

        if (rc != t->rc) {
            print_error("valid_reason(\"%s\") = %ld, expected %ld\n",
                        t_escape(t->in.data, t->in.len), (long) rc,
                        (long) t->rc);
            failed++;
        }
    }

    /* 200 characters, not 201, counted as code points, not bytes */

    for (i = 0; i < t_nelts(chars); i++) {
        if (t_reason_run(chars[i], 200, "") != NGX_OK
            || t_reason_run(chars[i], 201, "") != NGX_ERROR
            || t_reason_run(chars[i], 199, "x") != NGX_OK
            || t_reason_run(chars[i], 200, "x") != NGX_ERROR
            || t_reason_run(chars[i], 199, "\xf0\x9f\x98\x80") != NGX_OK
            || t_reason_run(chars[i], 200, "\xc3\xa9") != NGX_ERROR
            || t_reason_run(chars[i], 1, "") != NGX_OK
            || t_reason_run(chars[i], 199, "\x7f") != NGX_ERROR
            || t_reason_run(chars[i], 199, "\xc3") != NGX_ERROR
            || t_reason_run(chars[i], 10, "\xed\xa0\x80") != NGX_ERROR)
        {
            print_error("valid_reason: %zu-byte characters: wrong count\n",
                        strlen(chars[i]));
            failed++;
        }
    }

    /* mixed widths: 50 of each, 200 in all (500 bytes) */

    if (t_reason_run("r\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80", 50, "")
        != NGX_OK
        || t_reason_run("r\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80", 50, "!")
           != NGX_ERROR)
    {
        print_error("valid_reason: 200 mixed characters: wrong count\n");
        failed++;
    }

    /* every byte alone: printable ASCII only */

    for (c = 0; c < 256; c++) {
        b[0] = (u_char) c;

        rc = ngx_http_loyalty_valid_reason(b, 1);

        if (rc != ((c >= 0x20 && c < 0x7f) ? NGX_OK : NGX_ERROR)) {
            print_error("valid_reason: byte 0x%02x alone = %ld\n",
                        (unsigned) c, (long) rc);
            failed++;
        }
    }

    /* every two bytes starting above 0x7f: U+00A0 to U+07FF only */

    for (c = 0; c < 0x10000; c++) {
        b[0] = (u_char) (c >> 8);
        b[1] = (u_char) c;

        if (b[0] < 0x80) {
            continue;
        }

        rc = ngx_http_loyalty_valid_reason(b, 2);

        if (rc != ((b[0] >= 0xc2 && b[0] <= 0xdf && (b[1] & 0xc0) == 0x80
                    && (b[0] > 0xc2 || b[1] >= 0xa0))
                   ? NGX_OK : NGX_ERROR))
        {
            print_error("valid_reason: \\x%02x\\x%02x = %ld\n",
                        (unsigned) b[0], (unsigned) b[1], (long) rc);
            failed++;
        }
    }

    assert_int_equal(failed, 0);
}


/*
 * ngx_http_loyalty_form_arg(): the first "name=value" of an &-separated
 * string, the value still escaped
 */

typedef struct {
    ngx_str_t                   in;
    char                       *name;
    ngx_int_t                   rc;
    char                       *value;
} t_arg_case_t;


static t_arg_case_t  t_arg_cases[] = {
    { ngx_string("id=alice"), "id", NGX_OK, "alice" },
    { ngx_string("id=alice&points=5"), "id", NGX_OK, "alice" },
    { ngx_string("id=alice&points=5"), "points", NGX_OK, "5" },
    { ngx_string("a=1&id=x&b=2"), "id", NGX_OK, "x" },
    { ngx_string("a=1&b=2&id=last"), "id", NGX_OK, "last" },

    /* names that are prefixes or suffixes of others */
    { ngx_string("idx=1&id=2"), "id", NGX_OK, "2" },
    { ngx_string("id=1&idx=2"), "idx", NGX_OK, "2" },
    { ngx_string("idx=1&id=2"), "idx", NGX_OK, "1" },
    { ngx_string("xid=1&id=2"), "id", NGX_OK, "2" },
    { ngx_string("idx=1"), "id", NGX_DECLINED, NULL },
    { ngx_string("xid=1"), "id", NGX_DECLINED, NULL },
    { ngx_string("i=1"), "id", NGX_DECLINED, NULL },
    { ngx_string("i"), "id", NGX_DECLINED, NULL },
    { ngx_string("idx"), "id", NGX_DECLINED, NULL },
    { ngx_string("id=1"), "idx", NGX_DECLINED, NULL },
    { ngx_string("id"), "idx", NGX_DECLINED, NULL },

    /* empty values, and names without "=" */
    { ngx_string("id="), "id", NGX_OK, "" },
    { ngx_string("id=&x=1"), "id", NGX_OK, "" },
    { ngx_string("x=1&id="), "id", NGX_OK, "" },
    { ngx_string("id"), "id", NGX_OK, "" },
    { ngx_string("id&id=1"), "id", NGX_OK, "" },
    { ngx_string("x=1&id"), "id", NGX_OK, "" },
    { ngx_string("id&x=1"), "id", NGX_OK, "" },

    /* the first one wins */
    { ngx_string("id=1&id=2"), "id", NGX_OK, "1" },
    { ngx_string("id=&id=2"), "id", NGX_OK, "" },

    /* the value runs to the next "&", "=" included; nothing decoded */
    { ngx_string("id=a=b"), "id", NGX_OK, "a=b" },
    { ngx_string("id==&x"), "id", NGX_OK, "=" },
    { ngx_string("id=%41+b%"), "id", NGX_OK, "%41+b%" },
    { ngx_string("reason=late+delivery%21&x=1"), "reason", NGX_OK,
      "late+delivery%21" },
    { ngx_string("i%64=1"), "id", NGX_DECLINED, NULL },
    { ngx_string("ID=1"), "id", NGX_DECLINED, NULL },
    { ngx_string("id =1"), "id", NGX_DECLINED, NULL },
    { ngx_string(" id=1"), "id", NGX_DECLINED, NULL },

    /* empty parts */
    { ngx_string(""), "id", NGX_DECLINED, NULL },
    { ngx_string("&"), "id", NGX_DECLINED, NULL },
    { ngx_string("&&&"), "id", NGX_DECLINED, NULL },
    { ngx_string("=1"), "id", NGX_DECLINED, NULL },
    { ngx_string("a=1&"), "id", NGX_DECLINED, NULL },
    { ngx_string("&&id=1&&"), "id", NGX_OK, "1" },
    { ngx_string("&id=1"), "id", NGX_OK, "1" },
    { ngx_string("id=1&"), "id", NGX_OK, "1" },

    /* a ";" is no separator */
    { ngx_string("a=1;id=2"), "id", NGX_DECLINED, NULL },
    { ngx_string("id=1;a=2"), "id", NGX_OK, "1;a=2" },
};


static void
test_form_arg(void **state)
{
    u_char        *in;
    ngx_int_t      rc;
    ngx_str_t      value;
    ngx_uint_t     i, failed;
    t_arg_case_t  *t;

    failed = 0;

    for (i = 0; i < t_nelts(t_arg_cases); i++) {
        t = &t_arg_cases[i];

        /* an exact-size copy, nothing after it to read */

        in = malloc(t->in.len ? t->in.len : 1);
        assert_non_null(in);
        ngx_memcpy(in, t->in.data, t->in.len);

        value.data = (u_char *) "unset";
        value.len = 5;

        rc = ngx_http_loyalty_form_arg(in, t->in.len, (u_char *) t->name,
                                       strlen(t->name), &value);

        if (rc != t->rc
            || (rc == NGX_OK
                && (value.len != strlen(t->value)
                    || ngx_memcmp(value.data, t->value, value.len) != 0)))
        {
            print_error("form_arg(\"%s\", \"%s\") = %ld, \"%.*s\", "
                        "expected %ld, \"%s\"\n",
                        t_escape(t->in.data, t->in.len), t->name, (long) rc,
                        rc == NGX_OK ? (int) value.len : 0,
                        rc == NGX_OK ? (char *) value.data : "",
                        (long) t->rc, t->value ? t->value : "(none)");
            failed++;

        } else if (rc == NGX_OK
                   && (value.data < in
                       || value.data + value.len > in + t->in.len
                       || (value.data + value.len < in + t->in.len
                           && value.data[value.len] != '&')
                       || (value.len && value.data[-1] != '=')))
        {
            /* the value is the input's own bytes, "=" before, "&" after */

            print_error("form_arg(\"%s\", \"%s\"): value not in place\n",
                        t_escape(t->in.data, t->in.len), t->name);
            failed++;

        } else if (rc == NGX_DECLINED
                   && (value.len != 5
                       || ngx_memcmp(value.data, "unset", 5) != 0))
        {
            print_error("form_arg(\"%s\", \"%s\"): declined, value set\n",
                        t_escape(t->in.data, t->in.len), t->name);
            failed++;
        }

        free(in);
    }

    assert_int_equal(failed, 0);
}


/* ngx_http_loyalty_form_decode(): "+" is a space, "%XX" a byte */

typedef struct {
    ngx_str_t                   in;
    ngx_int_t                   rc;
    ngx_str_t                   out;
} t_decode_case_t;


static t_decode_case_t  t_decode_cases[] = {
    { ngx_string(""), NGX_OK, ngx_string("") },
    { ngx_string("alice"), NGX_OK, ngx_string("alice") },
    { ngx_string("a+b"), NGX_OK, ngx_string("a b") },
    { ngx_string("+"), NGX_OK, ngx_string(" ") },
    { ngx_string("++a++"), NGX_OK, ngx_string("  a  ") },
    { ngx_string("%41"), NGX_OK, ngx_string("A") },
    { ngx_string("%4a"), NGX_OK, ngx_string("J") },
    { ngx_string("%4A"), NGX_OK, ngx_string("J") },
    { ngx_string("%aF%Af"), NGX_OK, ngx_string("\xaf\xaf") },
    { ngx_string("%ff%FF"), NGX_OK, ngx_string("\xff\xff") },
    { ngx_string("%00"), NGX_OK, { 1, (u_char *) "\0" } },
    { ngx_string("a%00b"), NGX_OK, { 3, (u_char *) "a\0b" } },
    { ngx_string("%2B"), NGX_OK, ngx_string("+") },
    { ngx_string("%2b+%2B"), NGX_OK, ngx_string("+ +") },
    { ngx_string("%20"), NGX_OK, ngx_string(" ") },
    { ngx_string("%25"), NGX_OK, ngx_string("%") },
    { ngx_string("%2541"), NGX_OK, ngx_string("%41") },
    { ngx_string("%26%3D"), NGX_OK, ngx_string("&=") },
    { ngx_string("alice%40example.com"), NGX_OK,
      ngx_string("alice@example.com") },
    { ngx_string("caf%C3%A9"), NGX_OK, ngx_string("caf\xc3\xa9") },
    { ngx_string("late+delivery%21"), NGX_OK, ngx_string("late delivery!") },
    { ngx_string("a%20b+c"), NGX_OK, ngx_string("a b c") },
    { ngx_string("%0a%0D"), NGX_OK, ngx_string("\n\r") },
    { ngx_string("x%41"), NGX_OK, ngx_string("xA") },
    { ngx_string("&=;"), NGX_OK, ngx_string("&=;") },

    /* "%" without two hex digits, the end of the input included */
    { ngx_string("%"), NGX_ERROR, ngx_null_string },
    { ngx_string("a%"), NGX_ERROR, ngx_null_string },
    { ngx_string("%4"), NGX_ERROR, ngx_null_string },
    { ngx_string("a%4"), NGX_ERROR, ngx_null_string },
    { ngx_string("%41%"), NGX_ERROR, ngx_null_string },
    { ngx_string("%41%4"), NGX_ERROR, ngx_null_string },
    { ngx_string("100%"), NGX_ERROR, ngx_null_string },
    { ngx_string("%%"), NGX_ERROR, ngx_null_string },
    { ngx_string("%%41"), NGX_ERROR, ngx_null_string },
    { ngx_string("%4g"), NGX_ERROR, ngx_null_string },
    { ngx_string("%g4"), NGX_ERROR, ngx_null_string },
    { ngx_string("%G0"), NGX_ERROR, ngx_null_string },
    { ngx_string("%0G"), NGX_ERROR, ngx_null_string },
    { ngx_string("%@0"), NGX_ERROR, ngx_null_string },
    { ngx_string("%0`"), NGX_ERROR, ngx_null_string },
    { ngx_string("%0/"), NGX_ERROR, ngx_null_string },
    { ngx_string("%0:"), NGX_ERROR, ngx_null_string },
    { ngx_string("% 41"), NGX_ERROR, ngx_null_string },
    { ngx_string("%+41"), NGX_ERROR, ngx_null_string },
    { ngx_string("%-1"), NGX_ERROR, ngx_null_string },
    { ngx_string("%x41"), NGX_ERROR, ngx_null_string },
    { { 3, (u_char *) "%\0" "0" }, NGX_ERROR, ngx_null_string },
    { ngx_string("%\xc1" "1"), NGX_ERROR, ngx_null_string },
    { ngx_string("%a\xc6"), NGX_ERROR, ngx_null_string },
    { ngx_string("ok+%zz"), NGX_ERROR, ngx_null_string },
};


static void
test_form_decode(void **state)
{
    u_char           *in, *out;
    size_t            n;
    ngx_int_t         rc;
    ngx_uint_t        i, c, failed;
    t_decode_case_t  *t;
    u_char            esc[3], dst[4];

    static char       hex[] = "0123456789abcdef", uhex[] = "0123456789ABCDEF";

    failed = 0;

    for (i = 0; i < t_nelts(t_decode_cases); i++) {
        t = &t_decode_cases[i];

        /* exact-size buffers: the destination has room for len bytes */

        in = malloc(t->in.len ? t->in.len : 1);
        out = malloc(t->in.len ? t->in.len : 1);
        assert_non_null(in);
        assert_non_null(out);
        ngx_memcpy(in, t->in.data, t->in.len);

        n = 0xdead;

        rc = ngx_http_loyalty_form_decode(out, in, t->in.len, &n);

        if (rc != t->rc
            || (rc == NGX_OK
                && (n != t->out.len
                    || ngx_memcmp(out, t->out.data, n) != 0)))
        {
            print_error("form_decode(\"%s\") = %ld, %zu bytes,",
                        t_escape(t->in.data, t->in.len), (long) rc,
                        rc == NGX_OK ? n : 0);
            print_error(" \"%s\",", rc == NGX_OK ? t_escape(out, n) : "");
            print_error(" expected %ld, \"%s\"\n", (long) t->rc,
                        t_escape(t->out.data, t->out.len));
            failed++;
        }

        free(in);
        free(out);
    }

    /* every byte value as %xx and %XX; "+" and other bytes as they are */

    for (c = 0; c < 256; c++) {
        esc[0] = '%';
        esc[1] = hex[c >> 4];
        esc[2] = hex[c & 0xf];

        ngx_memset(dst, 0xa5, sizeof(dst));

        if (ngx_http_loyalty_form_decode(dst, esc, 3, &n) != NGX_OK
            || n != 1 || dst[0] != c || dst[1] != 0xa5)
        {
            print_error("form_decode(%%%02x) wrong\n", (unsigned) c);
            failed++;
        }

        esc[1] = uhex[c >> 4];
        esc[2] = uhex[c & 0xf];

        if (ngx_http_loyalty_form_decode(dst, esc, 3, &n) != NGX_OK
            || n != 1 || dst[0] != c)
        {
            print_error("form_decode(%%%02X) wrong\n", (unsigned) c);
            failed++;
        }

        /* a hex digit is one of 0-9 a-f A-F and nothing else */

        esc[1] = (u_char) c;
        esc[2] = '0';

        rc = ngx_http_loyalty_form_decode(dst, esc, 3, &n);

        if (rc != (((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')
                    || (c >= 'A' && c <= 'F')) ? NGX_OK : NGX_ERROR))
        {
            print_error("form_decode(%%\\x%02x0) = %ld\n", (unsigned) c,
                        (long) rc);
            failed++;
        }

        esc[1] = '0';
        esc[2] = (u_char) c;

        rc = ngx_http_loyalty_form_decode(dst, esc, 3, &n);

        if (rc != (((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')
                    || (c >= 'A' && c <= 'F')) ? NGX_OK : NGX_ERROR))
        {
            print_error("form_decode(%%0\\x%02x) = %ld\n", (unsigned) c,
                        (long) rc);
            failed++;
        }

        if (c != '%') {
            esc[0] = (u_char) c;

            if (ngx_http_loyalty_form_decode(dst, esc, 1, &n) != NGX_OK
                || n != 1 || dst[0] != (c == '+' ? ' ' : c))
            {
                print_error("form_decode(\\x%02x) wrong\n", (unsigned) c);
                failed++;
            }
        }
    }

    assert_int_equal(failed, 0);
}


/* the API's way: form_arg, then form_decode of the value, then a check */

static void
test_form_arg_decode(void **state)
{
    u_char     buf[64];
    size_t     n;
    ngx_str_t  v;

    static u_char  q[] =
        "customer=alice%40example.com&points=-25&order=o%2F1"
        "&reason=late+delivery+%E2%82%AC&idx=x";

    assert_int_equal(ngx_http_loyalty_form_arg(q, sizeof(q) - 1,
                                               (u_char *) "customer", 8, &v),
                     NGX_OK);
    assert_int_equal(ngx_http_loyalty_form_decode(buf, v.data, v.len, &n),
                     NGX_OK);
    assert_int_equal(n, 17);
    assert_memory_equal(buf, "alice@example.com", n);
    assert_int_equal(ngx_http_loyalty_valid_id(buf, n), NGX_OK);

    assert_int_equal(ngx_http_loyalty_form_arg(q, sizeof(q) - 1,
                                               (u_char *) "order", 5, &v),
                     NGX_OK);
    assert_int_equal(ngx_http_loyalty_form_decode(buf, v.data, v.len, &n),
                     NGX_OK);
    assert_int_equal(n, 3);
    assert_memory_equal(buf, "o/1", n);
    assert_int_equal(ngx_http_loyalty_valid_order(buf, n), NGX_OK);

    assert_int_equal(ngx_http_loyalty_form_arg(q, sizeof(q) - 1,
                                               (u_char *) "reason", 6, &v),
                     NGX_OK);
    assert_int_equal(ngx_http_loyalty_form_decode(buf, v.data, v.len, &n),
                     NGX_OK);
    assert_int_equal(n, sizeof("late delivery \xe2\x82\xac") - 1);
    assert_memory_equal(buf, "late delivery \xe2\x82\xac", n);
    assert_int_equal(ngx_http_loyalty_valid_reason(buf, n), NGX_OK);

    assert_int_equal(ngx_http_loyalty_form_arg(q, sizeof(q) - 1,
                                               (u_char *) "id", 2, &v),
                     NGX_DECLINED);
}


int
main(void)
{
    const struct CMUnitTest  tests[] = {
        cmocka_unit_test(test_valid_id_table),
        cmocka_unit_test(test_valid_id_length),
        cmocka_unit_test(test_valid_id_bytes),
        cmocka_unit_test(test_parse_uint),
        cmocka_unit_test(test_parse_fixed),
        cmocka_unit_test(test_parse_amount),
        cmocka_unit_test(test_parse_redeem),
        cmocka_unit_test(test_earned),
        cmocka_unit_test(test_sign),
        cmocka_unit_test(test_verify),
        cmocka_unit_test(test_select_tier),
        cmocka_unit_test(test_find_tier),
        cmocka_unit_test(test_select_offer_conditions),
        cmocka_unit_test(test_select_offer_first),
        cmocka_unit_test(test_select_offer_callback),
        cmocka_unit_test(test_offer_param),
        cmocka_unit_test(test_offer_param_values),
        cmocka_unit_test(test_write_uint),
        cmocka_unit_test(test_valid_text),
        cmocka_unit_test(test_json_string),
        cmocka_unit_test(test_json_field),
        cmocka_unit_test(test_label_value),
        cmocka_unit_test(test_key_slot),
        cmocka_unit_test(test_parse_redirect),
        cmocka_unit_test(test_parse_pending),
        cmocka_unit_test(test_parse_pending_long),
        cmocka_unit_test(test_parse_signed),
        cmocka_unit_test(test_valid_order),
        cmocka_unit_test(test_valid_reason),
        cmocka_unit_test(test_form_arg),
        cmocka_unit_test(test_form_decode),
        cmocka_unit_test(test_form_arg_decode),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
