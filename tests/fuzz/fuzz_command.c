
/*
 * Copyright (C) The ngx_http_loyalty_module authors
 */


/*
 * Command encoding: ngx_http_loyalty_command_write() stays within
 * ngx_http_loyalty_command_len() (the buffer is exactly that long), its
 * output is the RESP array of the arguments, byte for byte, and hiredis'
 * own reader (default reply objects) parses it back into the same
 * arguments, with nothing left over.
 *
 * Input: arguments, each a length byte (255: two more bytes, little
 * endian) then that many bytes (fewer at the end of the input); at most
 * ARGS_MAX of them.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <hiredis/hiredis.h>
#include "ngx_http_loyalty_redis.h"
#include "fuzz.h"


#define ARGS_MAX  64


static void
check_parse(u_char *buf, size_t len, ngx_uint_t argc, ngx_str_t *argv)
{
    void         *obj;
    ngx_uint_t    i;
    redisReply   *reply;
    redisReader  *reader;

    reader = redisReaderCreate();
    check(reader != NULL);

    check(redisReaderFeed(reader, (char *) buf, len) == REDIS_OK);

    check(redisReaderGetReply(reader, &obj) == REDIS_OK);
    check(obj != NULL);

    reply = obj;

    check(reply->type == REDIS_REPLY_ARRAY);
    check(reply->elements == argc);

    for (i = 0; i < argc; i++) {
        check(reply->element[i]->type == REDIS_REPLY_STRING);
        check((size_t) reply->element[i]->len == argv[i].len);
        check(memcmp(reply->element[i]->str, argv[i].data, argv[i].len) == 0);
    }

    freeReplyObject(reply);

    /* exactly one reply, nothing after it */

    check(redisReaderGetReply(reader, &obj) == REDIS_OK);
    check(obj == NULL);
    check(reader->pos == reader->len);

    redisReaderFree(reader);
}


static void
check_bytes(u_char *buf, size_t len, ngx_uint_t argc, ngx_str_t *argv)
{
    char        head[64];
    size_t      off;
    ngx_uint_t  i;
    int         n;

    off = 0;

    n = snprintf(head, sizeof(head), "*%lu\r\n", (unsigned long) argc);
    check(off + n <= len && memcmp(buf + off, head, n) == 0);
    off += n;

    for (i = 0; i < argc; i++) {
        n = snprintf(head, sizeof(head), "$%lu\r\n",
                     (unsigned long) argv[i].len);
        check(off + n <= len && memcmp(buf + off, head, n) == 0);
        off += n;

        check(off + argv[i].len + 2 <= len);
        check(memcmp(buf + off, argv[i].data, argv[i].len) == 0);
        off += argv[i].len;

        check(buf[off] == '\r' && buf[off + 1] == '\n');
        off += 2;
    }

    check(off == len);
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    u_char      *buf, *last;
    size_t       len, n, i;
    ngx_str_t    argv[ARGS_MAX];
    ngx_uint_t   argc;

    argc = 0;
    i = 0;

    while (i < size && argc < ARGS_MAX) {
        n = data[i++];

        if (n == 255 && i + 2 <= size) {
            n = data[i] | (data[i + 1] << 8);
            i += 2;
        }

        n = ngx_min(n, size - i);

        /* each argument in its own exact-size allocation */

        argv[argc].len = n;
        argv[argc].data = malloc(n ? n : 1);
        check(argv[argc].data != NULL);
        memcpy(argv[argc].data, data + i, n);

        argc++;
        i += n;
    }

    len = ngx_http_loyalty_command_len(argc, argv);

    buf = malloc(len);
    check(buf != NULL);

    last = ngx_http_loyalty_command_write(buf, argc, argv);

    check(last >= buf && (size_t) (last - buf) <= len);

    check_bytes(buf, last - buf, argc, argv);
    check_parse(buf, last - buf, argc, argv);

    free(buf);

    while (argc) {
        free(argv[--argc].data);
    }

    return 0;
}
