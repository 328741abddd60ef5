"""Hostile input, issue #4: hostile input never crashes a worker or
corrupts a record.

- huge cookies and header values (up to and past nginx's header buffers);
- hundreds of client-sent X-Loyalty-* headers in any case, interleaved
  with normal headers that must reach the backend intact and in order;
- customer ids with NUL, braces, blanks, control bytes, UTF-8, at and past
  128 bytes, and signed values that are wrong in every way we can think of;
- the rate-limited warning for invalid values;
- amounts, rates, redeem values and order ids at and past every bound,
  the 2^53 balance limit, and the longest prefix, id and order id through
  the journal and the replay tool;
- a fake Redis (fake_redis.py) answering HMGET, EVALSHA, SCRIPT LOAD, AUTH
  and SELECT with replies of unexpected types, shapes and sizes, split
  into single bytes, glued together, cut off, announcing more than they
  send, or not RESP at all; and clients hanging up mid-reply.

After every case: no worker died ("exited on signal" in the error log, or
a new worker pid), and later normal requests still get their own, intact
records.  The harness also fails any test whose error log has an [alert],
[crit] or [emerg] line.
"""

import hashlib
import hmac
import http.client
import json
import os
import re
import resource
import socket
import subprocess
import time
import urllib.parse

import pytest

from conftest import (Response, checkout_conf, expected, http_request,
                      log_lines, run_parallel, wait_until)
from credit_support import (PYTHON, REPO, did, edge_conf, error_log_credits,
                            hkey, ledger_entries, marker, read_journal,
                            record, replay, wait_marker)
from fake_redis import array, bulk, integer


CRASH = "exited on signal"
SECRET = "s3cret"
SECRET2 = "rotated-key-2"
ALICE_SIGNED = ("alice.765542af1f1d587bc60c218dca532a258f56b9c21a427cc819de2"
                "a1ff6d3e146")


def sign(secret, cid):
    """<id>.<lowercase hex HMAC-SHA256(secret, id)>, as bytes (any id)."""
    if isinstance(cid, str):
        cid = cid.encode("utf-8")
    mac = hmac.new(secret.encode(), cid, hashlib.sha256).hexdigest()
    return cid + b"." + mac.encode()


def crash_lines(n):
    return [l for l in n.error_log().splitlines() if CRASH in l]


def assert_alive(n, workers, what=""):
    """No worker died since `workers` (the pids at start) were listed."""
    crashed = crash_lines(n)
    assert not crashed, "worker crashed %s:\n%s\n--- error log tail:\n%s" % (
        what, "\n".join(crashed), "\n".join(n.error_log().splitlines()[-25:]))
    assert n.workers() == workers, "workers changed %s: %r -> %r" % (
        what, workers, n.workers())


def level_lines(n, needle, levels=("warn", "error")):
    text = n.error_log()
    return [l for lv in levels for l in log_lines(text, lv) if needle in l]


def message_of(line):
    """A log line without its request context (", client: ...")."""
    return line.split(", client: ")[0]


# --------------------------------------------------------------------------
# raw HTTP: header values http.client would refuse or reorder


def _b(x):
    return x if isinstance(x, bytes) else x.encode("latin-1")


def raw_get(port, path, headers, host=b"127.0.0.1", timeout=5.0):
    """GET with exactly these header lines ([(name, value)], bytes or
    latin-1 str; Host first unless host is None, Connection: close last
    unless already given).  A connection nginx resets (it may refuse an
    oversized request before reading it all) counts as status 400."""
    lines = [b"GET " + _b(path) + b" HTTP/1.1"]
    if host is not None:
        lines.append(b"Host: " + _b(host))
    lines += [_b(k) + b": " + _b(v) for k, v in headers]
    if not any(_b(k).lower() == b"connection" for k, _ in headers):
        lines.append(b"Connection: close")
    data = b"\r\n".join(lines) + b"\r\n\r\n"
    t0 = time.monotonic()
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        try:
            s.sendall(data)
            resp = http.client.HTTPResponse(s)
            resp.begin()
            body = resp.read().decode("utf-8", "replace")
        except (ConnectionResetError, BrokenPipeError):
            return Response(400, [], "(connection reset)",
                            time.monotonic() - t0)
        return Response(resp.status, resp.getheaders(), body,
                        time.monotonic() - t0)
    finally:
        s.close()


# --------------------------------------------------------------------------
# the read path against a real redis-server


HOSTILE_LOCS = """
    location /hs1 {
        loyalty on; loyalty_customer $http_x_customer;
        loyalty_redis 127.0.0.1:{redis_port};
        loyalty_secret s3cret;
        proxy_pass http://127.0.0.1:{backend_port};
    }
    location /hs2 {
        loyalty on; loyalty_customer $http_x_customer;
        loyalty_redis 127.0.0.1:{redis_port};
        loyalty_secret rotated-key-2;
        loyalty_secret s3cret;
        proxy_pass http://127.0.0.1:{backend_port};
    }
    location /cs1 {
        loyalty on; loyalty_customer $cookie_cid;
        loyalty_redis 127.0.0.1:{redis_port};
        loyalty_secret s3cret;
        proxy_pass http://127.0.0.1:{backend_port};
    }
"""


def hostile_nginx(nginx, redis, **kw):
    return nginx(checkout_conf(locations=HOSTILE_LOCS), redis_port=redis.port,
                 **kw)


JUNK_COOKIES = "; ".join("junk%03d=%s" % (i, "x" * 60) for i in range(100))


def test_huge_cookies(redis, nginx):
    n = hostile_nginx(nginx, redis)
    workers = n.workers()
    redis.seed("big", points=9, lifetime=90, orders=3)
    redis.seed("alice", points=4, lifetime=40, orders=1)
    before = {c: redis.client.hgetall(hkey(c)) for c in ("big", "alice")}
    assert 6900 < len(JUNK_COOKIES) < 7100

    ok_big = expected("ok", "big", 9, 90, 3)
    cases = [
        # (label, path, [Cookie header values], expected loyalty or 400)
        ("7KB-then-cid", "/checkout", [JUNK_COOKIES + "; cid=big"], ok_big),
        ("cid-then-7KB", "/checkout", ["cid=big; " + JUNK_COOKIES], ok_big),
        ("cid-twice", "/checkout", ["cid=big; " + JUNK_COOKIES + "; cid=x"],
         ok_big),
        ("7KB-cid-value", "/checkout", ["cid=" + "a" * 7000],
         expected("invalid")),
        ("7KB-signed-value", "/cs1",
         ["cid=" + sign(SECRET, "a" * 7000).decode()], expected("invalid")),
        ("7KB-then-signed", "/cs1", [JUNK_COOKIES + "; cid=" + ALICE_SIGNED],
         expected("ok", "alice", 4, 40, 1)),
        ("quoted-signed", "/cs1", ['cid="%s"' % ALICE_SIGNED],
         expected("invalid")),
        ("percent-00", "/checkout", ["cid=a%00b"], expected("invalid")),
        ("3x7KB-headers", "/checkout",
         [JUNK_COOKIES, JUNK_COOKIES, JUNK_COOKIES + "; cid=big"], ok_big),
        # past large_client_header_buffers (4 x 8k): nginx answers 400
        ("9KB-line", "/checkout", ["cid=big; " + "y" * 9000], 400),
        ("40KB-line", "/checkout", ["cid=big; " + "y" * 40000], 400),
        ("6x7KB-headers", "/checkout", [JUNK_COOKIES] * 5
         + [JUNK_COOKIES + "; cid=big"], 400),
    ]
    bad = []
    for label, path, cookies, want in cases:
        for _ in range(2):
            r = raw_get(n.port, path, [("Cookie", c) for c in cookies])
            if want == 400:
                if r.status != 400:
                    bad.append((label, r.status, r.body[:200]))
            elif r.status != 200 or r.loyalty != want:
                bad.append((label, r.status, r.body[:300]))
        assert_alive(n, workers, label)
    assert not bad, bad

    assert n.get("/checkout", cookies={"cid": "big"}).loyalty == ok_big
    assert n.get("/plain").body == "plain"
    assert {c: redis.client.hgetall(hkey(c)) for c in before} == before
    assert "aaaaaaaaaaaaaaaaaaaa" not in n.error_log(), \
        "an invalid customer value was logged"


def test_huge_header_values(redis, nginx):
    n = hostile_nginx(nginx, redis)
    workers = n.workers()
    redis.seed("big", points=9, lifetime=90, orders=3)
    before = redis.client.hgetall(hkey("big"))
    calls = redis.hmget_calls()
    junk = [("X-Junk-%d" % i, "j" * 7000) for i in range(3)]
    cases = [
        ("7KB-id", "/hcheckout", [("X-Customer", "a" * 7000)],
         expected("invalid"), 0),
        ("7KB-signed-id", "/hs1",
         [("X-Customer", sign(SECRET, "b" * 7000))], expected("invalid"), 0),
        ("7KB-of-dots", "/hs2", [("X-Customer", "." * 7000)],
         expected("invalid"), 0),
        ("3x7KB-other-headers", "/hcheckout",
         junk + [("X-Customer", "big")], expected("ok", "big", 9, 90, 3), 1),
        ("9KB-id", "/hcheckout", [("X-Customer", "a" * 9000)], 400, 0),
        ("9KB-other-header", "/hcheckout",
         [("X-Customer", "big"), ("X-Junk", "j" * 9000)], 400, 0),
    ]
    bad = []
    for label, path, headers, want, reads in cases:
        for _ in range(2):
            before_calls = redis.hmget_calls()
            r = raw_get(n.port, path, headers)
            if want == 400:
                ok = r.status == 400
            else:
                ok = r.status == 200 and r.loyalty == want
            if not ok:
                bad.append((label, r.status, r.body[:300]))
            if redis.hmget_calls() - before_calls != reads:
                bad.append((label, "redis reads",
                            redis.hmget_calls() - before_calls))
        assert_alive(n, workers, label)
    assert not bad, bad
    assert n.get("/hcheckout", headers={"X-Customer": "big"}).loyalty == \
        expected("ok", "big", 9, 90, 3)
    assert redis.client.hgetall(hkey("big")) == before
    assert redis.hmget_calls() - calls == 2 + 1


