
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


/*
 * Unit tests of the pure logic in ngx_http_loyalty_rules.c: customer ids
 * and their signatures, numbers, points earned, tiers, offers, the
 * loyalty_offer parameters, the escaping of JSON strings and Prometheus
 * labels, and Redis Cluster's key slots and redirections.  Table-driven:
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
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
