"""Read path (issue #2): statuses, request/response headers, variables,
tiers, offers, Redis key layout, pipelining, internal redirects.

Every data-driven case sends its request twice to the same nginx, so state
leaking from one request into the next shows up."""

import time

import pytest

from conftest import (BACKEND, DAY, KEEP, LOYALTY_HEADERS, SPOOF, TIERS,
                      checkout_conf,
                      expected, log_lines, run_parallel, twice, wait_until)


# --------------------------------------------------------------------------
# statuses


def test_anonymous_no_redis_call(redis, nginx):
    n = nginx(checkout_conf(TIERS + "loyalty_offer all code=ALL;"),
              redis_port=redis.port)
    before = redis.hmget_calls()
    for _ in range(2):
        for cookies in (None, "cid=", "other=c1"):
            r = n.get("/checkout", cookies=cookies)
            assert r.status == 200, r
            assert r.loyalty == {"X-Loyalty-Status": "anonymous"}, (cookies, r)
        r = n.get("/hcheckout", headers={"X-Customer": ""})
        assert r.loyalty == {"X-Loyalty-Status": "anonymous"}
    assert redis.hmget_calls() == before


def test_new_customer(redis, nginx):
    n = nginx(checkout_conf(), redis_port=redis.port)
    before = redis.hmget_calls()
    r = twice(lambda: n.get("/checkout", cookies={"cid": "nobody-yet"}).loyalty)
    assert r == expected("new", "nobody-yet")
    assert redis.hmget_calls() == before + 2
    assert redis.client.exists("loyalty:{nobody-yet}") == 0, \
        "the read path must not create records"


def test_known_customer_every_header(redis, nginx):
    n = nginx(checkout_conf(TIERS + "loyalty_offer vip code=VIP10 tier=gold;"),
              redis_port=redis.port)
    redis.seed("c-gold", points=250, lifetime=1500, orders=4)
    before = redis.hmget_calls()
    r = twice(lambda: n.get("/checkout", cookies={"cid": "c-gold"}).loyalty)
    assert r == expected("ok", "c-gold", 250, 1500, 4, "gold", "vip", "VIP10")
    assert redis.hmget_calls() == before + 2


def test_known_customer_exact_header_list(redis, nginx, capture_backend):
    """The backend gets each of the 8 headers exactly once, nothing else
    starting with X-Loyalty-."""
    loc = """location /cap {
        loyalty on; loyalty_customer $cookie_cid;
        loyalty_redis 127.0.0.1:{redis_port};
        %s
        loyalty_offer vip code=VIP10 tier=gold;
        proxy_pass http://127.0.0.1:{capture_port};
    }""" % TIERS
    n = nginx(checkout_conf(locations=loc), redis_port=redis.port,
              capture_port=capture_backend.port)
    redis.seed("c-gold", points=250, lifetime=1500, orders=4)
    for _ in range(2):
        assert n.get("/cap", cookies={"cid": "c-gold"}).status == 200
        got = capture_backend.loyalty_headers()
        assert sorted(k.lower() for k, _ in got) == sorted(
            h.lower() for h in LOYALTY_HEADERS), got
        assert {k.lower(): v for k, v in got} == {
            k.lower(): v for k, v in expected(
                "ok", "c-gold", 250, 1500, 4, "gold", "vip", "VIP10").items()}


RECORD_CASES = [
    # id, record fields, expected headers
    ("no-tier-no-offer", dict(points=5, lifetime=50, orders=1),
     expected("ok", "c", 5, 50, 1)),
    ("tier-no-offer", dict(points=10, lifetime=150, orders=2),
     expected("ok", "c", 10, 150, 2, "silver")),
    ("offer-without-code", dict(points=10, lifetime=20, orders=7),
     expected("ok", "c", 10, 20, 7, None, "regular")),
    ("offer-with-code", dict(points=600, lifetime=20, orders=1),
     expected("ok", "c", 600, 20, 1, None, "rich", "RICH5")),
    ("exists-with-zero-orders", dict(points=0, lifetime=0, orders=0),
     expected("ok", "c", 0, 0, 0, None, "welcome", "HELLO")),
    ("only-points-field",
     dict(points=7, lifetime=None, orders=None, first_order=None,
          last_order=None),
     expected("ok", "c", 7, 0, 0, None, "welcome", "HELLO")),
    ("19-digit-numbers",
     dict(points=9223372036854775807, lifetime=1000000000000000000,
          orders=1234567890123456789),
     expected("ok", "c", 9223372036854775807, 1000000000000000000,
              1234567890123456789, "platinum", "rich", "RICH5")),
]

RECORD_OFFERS = """
        loyalty_offer rich code=RICH5 min_points=500;
        loyalty_offer regular min_orders=5;
        loyalty_offer welcome code=HELLO new;
"""


@pytest.mark.parametrize("fields,want", [c[1:] for c in RECORD_CASES],
                         ids=[c[0] for c in RECORD_CASES])
def test_record_cases(redis, nginx, fields, want):
    n = nginx(checkout_conf(TIERS + RECORD_OFFERS), redis_port=redis.port)
    redis.seed("c", **fields)
    got = twice(lambda: n.get("/checkout", cookies={"cid": "c"}).loyalty)
    assert got == want


# --------------------------------------------------------------------------
# spoofed X-Loyalty-* request headers


@pytest.mark.parametrize("who,want", [
    ("anonymous", expected("anonymous")),
    ("invalid", expected("invalid")),
    ("new", expected("new", "fresh")),
    ("known", expected("ok", "known", 42, 1200, 3, "gold")),
])
def test_spoofed_headers_removed(redis, nginx, capture_backend, who, want):
    loc = """location /cap {
        loyalty on; loyalty_customer $http_x_customer;
        loyalty_redis 127.0.0.1:{redis_port};
        %s
        proxy_pass http://127.0.0.1:{capture_port};
    }""" % TIERS
    n = nginx(checkout_conf(TIERS, locations=loc), redis_port=redis.port,
              capture_port=capture_backend.port)
    redis.seed("known", points=42, lifetime=1200, orders=3)
    customer = {"anonymous": [], "invalid": [("X-Customer", "bad id")],
                "new": [("X-Customer", "fresh")],
                "known": [("X-Customer", "known")]}[who]
    for _ in range(2):
        # through the nginx echo backend
        r = n.get("/hcheckout", headers=customer + SPOOF)
        assert r.status == 200
        assert r.loyalty == want
        # through the capture backend: exact list, other headers intact
        r = n.get("/cap", headers=customer + SPOOF + KEEP)
        assert r.status == 200
        got = capture_backend.loyalty_headers()
        assert sorted((k.lower(), v) for k, v in got) == sorted(
            (k.lower(), v) for k, v in want.items()), got
        hdrs = capture_backend.requests[-1]["headers"]
        for k, v in KEEP:
            assert (k, v) in hdrs, (k, hdrs)