# --------------------------------------------------------------------------
# hundreds of client-sent X-Loyalty-* headers


CAPTURE_LOCS = """
    location /cap {
        loyalty on; loyalty_customer $cookie_cid;
        loyalty_redis 127.0.0.1:{redis_port};
        loyalty_tier gold 10;
        loyalty_offer all code=ALL;
        proxy_set_header Host $http_host;
        proxy_pass http://127.0.0.1:{capture_port};
    }
    location /capoff {
        loyalty on; loyalty_customer $cookie_cid;
        loyalty_redis 127.0.0.1:{redis_port};
        loyalty_request_headers off;
        proxy_set_header Host $http_host;
        proxy_pass http://127.0.0.1:{capture_port};
    }
"""

PREFIXES = ["x-loyalty-", "X-LOYALTY-", "X-Loyalty-", "x-LoYaLtY-",
            "X-lOYALTY-"]
SUFFIXES = ["Status", "Customer", "Points", "Lifetime", "Orders", "Tier",
            "Offer", "Offer-Code", "Earned", "Anything", "", "Redeem", "a",
            "Z-9", "points"]

# names that look alike but do not start with X-Loyalty-: kept
NORMAL = [("Cookie", "cid=hh; other=1"), ("User-Agent", "hostile-test/1.0"),
          ("X-Other", "kept-1"), ("X-Loyalty", "kept-2"),
          ("X-Loyaltyish", "kept-3"), ("Accept", "*/*"),
          ("X-Other", "kept-4"), ("Loyalty-Points", "kept-5"),
          ("X-Loyalt-Points", "kept-6"), ("X-Other-Loyalty-Points", "kept-7")]


EARLY_ERROR = """
server {
    listen 127.0.0.1:{port};
    underscores_in_headers on;
    location = /__harness_ready { return 204; }
    error_page 400 /bad-request;
    set $srv_copy $http_x_loyalty_tier;
    location /checkout {
        loyalty on;
        loyalty_customer $http_x_customer;
        loyalty_redis 127.0.0.1:{redis_port};
        proxy_pass http://127.0.0.1:{capture_port};
    }
    location = /bad-request {
        proxy_set_header X-Fwd-Tier $http_x_loyalty_tier;
        proxy_set_header X-Fwd-Copy $srv_copy;
        proxy_pass http://127.0.0.1:{capture_port};
    }
}
"""


def test_spoofed_headers_removed_before_error_page_of_refused_request(
        redis, nginx, capture_backend):
    """nginx refuses the request while it reads the headers (here: an
    invalid Host after an X-Loyalty-* line) and redirects it to its
    error_page without running the post-read phase: the client's
    X-Loyalty-* headers must be gone there too."""
    n = nginx(EARLY_ERROR, redis_port=redis.port,
              capture_port=capture_backend.port)
    for _ in range(2):
        capture_backend.requests.clear()
        r = raw_get(n.port, "/checkout", [("X-Loyalty-Tier", "platinum"),
                                          ("X_Loyalty_Points", "999999"),
                                          ("Host", "bad/host")], host=None)
        assert (r.status, r.body) == (400, "captured\n"), r
        [req] = capture_backend.requests
        assert req["path"] == "/bad-request", req
        assert [k for k, _ in req["headers"]
                if k.lower().replace("_", "-").startswith(
                    ("x-loyalty-", "x-fwd-"))] == [], req


def spoofs(count, compact=False):
    """count spoofed X-Loyalty-* headers in varied case; compact: short
    ones, so that many fit into nginx's header buffers"""
    out = []
    for i in range(count):
        if compact:
            out.append((PREFIXES[i % len(PREFIXES)] + "%d" % i, "s"))
            continue
        name = PREFIXES[i % len(PREFIXES)] + SUFFIXES[i % len(SUFFIXES)]
        if i % 3 == 0:
            name += "-%d" % i
        value = "" if i % 7 == 0 else "spoof-%d" % i
        out.append((name, value))
    return out


def interleave(spoof, normal, positions):
    """spoof headers with normal[k] inserted before spoof[positions[k]];
    the first and the last header are spoofs."""
    out, k = [], 0
    for i, h in enumerate(spoof):
        while k < len(normal) and positions[k] == i:
            out.append(normal[k])
            k += 1
        out.append(h)
    assert k == len(normal)
    assert out[0] in spoof and out[-1] in spoof
    return out


@pytest.mark.parametrize("count,path", [(300, "/cap"), (300, "/capoff"),
                                        (900, "/cap")],
                         ids=["300", "300-request-headers-off", "900"])
def test_hundreds_of_loyalty_headers(redis, nginx, capture_backend, count,
                                     path):
    n = nginx(checkout_conf(locations=CAPTURE_LOCS), redis_port=redis.port,
              capture_port=capture_backend.port)
    workers = n.workers()
    redis.seed("hh", points=12, lifetime=34, orders=5)
    before = redis.client.hgetall(hkey("hh"))
    # (900 short ones is about as many as nginx's default header buffers
    # take: 1000 get 400 Request Header Or Cookie Too Large from nginx)
    # Host and Connection sit among the spoofs too; normal headers land on
    # the first, last and middle slots of nginx's 20-element list parts
    normal = ([("Host", "hostile.example")] + NORMAL[:5]
              + [("Connection", "close")] + NORMAL[5:])
    positions = sorted({1, 18, 19, 20, 21, 39, 40, 59, 150, 151, 152,
                        count - 41, count - 40, count - 2, count - 1})
    positions = positions[:len(normal)]
    positions += [count - 1] * (len(normal) - len(positions))
    headers = interleave(spoofs(count, compact=count > 300), normal,
                         sorted(positions))
    assert len(headers) == count + len(normal)

    if path == "/cap":
        want = expected("ok", "hh", 12, 34, 5, "gold", "all", "ALL")
    else:
        want = {}
    for _ in range(2):
        capture_backend.requests.clear()
        r = raw_get(n.port, path, headers, host=None)
        assert r.status == 200, r
        assert len(capture_backend.requests) == 1
        got = capture_backend.requests[0]["headers"]
        # the normal headers, intact and in the client's order, after the
        # Host and Connection that the proxy module sets first
        rest = [(k, v) for k, v in got
                if not k.lower().startswith("x-loyalty-")]
        assert rest == [("Host", "hostile.example"), ("Connection", "close")] \
            + NORMAL, rest
        # the module's own headers, once each, and nothing else
        mine = [(k, v) for k, v in got if k.lower().startswith("x-loyalty-")]
        assert len(mine) == len({k.lower() for k, _ in mine}), mine
        assert dict(mine) == want, mine
        assert_alive(n, workers)
    assert redis.client.hgetall(hkey("hh")) == before
    r = n.get("/checkout", cookies={"cid": "hh"})
    assert r.loyalty == expected("ok", "hh", 12, 34, 5)


def test_loyalty_headers_in_every_list_slot(redis, nginx, capture_backend):
    """One normal header among spoofs at every position of the first three
    list parts (the module removes headers from nginx's list in place)."""
    n = nginx(checkout_conf(locations=CAPTURE_LOCS), redis_port=redis.port,
              capture_port=capture_backend.port)
    workers = n.workers()
    redis.seed("hh", points=1, lifetime=1, orders=1)
    want = expected("ok", "hh", 1, 1, 1, None, "all", "ALL")
    for pos in range(0, 62):
        headers = spoofs(60)
        headers.insert(pos, ("X-Other", "p%d" % pos))
        headers.insert(0, ("Cookie", "cid=hh"))
        capture_backend.requests.clear()
        r = raw_get(n.port, "/cap", headers)
        assert r.status == 200, (pos, r)
        got = capture_backend.requests[0]["headers"]
        assert [(k, v) for k, v in got
                if not k.lower().startswith("x-loyalty-")] == [
            ("Host", "127.0.0.1"), ("Connection", "close"),
            ("Cookie", "cid=hh"), ("X-Other", "p%d" % pos)], (pos, got)
        mine = [(k, v) for k, v in got if k.lower().startswith("x-loyalty-")]
        assert len(mine) == len(want) and dict(mine) == want, (pos, mine)
    assert_alive(n, workers)


# --------------------------------------------------------------------------
# customer ids


# a 128-byte id using every allowed character class
ID128 = ("AZaz09._-@:+" * 11)[:128]

