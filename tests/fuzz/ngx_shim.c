
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


/*
 * Just enough of nginx's core for ngx_http_loyalty_proto.c to link into a
 * fuzzer without any nginx object: pools, ngx_hex_dump() and
 * ngx_sha1_*().  Declared in fuzz.h.
 *
 * A pool is a list of separately malloc()ed blocks, freed by
 * ngx_reset_pool() and ngx_destroy_pool(): AddressSanitizer then sees
 * every allocation on its own, with redzones, and every use after a reset.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_sha1.h>
#include <openssl/evp.h>


static void *ngx_shim_alloc(ngx_pool_t *pool, size_t size);


/*
 * The largest single allocation a fuzzer allows (0: any), set per input:
 * replies are built from the bytes received, so an allocation far larger
 * than the input is a bug (a declared size trusted before the data came).
 */
size_t  ngx_shim_alloc_max;


ngx_pool_t *
ngx_create_pool(size_t size, ngx_log_t *log)
{
    ngx_pool_t  *pool;

    pool = calloc(1, sizeof(ngx_pool_t));
    if (pool == NULL) {
        return NULL;
    }

    pool->max = size;
    pool->log = log;

    return pool;
}


void
ngx_reset_pool(ngx_pool_t *pool)
{
    ngx_pool_large_t  *l, *next;

    for (l = pool->large; l; l = next) {
        next = l->next;
        free(l->alloc);
        free(l);
    }

    pool->large = NULL;
}


void
ngx_destroy_pool(ngx_pool_t *pool)
{
    ngx_reset_pool(pool);
    free(pool);
}


void *
ngx_palloc(ngx_pool_t *pool, size_t size)
{
    return ngx_shim_alloc(pool, size);
}


void *
ngx_pnalloc(ngx_pool_t *pool, size_t size)
{
    return ngx_shim_alloc(pool, size);
}


void *
ngx_pcalloc(ngx_pool_t *pool, size_t size)
{
    void  *p;

    p = ngx_shim_alloc(pool, size);
    if (p) {
        ngx_memzero(p, size);
    }

    return p;
}


static void *
ngx_shim_alloc(ngx_pool_t *pool, size_t size)
{
    void              *p;
    ngx_pool_large_t  *l;

    if (ngx_shim_alloc_max && size > ngx_shim_alloc_max) {
        fprintf(stderr, "ngx_shim: a pool allocation of %zu bytes, "
                "more than the %zu allowed for this input\n",
                size, ngx_shim_alloc_max);
        abort();
    }

    l = malloc(sizeof(ngx_pool_large_t));
    if (l == NULL) {
        return NULL;
    }

    /* never malloc(0): nginx returns a usable pointer for size 0 too */

    p = malloc(size ? size : 1);
    if (p == NULL) {
        free(l);
        return NULL;
    }

    l->alloc = p;
    l->next = pool->large;
    pool->large = l;

    return p;
}


u_char *
ngx_hex_dump(u_char *dst, u_char *src, size_t len)
{
    static u_char  hex[] = "0123456789abcdef";

    while (len--) {
        *dst++ = hex[*src >> 4];
        *dst++ = hex[*src++ & 0xf];
    }

    return dst;
}


/* ngx_sha1_t holds a pointer to an OpenSSL digest context */

void
ngx_sha1_init(ngx_sha1_t *ctx)
{
    EVP_MD_CTX  *md;

    md = EVP_MD_CTX_new();

    if (md == NULL || EVP_DigestInit_ex(md, EVP_sha1(), NULL) != 1) {
        abort();
    }

    ngx_memcpy(ctx->buffer, &md, sizeof(md));
}


void
ngx_sha1_update(ngx_sha1_t *ctx, const void *data, size_t size)
{
    EVP_MD_CTX  *md;

    ngx_memcpy(&md, ctx->buffer, sizeof(md));

    if (EVP_DigestUpdate(md, data, size) != 1) {
        abort();
    }
}


void
ngx_sha1_final(u_char result[20], ngx_sha1_t *ctx)
{
    EVP_MD_CTX  *md;

    ngx_memcpy(&md, ctx->buffer, sizeof(md));

    if (EVP_DigestFinal_ex(md, result, NULL) != 1) {
        abort();
    }

    EVP_MD_CTX_free(md);
}