# spoofed values that the rewrite phase copied or cached before the module
# ran: in a server where "loyalty on" appears, the client's X-Loyalty-*
# headers are gone before its rewrite phase, in every location (SPEC §2.1)


CACHE_HTTP = """
    map $http_x_loyalty_offer $offer_map {
        default  "";
        ~.       "client:$http_x_loyalty_offer";
    }
"""

# every X-Fwd-* header is evaluated after the module's read, and empty
# (so not sent) unless it holds the module's own value
CACHE_PROBES = """
        set $loc_copy $http_x_loyalty_points;
        if ($http_x_loyalty_lifetime) {
            set $seen "client";
        }
        if ($offer_map) {
            set $mapped $offer_map;
        }
        proxy_set_header X-Fwd-Tier $http_x_loyalty_tier;
        proxy_set_header X-Fwd-Points $http_x_loyalty_points;
        proxy_set_header X-Fwd-Lifetime $http_x_loyalty_lifetime;
        proxy_set_header X-Fwd-Offer $http_x_loyalty_offer;
        proxy_set_header X-Fwd-Anything $http_x_loyalty_anything;
        proxy_set_header X-Fwd-Srv-Copy $srv_copy;
        proxy_set_header X-Fwd-Srv-Seen $srv_seen;
        proxy_set_header X-Fwd-Loc-Copy $loc_copy;
        proxy_set_header X-Fwd-Seen $seen;
        proxy_set_header X-Fwd-Mapped $mapped;
        proxy_set_header X-Fwd-Map $offer_map;
        proxy_pass http://127.0.0.1:{capture_port};
"""

CACHE_CONF = CACHE_HTTP + """
server {
    listen 127.0.0.1:{port};
    underscores_in_headers on;
    location = /__harness_ready { return 204; }

    # the server's rewrite phase
    set $srv_copy $http_x_loyalty_tier;
    if ($http_x_loyalty_status) {
        set $srv_seen "client";
    }

    location /on {
        loyalty on;
        loyalty_customer $http_x_customer;
        loyalty_redis 127.0.0.1:{redis_port};
        loyalty_tier gold 1000;
        @PROBES@
    }
    location /off {
        @PROBES@
    }
}

# a server without loyalty anywhere passes the headers as they come
server {
    listen 127.0.0.1:{plain_port};
    underscores_in_headers on;
    location / {
        set $srv_copy $http_x_loyalty_tier;
        if ($http_x_loyalty_status) {
            set $srv_seen "client";
        }
        @PROBES@
    }
}
""".replace("@PROBES@", CACHE_PROBES)

CACHE_SPOOF = [("X-Loyalty-Tier", "platinum"), ("X-Loyalty-Points", "999999"),
               ("X-Loyalty-Lifetime", "77777"), ("X-Loyalty-Offer", "free"),
               ("X-Loyalty-Status", "ok"), ("X-Loyalty-Anything", "x")]

# the same names as nginx variables and CGI-style backends see them, with
# underscores (underscores_in_headers on)
CACHE_SPOOF_UNDERSCORE = [(k.replace("-", "_"), v) for k, v in CACHE_SPOOF]


def forwarded(capture_backend):
    """{name: value} of the X-Fwd-* and X-Loyalty-* headers of the last
    request, names lowercased, underscores as dashes."""
    out = {}
    for k, v in capture_backend.requests[-1]["headers"]:
        k = k.lower().replace("_", "-")
        if k.startswith(("x-fwd-", "x-loyalty-")):
            assert k not in out, (k, capture_backend.requests[-1])
            out[k] = v
    return out


@pytest.mark.parametrize("spoof", [CACHE_SPOOF, CACHE_SPOOF_UNDERSCORE],
                         ids=["dashes", "underscores"])
def test_spoofed_values_not_cached_by_rewrite_phase(redis, nginx,
                                                    capture_backend, spoof):
    n = nginx(CACHE_CONF, redis_port=redis.port,
              capture_port=capture_backend.port)
    redis.seed("known", points=42, lifetime=1200, orders=3)
    module = {"x-loyalty-status": "ok", "x-loyalty-customer": "known",
              "x-loyalty-points": "42", "x-loyalty-lifetime": "1200",
              "x-loyalty-orders": "3", "x-loyalty-tier": "gold"}
    want = {
        # the module's own headers, and the variables that read them
        ("/on", "known"): dict(module, **{
            "x-fwd-tier": "gold", "x-fwd-points": "42",
            "x-fwd-lifetime": "1200"}),
        ("/on", None): {"x-loyalty-status": "anonymous"},
        # "loyalty on" elsewhere in the server: nothing of the client's
        ("/off", "known"): {},
        ("/off", None): {},
    }
    for (path, cid), headers in want.items():
        customer = [("X-Customer", cid)] if cid else []
        for _ in range(2):
            r = n.get(path, headers=customer + spoof)
            assert r.status == 200, r
            assert forwarded(capture_backend) == headers, (path, cid)
    # without loyalty in the server, the client's headers are its own
    r = n.get("/", headers=spoof, port=n.ports["plain_port"])
    assert r.status == 200, r
    client = {k.lower().replace("_", "-"): v for k, v in spoof}
    assert forwarded(capture_backend) == dict(client, **{
        "x-fwd-tier": "platinum", "x-fwd-points": "999999",
        "x-fwd-lifetime": "77777", "x-fwd-offer": "free",
        "x-fwd-anything": "x", "x-fwd-srv-copy": "platinum",
        "x-fwd-srv-seen": "client",
        "x-fwd-loc-copy": "999999", "x-fwd-seen": "client",
        "x-fwd-mapped": "client:free", "x-fwd-map": "client:free"})


# --------------------------------------------------------------------------
# customer id validation


ID_CASES = [
    # id, cookie or header value, expected status
    ("128-bytes", "a" * 128, "new"),
    ("129-bytes", "a" * 129, "invalid"),
    ("all-allowed-chars", "AZaz09._-@:+", "new"),
    ("email", "jane.doe+shop@example.com", "new"),
    ("space", "a b", "invalid"),
    ("brace", "a{b", "invalid"),
    ("closing-brace", "a}b", "invalid"),
    ("slash", "a/b", "invalid"),
    ("percent", "a%20b", "invalid"),
    ("comma", "a,b", "invalid"),
    ("star", "a*", "invalid"),
    ("utf8", b"caf\xc3\xa9", "invalid"),
]


@pytest.mark.parametrize("value,status", [c[1:] for c in ID_CASES],
                         ids=[c[0] for c in ID_CASES])