# (label, location, raw value, expected status, customer id when new/ok)
#   status "400|invalid": nginx may refuse the header itself (NUL)
ID_CASES = [
    ("nul-middle", "/hcheckout", b"a\x00b", "400|invalid", None),
    ("nul-end", "/hcheckout", b"abc\x00", "400|invalid", None),
    ("nul-signed", "/hs1", b"alice\x00." + sign(SECRET, "alice")[6:],
     "400|invalid", None),
    ("nul-before-sig", "/hs1", sign(SECRET, b"al\x00ice"), "400|invalid",
     None),
    ("percent-00", "/hcheckout", b"a%00b", "invalid", None),
    ("open-brace", "/hcheckout", b"EVIL{x", "invalid", None),
    ("close-brace", "/hcheckout", b"EVIL}x", "invalid", None),
    ("hash-tag", "/hcheckout", b"{EVIL}", "invalid", None),
    ("reversed-braces", "/hcheckout", b"}EVIL{", "invalid", None),
    ("braces-signed", "/hs1", sign(SECRET, "EVIL{x}"), "invalid", None),
    # a newline cannot be sent inside a header value (it ends the line,
    # and nginx does not support obsolete line folding): no such case
    ("inner-space", "/hcheckout", b"EVIL x", "invalid", None),
    ("inner-tab", "/hcheckout", b"EVIL\tx", "invalid", None),
    ("space-signed", "/hs1", sign(SECRET, "EVIL x"), "invalid", None),
    # nginx trims leading and trailing blanks of header values itself
    ("outer-spaces", "/hcheckout", b"   trimmed   ", "new", "trimmed"),
    ("escape-seq", "/hcheckout", b"EVIL\x1b[31mred", "invalid", None),
    ("del", "/hcheckout", b"EVIL\x7f", "invalid", None),
    ("ctrl-a", "/hcheckout", b"EVIL\x01", "invalid", None),
    ("utf8-e-acute", "/hcheckout", "café".encode(), "invalid", None),
    ("utf8-emoji", "/hcheckout", "EVIL\U0001f600".encode(), "invalid", None),
    ("utf8-overlong", "/hcheckout", b"EVIL\xc0\xaf", "invalid", None),
    ("latin1-ff", "/hcheckout", b"EVIL\xff\xfe", "invalid", None),
    ("utf8-signed", "/hs1", sign(SECRET, "café"), "invalid", None),
    ("percent-encoded", "/hcheckout", b"a%40b", "invalid", None),
    ("comma-list", "/hcheckout", b"a,b", "invalid", None),
    ("semicolon", "/hcheckout", b"a;b", "invalid", None),
    ("quote", "/hcheckout", b'"a"', "invalid", None),
    ("backslash", "/hcheckout", b"a\\b", "invalid", None),
    ("slash", "/hcheckout", b"../../etc", "invalid", None),
    ("128-bytes", "/hcheckout", ID128.encode(), "new", ID128),
    ("129-bytes", "/hcheckout", ID128.encode() + b"a", "invalid", None),
    ("128-signed", "/hs1", sign(SECRET, ID128), "new", ID128),
    ("129-signed", "/hs1", sign(SECRET, ID128 + "a"), "invalid", None),
    # dots are allowed id characters without a secret
    ("only-dots", "/hcheckout", b"....", "new", "...."),
    ("one-dot", "/hcheckout", b".", "new", "."),
    # with a secret
    ("vector", "/hs1", ALICE_SIGNED.encode(), "ok", "alice"),
    ("vector-second-of-two", "/hs2", ALICE_SIGNED.encode(), "ok", "alice"),
    ("only-dots-signed-loc", "/hs1", b"....", "invalid", None),
    ("one-dot-signed-loc", "/hs1", b".", "invalid", None),
    ("65-dots", "/hs1", b"." * 65, "invalid", None),
    ("66-dots", "/hs1", b"." * 66, "invalid", None),
    ("a.b", "/hs1", b"a.b", "invalid", None),
    ("unsigned", "/hs1", b"alice", "invalid", None),
    ("uppercase-hex", "/hs1",
     b"alice." + ALICE_SIGNED.split(".")[1].upper().encode(), "invalid",
     None),
    ("one-uppercase-digit", "/hs1", ALICE_SIGNED[:-1].encode() + b"E",
     "invalid", None),
    ("63-hex", "/hs1", ALICE_SIGNED[:-1].encode(), "invalid", None),
    ("65-hex", "/hs1", ALICE_SIGNED.encode() + b"6", "invalid", None),
    ("65-hex-leading", "/hs1",
     b"alice.0" + ALICE_SIGNED.split(".")[1].encode(), "invalid", None),
    ("non-hex", "/hs1", ALICE_SIGNED[:-1].encode() + b"g", "invalid", None),
    ("trailing-dot", "/hs1", ALICE_SIGNED.encode() + b".", "invalid", None),
    ("sig-only", "/hs1", ALICE_SIGNED.split(".")[1].encode(), "invalid",
     None),
    ("empty-id", "/hs1", sign(SECRET, ""), "invalid", None),
    ("empty-id-dot-dot", "/hs1", b"." + sign(SECRET, ""), "invalid", None),
    ("two-dots", "/hs1", sign(SECRET, "a.b"), "new", "a.b"),
    ("dots-id", "/hs1", sign(SECRET, "..."), "new", "..."),
    ("double-dot-before-sig", "/hs1",
     b"alice.." + ALICE_SIGNED.split(".")[1].encode(), "invalid", None),
    # "alice.<sig>" is itself a valid id (dots and hex digits), so a
    # correctly signed signed value is a (new) customer of that name
    ("signed-twice", "/hs1", sign(SECRET, ALICE_SIGNED), "new",
     ALICE_SIGNED),
    ("other-ids-sig", "/hs1",
     b"bob." + ALICE_SIGNED.split(".")[1].encode(), "invalid", None),
    ("second-secret-one-secret-loc", "/hs1", sign(SECRET2, "alice"),
     "invalid", None),
    ("second-secret", "/hs2", sign(SECRET2, "alice"), "ok", "alice"),
    ("unknown-secret", "/hs2", sign("not-configured", "alice"), "invalid",
     None),
    ("empty-secret", "/hs2", sign("", "alice"), "invalid", None),
    ("secret-prefix", "/hs2", sign("s3cre", "alice"), "invalid", None),
]


