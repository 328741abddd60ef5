
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


/*
 * Order ids, and the ids of adjustments: 1 to 128 bytes, each of them
 * 0x21 to 0x7e.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include "fuzz.h"
#include "ngx_http_loyalty_rules.h"


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


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    ngx_int_t  rc;
    ngx_str_t  order;

    order.len = size;
    order.data = malloc(size ? size : 1);
    check(order.data != NULL);
    memcpy(order.data, data, size);

    rc = ngx_http_loyalty_valid_order(order.data, order.len);
    check(rc == NGX_OK || rc == NGX_ERROR);
    check((rc == NGX_OK) == ref_valid_order(data, size));
    check(order.len == size);

    free(order.data);

    return 0;
}