def test_customer_id_validation(redis, nginx, value, status):
    n = nginx(checkout_conf(), redis_port=redis.port)
    before = redis.hmget_calls()
    for _ in range(2):
        r = n.get("/hcheckout", headers=[("X-Customer", value)])
        assert r.status == 200
        if status == "new":
            assert r.loyalty == expected("new", value)
        else:
            assert r.loyalty == expected("invalid")
    calls = redis.hmget_calls() - before
    if status == "invalid":
        assert calls == 0
        warns = [l for l in log_lines(n.error_log(), "warn") if "invalid" in l]
        assert warns, "no warn line with 'invalid':\n" + n.error_log()[-3000:]
    else:
        assert calls == 2
        assert not [l for l in log_lines(n.error_log(), "warn")
                    if "invalid" in l]


@pytest.mark.parametrize("value,status", [
    ("a" * 128, "new"), ("a" * 129, "invalid"), ("", "anonymous")],
    ids=["128", "129", "empty"])
def test_customer_id_from_cookie(redis, nginx, value, status):
    n = nginx(checkout_conf(), redis_port=redis.port)
    for _ in range(2):
        r = n.get("/checkout", cookies="cid=" + value)
        assert r.loyalty == expected(status, value)


def test_known_customer_with_special_id(redis, nginx):
    cid = "Jane.Doe_1-x@shop:eu+vip"
    redis.seed(cid, points=17, lifetime=170, orders=2)
    n = nginx(checkout_conf(TIERS), redis_port=redis.port)
    got = twice(lambda: n.get("/checkout", cookies={"cid": cid}).loyalty)
    assert got == expected("ok", cid, 17, 170, 2, "silver")


# --------------------------------------------------------------------------
# tiers


TIER_CASES = [(0, None), (99, None), (100, "silver"), (101, "silver"),
              (999, "silver"), (1000, "gold"), (9999, "gold"),
              (10000, "platinum"), (9223372036854775807, "platinum")]


@pytest.mark.parametrize("lifetime,tier", TIER_CASES,
                         ids=[str(c[0]) for c in TIER_CASES])
def test_tier_by_lifetime(redis, nginx, lifetime, tier):
    n = nginx(checkout_conf(TIERS), redis_port=redis.port)
    redis.seed("t", points=1, lifetime=lifetime, orders=1)
    got = twice(lambda: n.get("/checkout", cookies={"cid": "t"}).loyalty)
    assert got == expected("ok", "t", 1, lifetime, 1, tier)


def test_tier_zero_threshold_applies_to_new_customers(redis, nginx):
    n = nginx(checkout_conf("loyalty_tier silver 100; loyalty_tier basic 0;"),
              redis_port=redis.port)
    got = twice(lambda: n.get("/checkout", cookies={"cid": "n1"}).loyalty)
    assert got == expected("new", "n1", tier="basic")
    redis.seed("k", points=3, lifetime=99, orders=1)
    got = twice(lambda: n.get("/checkout", cookies={"cid": "k"}).loyalty)
    assert got == expected("ok", "k", 3, 99, 1, "basic")


# --------------------------------------------------------------------------
# offers: every condition, inclusive bounds at the boundary values


# record shorthand (None instead of a record = customer unknown to Redis,
# status new); ago = seconds since the last order, resolved when seeding
def rec(points=0, lifetime=0, orders=0, ago=None):
    return dict(points=points, lifetime=lifetime, orders=orders, ago=ago)