def test_loyalty_sign_tool_matches_test_vector():
    p = subprocess.run([PYTHON, os.path.join(REPO, "tools", "loyalty-sign"),
                        SECRET, "alice"], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode().strip() == ALICE_SIGNED
    assert sign(SECRET, "alice").decode() == ALICE_SIGNED


def test_hostile_customer_ids(redis, nginx):
    n = hostile_nginx(nginx, redis)
    workers = n.workers()
    redis.seed("alice", points=3, lifetime=30, orders=2)
    before = redis.client.hgetall(hkey("alice"))
    bad, reads_expected = [], 0
    calls = redis.hmget_calls()
    for label, path, value, status, cid in ID_CASES:
        r = raw_get(n.port, path, [("X-Customer", value)])
        if status == "400|invalid":
            ok = r.status == 400 or (r.status == 200 and
                                     r.loyalty == expected("invalid"))
        elif r.status != 200:
            ok = False
        elif status == "ok":
            ok = r.loyalty == expected("ok", cid, 3, 30, 2)
            reads_expected += 1
        elif status == "new":
            ok = r.loyalty == expected("new", cid)
            reads_expected += 1
        else:
            ok = r.loyalty == expected(status)
        if not ok:
            bad.append((label, value, r.status, r.body[:400]))
        assert_alive(n, workers, "after id case %s (%r)" % (label, value))
    assert not bad, "\n".join(map(repr, bad))
    assert redis.hmget_calls() - calls == reads_expected, \
        "invalid ids must cost no Redis read"
    # nothing was written, and a normal customer still reads
    assert redis.client.hgetall(hkey("alice")) == before
    assert sorted(redis.client.keys("*")) == [hkey("alice")]
    r = n.get("/hs1", headers={"X-Customer": ALICE_SIGNED})
    assert r.loyalty == expected("ok", "alice", 3, 30, 2)
    # invalid values are not copied into the log
    log = n.error_log()
    assert "EVIL" not in log and "\x1b" not in log, [
        l for l in log.splitlines() if "EVIL" in l or "\x1b" in l][:5]


def test_invalid_warning_rate_limited(redis, nginx):
    """200 invalid values within a second give at most a few warn lines;
    the next line after a quiet second reports how many were suppressed,
    and every invalid request is accounted for (logged or counted)."""
    n = hostile_nginx(nginx, redis, workers=1)
    workers = n.workers()

    def one(i):
        if i % 2:
            r = n.get("/hcheckout", headers={"X-Customer": "EVIL{%d}" % i})
        else:
            r = n.get("/hs1", headers={"X-Customer": "EVIL%d.%s" % (
                i, "0" * 64)})
        return r.status, r.loyalty

    t0 = time.monotonic()
    results = run_parallel(one, range(200), threads=16)
    elapsed = time.monotonic() - t0
    assert all(r == (200, expected("invalid")) for r in results), results[:3]
    assert elapsed < 1.0, "200 requests took %.2f s" % elapsed

    def invalid_warns():
        return [l for l in log_lines(n.error_log(), "warn")
                if "invalid customer" in l]
    burst = invalid_warns()
    assert 1 <= len(burst) <= 3, burst

    time.sleep(1.1)
    r = n.get("/hcheckout", headers={"X-Customer": "EVIL{last}"})
    assert r.loyalty == expected("invalid")
    lines = invalid_warns()
    assert len(lines) == len(burst) + 1, lines
    counts = [int(x) for x in re.findall(r"\((\d+) more not logged\)",
                                         "\n".join(lines))]
    assert counts and not re.search("more not logged", lines[0]), lines
    # every invalid request was either logged or counted
    assert len(lines) + sum(counts) == 201, (lines, counts)
    assert all("treated as anonymous" in l for l in lines), lines
    log = n.error_log()
    assert "EVIL" not in log, "the invalid value itself was logged"
    assert_alive(n, workers)


# --------------------------------------------------------------------------
# amounts, rates, redeem values and order ids at and past every bound


BOUND_LOCS = """
    location /r00001/ {
        loyalty on; loyalty_earn_rate 0.0001;
        proxy_pass http://127.0.0.1:{shop_port}/;
    }
    location /r10000/ {
        loyalty on; loyalty_earn_rate 10000;
        proxy_pass http://127.0.0.1:{shop_port}/;
    }
    location /rmax/ {
        loyalty on; loyalty_earn_rate 999999.9999;
        proxy_pass http://127.0.0.1:{shop_port}/;
    }
    location /tmax/ {
        loyalty on; loyalty_earn_rate 999999.9999;
        loyalty_tier top 1 multiplier=999999.9999;
        proxy_pass http://127.0.0.1:{shop_port}/;
    }
    # values from the (decoded) path: blanks, signs, any byte but NUL
    location ~ ^/w/(?<w_amt>[^/]+)/(?<w_oid>[^/]+)/$ {
        loyalty on;
        loyalty_earn $w_amt;
        loyalty_order_id $w_oid;
        proxy_pass http://127.0.0.1:{shop_port};
    }
    location ~ ^/wr/(?<wr_amt>[^/]+)/(?<wr_red>[^/]+)/(?<wr_oid>[^/]+)/$ {
        loyalty on;
        loyalty_earn $wr_amt;
        loyalty_redeem $wr_red;
        loyalty_order_id $wr_oid;
        proxy_pass http://127.0.0.1:{shop_port};
    }
    location = /metrics {
        loyalty off;
        loyalty_status;
    }
"""

EARN_MAX = 10 ** 15

_sentinel = iter(range(1, 10 ** 6))


def flush(n, client):
    """One more order, waited for: with one worker and one pipelined Redis
    connection, every credit sent before it has been applied by then."""
    oid = "sentinel-%d" % next(_sentinel)
    r = http_request(n.port, "/buy?total=1&oid=" + oid,
                     headers={"X-Customer": "sentinel"})
    assert r.status == 200
    wait_marker(client, "sentinel", oid)


def wpath(*parts):
    return "/%s/" % "/".join(urllib.parse.quote(p, safe="")
                             for p in parts) + ""


def customer_keys(client, cid):
    return sorted(client.keys("loyalty:{%s}*" % cid))


def metric(n, name):
    body = http_request(n.port, "/metrics").body
    m = re.search(r"^%s (\d+)$" % re.escape(name), body, re.M)
    return int(m.group(1)) if m else None


def bound_nginx(nginx, redis, http=""):
    return nginx(edge_conf(locations=BOUND_LOCS, http=http),
                 redis_port=redis.port, workers=1)


# (path, amount sent by the shop, earned or "invalid" or "cap", lifetime
#  to seed or None)
AMOUNT_BOUNDS = [
    ("/buy", "999999999999.9999", 999999999999, None),
    ("/buy", "999999999999", 999999999999, None),
    ("/buy", "1000000000000", "invalid", None),
    ("/buy", "0000000000001", "invalid", None),         # 13 digits
    ("/buy", "000000000000.0000", 0, None),
    ("/buy", "0.0001", 0, None),
    ("/buy", "0.00001", "invalid", None),
    ("/buy", "1.00000", "invalid", None),
    ("/r00001/buy", "0.0001", 0, None),
    ("/r00001/buy", "10000", 1, None),
    ("/r00001/buy", "999999999999.9999", 99999999, None),
    ("/r10000/buy", "100000000000", EARN_MAX, None),    # exactly the cap
    ("/r10000/buy", "100000000000.0001", "cap", None),  # one point past
    ("/rmax/buy", "1000000000", 999999999900000, None),
    ("/rmax/buy", "1000000001", "cap", None),
    ("/rmax/buy", "999999999999.9999", "cap", None),
    ("/tmax/buy", "0.0001", 99999999, 5),               # 0.0001*rate*mult
    ("/tmax/buy", "999999999999.9999", "cap", 5),       # ~10^24: no wrap
    ("/tmax/buy", "184467.4407", "cap", 5),             # ~2^64 / 10^8
]


def test_amount_bounds(redis, nginx):
    n = bound_nginx(nginx, redis)
    workers = n.workers()
    bad = []
    for i, (path, amount, earned, lifetime) in enumerate(AMOUNT_BOUNDS):
        cid = "amt-%d" % i
        if lifetime is not None:
            redis.seed(cid, points=0, lifetime=lifetime, orders=1)
        before = record(redis.client, cid)
        r = http_request(n.port, "%s?total=%s&oid=o%d" % (path, amount, i),
                         headers={"X-Customer": cid})
        assert r.status == 200, r
        if isinstance(earned, int):
            if r.header("X-Loyalty-Earned") != str(earned):
                bad.append((path, amount, "earned header",
                            r.header("X-Loyalty-Earned")))
                continue
            if wait_marker(redis.client, cid, "o%d" % i) != "%d:0" % earned:
                bad.append((path, amount, "marker"))
            after = record(redis.client, cid)
            if (after.get("points", 0) - before.get("points", 0),
                    after.get("orders", 0) - before.get("orders", 0)) != (
                    earned, 1):
                bad.append((path, amount, "record", before, after))
        else:
            if r.header("X-Loyalty-Earned") is not None:
                bad.append((path, amount, "earned header",
                            r.header("X-Loyalty-Earned")))
            needle = ('invalid amount "%s"' % amount if earned == "invalid"
                      else 'amount "%s" earns more than %d points'
                      % (amount, EARN_MAX))
            msgs = [message_of(l) for l in log_lines(n.error_log(), "warn")
                    if 'customer "%s": ' % cid in l]
            if len(msgs) != 1 or needle not in msgs[0]:
                bad.append((path, amount, "warn", msgs))
        assert_alive(n, workers, "after amount %s on %s" % (amount, path))
    flush(n, redis.client)
    for i, (path, amount, earned, lifetime) in enumerate(AMOUNT_BOUNDS):
        if not isinstance(earned, int):
            cid = "amt-%d" % i
            want = [] if lifetime is None else [hkey(cid)]
            if customer_keys(redis.client, cid) != want:
                bad.append((path, amount, "credited anyway",
                            customer_keys(redis.client, cid)))
            elif lifetime is not None and record(redis.client, cid) != {
                    "points": 0, "lifetime": lifetime, "orders": 1,
                    "first_order": record(redis.client, cid)["first_order"],
                    "last_order": record(redis.client, cid)["last_order"]}:
                bad.append((path, amount, "record changed"))
    assert not bad, "\n".join(map(repr, bad))


# amount values the shop cannot send in a header (nginx trims blanks),
# passed through the decoded path instead
WEIRD_AMOUNTS = ["-5", "+5", "0x10", " 5", "5 ", "\t5", "1e3", "5.", ".5",
                 "1,5", "5..0", "1.2.3", "NaN", "Infinity", "-0", "+0",
                 "\u0665", "\uff15", "5\x7f", "5\x1b", "١٢", "5%", "%35",
                 "99999999999999999999999999999999999999999", "0." + "0" * 40,
                 "1_000", "5;", "5\\"]


def test_weird_amounts(redis, nginx):
    n = bound_nginx(nginx, redis)
    workers = n.workers()
    redis.seed("wa", points=7, lifetime=7, orders=1)
    before = redis.client.hgetall(hkey("wa"))
    bad = []
    for i, amount in enumerate(WEIRD_AMOUNTS):
        r = http_request(n.port, wpath("w", amount, "wa-%d" % i),
                         headers={"X-Customer": "wa"})
        if r.status != 200 or r.header("X-Loyalty-Earned") is not None:
            bad.append((amount, r))
            continue
        msgs = [message_of(l) for l in log_lines(n.error_log(), "warn")
                if 'invalid amount "%s"' % amount in l]
        if len(msgs) != 1 or 'customer "wa"' not in msgs[0]:
            bad.append((amount, "warn", msgs))
        assert_alive(n, workers, "after amount %r" % amount)
    # the same path credits a valid amount: the cases above were not
    # refused for another reason
    r = http_request(n.port, wpath("w", "7.5", "wa-ok"),
                     headers={"X-Customer": "wa"})
    assert r.header("X-Loyalty-Earned") == "7", r
    assert wait_marker(redis.client, "wa", "wa-ok") == "7:0"
    flush(n, redis.client)
    assert not bad, "\n".join(map(repr, bad))
    after = redis.client.hgetall(hkey("wa"))
    assert int(after["points"]) == int(before["points"]) + 7
    assert int(after["orders"]) == int(before["orders"]) + 1
    assert customer_keys(redis.client, "wa") == sorted(
        [hkey("wa"), marker("wa", "wa-ok"), hkey("wa") + ":ledger"])


def test_redeem_bounds(redis, nginx):
    n = bound_nginx(nginx, redis)
    workers = n.workers()

    # 18 digits, far beyond the balance: the balance goes to 0, the exact
    # shortfall is logged and counted
    redis.seed("rd", points=5, lifetime=5, orders=1)
    r = http_request(n.port, wpath("wr", "0", "999999999999999999", "rd-1"),
                     headers={"X-Customer": "rd"})
    assert r.status == 200 and r.header("X-Loyalty-Points") == "0", r
    assert r.header("X-Loyalty-Earned") == "0"
    assert wait_marker(redis.client, "rd", "rd-1") == "0:5"
    rec = record(redis.client, "rd")
    assert (rec["points"], rec["lifetime"], rec["orders"]) == (0, 5, 2)
    wait_until(lambda: level_lines(n, "more than the balance"), 5,
               message="the shortfall warning")
    msgs = [message_of(l) for l in level_lines(n, "more than the balance",
                                               ("warn",))]
    assert msgs == [m for m in msgs if 'order "rd-1" of customer "rd" '
                    'redeemed 999999999999999999 points, 999999999999999994 '
                    'more than the balance' in m] and len(msgs) == 1, msgs
    assert metric(n, "loyalty_redeem_shortfall_total") == 1

    # 19 digits: not a redeem (warn), the earn still applies
    redis.seed("rd2", points=5, lifetime=5, orders=1)
    r = http_request(n.port, wpath("wr", "10", "9" * 19, "rd2-1"),
                     headers={"X-Customer": "rd2"})
    assert r.header("X-Loyalty-Earned") == "10"
    assert r.header("X-Loyalty-Points") == "15"
    assert wait_marker(redis.client, "rd2", "rd2-1") == "10:0"
    assert len([l for l in log_lines(n.error_log(), "warn")
                if 'invalid redeem "%s"' % ("9" * 19) in l]) == 1

    # 18 characters with leading zeros is a redeem of 5
    redis.seed("rd3", points=100, lifetime=100, orders=1)
    r = http_request(n.port, wpath("wr", "1", "000000000000000005", "rd3-1"),
                     headers={"X-Customer": "rd3"})
    assert r.header("X-Loyalty-Points") == "96", r
    assert wait_marker(redis.client, "rd3", "rd3-1") == "1:5"

    # anything else redeems nothing, logs a warning and still earns
    weird = ["-1", "+5", "0x10", " 5", "5 ", "1.5", "1e3", "\u0665", "5\t",
             "99999999999999999999999", "-0", "5,0"]
    redis.seed("rd4", points=50, lifetime=50, orders=1)
    bad = []
    for i, red in enumerate(weird):
        oid = "rd4-%d" % i
        r = http_request(n.port, wpath("wr", "1", red, oid),
                         headers={"X-Customer": "rd4"})
        if r.status != 200 or r.header("X-Loyalty-Earned") != "1":
            bad.append((red, r))
            continue
        if wait_marker(redis.client, "rd4", oid) != "1:0":
            bad.append((red, "marker", redis.client.get(marker("rd4", oid))))
        if len([l for l in log_lines(n.error_log(), "warn")
                if 'invalid redeem "%s"' % red in l]) != 1:
            bad.append((red, "no single warn line"))
        assert_alive(n, workers, "after redeem %r" % red)
    assert not bad, bad
    rec = record(redis.client, "rd4")
    assert (rec["points"], rec["orders"]) == (50 + len(weird),
                                              1 + len(weird))
    assert metric(n, "loyalty_redeem_shortfall_total") == 1
    assert_alive(n, workers)


ODD_ORDER_IDS = ['a"b\\c{d}e', "{x}", "}{", "%s%n%d", "\\", '"', "'",
                 "<script>", "a:b:c", "x" * 128,
                 "!#$&()*+,-.:;<=>?@[]^_`{|}~" + "A" * 10]


def test_order_id_bounds(redis, nginx):
    n = bound_nginx(nginx, redis)
    workers = n.workers()
    bad = []
    # printable ids are credited, and the marker key holds them verbatim
    for i, oid in enumerate(ODD_ORDER_IDS):
        cid = "oi%d" % i
        # the shop sends $arg_oid undecoded: put the id in the query as is,
        # except for the characters that would end the argument or the URI
        raw = oid.replace("%", "%25").replace("&", "%26").replace(
            "#", "%23").replace("?", "%3F")
        if raw != oid:
            r = http_request(n.port, wpath("w", "3", oid),
                             headers={"X-Customer": cid})
        else:
            r = http_request(n.port, "/buy?total=3&oid=" + oid,
                             headers={"X-Customer": cid})
        if r.status != 200 or r.header("X-Loyalty-Earned") != "3":
            bad.append((oid, r))
            continue
        try:
            got = wait_marker(redis.client, cid, oid, timeout=3)
        except AssertionError:
            got = customer_keys(redis.client, cid)
        if got != "3:0":
            bad.append((oid, "marker", got))
            continue
        entries = ledger_entries(redis.client, cid)
        if [e["order"] for e in entries] != [oid]:
            bad.append((oid, "ledger", entries))
        assert_alive(n, workers, "after order id %r" % oid)

    # 129 characters, blanks, control bytes, non-ASCII: nothing credited
    invalid = ["y" * 129, "a b", "a\tb", "a\x7fb", "caf\u00e9", "a\x01",
               "\u3042" * 43]
    for i, oid in enumerate(invalid):
        cid = "oinv%d" % i
        r = http_request(n.port, wpath("w", "3", oid),
                         headers={"X-Customer": cid})
        if r.status != 200 or r.header("X-Loyalty-Earned") is not None:
            bad.append((oid, r))
        if len([l for l in log_lines(n.error_log(), "warn")
                if 'customer "%s": invalid order id' % cid in l]) != 1:
            bad.append((oid, "no single warn line"))
        assert_alive(n, workers, "after order id %r" % oid)
    flush(n, redis.client)
    for i, oid in enumerate(invalid):
        if customer_keys(redis.client, "oinv%d" % i):
            bad.append((oid, "credited", customer_keys(redis.client,
                                                        "oinv%d" % i)))
    assert not bad, "\n".join(map(repr, bad))


def test_balance_at_2_53(redis, nginx):
    """The script keeps balances below 2^53; the order that would reach it
    is refused by Redis, retried, never dropped (journaled on exit), and
    the record is left exactly as it was."""
    n = bound_nginx(nginx, redis,
                    http="loyalty_journal {prefix}/loyalty.journal;")
    workers = n.workers()
    top = 2 ** 53 - 1
    redis.seed("rich", points=top - 10, lifetime=top - 10, orders=1)
    r = http_request(n.port, "/buy?total=10&oid=fill",
                     headers={"X-Customer": "rich"})
    assert r.header("X-Loyalty-Points") == str(top), r
    assert wait_marker(redis.client, "rich", "fill") == "10:0"
    assert record(redis.client, "rich")["points"] == top
    before = redis.client.hgetall(hkey("rich"))

    r = http_request(n.port, "/buy?total=1&oid=over",
                     headers={"X-Customer": "rich"})
    assert r.status == 200, r
    wait_until(lambda: level_lines(n, "would overflow", ("warn",)), 5,
               message="the refused credit")
    assert_alive(n, workers)
    assert redis.client.hgetall(hkey("rich")) == before
    assert not redis.client.exists(marker("rich", "over"))
    assert n.stop() is None
    entries = read_journal(os.path.join(n.prefix, "loyalty.journal"))
    assert [(e["customer"], e["order"], e["earned"]) for e in entries] == [
        ("rich", "over", 1)], entries
    assert not crash_lines(n)


# no "{" or "}": a prefix may not move the hash tag of the keys
MAX_PREFIX = "P" * 61 + '"%:'                    # 64 bytes
MAX_ORDER = '"\\' * 64                           # 128 bytes: " and \


@pytest.mark.parametrize("journal", ["file", "off"])
def test_max_lengths_journal_and_replay(redis_factory, nginx, journal):
    """The longest prefix, customer id and order id, the order id made of
    the characters JSON must escape, with Redis down: the credit is
    journaled (or logged) as exact JSON, and replaying it writes the
    marker key byte for byte."""
    redis = redis_factory(start=False)
    http = ("loyalty_journal {prefix}/loyalty.journal;" if journal == "file"
            else "loyalty_journal off;")
    n = nginx(edge_conf(server="loyalty_redis_prefix '%s';" % MAX_PREFIX,
                        http=http), redis_port=redis.port, workers=1)
    workers = n.workers()
    r = http_request(n.port, "/buy?total=999999999999.9999&redeem=" +
                     "9" * 18 + "&oid=" + MAX_ORDER,
                     headers={"X-Customer": ID128})
    assert r.status == 200 and r.header("X-Loyalty-Status") == "unavailable"
    assert_alive(n, workers)
    assert n.stop() is None
    if journal == "file":
        path = os.path.join(n.prefix, "loyalty.journal")
        entries = read_journal(path)
    else:
        entries = error_log_credits(n.error_log())
        path = os.path.join(n.prefix, "unapplied.journal")
        with open(path, "w") as f:
            f.write("".join(json.dumps(e) + "\n" for e in entries))
    assert [(e["prefix"], e["customer"], e["order"], e["amount"],
             e["earned"], e["redeem"]) for e in entries] == [
        (MAX_PREFIX, ID128, MAX_ORDER, "999999999999.9999", 999999999999,
         10 ** 18 - 1)], entries
    assert not crash_lines(n)
    redis.start()
    redis.seed(ID128, points=1, lifetime=1, orders=1, prefix=MAX_PREFIX)
    rc, applied, _, failed, out = replay(path)
    assert (rc, applied, failed) == (0, 1, 0), out
    assert did(redis.client.get(marker(ID128, MAX_ORDER, MAX_PREFIX))) \
        == "999999999999:1"
    rec = record(redis.client, ID128, MAX_PREFIX)
    assert (rec["points"], rec["lifetime"], rec["orders"]) == (
        999999999999, 999999999999 + 1, 2)


# --------------------------------------------------------------------------
# a fake Redis with hostile replies


GOOD = dict(points=7, lifetime=70, orders=2, first_order=1700000000,
            last_order=1700000100)
GOOD_OK = expected("ok", "h", 7, 70, 2)
# the fields the module reads, "pending" (no points locked) last
FIELDS = ["points", "lifetime", "orders", "first_order", "last_order",
          "pending"]


def rec_reply(**over):
    """The HMGET reply for GOOD, with elements replaced (raw RESP bytes or
    a value for a bulk string)."""
    items = []
    for f in FIELDS:
        v = over.get(f, GOOD.get(f))
        items.append(v if isinstance(v, bytes) else
                     bulk(None) if v is None else bulk(str(v)))
    return array(*items)


def nested(depth, leaf=b":1\r\n"):
    out = leaf
    for _ in range(depth):
        out = b"*1\r\n" + out
    return out


MB = 1 << 20

# (label, command, answer, status, fields (0: zeroed) or None, log needle,
#  connection dropped)
READ_CASES = [
    ("integer", "HMGET", b":5\r\n", "unavailable", None,
     "unexpected redis reply", False),
    ("status", "HMGET", b"+OK\r\n", "unavailable", None,
     "unexpected redis reply", False),
    ("error", "HMGET", b"-ERR x\r\n", "unavailable", None,
     'redis error reading customer "h": "ERR x"', False),
    ("nil-bulk", "HMGET", b"$-1\r\n", "unavailable", None,
     "unexpected redis reply", False),
    ("nil-array", "HMGET", b"*-1\r\n", "unavailable", None,
     "unexpected redis reply", False),
    ("empty-array", "HMGET", b"*0\r\n", "unavailable", None,
     "unexpected redis reply", False),
    ("array-of-3", "HMGET", array(bulk("1"), bulk("2"), bulk("3")),
     "unavailable", None, "unexpected redis reply", False),
    ("array-of-7", "HMGET", array(*[bulk("1")] * 7), "unavailable", None,
     "unexpected redis reply", False),
    ("negative-array-count", "HMGET", b"*-2\r\n", "unavailable", None,
     "protocol error", True),
    ("array-count-2^31", "HMGET", b"*2147483648\r\n" + b":1\r\n" * 5,
     "unavailable", None, "redis", True),
    ("bulk-length-garbage", "HMGET", b"$abc\r\n", "unavailable", None,
     "redis", None),
    ("integer-garbage", "HMGET", b":abc\r\n", "unavailable", None,
     "redis", None),
    ("nested-field", "HMGET", rec_reply(points=array(integer(1), integer(2))),
     "ok", {"points": 0}, '"points" field', False),
    ("nested-depth-7", "HMGET", rec_reply(orders=nested(6)), "ok",
     {"orders": 0}, '"orders" field', False),
    # the deepest hiredis 0.14 parses, and one more: hiredis 1.x, which has
    # no limit of its own, must refuse the same (ngx_http_loyalty_proto.c)
    ("nested-depth-8", "HMGET", rec_reply(orders=nested(7)), "ok",
     {"orders": 0}, '"orders" field', False),
    ("nested-depth-9", "HMGET", rec_reply(orders=nested(8)), "unavailable",
     None, "protocol error", True),
    ("nested-depth-20", "HMGET", rec_reply(orders=nested(20)), "unavailable",
     None, "protocol error", True),
    ("1MB-digits-field", "HMGET", rec_reply(points="9" * MB), "ok",
     {"points": 0}, '"points" field', False),
    ("1MB-x-field", "HMGET", rec_reply(lifetime="x" * MB), "ok",
     {"lifetime": 0}, '"lifetime" field', False),
    ("1MB-error", "HMGET", b"-" + b"E" * MB + b"\r\n", "unavailable", None,
     "redis error reading customer", False),
    ("negative-integer-field", "HMGET", rec_reply(points=integer(-5)), "ok",
     {"points": 0}, '"points" field', False),
    ("minus-one-string-field", "HMGET", rec_reply(orders="-1"), "ok",
     {"orders": 0}, '"orders" field', False),
    ("20-digit-string-field", "HMGET", rec_reply(points="9" * 20), "ok",
     {"points": 0}, '"points" field', False),
    ("20-digit-integer-field", "HMGET",
     rec_reply(points=b":" + b"9" * 20 + b"\r\n"), "unavailable", None,
     "protocol error", True),
    ("int64-max-field", "HMGET", rec_reply(points=str(2 ** 63 - 1)), "ok",
     {"points": 2 ** 63 - 1}, None, False),
    ("int64-max+1-field", "HMGET", rec_reply(points=str(2 ** 63)), "ok",
     {"points": 0}, '"points" field', False),
    ("status-field", "HMGET", rec_reply(points=b"+5\r\n"), "ok",
     {"points": 0}, '"points" field', False),
    ("error-field", "HMGET", rec_reply(lifetime=b"-ERR no\r\n"), "ok",
     {"lifetime": 0}, '"lifetime" field', False),
    ("crlf-in-field", "HMGET", rec_reply(points="5\r\n6"), "ok",
     {"points": 0}, '"points" field', False),
    ("nul-in-field", "HMGET", rec_reply(points="5\x006"), "ok",
     {"points": 0}, '"points" field', False),
    ("plus-field", "HMGET", rec_reply(points="+5"), "ok", {"points": 0},
     '"points" field', False),
    ("space-field", "HMGET", rec_reply(points=" 5"), "ok", {"points": 0},
     '"points" field', False),
    ("empty-field", "HMGET", rec_reply(points=""), "ok", {"points": 0},
     '"points" field', False),
    ("negative-bulk-length-field", "HMGET", rec_reply(points=b"$-7\r\n"),
     "unavailable", None, "protocol error", True),
    ("nil-field", "HMGET", rec_reply(points=bulk(None)), "ok",
     {"points": "nil"}, None, False),
    ("all-nil", "HMGET", array(*[bulk(None)] * 6), "new", None, None, False),
    # the five fields an older module asked for
    ("array-of-5", "HMGET", array(*[bulk("1")] * 5), "unavailable", None,
     "unexpected redis reply", False),
    # locked points of another tool's making: no points are added
    ("bad-pending-field", "HMGET", rec_reply(pending="1:2,"), "ok", {},
     '"pending" field', False),
    ("integer-pending-field", "HMGET", rec_reply(pending=integer(5)), "ok",
     {}, '"pending" field', False),
    ("bytewise", "HMGET", ("bytewise", rec_reply(), 0.003), "ok", {}, None,
     False),
    ("bytewise-then-rest", "HMGET",
     [("bytewise", rec_reply(points="1" * 40)[:30], 0.003),
      rec_reply(points="1" * 40)[30:]], "ok", {"points": 0},
     '"points" field', False),
    ("garbage", "HMGET", b"xyz\r\n", "unavailable", None, "protocol error",
     True),
    ("garbage-no-crlf", "HMGET", b"\x00\xff\xfe", "unavailable", None,
     "protocol error", True),
    ("resp3-null", "HMGET", b"_\r\n", "unavailable", None, "protocol error",
     True),
    ("resp3-map", "HMGET", b"%1\r\n+a\r\n+b\r\n", "unavailable", None,
     "protocol error", True),
    # RESP3, never asked for: a protocol error with hiredis 0.14 and 1.x
    ("resp3-null-field", "HMGET", rec_reply(points=b"_\r\n"), "unavailable",
     None, "protocol error", True),
    ("resp3-double-field", "HMGET", rec_reply(points=b",5\r\n"),
     "unavailable", None, "protocol error", True),
    ("resp3-bool-field", "HMGET", rec_reply(points=b"#t\r\n"), "unavailable",
     None, "protocol error", True),
    ("resp3-bignum-field", "HMGET", rec_reply(points=b"(5\r\n"),
     "unavailable", None, "protocol error", True),
    ("resp3-verbatim-field", "HMGET", rec_reply(points=b"=5\r\ntxt:5\r\n"),
     "unavailable", None, "protocol error", True),
    ("resp3-set", "HMGET", b"~5\r\n" + b":1\r\n" * 5, "unavailable", None,
     "protocol error", True),
    ("resp3-push", "HMGET", b">2\r\n+message\r\n+x\r\n", "unavailable",
     None, "protocol error", True),
    ("close-mid-reply", "HMGET",
     [rec_reply()[:9], ("sleep", 0.05), ("close",)], "unavailable", None,
     "closed the connection", True),
    ("close-without-reply", "HMGET", ("close",), "unavailable", None,
     "closed the connection", True),
    ("huge-bulk-length", "HMGET", b"$9223372036854775806\r\n12345",
     "unavailable", None, "did not answer in time", True),
    # refused at once, before anything is allocated for the elements
    ("huge-array-count", "HMGET", b"*10000000\r\n", "unavailable", None,
     "protocol error", True),
    ("unsolicited-extra-reply", "HMGET",
     [rec_reply(), ("sleep", 0.1), b"+OK\r\n"], "ok", {},
     "unexpected reply from redis", True),
    ("script-load-error", "SCRIPT", b"-ERR no scripting\r\n", "ok", {},
     "refused SCRIPT LOAD", False),
    ("script-load-integer", "SCRIPT", b":1\r\n", "ok", {}, None, False),
    # the status of the read right after these depends on the back-off
    ("script-load-garbage", "SCRIPT", b"xyz\r\n", None, None,
     "protocol error", True),
    ("script-load-close", "SCRIPT", ("close",), None, None,
     "closed the connection", True),
]

FAKE_READ_CONF = """
    location = /bal {
        loyalty_balance;
        loyalty_customer $http_x_customer;
        loyalty_redis 127.0.0.1:{redis_port};
        loyalty_redis_timeout 1s;
    }
    location = /metrics {
        loyalty off;
        loyalty_status;
    }
"""


def fake_nginx(nginx, fake):
    return nginx(checkout_conf("loyalty_redis_timeout 1s;",
                               locations=FAKE_READ_CONF),
                 redis_port=fake.port, workers=1)


def recovered(n, fake, timeout=5):
    """Normal requests get their own, intact record again (the module may
    need to reconnect after its back-off first)."""
    fake.seed("h", **GOOD)
    fake.seed("other", points=1, lifetime=2, orders=3, first_order=4,
              last_order=5)
    wait_until(lambda: n.get("/checkout", cookies={"cid": "h"}).loyalty
               == GOOD_OK, timeout, 0.05, "a normal read after the case")
    for _ in range(3):
        assert n.get("/checkout", cookies={"cid": "h"}).loyalty == GOOD_OK
        assert n.get("/checkout", cookies={"cid": "other"}).loyalty == \
            expected("ok", "other", 1, 2, 3)
    r = http_request(n.port, "/bal", headers={"X-Customer": "h"})
    assert r.status == 200 and '"points":7' in r.body, r


@pytest.mark.parametrize("case", READ_CASES, ids=[c[0] for c in READ_CASES])
def test_fake_redis_read_reply(fake_redis, nginx, case):
    label, command, answer, status, fields, needle, drops = case
    fake = fake_redis
    fake.seed("h", **GOOD)
    n = fake_nginx(nginx, fake)
    workers = n.workers()
    # open the connection with a normal read first, then the hostile reply
    assert n.get("/checkout", cookies={"cid": "h"}).loyalty == GOOD_OK
    assert fake.accepted == 1
    if command == "SCRIPT":
        # SCRIPT LOAD goes first on every new connection: make Redis drop
        # the first one so that the hostile answer meets a fresh one
        fake.queue("HMGET", ("close",))
        fake.queue("SCRIPT", answer)
        assert n.get("/checkout", cookies={"cid": "h"}).loyalty == \
            expected("unavailable")
        wait_until(lambda: fake.calls("SCRIPT")[1:], 5, 0.02,
                   "the module to reconnect")
        wait_until(lambda: fake.pending_answers("SCRIPT") == 0, 5, 0.02,
                   "the hostile SCRIPT LOAD answer to be used")
        time.sleep(0.05)
        accepted = fake.accepted
        r = n.get("/checkout", cookies={"cid": "h"})
    else:
        fake.queue("HMGET", answer)
        accepted = fake.accepted
        r = n.get("/checkout", cookies={"cid": "h"})
    assert r.status == 200, r
    if status == "ok":
        want = dict(GOOD, **{f: 0 if v == "nil" else v
                             for f, v in fields.items()})
        assert r.loyalty == expected("ok", "h", want["points"],
                                     want["lifetime"], want["orders"]), \
            r.loyalty
    elif status == "new":
        assert r.loyalty == expected("new", "h")
    elif status == "unavailable":
        assert r.loyalty == expected("unavailable"), r.loyalty
    time.sleep(0.15)                    # let late bytes and closes land
    assert_alive(n, workers, "after the %s reply" % label)
    if needle:
        assert level_lines(n, needle), "no warn/error line with %r:\n%s" % (
            needle, n.error_log()[-2500:])
    if fields:
        for f, v in fields.items():
            if v == 0:
                assert level_lines(n, 'has an invalid "%s" field' % f,
                                   ("warn",)), n.error_log()[-2000:]
    # a reply that never ends costs the connection only once nothing has
    # come for 10 x loyalty_redis_timeout (10 s here)
    recovered(n, fake, timeout=15)
    assert_alive(n, workers, "after the %s reply" % label)
    if command == "SCRIPT":
        # connection 1 was dropped on purpose, connection 2 met the answer
        if drops:
            assert fake.accepted >= 3, "the module did not reconnect"
        else:
            assert fake.accepted == 2, \
                "a well-formed reply should not cost the connection"
    elif drops:
        assert fake.accepted > accepted, "the module did not reconnect"
    elif drops is False:
        assert fake.accepted == accepted, \
            "a well-formed reply should not cost the connection"


def test_fake_redis_balance_handler(fake_redis, nginx):
    """loyalty_balance with hostile replies: 503 for a reply of the wrong
    shape, a zeroed field for a field that is not a count."""
    fake = fake_redis
    fake.seed("h", **GOOD)
    n = fake_nginx(nginx, fake)
    workers = n.workers()
    for answer, status, body in [
            (b":5\r\n", 503, '{"status":"unavailable"}'),
            (b"-ERR x\r\n", 503, '{"status":"unavailable"}'),
            (array(bulk("1")), 503, '{"status":"unavailable"}'),
            (rec_reply(points=integer(-1)), 200, '"points":0,'),
            (rec_reply(points="9" * MB), 200, '"points":0,'),
            (array(*[bulk(None)] * 6), 200, '"status":"new"'),
            # last: a protocol error costs the connection
            (b"*-2\r\n", 503, '{"status":"unavailable"}')]:
        fake.queue("HMGET", answer)
        r = http_request(n.port, "/bal", headers={"X-Customer": "h"})
        assert r.status == status and body in r.body, (answer[:40], r)
        assert_alive(n, workers, "after %r" % answer[:40])
    recovered(n, fake)


@pytest.mark.parametrize("concurrent", [2, 20])
def test_fake_redis_glued_replies(fake_redis, nginx, concurrent):
    """The replies to concurrent requests arrive in one write: each request
    gets its own record."""
    fake = fake_redis
    for i in range(concurrent):
        fake.seed("g%d" % i, points=100 + i, lifetime=200 + i, orders=i,
                  first_order=1, last_order=2)
    n = fake_nginx(nginx, fake)
    workers = n.workers()
    assert n.get("/checkout", cookies={"cid": "g0"}).status == 200
    for round_ in range(2):
        fake.queue("HMGET", *[
            (lambda args: [("glue", fake.default_reply(args))])
            for _ in range(concurrent - 1)])

        def one(i):
            return i, n.get("/checkout", cookies={"cid": "g%d" % i})
        for i, r in run_parallel(one, range(concurrent), threads=concurrent):
            assert r.loyalty == expected("ok", "g%d" % i, 100 + i, 200 + i,
                                         i), (round_, i, r.loyalty)
        assert fake.pending_answers("HMGET") == 0
    assert_alive(n, workers)
    assert fake.accepted == 1


def test_fake_redis_bytewise_concurrent(fake_redis, nginx):
    """Replies dribbled one byte per write to 8 pipelined reads."""
    fake = fake_redis
    for i in range(8):
        fake.seed("b%d" % i, points=i, lifetime=10 * i, orders=i,
                  first_order=1, last_order=2)
    n = fake_nginx(nginx, fake)
    workers = n.workers()
    assert n.get("/checkout", cookies={"cid": "b0"}).status == 200
    fake.queue("HMGET", *[
        (lambda args: [("bytewise", fake.default_reply(args), 0.0005)])
        for _ in range(8)])

    def one(i):
        return i, n.get("/checkout", cookies={"cid": "b%d" % i})
    for i, r in run_parallel(one, range(8), threads=8):
        assert r.loyalty == expected("ok", "b%d" % i, i, 10 * i, i), (
            i, r.loyalty)
    assert_alive(n, workers)


def test_fake_redis_clients_abort_mid_reply(fake_redis, nginx):
    """Clients that hang up while their replies are still dribbling in,
    between clients that wait: the replies of the gone requests are read
    and dropped, and every waiting request gets its own record."""
    fake = fake_redis
    for i in range(8):
        fake.seed("b%d" % i, points=i, lifetime=10 * i, orders=i,
                  first_order=1, last_order=2)
    n = fake_nginx(nginx, fake)
    workers = n.workers()
    assert n.get("/checkout", cookies={"cid": "b0"}).status == 200
    fake.queue("HMGET", *[
        (lambda args: [("bytewise", fake.default_reply(args), 0.001)])
        for _ in range(8)])

    def one(i):
        if i % 2:
            s = socket.create_connection(("127.0.0.1", n.port), timeout=5)
            s.sendall(b"GET /checkout HTTP/1.1\r\nHost: x\r\n"
                      b"Cookie: cid=b%d\r\n\r\n" % i)
            time.sleep(0.02)
            s.close()
            return i, None
        time.sleep(0.005 * i)
        return i, n.get("/checkout", cookies={"cid": "b%d" % i})
    for i, r in run_parallel(one, range(8), threads=8):
        if r is not None:
            assert r.loyalty == expected("ok", "b%d" % i, i, 10 * i, i), (
                i, r.loyalty)
    wait_until(lambda: fake.pending_answers("HMGET") == 0, 5, 0.02,
               "every read to be answered")
    time.sleep(0.6)
    assert_alive(n, workers)
    recovered(n, fake)
    assert fake.accepted == 1


@pytest.mark.parametrize("answer,drops", [
    (b"-ERR invalid password\r\n", True), (b":1\r\n", False),
    (b"xyz\r\n", True), (b"*-2\r\n", True)],
    ids=["error", "integer", "garbage", "negative-array"])
def test_fake_redis_auth_select_replies(fake_redis, nginx, answer, drops):
    """AUTH and SELECT go first on every connection; a hostile answer to
    AUTH costs at most that connection."""
    fake = fake_redis
    fake.seed("h", **GOOD)
    n = nginx(checkout_conf("loyalty_redis_timeout 1s;",
                            locations=FAKE_READ_CONF,
                            redis="127.0.0.1:{redis_port} db=3 password=pw"),
              redis_port=fake.port, workers=1)
    workers = n.workers()
    fake.queue("AUTH", answer)
    r = n.get("/checkout", cookies={"cid": "h"})
    assert r.status == 200
    assert r.loyalty == (expected("unavailable") if drops else GOOD_OK), \
        r.loyalty
    time.sleep(0.1)
    assert_alive(n, workers)
    recovered(n, fake)
    assert fake.calls("AUTH")[0] == [b"AUTH", b"pw"]
    assert fake.calls("SELECT")[0] == [b"SELECT", b"3"]
    # (/bal names the address without db= and password=: a connection of
    # its own, without AUTH)
    with_auth = [no for no in range(1, fake.accepted + 1)
                 if fake.connection_commands(no)[:1] == ["AUTH"]]
    assert len(with_auth) == (2 if drops else 1), with_auth
    # ROLE: a replica where the master was is not used.  A connection
    # dropped at the AUTH reply may close before the fake read it all.
    handshake = ["AUTH", "SELECT", "ROLE", "SCRIPT"]
    for no in with_auth:
        sent = fake.connection_commands(no)[:4]
        assert sent == handshake[:len(sent)] and len(sent) >= 3, sent
    assert fake.connection_commands(with_auth[-1])[:4] == handshake
    if answer.startswith(b"-"):
        assert level_lines(n, 'redis refused AUTH: '
                              '"ERR invalid password"', ("error",))


ROLE_CASES = [
    ("master", array(bulk("master"), integer(0), array()), None),
    ("replica", array(bulk("slave"), bulk("127.0.0.1"), integer(6379),
                      bulk("connected"), integer(0)),
     'redis is not the master (ROLE "slave")'),
    ("sentinel", array(bulk("sentinel"), array(bulk("mymaster"))),
     'redis is a sentinel: name its master with "sentinel="'),
    ("refused", b"-NOPERM this user has no permissions to run the 'role' "
                b"command\r\n", None),
    ("integer", integer(1), "unexpected reply from redis to ROLE"),
]


@pytest.mark.parametrize("case", ROLE_CASES, ids=[c[0] for c in ROLE_CASES])
def test_fake_redis_role(fake_redis, nginx, case):
    """Each connection asks ROLE in its handshake: a replica or a sentinel
    is not used (reads unavailable, an error naming it); a Redis that
    refuses ROLE is taken at its word."""
    label, answer, error = case
    fake = fake_redis
    fake.seed("h", **GOOD)
    n = fake_nginx(nginx, fake)
    workers = n.workers()
    fake.queue("ROLE", answer)
    r = n.get("/checkout", cookies={"cid": "h"})
    assert r.status == 200
    assert r.loyalty == (expected("unavailable") if error else GOOD_OK), \
        r.loyalty
    # ROLE first, then the script; a connection that ROLE fails may be
    # closed before the fake has read the SCRIPT LOAD behind it
    sent = fake.connection_commands(1)[:2]
    assert sent == ["ROLE", "SCRIPT"] or (error and sent == ["ROLE"]), sent
    if error:
        assert level_lines(n, error, ("error",)), n.error_log()
        # the next connection finds a master again
        recovered(n, fake)
        assert fake.accepted >= 2
    else:
        assert fake.accepted == 1
    assert_alive(n, workers)


def test_fake_redis_readonly_read_drops_connection(fake_redis, nginx):
    """A READONLY reply (the server was demoted under us) fails what is on
    that connection and the connection: the next one asks ROLE again."""
    fake = fake_redis
    fake.seed("h", **GOOD)
    n = fake_nginx(nginx, fake)
    assert n.get("/checkout", cookies={"cid": "h"}).loyalty == GOOD_OK
    fake.queue("HMGET", b"-READONLY You can't write against a read only "
                        b"replica.\r\n")
    r = n.get("/checkout", cookies={"cid": "h"})
    assert r.loyalty == expected("unavailable"), r.loyalty
    assert level_lines(n, "redis answered READONLY, looking for the master "
                          "again", ("warn",))
    recovered(n, fake)
    assert fake.accepted == 2
    assert fake.connection_commands(2)[:1] == ["ROLE"]


def test_fake_redis_error_replies_rate_limited(fake_redis, nginx):
    """Every read answered -LOADING (a Redis loading its dataset): each is
    unavailable, but the warning is logged at most once a second per
    worker, with the count of those not logged, as for invalid ids."""
    fake = fake_redis
    fake.seed("h", **GOOD)
    n = fake_nginx(nginx, fake)
    workers = n.workers()
    assert n.get("/checkout", cookies={"cid": "h"}).loyalty == GOOD_OK
    count = 60
    fake.queue("HMGET", *[b"-LOADING Redis is loading the dataset in "
                          b"memory\r\n"] * count)
    t0 = time.monotonic()
    for i in range(count):
        if i == count - 1:
            time.sleep(1.1)             # the next second logs again
        r = n.get("/checkout", cookies={"cid": "h"})
        assert r.status == 200 and r.loyalty == expected("unavailable"), r
    seconds = time.monotonic() - t0
    lines = [message_of(l) for l in level_lines(
        n, "redis error reading customer", ("warn",))]
    assert 2 <= len(lines) <= seconds + 2, "\n".join(lines)
    assert all('"h": "LOADING Redis is loading' in l for l in lines), lines
    more = [int(m.group(1)) for m in
            (re.search(r"\((\d+) more not logged\)$", l) for l in lines)
            if m]
    assert more, lines
    assert len(lines) + sum(more) == count, (lines, more)
    assert fake.accepted == 1, "an error reply cost the connection"
    recovered(n, fake)
    assert_alive(n, workers)


def vm_hwm(pid):
    """Peak resident set size of a process, in bytes."""
    with open("/proc/%d/status" % pid) as f:
        return int(re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M)
                   .group(1)) * 1024


