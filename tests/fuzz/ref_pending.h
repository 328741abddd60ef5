
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


/*
 * A reference for the "pending" field of a record, for the fuzz targets
 * that check ngx_http_loyalty_parse_pending(): fuzz_api and fuzz_reply.
 */


#ifndef _REF_PENDING_H_INCLUDED_
#define _REF_PENDING_H_INCLUDED_


/* 2^53: counts below it are exact in the scripts' Lua numbers */
#define REF_EXACT  9007199254740992ULL


/* ^0*[0-9]{1,16}$, below 2^53: leading zeros do not count, as in Lua */

static int
ref_count(const u_char *p, size_t len, uint64_t *value)
{
    size_t    i;
    uint64_t  v;

    while (len > 1 && p[0] == '0') {
        p++;
        len--;
    }

    if (len < 1 || len > 16) {
        return 0;
    }

    v = 0;

    for (i = 0; i < len; i++) {
        if (p[i] < '0' || p[i] > '9') {
            return 0;
        }

        v = v * 10 + (p[i] - '0');           /* 16 digits fit */
    }

    if (v >= REF_EXACT) {
        return 0;
    }

    *value = v;
    return 1;
}


/*
 * What ngx_http_loyalty_parse_pending() must say: the field is "" or
 * entries "<release>:<points>" joined by single commas, each count
 * ^[0-9]{1,16}$ below 2^53; released by "now" is due, later locked, next
 * the earliest locked release (0: none); either sum at 2^53 refused.
 * The sums are kept in 128 bits and checked once, at the end.
 */

static int
ref_pending(const u_char *p, size_t len, int64_t now, uint64_t *due,
    uint64_t *locked, int64_t *next)
{
    size_t              i, start, colon, k;
    int64_t             earliest;
    uint64_t            release, points;
    unsigned __int128   d, l;

    d = 0;
    l = 0;
    earliest = -1;

    if (len > 0) {
        start = 0;

        for (i = 0; i <= len; i++) {
            if (i < len && p[i] != ',') {
                continue;
            }

            /* one entry, p[start .. i): exactly one colon */

            colon = i;

            for (k = start; k < i; k++) {
                if (p[k] == ':') {
                    if (colon != i) {
                        return 0;
                    }

                    colon = k;
                }
            }

            if (colon == i
                || !ref_count(p + start, colon - start, &release)
                || !ref_count(p + colon + 1, i - colon - 1, &points))
            {
                return 0;
            }

            if ((int64_t) release <= now) {
                d += points;

            } else {
                l += points;

                if (earliest < 0 || (int64_t) release < earliest) {
                    earliest = (int64_t) release;
                }
            }

            start = i + 1;
        }
    }

    if (d >= REF_EXACT || l >= REF_EXACT) {
        return 0;
    }

    *due = (uint64_t) d;
    *locked = (uint64_t) l;
    *next = earliest < 0 ? 0 : earliest;

    return 1;
}


#endif /* _REF_PENDING_H_INCLUDED_ */