OFFER_CASES = [
    # id, offer lines, record, request headers, expected (offer, code)
    ("no-condition/known", "loyalty_offer any code=ANY;", rec(orders=3), {},
     ("any", "ANY")),
    ("no-condition/new", "loyalty_offer any code=ANY;", None, {},
     ("any", "ANY")),

    ("tier/gold", "loyalty_offer g tier=gold;", rec(lifetime=1000), {},
     ("g", None)),
    ("tier/silver", "loyalty_offer g tier=gold;", rec(lifetime=999), {}, None),
    ("tier/none", "loyalty_offer g tier=gold;", rec(lifetime=0), {}, None),
    ("tier/platinum", "loyalty_offer g tier=gold;", rec(lifetime=10000), {},
     None),
    ("tier/new", "loyalty_offer g tier=gold;", None, {}, None),

    ("min_points/99", "loyalty_offer o min_points=100;", rec(points=99), {},
     None),
    ("min_points/100", "loyalty_offer o min_points=100;", rec(points=100), {},
     ("o", None)),
    ("min_points/101", "loyalty_offer o min_points=100;", rec(points=101), {},
     ("o", None)),
    ("min_points/new", "loyalty_offer o min_points=100;", None, {}, None),

    ("max_points/0", "loyalty_offer o max_points=100;", rec(points=0), {},
     ("o", None)),
    ("max_points/100", "loyalty_offer o max_points=100;", rec(points=100), {},
     ("o", None)),
    ("max_points/101", "loyalty_offer o max_points=100;", rec(points=101), {},
     None),
    ("max_points/new", "loyalty_offer o max_points=100;", None, {},
     ("o", None)),

    ("points-range/99", "loyalty_offer o min_points=100 max_points=200;",
     rec(points=99), {}, None),
    ("points-range/100", "loyalty_offer o min_points=100 max_points=200;",
     rec(points=100), {}, ("o", None)),
    ("points-range/200", "loyalty_offer o min_points=100 max_points=200;",
     rec(points=200), {}, ("o", None)),
    ("points-range/201", "loyalty_offer o min_points=100 max_points=200;",
     rec(points=201), {}, None),
    ("points-equal/50", "loyalty_offer o min_points=50 max_points=50;",
     rec(points=50), {}, ("o", None)),

    ("min_orders/1", "loyalty_offer o min_orders=2;", rec(orders=1), {}, None),
    ("min_orders/2", "loyalty_offer o min_orders=2;", rec(orders=2), {},
     ("o", None)),
    ("min_orders/3", "loyalty_offer o min_orders=2;", rec(orders=3), {},
     ("o", None)),

    ("max_orders/2", "loyalty_offer o max_orders=2;", rec(orders=2), {},
     ("o", None)),
    ("max_orders/3", "loyalty_offer o max_orders=2;", rec(orders=3), {}, None),
    ("max_orders/new", "loyalty_offer o max_orders=2;", None, {},
     ("o", None)),

    ("inactive/90d+1min", "loyalty_offer back code=BACK inactive=90d;",
     rec(orders=1, ago=90 * DAY + 60), {}, ("back", "BACK")),
    ("inactive/90d-1min", "loyalty_offer back code=BACK inactive=90d;",
     rec(orders=1, ago=90 * DAY - 60), {}, None),
    ("inactive/1y", "loyalty_offer back code=BACK inactive=90d;",
     rec(orders=5, ago=365 * DAY), {}, ("back", "BACK")),
    ("inactive/no-orders", "loyalty_offer back code=BACK inactive=90d;",
     rec(orders=0, ago=365 * DAY), {}, None),
    ("inactive/new", "loyalty_offer back code=BACK inactive=90d;", None, {},
     None),
    ("inactive-12h/13h", "loyalty_offer back inactive=12h;",
     rec(orders=1, ago=13 * 3600), {}, ("back", None)),
    ("inactive-12h/11h", "loyalty_offer back inactive=12h;",
     rec(orders=1, ago=11 * 3600), {}, None),

    ("new/unknown", "loyalty_offer hello code=HI new;", None, {},
     ("hello", "HI")),
    ("new/zero-orders", "loyalty_offer hello code=HI new;", rec(orders=0), {},
     ("hello", "HI")),
    ("new/one-order", "loyalty_offer hello code=HI new;", rec(orders=1), {},
     None),

    ("if/treat", "loyalty_offer t code=T if=$holdout;", rec(orders=1),
     {"X-Group": "treat"}, ("t", "T")),
    ("if/yes", "loyalty_offer t code=T if=$holdout;", rec(orders=1),
     {"X-Group": "word"}, ("t", "T")),
    ("if/zero", "loyalty_offer t code=T if=$holdout;", rec(orders=1),
     {"X-Group": "control"}, None),
    ("if/empty", "loyalty_offer t code=T if=$holdout;", rec(orders=1), {},
     None),
    ("if/new", "loyalty_offer t code=T if=$holdout;", None,
     {"X-Group": "treat"}, ("t", "T")),

    ("and/all", "loyalty_offer c tier=gold min_points=100 max_orders=5;",
     rec(points=100, lifetime=1000, orders=5), {}, ("c", None)),
    ("and/points", "loyalty_offer c tier=gold min_points=100 max_orders=5;",
     rec(points=99, lifetime=1000, orders=5), {}, None),
    ("and/orders", "loyalty_offer c tier=gold min_points=100 max_orders=5;",
     rec(points=100, lifetime=1000, orders=6), {}, None),
    ("and/tier", "loyalty_offer c tier=gold min_points=100 max_orders=5;",
     rec(points=100, lifetime=999, orders=5), {}, None),
    ("and/if", "loyalty_offer c min_orders=1 if=$holdout;",
     rec(orders=1), {"X-Group": "control"}, None),

    ("first-wins/1500", "loyalty_offer big code=B min_points=1000; "
     "loyalty_offer mid code=M min_points=100; loyalty_offer all;",
     rec(points=1500), {}, ("big", "B")),
    ("first-wins/1000", "loyalty_offer big code=B min_points=1000; "
     "loyalty_offer mid code=M min_points=100; loyalty_offer all;",
     rec(points=1000), {}, ("big", "B")),
    ("first-wins/999", "loyalty_offer big code=B min_points=1000; "
     "loyalty_offer mid code=M min_points=100; loyalty_offer all;",
     rec(points=999), {}, ("mid", "M")),
    ("first-wins/0", "loyalty_offer big code=B min_points=1000; "
     "loyalty_offer mid code=M min_points=100; loyalty_offer all;",
     rec(points=0), {}, ("all", None)),
    ("first-wins/new", "loyalty_offer big code=B min_points=1000; "
     "loyalty_offer mid code=M min_points=100; loyalty_offer all;",
     None, {}, ("all", None)),
    ("first-wins/order", "loyalty_offer all; "
     "loyalty_offer big code=B min_points=1000;",
     rec(points=5000), {}, ("all", None)),
]

HOLDOUT_MAP = """
    map $http_x_group $holdout {
        default  "";
        treat    1;
        word     yes;
        control  0;
    }
"""


@pytest.mark.parametrize("offers,record,headers,want",
                         [c[1:] for c in OFFER_CASES],
                         ids=[c[0] for c in OFFER_CASES])
def test_offer_conditions(redis, nginx, offers, record, headers, want):
    n = nginx(checkout_conf(TIERS + offers, http=HOLDOUT_MAP),
              redis_port=redis.port)
    if record is not None:
        record = dict(record)
        ago = record.pop("ago")
        if ago is not None:
            record["last_order"] = int(time.time()) - ago
        redis.seed("o1", **record)
    got = twice(lambda: n.get("/checkout", cookies={"cid": "o1"},
                              headers=headers).loyalty)
    assert got["X-Loyalty-Status"] == ("new" if record is None else "ok")
    offer = (got.get("X-Loyalty-Offer"), got.get("X-Loyalty-Offer-Code"))
    assert offer == (want or (None, None)), got


def test_offer_if_split_clients(redis, nginx):
    """if=$var gated by a split_clients arm: the offer is shown exactly to
    the customers of the "1" arm (checked against the arm nginx itself
    computed, echoed in a response header)."""
    http = """
    split_clients "${cookie_cid}" $arm {
        50%     1;
        *       "";
    }
"""
    n = nginx(checkout_conf("loyalty_offer promo code=P if=$arm; "
                            "add_header X-Arm \"[$arm]\";", http=http),
              redis_port=redis.port)
    arms = set()
    for i in range(40):
        cid = "split-%d" % i
        redis.seed(cid, points=1, lifetime=1, orders=1)
        for _ in range(2):
            r = n.get("/checkout", cookies={"cid": cid})
            arm = r.header("X-Arm")
            arms.add(arm)
            if arm == "[1]":
                assert r.loyalty.get("X-Loyalty-Offer") == "promo", r
                assert r.loyalty.get("X-Loyalty-Offer-Code") == "P"
            else:
                assert arm == "[]", r
                assert "X-Loyalty-Offer" not in r.loyalty, r
    assert arms == {"[1]", "[]"}, "40 ids should hit both arms"


# --------------------------------------------------------------------------
# response headers


RESP_CASES = [
    # id, customer header, record, expected response X-Loyalty-* headers
    ("ok-full", "c-gold", dict(points=250, lifetime=1500, orders=4),
     {"X-Loyalty-Status": "ok", "X-Loyalty-Points": "250",
      "X-Loyalty-Tier": "gold", "X-Loyalty-Offer": "vip",
      "X-Loyalty-Offer-Code": "VIP10"}),
    ("ok-offer-no-code", "c-silver", dict(points=3, lifetime=150, orders=9),
     {"X-Loyalty-Status": "ok", "X-Loyalty-Points": "3",
      "X-Loyalty-Tier": "silver", "X-Loyalty-Offer": "many"}),
    ("ok-bare", "c-bare", dict(points=3, lifetime=10, orders=1),
     {"X-Loyalty-Status": "ok", "X-Loyalty-Points": "3"}),
    ("new", "c-new", None,
     {"X-Loyalty-Status": "new", "X-Loyalty-Points": "0"}),
    ("anonymous", "", None, {"X-Loyalty-Status": "anonymous"}),
    ("invalid", "bad id", None, {"X-Loyalty-Status": "invalid"}),
]