@pytest.mark.skipif(os.environ.get("LOYALTY_SANITIZER") == "asan",
                    reason="an RLIMIT_AS cap leaves AddressSanitizer no "
                           "room for its shadow memory (make test-asan)")
@pytest.mark.parametrize("count", [2 ** 31 - 1, 50000000])
def test_fake_redis_announced_array_size(fake_redis, nginx, count):
    """A reply that announces a huge array and never sends it: the worker
    must not allocate (and zero) memory for what was only announced.
    nginx is started with its address space capped (RLIMIT_AS, inherited
    from this process for the moment of the start), so that an attempt to
    allocate 2^31 element pointers fails instead of zeroing 16 GiB of
    this machine's memory."""
    fake = fake_redis
    fake.seed("h", **GOOD)
    n = nginx(checkout_conf("loyalty_redis_timeout 1s;",
                            locations=FAKE_READ_CONF),
              redis_port=fake.port, workers=1, start=False)
    cap = 4 << 30
    old = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (cap, old[1]))
    try:
        n.start()
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old)
    workers = n.workers()
    for pid in workers:
        with open("/proc/%d/limits" % pid) as f:
            line = [l for l in f if l.startswith("Max address space")][0]
        assert int(line.split()[3]) == cap, line
    assert n.get("/checkout", cookies={"cid": "h"}).loyalty == GOOD_OK
    peak = vm_hwm(workers[0])
    fake.queue("HMGET", b"*%d\r\n" % count + b":1\r\n" * 5)
    r = n.get("/checkout", cookies={"cid": "h"})
    assert r.status == 200 and r.loyalty == expected("unavailable"), r
    time.sleep(0.1)
    assert_alive(n, workers)
    recovered(n, fake)
    grown = vm_hwm(workers[0]) - peak
    assert grown < 64 << 20, (
        "the worker's peak RSS grew by %d MB for a reply that announced "
        "%d elements and sent 5" % (grown >> 20, count))


