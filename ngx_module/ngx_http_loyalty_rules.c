
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include "ngx_http_loyalty_rules.h"


static ngx_int_t ngx_http_loyalty_parse_decimal(u_char *p, size_t len,
    ngx_uint_t digits, uint64_t *value);
static ngx_int_t ngx_http_loyalty_key(ngx_str_t *param, const char *key,
    size_t len, ngx_str_t *value);


/* A-Z a-z 0-9 . _ - @ : + */
static uint32_t  ngx_http_loyalty_id_chars[] = {
    0x00000000, /* 0000 0000 0000 0000  0000 0000 0000 0000 */

                /* ?>=< ;:98 7654 3210  /.-, +*)( '&%$ #"!  */
    0x07ff6800, /* 0000 0111 1111 1111  0110 1000 0000 0000 */

                /* _^]\ [ZYX WVUT SRQP  ONML KJIH GFED CBA@ */
    0x87ffffff, /* 1000 0111 1111 1111  1111 1111 1111 1111 */

                /*  ~}| {zyx wvut srqp  onml kjih gfed cba` */
    0x07fffffe, /* 0000 0111 1111 1111  1111 1111 1111 1110 */

    0x00000000, 0x00000000, 0x00000000, 0x00000000
};


ngx_int_t
ngx_http_loyalty_valid_id(u_char *p, size_t len)
{
    u_char  *last;

    if (len == 0 || len > NGX_HTTP_LOYALTY_ID_MAX) {
        return NGX_ERROR;
    }

    for (last = p + len; p < last; p++) {
        if (!(ngx_http_loyalty_id_chars[*p >> 5] & (1U << (*p & 0x1f)))) {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/*
 * A signed customer value "<id>.<sig>", split at the last dot, where sig
 * is the lowercase hex HMAC-SHA256 of id under one of the secrets.  On
 * NGX_OK "id" is set; the signature is compared in constant time.
 */

ngx_int_t
ngx_http_loyalty_verify(ngx_str_t *value, ngx_str_t *secrets,
    ngx_uint_t nsecrets, ngx_str_t *id)
{
    u_char      *p, *sig;
    ngx_int_t    rc;
    ngx_uint_t   i;
    u_char       expect[NGX_HTTP_LOYALTY_SIG_LEN];

    if (value->len < 1 + 1 + NGX_HTTP_LOYALTY_SIG_LEN) {
        return NGX_ERROR;
    }

    sig = value->data + value->len - NGX_HTTP_LOYALTY_SIG_LEN;

    if (sig[-1] != '.') {
        return NGX_ERROR;
    }

    for (p = sig; p < value->data + value->len; p++) {
        if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f'))) {
            return NGX_ERROR;
        }
    }

    id->data = value->data;
    id->len = sig - 1 - value->data;

    rc = NGX_ERROR;

    for (i = 0; i < nsecrets; i++) {
        ngx_http_loyalty_sign(&secrets[i], id->data, id->len, expect);

        if (CRYPTO_memcmp(expect, sig, NGX_HTTP_LOYALTY_SIG_LEN) == 0) {
            rc = NGX_OK;
        }
    }

    return rc;
}


/* sig: NGX_HTTP_LOYALTY_SIG_LEN lowercase hex digits */

void
ngx_http_loyalty_sign(ngx_str_t *secret, u_char *id, size_t len, u_char *sig)
{
    u_char         *p;
    unsigned int    n, i;
    unsigned char   md[EVP_MAX_MD_SIZE];

    static u_char   hex[] = "0123456789abcdef";

    n = 0;

    if (HMAC(EVP_sha256(), secret->data, (int) secret->len, id, len, md, &n)
        == NULL || n != NGX_HTTP_LOYALTY_SIG_LEN / 2)
    {
        /* cannot happen with OpenSSL's SHA-256; never verifies */
        ngx_memset(sig, 'x', NGX_HTTP_LOYALTY_SIG_LEN);
        return;
    }

    for (p = sig, i = 0; i < n; i++) {
        *p++ = hex[md[i] >> 4];
        *p++ = hex[md[i] & 0xf];
    }
}


/*
 * The "pending" field of a record: "<release>:<points>[,...]", each a
 * count below 2^53.  Points whose release time is not after "now" are
 * due (released, though no write may have stored them so yet); the others
 * are locked, "next" being the earliest of their release times, 0 when
 * none.  An empty field holds nothing.  NGX_ERROR when it is not such a
 * list, or its sums reach 2^53.
 */

ngx_int_t
ngx_http_loyalty_parse_pending(u_char *p, size_t len, time_t now,
    uint64_t *due, uint64_t *locked, time_t *next)
{
    u_char    *last, *colon, *comma, *digits;
    uint64_t   release, points;

    *due = 0;
    *locked = 0;
    *next = 0;

    if (len == 0) {
        return NGX_OK;
    }

    last = p + len;

    if (last[-1] == ',') {
        return NGX_ERROR;
    }

    while (p < last) {

        for (comma = p; comma < last && *comma != ','; comma++) {
            /* void */
        }

        for (colon = p; colon < comma && *colon != ':'; colon++) {
            /* void */
        }

        if (colon == comma) {
            return NGX_ERROR;
        }

        /* leading zeros do not count, as in the scripts */

        for (digits = colon + 1; digits < comma - 1 && *digits == '0';
             digits++)
        {
            /* void */
        }

        for ( /* void */ ; p < colon - 1 && *p == '0'; p++) {
            /* void */
        }

        if (colon - p > NGX_HTTP_LOYALTY_PENDING_DIGITS
            || comma - digits > NGX_HTTP_LOYALTY_PENDING_DIGITS
            || ngx_http_loyalty_parse_uint(p, colon - p, &release) != NGX_OK
            || ngx_http_loyalty_parse_uint(digits, comma - digits, &points)
               != NGX_OK
            || release >= NGX_HTTP_LOYALTY_EXACT
            || points >= NGX_HTTP_LOYALTY_EXACT)
        {
            return NGX_ERROR;
        }

        if ((time_t) release <= now) {
            *due += points;

        } else {
            *locked += points;

            if (*next == 0 || (time_t) release < *next) {
                *next = (time_t) release;
            }
        }

        if (*due >= NGX_HTTP_LOYALTY_EXACT
            || *locked >= NGX_HTTP_LOYALTY_EXACT)
        {
            return NGX_ERROR;
        }

        p = comma + 1;
    }

    return NGX_OK;
}


/*
 * A decimal integer of 1 to 19 digits, no sign, no blanks; NGX_ERROR on
 * anything else or on overflow of 2^63 - 1.
 */

ngx_int_t
ngx_http_loyalty_parse_uint(u_char *p, size_t len, uint64_t *value)
{
    uint64_t  v;
    u_char   *last;

    if (len == 0 || len > 19) {
        return NGX_ERROR;
    }

    v = 0;

    for (last = p + len; p < last; p++) {
        if (*p < '0' || *p > '9') {
            return NGX_ERROR;
        }

        v = v * 10 + (*p - '0');
    }

    if (v > (uint64_t) INT64_MAX) {
        return NGX_ERROR;
    }

    *value = v;

    return NGX_OK;
}


/*
 * A rate or a multiplier: a non-negative decimal of up to 6 integer and
 * 4 fractional digits ("1", "0.1", "2.5", "1.0005"), scaled by 10^4.
 */

ngx_int_t
ngx_http_loyalty_parse_fixed(u_char *p, size_t len, uint64_t *value)
{
    return ngx_http_loyalty_parse_decimal(p, len,
                                          NGX_HTTP_LOYALTY_FIXED_DIGITS,
                                          value);
}


/* an amount: ^[0-9]{1,12}(\.[0-9]{1,4})?$, scaled by 10^4 */

ngx_int_t
ngx_http_loyalty_parse_amount(u_char *p, size_t len, uint64_t *value)
{
    return ngx_http_loyalty_parse_decimal(p, len,
                                          NGX_HTTP_LOYALTY_AMOUNT_DIGITS,
                                          value);
}


/* points redeemed: ^[0-9]{1,18}$ */

ngx_int_t
ngx_http_loyalty_parse_redeem(u_char *p, size_t len, uint64_t *value)
{
    if (len > NGX_HTTP_LOYALTY_REDEEM_DIGITS) {
        return NGX_ERROR;
    }

    return ngx_http_loyalty_parse_uint(p, len, value);
}


/* points of an adjustment: ^[+-]?[0-9]{1,18}$ */

ngx_int_t
ngx_http_loyalty_parse_signed(u_char *p, size_t len, uint64_t *value,
    ngx_uint_t *negative)
{
    *negative = 0;

    if (len && (*p == '-' || *p == '+')) {
        *negative = (*p == '-');
        p++;
        len--;
    }

    return ngx_http_loyalty_parse_redeem(p, len, value);
}


/* an order or adjustment id: 1 to 128 printable ASCII characters, no blanks */

ngx_int_t
ngx_http_loyalty_valid_order(u_char *p, size_t len)
{
    u_char  *last;

    if (len == 0 || len > NGX_HTTP_LOYALTY_ORDER_MAX) {
        return NGX_ERROR;
    }

    for (last = p + len; p < last; p++) {
        if (*p <= ' ' || *p >= 0x7f) {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/*
 * The reason of a refund or an adjustment: 1 to 200 characters of UTF-8,
 * none of them a control character.
 */

ngx_int_t
ngx_http_loyalty_valid_reason(u_char *p, size_t len)
{
    u_char      *last;
    uint32_t     c, min;
    ngx_uint_t   n, chars;

    chars = 0;

    for (last = p + len; p < last; chars++) {

        c = *p++;

        if (c < 0x80) {
            if (c < 0x20 || c == 0x7f) {
                return NGX_ERROR;
            }

            continue;
        }

        if (c >= 0xc2 && c <= 0xdf) {
            n = 1;
            c &= 0x1f;
            min = 0x80;

        } else if (c >= 0xe0 && c <= 0xef) {
            n = 2;
            c &= 0x0f;
            min = 0x800;

        } else if (c >= 0xf0 && c <= 0xf4) {
            n = 3;
            c &= 0x07;
            min = 0x10000;

        } else {
            return NGX_ERROR;
        }

        if ((size_t) (last - p) < n) {
            return NGX_ERROR;
        }

        while (n--) {
            if ((*p & 0xc0) != 0x80) {
                return NGX_ERROR;
            }

            c = (c << 6) | (*p++ & 0x3f);
        }

        /* overlong forms, surrogates, beyond U+10FFFF, C1 controls */

        if (c < min || (c >= 0xd800 && c <= 0xdfff) || c > 0x10ffff
            || c < 0xa0)
        {
            return NGX_ERROR;
        }
    }

    if (chars == 0 || chars > NGX_HTTP_LOYALTY_REASON_MAX) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * The value of the first argument "name" of a query string or an
 * application/x-www-form-urlencoded body, still escaped: NGX_DECLINED
 * when there is none.
 */

ngx_int_t
ngx_http_loyalty_form_arg(u_char *p, size_t len, u_char *name, size_t nlen,
    ngx_str_t *value)
{
    u_char  *last, *end, *eq;

    /* no query string: no data either */

    if (len == 0) {
        return NGX_DECLINED;
    }

    for (last = p + len; p < last; p = end + 1) {

        for (end = p; end < last && *end != '&'; end++) {
            /* void */
        }

        for (eq = p; eq < end && *eq != '='; eq++) {
            /* void */
        }

        if ((size_t) (eq - p) == nlen && ngx_memcmp(p, name, nlen) == 0) {
            value->data = (eq < end) ? eq + 1 : end;
            value->len = end - value->data;
            return NGX_OK;
        }
    }

    return NGX_DECLINED;
}


/*
 * Form decoding: "+" is a space and "%XX" a byte.  The destination has
 * room for len bytes; NGX_ERROR on a "%" not followed by two hex digits.
 */

ngx_int_t
ngx_http_loyalty_form_decode(u_char *dst, u_char *src, size_t len,
    size_t *n)
{
    u_char     c, *d, *last;
    ngx_int_t  i, h;

    d = dst;

    for (last = src + len; src < last; src++) {

        if (*src == '+') {
            *d++ = ' ';
            continue;
        }

        if (*src != '%') {
            *d++ = *src;
            continue;
        }

        if (last - src < 3) {
            return NGX_ERROR;
        }

        c = 0;

        for (i = 1; i <= 2; i++) {
            h = src[i];

            if (h >= '0' && h <= '9') {
                h -= '0';

            } else if ((h | 0x20) >= 'a' && (h | 0x20) <= 'f') {
                h = (h | 0x20) - 'a' + 10;

            } else {
                return NGX_ERROR;
            }

            c = (u_char) (c * 16 + h);
        }

        *d++ = c;
        src += 2;
    }

    *n = d - dst;

    return NGX_OK;
}


/*
 * floor(amount * rate * multiplier), all three scaled by 10^4, computed
 * in integers: at most 10^16 * 10^10 * 10^10 < 2^128.  NGX_ERROR when the
 * result exceeds NGX_HTTP_LOYALTY_EARN_MAX.
 */

ngx_int_t
ngx_http_loyalty_earned(uint64_t amount, uint64_t rate, uint64_t multiplier,
    uint64_t *earned)
{
    unsigned __int128  v;

    v = (unsigned __int128) amount * rate * multiplier;
    v /= (unsigned __int128) NGX_HTTP_LOYALTY_FRAC_ONE
         * NGX_HTTP_LOYALTY_FRAC_ONE * NGX_HTTP_LOYALTY_FRAC_ONE;

    if (v > NGX_HTTP_LOYALTY_EARN_MAX) {
        return NGX_ERROR;
    }

    *earned = (uint64_t) v;

    return NGX_OK;
}


static ngx_int_t
ngx_http_loyalty_parse_decimal(u_char *p, size_t len, ngx_uint_t digits,
    uint64_t *value)
{
    u_char     *last, *dot;
    uint64_t    v;
    ngx_uint_t  n, frac;

    last = p + len;

    dot = NULL;
    v = 0;
    n = 0;
    frac = 0;

    for ( /* void */ ; p < last; p++) {

        if (*p == '.') {
            if (dot || n == 0) {
                return NGX_ERROR;
            }

            dot = p;
            continue;
        }

        if (*p < '0' || *p > '9') {
            return NGX_ERROR;
        }

        if (dot) {
            if (++frac > NGX_HTTP_LOYALTY_FRAC_DIGITS) {
                return NGX_ERROR;
            }

        } else if (++n > digits) {
            return NGX_ERROR;
        }

        v = v * 10 + (*p - '0');
    }

    if (n == 0 || (dot && frac == 0)) {
        return NGX_ERROR;
    }

    while (frac++ < NGX_HTTP_LOYALTY_FRAC_DIGITS) {
        v *= 10;
    }

    *value = v;

    return NGX_OK;
}


/*
 * The decimal digits of n, as ngx_sprintf(p, "%uL", n) writes them but
 * without parsing a format: the request path writes several numbers per
 * request.  The caller reserves NGX_INT64_LEN bytes.
 */

u_char *
ngx_http_loyalty_write_uint(u_char *p, uint64_t n)
{
    u_char    *q;
    uint64_t   m;

    /* most numbers here are lengths of one or two digits */

    for (m = n; m >= 10; m /= 10) {
        p++;
    }

    q = ++p;

    do {
        *--q = (u_char) (n % 10 + '0');
        n /= 10;
    } while (n);

    return p;
}


/*
 * A name or code from the configuration, sent in request and response
 * headers: not empty, no control characters.
 */

ngx_int_t
ngx_http_loyalty_valid_text(u_char *p, size_t len)
{
    if (len == 0) {
        return NGX_DECLINED;
    }

    while (len--) {
        if (*p < 0x20 || *p == 0x7f) {
            return NGX_DECLINED;
        }

        p++;
    }

    return NGX_OK;
}


/*
 * A JSON string, quoted: '"', '\\' and the control characters are escaped
 * (RFC 8259), everything else is copied.  The caller reserves
 * 2 + len * NGX_HTTP_LOYALTY_JSON_ESCAPE bytes.  nginx's ngx_escape_json()
 * does the same; this one is here so that the unit tests, which link no
 * nginx object (nginx-dev has none), cover the writer the module runs.
 */

u_char *
ngx_http_loyalty_json_string(u_char *p, u_char *src, size_t len)
{
    u_char  ch;

    static u_char  hex[] = "0123456789abcdef";

    *p++ = '"';

    while (len--) {
        ch = *src++;

        if (ch > 0x1f && ch != '"' && ch != '\\') {
            *p++ = ch;
            continue;
        }

        *p++ = '\\';

        switch (ch) {
        case '"':
        case '\\':
            *p++ = ch;
            break;
        case '\b':
            *p++ = 'b';
            break;
        case '\f':
            *p++ = 'f';
            break;
        case '\n':
            *p++ = 'n';
            break;
        case '\r':
            *p++ = 'r';
            break;
        case '\t':
            *p++ = 't';
            break;
        default:
            *p++ = 'u';
            *p++ = '0';
            *p++ = '0';
            *p++ = hex[ch >> 4];
            *p++ = hex[ch & 0xf];
        }
    }

    *p++ = '"';

    return p;
}


/*
 * "name":value, the value as a JSON string when quote is set, as is
 * (a number) otherwise.  The name is the caller's own and is not escaped.
 */

u_char *
ngx_http_loyalty_json_field(u_char *p, ngx_str_t *name, ngx_str_t *value,
    ngx_uint_t quote)
{
    *p++ = '"';
    p = ngx_cpymem(p, name->data, name->len);
    *p++ = '"';
    *p++ = ':';

    if (quote) {
        return ngx_http_loyalty_json_string(p, value->data, value->len);
    }

    return ngx_cpymem(p, value->data, value->len);
}


/*
 * A label value of the Prometheus text format, without its quotes:
 * '\\', '"' and a line feed are escaped.  The caller reserves
 * len * NGX_HTTP_LOYALTY_LABEL_ESCAPE bytes.
 */

u_char *
ngx_http_loyalty_label_value(u_char *p, u_char *src, size_t len)
{
    u_char  ch;

    while (len--) {
        ch = *src++;

        switch (ch) {
        case '\\':
        case '"':
            *p++ = '\\';
            *p++ = ch;
            break;
        case '\n':
            *p++ = '\\';
            *p++ = 'n';
            break;
        default:
            *p++ = ch;
        }
    }

    return p;
}


/* the tier with the highest threshold not above the lifetime points */

ngx_http_loyalty_tier_t *
ngx_http_loyalty_select_tier(ngx_http_loyalty_tier_t *tiers, ngx_uint_t n,
    uint64_t lifetime)
{
    ngx_uint_t                i;
    ngx_http_loyalty_tier_t  *best;

    best = NULL;

    for (i = 0; i < n; i++) {
        if (tiers[i].min_lifetime > lifetime) {
            continue;
        }

        if (best == NULL || tiers[i].min_lifetime > best->min_lifetime) {
            best = &tiers[i];
        }
    }

    return best;
}


/* the tier of that name, NULL when there is none */

ngx_http_loyalty_tier_t *
ngx_http_loyalty_find_tier(ngx_http_loyalty_tier_t *tiers, ngx_uint_t n,
    ngx_str_t *name)
{
    ngx_uint_t  i;

    for (i = 0; i < n; i++) {
        if (tiers[i].name.len == name->len
            && ngx_strncmp(tiers[i].name.data, name->data, name->len) == 0)
        {
            return &tiers[i];
        }
    }

    return NULL;
}


/* the first offer whose conditions all hold */

ngx_http_loyalty_offer_t *
ngx_http_loyalty_select_offer(ngx_http_loyalty_offer_t *offers, ngx_uint_t n,
    ngx_http_loyalty_record_t *rec, ngx_http_loyalty_tier_t *tier,
    time_t now, ngx_http_loyalty_cond_pt cond, void *data)
{
    ngx_uint_t                 i;
    ngx_http_loyalty_offer_t  *o;

    for (i = 0; i < n; i++) {
        o = &offers[i];

        if (o->new_only && rec->orders != 0) {
            continue;
        }

        if (o->has_tier
            && (tier == NULL
                || tier->name.len != o->tier.len
                || ngx_strncmp(tier->name.data, o->tier.data, o->tier.len)
                   != 0))
        {
            continue;
        }

        if ((o->has_min_points && rec->points < o->min_points)
            || (o->has_max_points && rec->points > o->max_points)
            || (o->has_min_orders && rec->orders < o->min_orders)
            || (o->has_max_orders && rec->orders > o->max_orders))
        {
            continue;
        }

        if (o->has_inactive
            && (rec->orders == 0
                || now < 0
                || (uint64_t) now < rec->last_order
                || (uint64_t) now - rec->last_order < o->inactive))
        {
            continue;
        }

        if (o->cond && cond && cond(data, o->cond) != NGX_OK) {
            continue;
        }

        return o;
    }

    return NULL;
}


/*
 * One "key=value" (or "new") parameter of loyalty_offer other than
 * "inactive=" and "if=", which need nginx to parse; NULL when it is
 * accepted, or why not.
 */

char *
ngx_http_loyalty_offer_param(ngx_http_loyalty_offer_t *offer,
    ngx_str_t *param)
{
    uint64_t   *bound;
    unsigned    is_set;
    ngx_str_t   value;

    if (param->len == sizeof("new") - 1
        && ngx_strncmp(param->data, "new", sizeof("new") - 1) == 0)
    {
        if (offer->new_only) {
            return "is duplicate";
        }

        offer->new_only = 1;
        return NULL;
    }

    if (ngx_http_loyalty_key(param, "code=", sizeof("code=") - 1, &value)
        == NGX_OK)
    {
        if (offer->code.data) {
            return "is duplicate";
        }

        if (value.len == 0) {
            return "has an empty value";
        }

        if (ngx_http_loyalty_valid_text(value.data, value.len) != NGX_OK) {
            return "contains a control character";
        }

        offer->code = value;
        return NULL;
    }

    if (ngx_http_loyalty_key(param, "tier=", sizeof("tier=") - 1, &value)
        == NGX_OK)
    {
        if (offer->has_tier) {
            return "is duplicate";
        }

        if (value.len == 0) {
            return "has an empty value";
        }

        offer->tier = value;
        offer->has_tier = 1;
        return NULL;
    }

    if (ngx_http_loyalty_key(param, "min_points=", sizeof("min_points=") - 1,
                             &value)
        == NGX_OK)
    {
        bound = &offer->min_points;
        is_set = offer->has_min_points;
        offer->has_min_points = 1;

    } else if (ngx_http_loyalty_key(param, "max_points=",
                                    sizeof("max_points=") - 1, &value)
               == NGX_OK)
    {
        bound = &offer->max_points;
        is_set = offer->has_max_points;
        offer->has_max_points = 1;

    } else if (ngx_http_loyalty_key(param, "min_orders=",
                                    sizeof("min_orders=") - 1, &value)
               == NGX_OK)
    {
        bound = &offer->min_orders;
        is_set = offer->has_min_orders;
        offer->has_min_orders = 1;

    } else if (ngx_http_loyalty_key(param, "max_orders=",
                                    sizeof("max_orders=") - 1, &value)
               == NGX_OK)
    {
        bound = &offer->max_orders;
        is_set = offer->has_max_orders;
        offer->has_max_orders = 1;

    } else {
        return "is unknown";
    }

    if (is_set) {
        return "is duplicate";
    }

    if (ngx_http_loyalty_parse_uint(value.data, value.len, bound) != NGX_OK) {
        return "is not a non-negative integer";
    }

    return NULL;
}


/* contradictions between the parameters of one offer */

char *
ngx_http_loyalty_offer_check(ngx_http_loyalty_offer_t *offer)
{
    if (offer->has_min_points && offer->has_max_points
        && offer->min_points > offer->max_points)
    {
        return "min_points is greater than max_points";
    }

    if (offer->has_min_orders && offer->has_max_orders
        && offer->min_orders > offer->max_orders)
    {
        return "min_orders is greater than max_orders";
    }

    if (offer->new_only
        && ((offer->has_min_orders && offer->min_orders > 0)
            || offer->has_inactive))
    {
        return "\"new\" cannot be combined with min_orders or inactive";
    }

    return NULL;
}


/*
 * CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0), the hash of
 * Redis Cluster's key slots, one table lookup a byte.
 */

static uint16_t  ngx_http_loyalty_crc16_table[256] = {
    0x0000, 0x1021, 0x2042, 0x3063, 0x4084, 0x50a5, 0x60c6, 0x70e7,
    0x8108, 0x9129, 0xa14a, 0xb16b, 0xc18c, 0xd1ad, 0xe1ce, 0xf1ef,
    0x1231, 0x0210, 0x3273, 0x2252, 0x52b5, 0x4294, 0x72f7, 0x62d6,
    0x9339, 0x8318, 0xb37b, 0xa35a, 0xd3bd, 0xc39c, 0xf3ff, 0xe3de,
    0x2462, 0x3443, 0x0420, 0x1401, 0x64e6, 0x74c7, 0x44a4, 0x5485,
    0xa56a, 0xb54b, 0x8528, 0x9509, 0xe5ee, 0xf5cf, 0xc5ac, 0xd58d,
    0x3653, 0x2672, 0x1611, 0x0630, 0x76d7, 0x66f6, 0x5695, 0x46b4,
    0xb75b, 0xa77a, 0x9719, 0x8738, 0xf7df, 0xe7fe, 0xd79d, 0xc7bc,
    0x48c4, 0x58e5, 0x6886, 0x78a7, 0x0840, 0x1861, 0x2802, 0x3823,
    0xc9cc, 0xd9ed, 0xe98e, 0xf9af, 0x8948, 0x9969, 0xa90a, 0xb92b,
    0x5af5, 0x4ad4, 0x7ab7, 0x6a96, 0x1a71, 0x0a50, 0x3a33, 0x2a12,
    0xdbfd, 0xcbdc, 0xfbbf, 0xeb9e, 0x9b79, 0x8b58, 0xbb3b, 0xab1a,
    0x6ca6, 0x7c87, 0x4ce4, 0x5cc5, 0x2c22, 0x3c03, 0x0c60, 0x1c41,
    0xedae, 0xfd8f, 0xcdec, 0xddcd, 0xad2a, 0xbd0b, 0x8d68, 0x9d49,
    0x7e97, 0x6eb6, 0x5ed5, 0x4ef4, 0x3e13, 0x2e32, 0x1e51, 0x0e70,
    0xff9f, 0xefbe, 0xdfdd, 0xcffc, 0xbf1b, 0xaf3a, 0x9f59, 0x8f78,
    0x9188, 0x81a9, 0xb1ca, 0xa1eb, 0xd10c, 0xc12d, 0xf14e, 0xe16f,
    0x1080, 0x00a1, 0x30c2, 0x20e3, 0x5004, 0x4025, 0x7046, 0x6067,
    0x83b9, 0x9398, 0xa3fb, 0xb3da, 0xc33d, 0xd31c, 0xe37f, 0xf35e,
    0x02b1, 0x1290, 0x22f3, 0x32d2, 0x4235, 0x5214, 0x6277, 0x7256,
    0xb5ea, 0xa5cb, 0x95a8, 0x8589, 0xf56e, 0xe54f, 0xd52c, 0xc50d,
    0x34e2, 0x24c3, 0x14a0, 0x0481, 0x7466, 0x6447, 0x5424, 0x4405,
    0xa7db, 0xb7fa, 0x8799, 0x97b8, 0xe75f, 0xf77e, 0xc71d, 0xd73c,
    0x26d3, 0x36f2, 0x0691, 0x16b0, 0x6657, 0x7676, 0x4615, 0x5634,
    0xd94c, 0xc96d, 0xf90e, 0xe92f, 0x99c8, 0x89e9, 0xb98a, 0xa9ab,
    0x5844, 0x4865, 0x7806, 0x6827, 0x18c0, 0x08e1, 0x3882, 0x28a3,
    0xcb7d, 0xdb5c, 0xeb3f, 0xfb1e, 0x8bf9, 0x9bd8, 0xabbb, 0xbb9a,
    0x4a75, 0x5a54, 0x6a37, 0x7a16, 0x0af1, 0x1ad0, 0x2ab3, 0x3a92,
    0xfd2e, 0xed0f, 0xdd6c, 0xcd4d, 0xbdaa, 0xad8b, 0x9de8, 0x8dc9,
    0x7c26, 0x6c07, 0x5c64, 0x4c45, 0x3ca2, 0x2c83, 0x1ce0, 0x0cc1,
    0xef1f, 0xff3e, 0xcf5d, 0xdf7c, 0xaf9b, 0xbfba, 0x8fd9, 0x9ff8,
    0x6e17, 0x7e36, 0x4e55, 0x5e74, 0x2e93, 0x3eb2, 0x0ed1, 0x1ef0
};


/*
 * The Redis Cluster slot of a key, as Redis computes it: the CRC16 of the
 * text between the first "{" and the first "}" after it when that text is
 * not empty (the hash tag), else of the whole key, modulo 16384.
 */

ngx_uint_t
ngx_http_loyalty_key_slot(u_char *key, size_t len)
{
    u_char    *p, *last, *open, *close;
    uint16_t   crc;

    p = key;
    last = key + len;

    open = ngx_strlchr(key, last, '{');

    if (open) {
        close = ngx_strlchr(open + 1, last, '}');

        if (close && close > open + 1) {
            p = open + 1;
            last = close;
        }
    }

    crc = 0;

    while (p < last) {
        crc = (uint16_t) (crc << 8)
              ^ ngx_http_loyalty_crc16_table[((crc >> 8) ^ *p++) & 0xff];
    }

    return crc & (NGX_HTTP_LOYALTY_SLOTS - 1);
}


/*
 * A Redis Cluster redirection, "MOVED <slot> <host>:<port>" or "ASK ...":
 * the slot, and the address split at its last colon.  The host may be
 * empty (the node's endpoint is unknown: the one asked, on that port) and
 * is an IPv6 address without brackets as Redis writes it.
 */

ngx_int_t
ngx_http_loyalty_parse_redirect(u_char *p, size_t len,
    ngx_http_loyalty_redirect_t *rd)
{
    u_char    *last, *slot, *colon;
    uint64_t   n;

    last = p + len;

    if (len > sizeof("MOVED ") - 1
        && ngx_strncmp(p, "MOVED ", sizeof("MOVED ") - 1) == 0)
    {
        rd->ask = 0;
        p += sizeof("MOVED ") - 1;

    } else if (len > sizeof("ASK ") - 1
               && ngx_strncmp(p, "ASK ", sizeof("ASK ") - 1) == 0)
    {
        rd->ask = 1;
        p += sizeof("ASK ") - 1;

    } else {
        return NGX_DECLINED;
    }

    slot = p;

    p = ngx_strlchr(p, last, ' ');
    if (p == NULL
        || ngx_http_loyalty_parse_uint(slot, p - slot, &n) != NGX_OK
        || n >= NGX_HTTP_LOYALTY_SLOTS)
    {
        return NGX_ERROR;
    }

    rd->slot = (ngx_uint_t) n;

    p++;

    for (colon = last - 1; colon >= p; colon--) {
        if (*colon == ':') {
            break;
        }
    }

    if (colon < p
        || ngx_http_loyalty_parse_uint(colon + 1, last - colon - 1, &n)
           != NGX_OK
        || n == 0 || n > 65535)
    {
        return NGX_ERROR;
    }

    rd->host.data = p;
    rd->host.len = colon - p;
    rd->port = (in_port_t) n;

    return NGX_OK;
}


static ngx_int_t
ngx_http_loyalty_key(ngx_str_t *param, const char *key, size_t len,
    ngx_str_t *value)
{
    if (param->len < len
        || ngx_strncmp(param->data, (u_char *) key, len) != 0)
    {
        return NGX_DECLINED;
    }

    value->data = param->data + len;
    value->len = param->len - len;

    return NGX_OK;
}