@pytest.mark.parametrize("cid,record,want", [c[1:] for c in RESP_CASES],
                         ids=[c[0] for c in RESP_CASES])
def test_response_headers_on(redis, nginx, cid, record, want):
    n = nginx(checkout_conf(TIERS + "loyalty_response_headers on; "
                            "loyalty_offer vip code=VIP10 tier=gold; "
                            "loyalty_offer many min_orders=5;"),
              redis_port=redis.port)
    if record:
        redis.seed(cid, **record)
    for _ in range(2):
        r = n.get("/hcheckout", headers={"X-Customer": cid})
        assert r.status == 200
        assert r.loyalty_response_headers() == want, r.headers


@pytest.mark.parametrize("directive", ["", "loyalty_response_headers off;"],
                         ids=["default", "explicit-off"])
def test_response_headers_off(redis, nginx, directive):
    n = nginx(checkout_conf(TIERS + directive +
                            "loyalty_offer vip code=VIP10 tier=gold;"),
              redis_port=redis.port)
    redis.seed("c-gold", points=250, lifetime=1500, orders=4)
    for cid in ("c-gold", "c-new", "", "bad id"):
        for _ in range(2):
            r = n.get("/hcheckout", headers={"X-Customer": cid})
            assert r.status == 200
            assert r.loyalty_response_headers() == {}, r.headers
    # the request headers are still there
    assert r.loyalty == expected("invalid")
    r = n.get("/hcheckout", headers={"X-Customer": "c-gold"})
    assert r.loyalty == expected("ok", "c-gold", 250, 1500, 4, "gold", "vip",
                                 "VIP10")


def test_request_headers_off(redis, nginx):
    """loyalty_request_headers off: no X-Loyalty-* to the backend (spoofed
    ones still removed), the variables still work."""
    loc = TIERS + """
        loyalty_request_headers off;
        proxy_set_header X-Var-Status $loyalty_status;
        proxy_set_header X-Var-Points $loyalty_points;
        proxy_set_header X-Var-Tier $loyalty_tier;
"""
    n = nginx(checkout_conf(loc), redis_port=redis.port)
    redis.seed("c", points=5, lifetime=1000, orders=1)
    for _ in range(2):
        r = n.get("/checkout", cookies={"cid": "c"}, headers=SPOOF)
        assert r.loyalty == {}, r.echo
        assert (r.echo["X-Var-Status"], r.echo["X-Var-Points"],
                r.echo["X-Var-Tier"]) == ("ok", "5", "gold")


# --------------------------------------------------------------------------
# variables: add_header, proxy_set_header, map, log_format


VARS = ["status", "customer", "points", "lifetime", "tier", "orders",
        "offer", "offer_code", "earned"]

VARS_HTTP = """
    map $loyalty_tier $tier_discount {
        default  none;
        gold     10;
        silver   5;
    }
    log_format loyalty_vars '$uri|$loyalty_status|$loyalty_customer|$loyalty_points|$loyalty_lifetime|$loyalty_tier|$loyalty_orders|$loyalty_offer|$loyalty_offer_code|$loyalty_earned|$tier_discount';
"""

VARS_LOC = TIERS + """
        loyalty_offer vip code=VIP10 tier=gold;
        loyalty_offer hello new;
        access_log {prefix}/logs/loyalty.log loyalty_vars;
""" + "".join("""
        add_header X-V-%s "[$loyalty_%s]";
        proxy_set_header X-Var-%s $loyalty_%s;""" % (
    v.replace("_", "-"), v, v.replace("_", "-"), v) for v in VARS) + """
        add_header X-V-Map "[$tier_discount]";
        proxy_set_header X-Var-Map $tier_discount;
"""

VARS_PLAIN = """
    location /off {
        add_header X-V-Status "[$loyalty_status]";
        return 200 "off";
    }
    location /offproxy {
        loyalty off;
        loyalty_customer $cookie_cid;
        loyalty_redis 127.0.0.1:{redis_port};
        proxy_set_header X-Var-Status $loyalty_status;
        add_header X-V-Status "[$loyalty_status]";
        proxy_pass http://127.0.0.1:{backend_port};
    }
"""


VAR_CASES = [
    # cid, expected variables (status..offer_code), map value
    ("c-gold", dict(status="ok", customer="c-gold", points="250",
                    lifetime="1500", tier="gold", orders="4", offer="vip",
                    offer_code="VIP10"), "10"),
    ("c-silver", dict(status="ok", customer="c-silver", points="7",
                      lifetime="100", tier="silver", orders="1", offer="",
                      offer_code=""), "5"),
    ("c-new", dict(status="new", customer="c-new", points="0", lifetime="0",
                   tier="", orders="0", offer="hello", offer_code=""),
     "none"),
]


def test_variables_everywhere(redis, nginx):
    n = nginx(checkout_conf(VARS_LOC, http=VARS_HTTP, locations=VARS_PLAIN),
              redis_port=redis.port)
    redis.seed("c-gold", points=250, lifetime=1500, orders=4)
    redis.seed("c-silver", points=7, lifetime=100, orders=1)
    expect_log = []
    for cid, want, mapped in VAR_CASES:
        for _ in range(2):
            r = n.get("/checkout/" + cid, cookies={"cid": cid})
            assert r.status == 200
            for v in VARS[:-1]:
                name = v.replace("_", "-")
                assert r.header("X-V-" + name) == "[%s]" % want[v], (v, r)
                assert r.echo["X-Var-" + name.title()] == want[v], (v, r)
            # no order on this request: nothing earned
            assert r.header("X-V-Earned") == "[]", r
            assert r.echo["X-Var-Earned"] == ""
            assert r.header("X-V-Map") == "[%s]" % mapped
            assert r.echo["X-Var-Map"] == mapped
            expect_log.append("|".join(
                ["/checkout/" + cid] + [want[v] or "-" for v in VARS[:-1]]
                + ["-", mapped]))
    # anonymous
    r = n.get("/checkout/anon")
    assert r.header("X-V-Status") == "[anonymous]"
    assert r.header("X-V-Customer") == "[]"
    assert r.echo["X-Var-Status"] == "anonymous"
    # where loyalty is off
    r = n.get("/off")
    assert r.header("X-V-Status") == "[off]"
    r = n.get("/offproxy", cookies={"cid": "c-gold"})
    assert r.header("X-V-Status") == "[off]"
    assert r.echo["X-Var-Status"] == "off"
    assert r.loyalty == {}

    def logged():
        try:
            lines = n.read_file("logs/loyalty.log").splitlines()
        except FileNotFoundError:
            return None
        return lines if len(lines) >= len(expect_log) + 1 else None
    lines = wait_until(logged, 3, message="access log lines")
    assert lines[:len(expect_log)] == expect_log
    assert lines[len(expect_log)].split("|")[:3] == ["/checkout/anon",
                                                     "anonymous", "-"]