# the credit path: hostile replies to EVALSHA


CREDIT_FAKE_LOCS = """
    location = /metrics {
        loyalty off;
        loyalty_status;
    }
"""

# (label, answer, outcome): "retried": not applied by this reply, sent
# again later; "applied" / "duplicate": the reply counts as that
CREDIT_CASES = [
    ("integer", b":1\r\n", "retried"),
    ("status", b"+OK\r\n", "retried"),
    ("error", b"-ERR x\r\n", "retried"),
    ("nil-bulk", b"$-1\r\n", "retried"),
    ("nil-array", b"*-1\r\n", "retried"),
    ("empty-array", b"*0\r\n", "retried"),
    ("array-of-1", array(integer(1)), "retried"),
    ("string-first", array(bulk("1"), bulk("5:0")), "retried"),
    ("nil-first", array(bulk(None), bulk("5:0")), "retried"),
    ("nested-first", array(array(integer(1)), bulk("5:0")), "retried"),
    ("negative-array-count", b"*-2\r\n", "retried"),
    ("array-count-2^31", b"*2147483648\r\n" + b":1\r\n" * 4, "retried"),
    ("garbage", b"xyz\r\n", "retried"),
    # a replica where the master was: the connection goes, the credit waits
    ("readonly", b"-READONLY You can't write against a read only "
                 b"replica.\r\n", "retried"),
    # a master under min-replicas-to-write: retried, the connection kept
    ("noreplicas", b"-NOREPLICAS Not enough good replicas to write.\r\n",
     "retried"),
    ("close-mid-reply", [array(integer(1), bulk("5:0"))[:6], ("close",)],
     "retried"),
    ("1MB-error", b"-" + b"E" * MB + b"\r\n", "retried"),
    ("noscript", b"-NOSCRIPT No matching script\r\n", "applied"),
    ("bytewise", ("bytewise", array(integer(1), bulk("5:0"), integer(5),
                                    integer(0)), 0.002), "applied"),
    ("two-elements", array(integer(1), bulk("5:0")), "applied"),
    ("nil-marker-short", array(integer(1), bulk(None), integer(0),
                               integer(1)), "applied"),
    ("array-marker-short", array(integer(1), array(integer(1)), integer(0),
                                 integer(1)), "applied"),
    ("bad-marker-short", array(integer(1), bulk("x:y"), integer(0),
                               integer(1)), "applied"),
    ("huge-marker-short", array(integer(1), bulk("5:" + "9" * 40),
                                integer(0), integer(1)), "applied"),
    ("1MB-marker", array(integer(1), bulk("5:" + "0" * MB), integer(0),
                         integer(0)), "applied"),
    ("short-is-string", array(integer(1), bulk("5:0"), integer(0),
                              bulk("1")), "applied"),
    ("first-is-2", array(integer(2), bulk("5:0"), integer(0), integer(0)),
     "applied"),
    ("first-is-negative", array(integer(-1), bulk("5:0"), integer(0),
                                integer(0)), "applied"),
    ("ten-elements", array(integer(1), bulk("5:0"),
                           *[integer(0)] * 8), "applied"),
    ("duplicate", array(integer(0), bulk("5:0")), "duplicate"),
    ("duplicate-nil-marker", array(integer(0), bulk(None)), "duplicate"),
]


