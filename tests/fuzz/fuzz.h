
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


#ifndef _NGX_HTTP_LOYALTY_FUZZ_H_INCLUDED_
#define _NGX_HTTP_LOYALTY_FUZZ_H_INCLUDED_


#include <stdio.h>
#include <stdlib.h>


/* an invariant of the code under test: abort, and libFuzzer saves the input */

#define check(expr)                                                           \
    do {                                                                      \
        if (!(expr)) {                                                        \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, \
                    #expr);                                                   \
            abort();                                                          \
        }                                                                     \
    } while (0)


/* ngx_shim.c: the largest pool allocation allowed, 0: any */
extern size_t  ngx_shim_alloc_max;


#endif /* _NGX_HTTP_LOYALTY_FUZZ_H_INCLUDED_ */