# --------------------------------------------------------------------------
# inheritance


INHERIT = """
    loyalty_redis 127.0.0.1:{redis_port};
    loyalty_customer $cookie_cid;
    loyalty_tier silver 100;
    loyalty_tier gold 1000;
    loyalty_offer welcome code=W new;
    loyalty_response_headers on;

    server {
        listen 127.0.0.1:{port};
        loyalty on;
        location = /__harness_ready { return 204; }
        location /inherit { proxy_pass http://127.0.0.1:{backend_port}; }
        location /own-tiers {
            loyalty_tier platinum 500;
            proxy_pass http://127.0.0.1:{backend_port};
        }
        location /own-offers {
            loyalty_offer big code=BIG min_points=1000;
            proxy_pass http://127.0.0.1:{backend_port};
        }
        location /off {
            loyalty off;
            add_header X-V-Status "[$loyalty_status]";
            proxy_pass http://127.0.0.1:{backend_port};
        }
    }

    server {
        listen 127.0.0.1:{port2};
        loyalty on;
        loyalty_customer $http_x_customer;
        loyalty_redis_prefix shop2:;
        loyalty_tier member 0;
        loyalty_response_headers off;
        location / { proxy_pass http://127.0.0.1:{backend_port}; }
        location /shop2-offers {
            loyalty_offer s2 code=S2;
            proxy_pass http://127.0.0.1:{backend_port};
        }
    }
""" + BACKEND


def test_inheritance(redis, nginx):
    n = nginx(INHERIT, redis_port=redis.port)
    port2 = n.ports["port2"]
    redis.seed("rich", points=2000, lifetime=1500, orders=3)
    redis.seed("rich", points=7, lifetime=7, orders=1, prefix="shop2:")
    for _ in range(2):
        r = n.get("/inherit", cookies={"cid": "rich"})
        assert r.loyalty == expected("ok", "rich", 2000, 1500, 3, "gold")
        assert r.loyalty_response_headers()["X-Loyalty-Tier"] == "gold"
        r = n.get("/inherit", cookies={"cid": "newbie"})
        assert r.loyalty == expected("new", "newbie", offer="welcome", code="W")

        # own tier list replaces silver/gold; offers still inherited
        r = n.get("/own-tiers", cookies={"cid": "rich"})
        assert r.loyalty == expected("ok", "rich", 2000, 1500, 3, "platinum")
        r = n.get("/own-tiers", cookies={"cid": "newbie"})
        assert r.loyalty == expected("new", "newbie", offer="welcome", code="W")

        # own offer list replaces welcome; tiers still inherited
        r = n.get("/own-offers", cookies={"cid": "rich"})
        assert r.loyalty == expected("ok", "rich", 2000, 1500, 3, "gold",
                                     "big", "BIG")
        r = n.get("/own-offers", cookies={"cid": "newbie"})
        assert r.loyalty == expected("new", "newbie")

        r = n.get("/off", cookies={"cid": "rich"})
        assert r.header("X-V-Status") == "[off]"
        assert r.loyalty == {}
        assert r.loyalty_response_headers() == {}

        # server level overrides: customer from header, prefix, tiers,
        # response headers off; http-level offers inherited
        r = n.get("/x", port=port2, headers={"X-Customer": "rich"},
                  cookies={"cid": "ignored"})
        assert r.loyalty == expected("ok", "rich", 7, 7, 1, "member")
        assert r.loyalty_response_headers() == {}
        r = n.get("/x", port=port2, headers={"X-Customer": "newbie"})
        assert r.loyalty == expected("new", "newbie", tier="member",
                                     offer="welcome", code="W")
        r = n.get("/shop2-offers", port=port2, headers={"X-Customer": "rich"})
        assert r.loyalty == expected("ok", "rich", 7, 7, 1, "member", "s2",
                                     "S2")


# --------------------------------------------------------------------------
# Redis key layout, db, password


def test_redis_prefix_isolates(redis, nginx):
    loc = """location /shop2 {
        loyalty on; loyalty_customer $cookie_cid;
        loyalty_redis 127.0.0.1:{redis_port};
        loyalty_redis_prefix shop2:;
        proxy_pass http://127.0.0.1:{backend_port};
    }"""
    n = nginx(checkout_conf(locations=loc), redis_port=redis.port)
    redis.seed("both", points=1, lifetime=1, orders=1)
    redis.seed("both", points=2, lifetime=2, orders=2, prefix="shop2:")
    redis.seed("only1", points=3, lifetime=3, orders=3)
    redis.client.hset("loyalty:only2", "points", 99)   # no hash tag: ignored
    for _ in range(2):
        assert n.get("/checkout", cookies={"cid": "both"}).loyalty == \
            expected("ok", "both", 1, 1, 1)
        assert n.get("/shop2", cookies={"cid": "both"}).loyalty == \
            expected("ok", "both", 2, 2, 2)
        assert n.get("/checkout", cookies={"cid": "only1"}).loyalty == \
            expected("ok", "only1", 3, 3, 3)
        assert n.get("/shop2", cookies={"cid": "only1"}).loyalty == \
            expected("new", "only1")
        assert n.get("/checkout", cookies={"cid": "only2"}).loyalty == \
            expected("new", "only2")


def test_redis_db_select(redis, nginx):
    n = nginx(checkout_conf(redis="127.0.0.1:{redis_port} db=3"),
              redis_port=redis.port)
    redis.seed("d", points=33, lifetime=33, orders=3, db=3)
    redis.seed("d", points=1, lifetime=1, orders=1, db=0)
    redis.seed("zero-only", points=1, lifetime=1, orders=1, db=0)
    for _ in range(2):
        assert n.get("/checkout", cookies={"cid": "d"}).loyalty == \
            expected("ok", "d", 33, 33, 3)
        assert n.get("/checkout", cookies={"cid": "zero-only"}).loyalty == \
            expected("new", "zero-only")


def test_redis_password(redis_factory, nginx):
    r = redis_factory(password="s3cret")
    n = nginx(checkout_conf(redis="127.0.0.1:{redis_port} password=s3cret "
                                  "db=2"),
              redis_port=r.port)
    r.seed("p", points=12, lifetime=12, orders=1, db=2)
    for _ in range(2):
        assert n.get("/checkout", cookies={"cid": "p"}).loyalty == \
            expected("ok", "p", 12, 12, 1)
        assert n.get("/checkout", cookies={"cid": "q"}).loyalty == \
            expected("new", "q")


