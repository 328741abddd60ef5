
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


/*
 * Points redeemed: ngx_http_loyalty_parse_redeem() accepts exactly 1 to 18
 * decimal digits, and the value is theirs.  ngx_http_loyalty_parse_uint(),
 * which it and the Redis counters rest on, accepts 1 to 19 digits up to
 * 2^63 - 1.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include "ngx_http_loyalty_rules.h"
#include "fuzz.h"


/* 1 to max digits, at most INT64_MAX; the value by long division */

static int
ref_uint(const u_char *p, size_t len, size_t max, uint64_t *value)
{
    size_t    i;
    uint64_t  v;

    if (len < 1 || len > max) {
        return 0;
    }

    for (i = 0; i < len; i++) {
        if (p[i] < '0' || p[i] > '9') {
            return 0;
        }
    }

    /* "9223372036854775807" is the largest 19-digit value accepted */

    if (len == 19 && memcmp(p, "9223372036854775807", 19) > 0) {
        return 0;
    }

    v = 0;

    for (i = 0; i < len; i++) {
        v = v * 10 + (uint64_t) (p[i] - '0');
    }

    *value = v;

    return 1;
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    u_char     *v;
    uint64_t    value, ref;
    ngx_int_t   rc;

    v = malloc(size ? size : 1);
    check(v != NULL);
    memcpy(v, data, size);

    value = 0xdeadbeef;
    rc = ngx_http_loyalty_parse_redeem(v, size, &value);
    check(rc == NGX_OK || rc == NGX_ERROR);
    check((rc == NGX_OK) == ref_uint(data, size, 18, &ref));

    if (rc == NGX_OK) {
        check(value == ref);
        check(value < 1000000000000000000ULL);

    } else {
        check(value == 0xdeadbeef);
    }

    value = 0xdeadbeef;
    rc = ngx_http_loyalty_parse_uint(v, size, &value);
    check(rc == NGX_OK || rc == NGX_ERROR);
    check((rc == NGX_OK) == ref_uint(data, size, 19, &ref));

    if (rc == NGX_OK) {
        check(value == ref);
        check(value <= (uint64_t) INT64_MAX);

    } else {
        check(value == 0xdeadbeef);
    }

    free(v);

    return 0;
}
