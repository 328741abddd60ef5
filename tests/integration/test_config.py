"""Configuration (issue #2): `nginx -t` rejects bad arguments with a message
naming the directive, the file and the line; accepts every valid form;
reload applies a new configuration."""

import json
import re

import pytest

from conftest import BACKEND, checkout_conf, expected, twice


CONF = """
    server {
        listen 127.0.0.1:{port};
        @SERVER@
        location /checkout {
            loyalty on;
            loyalty_customer $cookie_cid;
            @LINES@
            proxy_pass http://127.0.0.1:{backend_port};
        }
    }
"""


def conf(lines, server="", http=""):
    return http + CONF.replace("@LINES@", lines).replace("@SERVER@", server)


BAD = [
    # id, lines, directive named in the message, text of the offending line
    ("tier-missing-threshold", "loyalty_tier gold;", "loyalty_tier", None),
    ("tier-no-args", "loyalty_tier;", "loyalty_tier", None),
    ("tier-negative", "loyalty_tier gold -5;", "loyalty_tier", None),
    ("tier-non-numeric", "loyalty_tier gold abc;", "loyalty_tier", None),
    ("tier-suffix", "loyalty_tier gold 10x;", "loyalty_tier", None),
    ("tier-multiplier-abc", "loyalty_tier gold 100 multiplier=abc;",
     "loyalty_tier", None),
    ("tier-multiplier-negative", "loyalty_tier gold 100 multiplier=-1;",
     "loyalty_tier", None),
    ("tier-multiplier-empty", "loyalty_tier gold 100 multiplier=;",
     "loyalty_tier", None),
    ("tier-unknown-param", "loyalty_tier gold 100 bonus=2;", "loyalty_tier",
     None),
    ("tier-duplicate-name", "loyalty_tier gold 100;\n"
     "            loyalty_tier gold 200;", "loyalty_tier",
     "loyalty_tier gold 200;"),

    ("offer-no-name", "loyalty_offer;", "loyalty_offer", None),
    ("offer-unknown-param", "loyalty_offer x foo=bar;", "loyalty_offer", None),
    ("offer-unknown-flag", "loyalty_offer x newish;", "loyalty_offer", None),
    ("offer-min_points-abc", "loyalty_offer x min_points=abc;",
     "loyalty_offer", None),
    ("offer-min_points-negative", "loyalty_offer x min_points=-1;",
     "loyalty_offer", None),
    ("offer-min_points-empty", "loyalty_offer x min_points=;",
     "loyalty_offer", None),
    ("offer-max_points-abc", "loyalty_offer x max_points=1e3;",
     "loyalty_offer", None),
    ("offer-min_orders-abc", "loyalty_offer x min_orders=two;",
     "loyalty_offer", None),
    ("offer-max_orders-abc", "loyalty_offer x max_orders=9.5;",
     "loyalty_offer", None),
    ("offer-min-gt-max-points", "loyalty_offer x min_points=10 max_points=5;",
     "loyalty_offer", None),
    ("offer-min-gt-max-orders", "loyalty_offer x min_orders=3 max_orders=2;",
     "loyalty_offer", None),
    ("offer-inactive-abc", "loyalty_offer x inactive=abc;", "loyalty_offer",
     None),
    ("offer-inactive-empty", "loyalty_offer x inactive=;", "loyalty_offer",
     None),
    ("offer-inactive-negative", "loyalty_offer x inactive=-1d;",
     "loyalty_offer", None),
    ("offer-if-without-dollar", "loyalty_offer x if=holdout;",
     "loyalty_offer", None),
    ("offer-if-empty", "loyalty_offer x if=;", "loyalty_offer", None),
    # names and codes go into headers: no control characters
    ("offer-name-newline", "loyalty_offer 'two\\nlines';", "loyalty_offer",
     None),
    ("offer-name-empty", "loyalty_offer '';", "loyalty_offer", None),
    ("offer-code-crlf", "loyalty_offer x 'code=A\\r\\nX-Evil: 1';",
     "loyalty_offer", None),
    ("tier-name-tab", "loyalty_tier 'gold\\t' 100;", "loyalty_tier", None),

    ("redis-port-abc", "loyalty_redis 127.0.0.1:abc;", "loyalty_redis", None),
    ("redis-port-range", "loyalty_redis 127.0.0.1:99999;", "loyalty_redis",
     None),
    ("redis-db-abc", "loyalty_redis 127.0.0.1:6379 db=abc;", "loyalty_redis",
     None),
    ("redis-db-negative", "loyalty_redis 127.0.0.1:6379 db=-1;",
     "loyalty_redis", None),
    ("redis-unknown-param", "loyalty_redis 127.0.0.1:6379 foo=bar;",
     "loyalty_redis", None),
    ("redis-no-args", "loyalty_redis;", "loyalty_redis", None),
    ("redis-address-too-long", "loyalty_redis unix:/%s.sock;" % ("d" * 260),
     "loyalty_redis", None),

    ("fail-maybe", "loyalty_fail maybe;", "loyalty_fail", None),
    ("timeout-abc", "loyalty_redis_timeout abc;", "loyalty_redis_timeout",
     None),
    ("timeout-suffix", "loyalty_redis_timeout 5x;", "loyalty_redis_timeout",
     None),
    ("timeout-duplicate", "loyalty_redis_timeout 1s;\n"
     "            loyalty_redis_timeout 2s;", "loyalty_redis_timeout",
     "loyalty_redis_timeout 2s;"),
    ("loyalty-maybe", "loyalty maybe;", "loyalty", None),
    ("response-headers-maybe", "loyalty_response_headers maybe;",
     "loyalty_response_headers", None),
    ("request-headers-maybe", "loyalty_request_headers maybe;",
     "loyalty_request_headers", None),
    ("customer-no-args", "loyalty_customer;", "loyalty_customer", None),
    ("prefix-no-args", "loyalty_redis_prefix;", "loyalty_redis_prefix", None),
]