def test_redis_wrong_password_is_unavailable(redis_factory, nginx):
    r = redis_factory(password="s3cret")
    n = nginx(checkout_conf(redis="127.0.0.1:{redis_port} password=wrong"),
              redis_port=r.port)
    r.seed("p", points=12, lifetime=12, orders=1)
    for _ in range(2):
        resp = n.get("/checkout", cookies={"cid": "p"})
        assert resp.status == 200
        assert resp.loyalty == expected("unavailable")
        assert resp.elapsed < 1.0


# --------------------------------------------------------------------------
# pipelining


@pytest.mark.parametrize("workers", [1, 2])
def test_pipelined_replies_not_mixed(redis, nginx, workers):
    n = nginx(checkout_conf(TIERS), redis_port=redis.port, workers=workers)
    pipe = redis.client.pipeline()
    for i in range(200):
        pipe.hset("loyalty:{p%d}" % i, mapping=dict(
            points=1000 + 7 * i, lifetime=13 * i, orders=i, first_order=1,
            last_order=2))
    pipe.execute()

    def one(i):
        cid = "p%d" % (i % 200)
        return i, n.get("/checkout", cookies={"cid": cid}, timeout=10).loyalty

    for i, got in run_parallel(one, range(400), threads=20, timeout=60):
        k = i % 200
        tier = ("platinum" if 13 * k >= 10000 else "gold" if 13 * k >= 1000
                else "silver" if 13 * k >= 100 else None)
        assert got == expected("ok", "p%d" % k, 1000 + 7 * k, 13 * k, k,
                               tier), (i, got)


def test_one_persistent_connection_per_worker(redis, nginx):
    n = nginx(checkout_conf(), redis_port=redis.port, workers=1)
    redis.seed("c", points=1, lifetime=1, orders=1)
    run_parallel(lambda i: n.get("/checkout", cookies={"cid": "c"}),
                 range(100), threads=20)
    me = redis.client.client_id()
    others = [c for c in redis.client.client_list() if int(c["id"]) != me]
    assert len(others) == 1, others


# --------------------------------------------------------------------------
# record fields that are not integers


@pytest.mark.parametrize("field,value", [
    ("points", "abc"), ("points", "-5"), ("points", "1.5"),
    ("points", "12abc"), ("lifetime", "abc"), ("orders", "x1")])
def test_non_integer_field_is_zero_with_warning(redis, nginx, field, value):
    n = nginx(checkout_conf(), redis_port=redis.port)
    fields = dict(points=40, lifetime=50, orders=6)
    fields[field] = value
    redis.seed("bad", **fields)
    want = {k: (0 if k == field else v) for k, v in fields.items()}
    before = log_lines(n.error_log(), "warn")
    assert before == []
    got = twice(lambda: n.get("/checkout", cookies={"cid": "bad"}).loyalty)
    assert got == expected("ok", "bad", **want)
    assert log_lines(n.error_log(), "warn"), \
        "no [warn] line for %s=%r:\n%s" % (field, value, n.error_log()[-2000:])


# --------------------------------------------------------------------------
# internal redirects and subrequests: one read, headers once


REDIRECTS = """
    location /ep {
        loyalty on; loyalty_customer $cookie_cid;
        loyalty_redis 127.0.0.1:{redis_port};
        loyalty_response_headers on;
        log_not_found off;
        root {prefix}/html;
        error_page 404 = /checkout2;
    }
    location /tf {
        loyalty on; loyalty_customer $cookie_cid;
        loyalty_redis 127.0.0.1:{redis_port};
        loyalty_response_headers on;
        root {prefix}/html;
        try_files /nonexistent @be;
    }
    location /checkout2 {
        loyalty on; loyalty_customer $cookie_cid;
        loyalty_redis 127.0.0.1:{redis_port};
        loyalty_response_headers on;
        proxy_pass http://127.0.0.1:{capture_port};
    }
    location @be {
        loyalty on; loyalty_customer $cookie_cid;
        loyalty_redis 127.0.0.1:{redis_port};
        loyalty_response_headers on;
        proxy_pass http://127.0.0.1:{capture_port};
    }
    location /ar {
        loyalty on; loyalty_customer $cookie_cid;
        loyalty_redis 127.0.0.1:{redis_port};
        loyalty_response_headers on;
        auth_request /authz;
        proxy_pass http://127.0.0.1:{capture_port};
    }
    location = /authz {
        internal;
        loyalty on; loyalty_customer $cookie_cid;
        loyalty_redis 127.0.0.1:{redis_port};
        proxy_pass http://127.0.0.1:{capture_port};
    }
"""


@pytest.mark.parametrize("path,backend_requests", [
    ("/ep/missing", 1), ("/tf", 1), ("/ar", 2)],
    ids=["error_page", "try_files", "auth_request"])
@pytest.mark.parametrize("who", ["known", "new"])
def test_read_once_across_redirects(redis, nginx, capture_backend, path,
                                    backend_requests, who):
    n = nginx(checkout_conf(http=TIERS, locations=REDIRECTS),
              redis_port=redis.port, capture_port=capture_backend.port)
    redis.seed("known", points=5, lifetime=1000, orders=2)
    want = (expected("ok", "known", 5, 1000, 2, "gold") if who == "known"
            else expected("new", "new"))
    for _ in range(2):
        capture_backend.requests.clear()
        before = redis.hmget_calls()
        r = n.get(path, cookies={"cid": who},
                  headers=[("X-Loyalty-Points", "999999")])
        assert r.status == 200, r
        assert r.body == "captured\n"
        assert redis.hmget_calls() - before == 1
        assert len(capture_backend.requests) == backend_requests
        got = capture_backend.loyalty_headers()
        assert sorted((k.lower(), v) for k, v in got) == sorted(
            (k.lower(), v) for k, v in want.items()), got
        resp = r.loyalty_response_headers()   # asserts no repeats
        assert resp["X-Loyalty-Status"] == want["X-Loyalty-Status"]
        assert resp["X-Loyalty-Points"] == want["X-Loyalty-Points"]
        if path == "/ar":
            # the auth subrequest (access phase) sees no X-Loyalty-* at
            # all: the client's were stripped in post-read, and the read
            # happens after access checks (precontent), so a request they
            # refuse costs no Redis round trip
            got = capture_backend.loyalty_headers(0)
            assert capture_backend.requests[0]["path"] == "/authz"
            assert got == [], got