def credit_calls(fake, oid):
    return [a for a in fake.calls("EVALSHA") + fake.calls("EVAL")
            if len(a) > 11 and a[11] == oid.encode()]


@pytest.mark.parametrize("case", CREDIT_CASES,
                         ids=[c[0] for c in CREDIT_CASES])
def test_fake_redis_credit_reply(fake_redis, nginx, case):
    label, answer, outcome = case
    fake = fake_redis
    fake.seed("c", points=5, lifetime=5, orders=1, first_order=1,
              last_order=2)
    n = nginx(edge_conf(locations=CREDIT_FAKE_LOCS), redis_port=fake.port,
              workers=1)
    workers = n.workers()
    # a normal credit first: the connection is open and the script loaded
    r = http_request(n.port, "/buy?total=1&oid=warm",
                     headers={"X-Customer": "c"})
    assert r.header("X-Loyalty-Earned") == "1", r
    wait_until(lambda: credit_calls(fake, "warm"), 5, 0.02, "the credit")
    assert metric(n, 'loyalty_credits_total{result="applied"}') == 1

    fake.queue("EVALSHA", answer)
    r = http_request(n.port, "/buy?total=5&oid=o1",
                     headers={"X-Customer": "c"})
    assert r.status == 200 and r.header("X-Loyalty-Earned") == "5", r
    assert r.header("X-Loyalty-Points") == "10"
    wait_until(lambda: credit_calls(fake, "o1"), 5, 0.02, "the credit")
    time.sleep(0.15)
    assert_alive(n, workers, "after the %s reply to a credit" % label)

    # reads still work meanwhile
    wait_until(lambda: http_request(n.port, "/buy", headers={
        "X-Customer": "c"}).header("X-Loyalty-Points") == "5", 5, 0.05,
        "a normal read after the case")
    if label == "readonly":
        wait_until(lambda: fake.accepted == 2, 5, 0.05, "a new connection")
    if label == "noreplicas":
        assert fake.accepted == 1, "NOREPLICAS is no reason to reconnect"
    if outcome == "retried":
        # not dropped: sent again (within about a second) and applied
        wait_until(lambda: len(credit_calls(fake, "o1")) >= 2, 5, 0.05,
                   "the credit to be retried")
        wait_until(lambda: metric(
            n, 'loyalty_credits_total{result="applied"}') == 2, 5, 0.05,
            "the retried credit to be applied")
        assert metric(n, 'loyalty_credits_total{result="retried"}') >= 1
        assert len(credit_calls(fake, "o1")) == 2
    else:
        time.sleep(0.1)
        calls = credit_calls(fake, "o1")
        if label == "noscript":
            assert [c[0] for c in calls] == [b"EVALSHA", b"EVAL"], calls
        else:
            assert len(calls) == 1, calls
        applied = 2 if outcome == "applied" else 1
        assert metric(n, 'loyalty_credits_total{result="applied"}') == \
            applied
        assert metric(n, 'loyalty_credits_total{result="duplicate"}') == \
            (1 if outcome == "duplicate" else 0)
        assert (metric(n, 'loyalty_credits_total{result="retried"}') or 0) \
            == 0
    # what the module sent is exactly the order, whatever came back
    for c in credit_calls(fake, "o1"):
        assert c[3:8] == [b"loyalty:{c}", b"loyalty:{c}:order:o1",
                          b"loyalty:{c}:ledger", b"5", b"0"], c
    # a later credit goes through normally
    r = http_request(n.port, "/buy?total=2&oid=after",
                     headers={"X-Customer": "c"})
    assert r.header("X-Loyalty-Earned") == "2", r
    wait_until(lambda: credit_calls(fake, "after"), 5, 0.02, "the credit")
    assert_alive(n, workers, "after the %s reply to a credit" % label)