def _assert_rejected(check, directive, line_text):
    rc, out = check
    assert rc != 0, "nginx -t accepted:\n%s\n%s" % (out, open(check.conf).read())
    line = check.line_of(line_text)
    where = "in %s:%d" % (check.conf, line)
    named = re.compile(r"\b%s\b" % re.escape(directive))
    hits = [l for l in out.splitlines() if where in l and named.search(l)]
    assert hits, ("no line of the nginx -t output names %r and %r:\n%s"
                  % (directive, where, out))
    assert "[emerg]" in hits[0]


@pytest.mark.parametrize("lines,directive,marker",
                         [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_rejects_bad_arguments(nginx, lines, directive, marker):
    check = nginx.check_config(conf(lines))
    _assert_rejected(check, directive, marker or lines.strip())


@pytest.mark.parametrize("level", ["http", "server"])
@pytest.mark.parametrize("line,directive", [
    ("loyalty_tier gold abc;", "loyalty_tier"),
    ("loyalty_offer x min_points=10 max_points=5;", "loyalty_offer"),
    ("loyalty_redis 127.0.0.1:6379 db=abc;", "loyalty_redis"),
    ("loyalty_fail maybe;", "loyalty_fail"),
], ids=["tier", "offer", "redis", "fail"])
def test_rejects_bad_arguments_at_http_and_server_level(nginx, level, line,
                                                        directive):
    if level == "http":
        check = nginx.check_config(conf("", http=line + "\n"))
    else:
        check = nginx.check_config(conf("", server=line))
    _assert_rejected(check, directive, line)


GOOD = [
    ("tiers", "loyalty_tier basic 0; loyalty_tier gold 1000 multiplier=1.5;"
     " loyalty_tier vip 1000000000000000000 multiplier=2;"),
    ("offer-every-param", "loyalty_tier gold 1000; loyalty_offer full code=C "
     "tier=gold min_points=0 max_points=100 min_orders=1 max_orders=9 "
     "inactive=90d if=$arg_x;"),
    ("offer-new", "loyalty_offer welcome code=HELLO new;"),
    ("offer-bare", "loyalty_offer always;"),
    ("offer-equal-bounds", "loyalty_offer x min_points=5 max_points=5 "
     "min_orders=2 max_orders=2;"),
    ("offer-inactive-units", "loyalty_offer a inactive=12h; "
     "loyalty_offer b inactive=30m; loyalty_offer c inactive=1y;"),
    ("redis-params", "loyalty_redis 127.0.0.1:6379 db=15 password=p user=u;"),
    ("redis-localhost", "loyalty_redis localhost:6380;"),
    ("redis-unix", "loyalty_redis unix:/tmp/loyalty-it-redis.sock;"),
    ("misc", "loyalty_redis_timeout 250ms; loyalty_fail reject; "
     "loyalty_redis_prefix shop2:; loyalty_response_headers on; "
     "loyalty_request_headers off;"),
]


@pytest.mark.parametrize("lines", [c[1] for c in GOOD],
                         ids=[c[0] for c in GOOD])
def test_accepts_valid_arguments(nginx, lines):
    rc, out = nginx.check_config(conf(lines))
    assert rc == 0, out
    rc, out = nginx.check_config(conf("", http=lines + "\n"))
    assert rc == 0, out


def test_reload_applies_new_configuration(redis, nginx):
    n = nginx(checkout_conf("loyalty_tier silver 100;"), redis_port=redis.port)
    redis.seed("c", points=1, lifetime=500, orders=1)
    for _ in range(2):
        assert n.get("/checkout", cookies={"cid": "c"}).loyalty == \
            expected("ok", "c", 1, 500, 1, "silver")
    n.reload(checkout_conf("loyalty_tier bronze 100; loyalty_tier gold 400; "
                           "loyalty_offer back code=B min_orders=1;"))
    for _ in range(2):
        assert n.get("/checkout", cookies={"cid": "c"}).loyalty == \
            expected("ok", "c", 1, 500, 1, "gold", "back", "B")
    n.reload()
    assert n.get("/checkout", cookies={"cid": "c"}).loyalty == \
        expected("ok", "c", 1, 500, 1, "gold", "back", "B")


# --------------------------------------------------------------------------
# partial configurations: a location that reads without any loyalty_redis
# uses the default address, 127.0.0.1:6379, whatever the order of the
# locations (SPEC §2, last paragraph; §3)


PARTIAL = """
    server {
        listen 127.0.0.1:{port};
        location = /__harness_ready { return 204; }
        @LOCATIONS@
    }
""" + BACKEND

READS = """
        location /a {
            loyalty on;
            loyalty_customer $http_x_customer;
            proxy_pass http://127.0.0.1:{backend_port};
        }
"""

BALANCE = """
        location /b {
            loyalty_customer $http_x_customer;
            loyalty_balance;
            if ($arg_in_if) {
                # the "if" block's configuration answers the request
            }
        }
"""


def partial_conf(*locations):
    return PARTIAL.replace("@LOCATIONS@", "".join(locations))


def default_address_answers(n, paths):
    """{path: (status, body)} of alice's requests, body decoded (JSON of a
    balance, X-Loyalty-* headers the backend got for /a)."""
    out = {}
    for path in paths:
        r = n.get(path, headers={"X-Customer": "alice"})
        body = r.loyalty if path.startswith("/a") else json.loads(r.body)
        out[path] = (r.status, body)
    return out


ALICE = {"status": "ok", "customer": "alice", "points": 7, "lifetime": 9,
         "orders": 1, "tier": None, "offer": None, "offer_code": None}


def test_balance_without_loyalty_redis_uses_default_address(default_redis,
                                                            nginx):
    default_redis.seed("alice", points=7, lifetime=9, orders=1)
    n = nginx(partial_conf(BALANCE))
    workers = n.workers()
    before = default_redis.hmget_calls()
    assert twice(lambda: default_address_answers(
        n, ["/b", "/b?in_if=1"])) == {
        "/b": (200, ALICE), "/b?in_if=1": (200, ALICE)}
    assert default_redis.hmget_calls() - before == 4
    assert n.workers() == workers, "a worker died"
    assert "exited on signal" not in n.error_log()


@pytest.mark.parametrize("order", ["reads-first", "balance-first"])
def test_default_address_independent_of_location_order(default_redis,
                                                       nginx, order):
    default_redis.seed("alice", points=7, lifetime=9, orders=1)
    locations = (READS, BALANCE) if order == "reads-first" else (BALANCE,
                                                                 READS)
    n = nginx(partial_conf(*locations))
    workers = n.workers()
    before = default_redis.hmget_calls()
    assert twice(lambda: default_address_answers(
        n, ["/a", "/b", "/b?in_if=1"])) == {
        "/a": (200, expected("ok", "alice", 7, 9, 1)),
        "/b": (200, ALICE), "/b?in_if=1": (200, ALICE)}
    assert default_redis.hmget_calls() - before == 6
    assert n.workers() == workers, "a worker died"
    assert "exited on signal" not in n.error_log()