# --------------------------------------------------------------------------
# more read-path conditions: unix socket, keep-alive, request bodies,
# a burst of pipelined replies, an error reply


def test_redis_unix_socket(redis, nginx):
    n = nginx(checkout_conf(redis="unix:" + redis.unixsocket),
              redis_port=redis.port)
    redis.seed("u", points=4, lifetime=400, orders=1)
    for _ in range(2):
        assert n.get("/checkout", cookies={"cid": "u"}).loyalty == \
            expected("ok", "u", 4, 400, 1)
        assert n.get("/checkout", cookies={"cid": "v"}).loyalty == \
            expected("new", "v")


def test_keepalive_requests_do_not_share_state(redis, nginx):
    """Several requests on one client connection each get their own
    status and headers."""
    import http.client
    n = nginx(checkout_conf(TIERS + "loyalty_offer vip code=VIP tier=gold; "
                            "loyalty_response_headers on;"),
              redis_port=redis.port)
    redis.seed("a", points=250, lifetime=1500, orders=4)
    seq = [
        ({"Cookie": "cid=a"},
         expected("ok", "a", 250, 1500, 4, "gold", "vip", "VIP")),
        ({"X-Loyalty-Tier": "gold"}, expected("anonymous")),
        ({"Cookie": "cid=b"}, expected("new", "b")),
        ({"Cookie": "cid=a{b"}, expected("invalid")),
        ({"Cookie": "cid=a"},
         expected("ok", "a", 250, 1500, 4, "gold", "vip", "VIP")),
        ({}, expected("anonymous")),
    ]
    conn = http.client.HTTPConnection("127.0.0.1", n.port, timeout=5)
    try:
        for _ in range(2):
            for headers, want in seq:
                conn.request("GET", "/checkout", headers=headers)
                resp = conn.getresponse()
                body = resp.read().decode()
                assert resp.status == 200 and not resp.will_close
                from conftest import Response
                r = Response(resp.status, resp.getheaders(), body, 0)
                assert r.loyalty == want, (headers, r.loyalty)
                assert r.header("X-Loyalty-Status") == want["X-Loyalty-Status"]
                assert r.header("X-Loyalty-Tier") == want.get("X-Loyalty-Tier")
    finally:
        conn.close()


POST_LOC = """
    location /cap {
        loyalty on;
        loyalty_customer $cookie_cid;
        loyalty_redis 127.0.0.1:{redis_port};
        proxy_pass http://127.0.0.1:{capture_port};
    }
"""


@pytest.mark.parametrize("size", [10, 100000])
def test_post_body_reaches_backend(redis, nginx, capture_backend, size):
    import os
    n = nginx(checkout_conf(locations=POST_LOC), redis_port=redis.port,
              capture_port=capture_backend.port)
    redis.seed("c", points=8, lifetime=80, orders=2)
    for cid, want in (("c", expected("ok", "c", 8, 80, 2)),
                      ("d", expected("new", "d"))):
        for _ in range(2):
            body = os.urandom(size)
            capture_backend.requests.clear()
            r = n.post("/cap", body, cookies={"cid": cid})
            assert r.status == 200
            req = capture_backend.requests[-1]
            assert req["method"] == "POST" and req["body"] == body
            assert dict(capture_backend.loyalty_headers()) == want


def test_pipelined_burst_after_redis_stall(redis, nginx):
    """Redis stalls (DEBUG SLEEP) while 100 requests queue on the worker's
    one connection; the replies then arrive in one burst of ~40 KB and
    every request still gets its own record."""
    import redis as redis_lib
    n = nginx(checkout_conf(TIERS + "loyalty_redis_timeout 5s;"),
              redis_port=redis.port, workers=1)
    big = 10 ** 18
    pipe = redis.client.pipeline()
    for i in range(300):
        pipe.hset("loyalty:{b%d}" % i, mapping=dict(
            points=big + i, lifetime=big + 2 * i, orders=big + 3 * i,
            first_order=1, last_order=2))
    pipe.execute()
    assert n.get("/checkout", cookies={"cid": "b0"}).loyalty["X-Loyalty-Status"] == "ok"

    def stall():
        c = redis_lib.Redis(host="127.0.0.1", port=redis.port,
                            socket_timeout=5)
        try:
            c.execute_command("DEBUG", "SLEEP", "0.8")
        finally:
            c.close()
    import threading
    t = threading.Thread(target=stall, daemon=True)
    t.start()
    time.sleep(0.1)

    def one(i):
        return i, n.get("/checkout", cookies={"cid": "b%d" % i}, timeout=10)

    results = run_parallel(one, range(300), threads=100, timeout=30)
    t.join(5)
    for i, r in results:
        assert r.loyalty == expected("ok", "b%d" % i, big + i, big + 2 * i,
                                     big + 3 * i, "platinum"), (i, r.loyalty)
    assert max(r.elapsed for _, r in results) >= 0.4, \
        "the requests did not wait for the stalled Redis"


def test_error_reply_does_not_desync(redis, nginx):
    """A key of the wrong type makes Redis answer HMGET with an error: that
    request passes as unavailable, concurrent requests on the same
    connection still get their own records."""
    n = nginx(checkout_conf(), redis_port=redis.port, workers=1)
    redis.client.set("loyalty:{wrong}", "not a hash")
    for i in range(50):
        redis.seed("g%d" % i, points=i, lifetime=i, orders=1)

    def one(i):
        cid = "wrong" if i % 5 == 0 else "g%d" % (i % 50)
        return cid, n.get("/checkout", cookies={"cid": cid})

    for cid, r in run_parallel(one, range(200), threads=20):
        assert r.status == 200
        if cid == "wrong":
            assert r.loyalty == expected("unavailable"), r.loyalty
        else:
            k = int(cid[1:])
            assert r.loyalty == expected("ok", cid, k, k, 1), r.loyalty


# --------------------------------------------------------------------------
# the read comes after access checks and limits: a refused request costs
# no Redis round trip, and its spoofed headers are gone all the same

REFUSED = """
    location /denied {
        loyalty on; loyalty_customer $cookie_cid;
        loyalty_redis 127.0.0.1:{redis_port};
        deny all;
        proxy_pass http://127.0.0.1:{capture_port};
    }
"""


def test_refused_request_costs_no_read(redis, nginx, capture_backend):
    n = nginx(checkout_conf(locations=REFUSED),
              redis_port=redis.port, capture_port=capture_backend.port)
    redis.seed("known", points=5, lifetime=1000, orders=2)
    for _ in range(2):
        before = redis.hmget_calls()
        r = n.get("/denied", cookies={"cid": "known"},
                  headers=[("X-Loyalty-Points", "999999")])
        assert r.status == 403, r
        assert redis.hmget_calls() - before == 0
        assert capture_backend.requests == []
