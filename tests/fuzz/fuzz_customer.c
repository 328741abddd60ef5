
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


/*
 * The customer value: ngx_http_loyalty_valid_id() and
 * ngx_http_loyalty_verify() on arbitrary bytes, checked against a
 * reference written from the specification, with the HMAC computed here
 * by OpenSSL directly.  Then the input, taken as an id, is signed with
 * ngx_http_loyalty_sign() and must verify, under either secret, and must
 * not once the signature is altered.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include "ngx_http_loyalty_rules.h"
#include "fuzz.h"


static ngx_str_t  secrets[] = {
    ngx_string("fuzz-secret-one"),
    ngx_string("an older secret, still accepted")
};


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


static void
ref_sign(ngx_str_t *secret, const u_char *id, size_t len, u_char *hex)
{
    size_t          i;
    unsigned int    n;
    unsigned char   md[EVP_MAX_MD_SIZE];

    check(HMAC(EVP_sha256(), secret->data, (int) secret->len, id, len, md, &n)
          != NULL);
    check(n == 32);

    for (i = 0; i < n; i++) {
        sprintf((char *) hex + 2 * i, "%02x", md[i]);
    }
}


/* "<id>.<64 lowercase hex>", the HMAC of id under one of the secrets */

static int
ref_verify(const u_char *p, size_t len, ngx_uint_t nsecrets)
{
    size_t      i, idlen;
    u_char      hex[65];
    ngx_uint_t  k;

    if (len < 66 || p[len - 65] != '.') {
        return 0;
    }

    idlen = len - 65;

    for (i = len - 64; i < len; i++) {
        if (!((p[i] >= '0' && p[i] <= '9') || (p[i] >= 'a' && p[i] <= 'f'))) {
            return 0;
        }
    }

    for (k = 0; k < nsecrets; k++) {
        ref_sign(&secrets[k], p, idlen, hex);

        if (memcmp(hex, p + idlen + 1, 64) == 0) {
            return 1;
        }
    }

    return 0;
}


/* verify as the handler calls it: value and id are the same ngx_str_t */

static ngx_int_t
verify(u_char *p, size_t len, ngx_uint_t nsecrets, ngx_str_t *id)
{
    ngx_int_t  rc;

    id->data = p;
    id->len = len;

    rc = ngx_http_loyalty_verify(id, secrets, nsecrets, id);

    if (rc == NGX_OK) {
        check(id->data == p);
        check(id->len == len - 65);
    }

    return rc;
}


static void
check_signed(const u_char *data, size_t size, ngx_uint_t k)
{
    u_char     *v, sig[NGX_HTTP_LOYALTY_SIG_LEN], ref[65];
    size_t      len, i;
    ngx_str_t   id;

    ngx_http_loyalty_sign(&secrets[k], (u_char *) data, size, sig);

    ref_sign(&secrets[k], data, size, ref);
    check(memcmp(sig, ref, NGX_HTTP_LOYALTY_SIG_LEN) == 0);

    /* an exact-size heap copy: any read past the value is caught */

    len = size + 1 + NGX_HTTP_LOYALTY_SIG_LEN;
    v = malloc(len);
    check(v != NULL);

    memcpy(v, data, size);
    v[size] = '.';
    memcpy(v + size + 1, sig, NGX_HTTP_LOYALTY_SIG_LEN);

    if (size == 0) {
        /* ".<sig>" is one byte short of the smallest value */
        check(verify(v, len, 2, &id) == NGX_ERROR);
        free(v);
        return;
    }

    check(verify(v, len, 2, &id) == NGX_OK);
    check(id.len == size && memcmp(id.data, data, size) == 0);

    /* only the right secret, alone */

    check(verify(v, len, 0, &id) == NGX_ERROR);

    if (k == 0) {
        check(verify(v, len, 1, &id) == NGX_OK);
    }

    /* one byte of the signature altered: a digit, a letter, upper case */

    i = size + 1 + (data[0] % NGX_HTTP_LOYALTY_SIG_LEN);

    v[i] = (v[i] == '0') ? '1' : '0';
    check(verify(v, len, 2, &id) == NGX_ERROR);

    v[i] = (sig[i - size - 1] == 'f') ? 'e' : 'f';
    check(verify(v, len, 2, &id) == NGX_ERROR);

    v[i] = sig[i - size - 1];

    if (v[i] >= 'a' && v[i] <= 'f') {
        v[i] -= 'a' - 'A';
        check(verify(v, len, 2, &id) == NGX_ERROR);
        v[i] = sig[i - size - 1];
    }

    /* the signature one byte short (the dot moves into the id) */

    check(verify(v, len - 1, 2, &id) == NGX_ERROR);

    free(v);
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    u_char     *v;
    ngx_int_t   rc;
    ngx_str_t   id;

    /* exact-size heap copy: data itself may sit inside a larger buffer */

    v = malloc(size ? size : 1);
    check(v != NULL);
    memcpy(v, data, size);

    rc = ngx_http_loyalty_valid_id(v, size);
    check((rc == NGX_OK) == ref_valid_id(data, size));
    check(rc == NGX_OK || rc == NGX_ERROR);

    rc = verify(v, size, 2, &id);
    check(rc == NGX_OK || rc == NGX_ERROR);
    check((rc == NGX_OK) == ref_verify(data, size, 2));

    /* no secret, nothing verifies */
    check(verify(v, size, 0, &id) == NGX_ERROR);

    free(v);

    /* the input as an id: signed, it verifies (the handler checks ids after
     * verification, so any bytes, dots included, must round-trip) */

    if (size <= 4096) {
        check_signed(data, size, size % 2);
    }

    return 0;
}
