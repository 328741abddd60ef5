"""HTTP/2 (issue 13): reads, credits, the balance JSON and streams that go
away while they wait on Redis, over h2c with prior knowledge and over TLS
(ALPN h2, a self-signed certificate made for the session).

Each nginx serves HTTP/1.1 on {port} (the harness' own checks, and the
same requests over HTTP/1.1 to compare with), h2c on {h2c_port} and h2 over
TLS on {h2s_port}; see h2_support.py.  Streams are suspended on Redis
deterministically, without timing: nginx talks to redis-server through a
RedisGate, which holds Redis' replies (or nginx's commands) until the test
releases them.  Many-stream tests drive one connection frame by frame with
python3-h2; single requests use curl."""

import json
from decimal import Decimal

import pytest

from conftest import (KEEP, SLOW, SPOOF, TIERS, checkout_conf, expected,
                      log_lines, wait_until)
from credit_support import (edge_conf, hkey, ledger_entries, marker,
                            order_path, record, settle, wait_marker)
from h2_support import (H2Client, RedisGate, TrickleShop, curl_h2,
                        h2_server, http2_directive, make_cert, require_h2,
                        wait_connections_closed)


TRANSPORTS = ["h2c", "tls"]

RULES = TIERS + """
        loyalty_offer vip code=VIP10 tier=gold;
        loyalty_offer welcome code=HELLO new;
"""

BALANCE = """
    location = /balance {
        loyalty_customer $http_x_customer;
        loyalty_redis 127.0.0.1:{redis_port};
        %s
        loyalty_balance;
    }
""" % RULES


@pytest.fixture(scope="session")
def cert(tmp_path_factory):
    return make_cert(str(tmp_path_factory.mktemp("h2-cert")))


@pytest.fixture(autouse=True)
def _h2_installed():
    require_h2()


@pytest.fixture
def gate(redis):
    g = RedisGate(redis.port)
    yield g
    g.stop()


def read_conf(cert, timeout="10s"):
    """The standard front server (/checkout: cookie cid, /hcheckout: header
    X-Customer, proxied to the echo backend) and /balance, over HTTP/1.1
    and HTTP/2."""
    return checkout_conf(RULES, server=h2_server(*cert)
                         + "loyalty_redis_timeout %s;" % timeout,
                         locations=BALANCE)


def h2_port(n, transport):
    return n.ports["h2s_port" if transport == "tls" else "h2c_port"]


def client(n, transport):
    return H2Client(h2_port(n, transport), tls=transport == "tls")


def tier_of(lifetime):
    return ("platinum" if lifetime >= 10000 else "gold" if lifetime >= 1000
            else "silver" if lifetime >= 100 else None)


def want_for(cid, points, lifetime, orders, status="ok"):
    """What RULES make of a record."""
    tier = tier_of(lifetime)
    offer, code = (("vip", "VIP10") if tier == "gold" else
                   ("welcome", "HELLO") if orders == 0 else (None, None))
    return expected(status, cid, points, lifetime, orders, tier, offer, code)


def seed_many(redis, prefix, count):
    """count customers <prefix><i>, each with its own numbers: {cid: the
    headers the backend must get}."""
    pipe = redis.client.pipeline()
    want = {}
    for i in range(count):
        cid = "%s%d" % (prefix, i)
        rec = dict(points=1000 + 7 * i, lifetime=97 * i, orders=i)
        pipe.hset(hkey(cid), mapping=dict(rec, first_order=1, last_order=2))
        want[cid] = want_for(cid, **rec)
    pipe.execute()
    return want


def canceled_streams(n):
    """nginx's info lines for RST_STREAM (CANCEL) of a live stream."""
    return [l for l in log_lines(n.error_log(), "info")
            if "client canceled stream" in l]


def evalsha_calls(redis):
    stats = redis.client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def check_healthy(n, workers):
    """Same workers, and nothing in the error log that the harness' own
    teardown check would only report after the test."""
    assert n.workers() == workers, "a worker died: %r -> %r" % (
        workers, n.workers())
    log = n.error_log()
    assert "http request count is zero" not in log, log[-3000:]
    assert n.bad_log_lines() == [], n.bad_log_lines()


# --------------------------------------------------------------------------
# 1. reads over HTTP/2, exactly as over HTTP/1.1


READ_CASES = [
    # id, request headers, the X-Loyalty-* headers the backend must get
    ("anonymous", [], expected("anonymous")),
    ("invalid", [("X-Customer", "bad id")], expected("invalid")),
    ("new", [("X-Customer", "fresh")],
     expected("new", "fresh", 0, 0, 0, None, "welcome", "HELLO")),
    ("ok-gold", [("X-Customer", "g1")],
     expected("ok", "g1", 250, 1500, 4, "gold", "vip", "VIP10")),
    ("ok-silver", [("X-Customer", "s1")],
     expected("ok", "s1", 7, 150, 2, "silver")),
    ("ok-cookie", [("Cookie", "x=1; cid=g1; y=2")],
     expected("ok", "g1", 250, 1500, 4, "gold", "vip", "VIP10")),
]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_reads_as_over_http1(redis, nginx, cert, transport):
    """curl over HTTP/2 (h2c prior knowledge, or TLS with ALPN): the
    response is HTTP/2 and the backend gets the same X-Loyalty-* headers
    as over HTTP/1.1, spoofed ones removed, others kept."""
    n = nginx(read_conf(cert), redis_port=redis.port)
    redis.seed("g1", points=250, lifetime=1500, orders=4)
    redis.seed("s1", points=7, lifetime=150, orders=2)
    port = h2_port(n, transport)
    for name, headers, want in READ_CASES:
        path = "/checkout" if name == "ok-cookie" else "/hcheckout"
        identified = name not in ("anonymous", "invalid")
        for _ in range(2):
            before = redis.hmget_calls()
            version, r = curl_h2(port, path, headers + SPOOF + KEEP,
                                 tls=transport == "tls")
            assert version == "2", (name, version)
            assert r.status == 200, (name, r)
            assert r.loyalty == want, (name, r.loyalty)
            assert redis.hmget_calls() == before + identified, name
            r1 = n.get(path, headers=headers + SPOOF + KEEP)
            assert r1.loyalty == r.loyalty, (name, r1.loyalty, r.loyalty)
    if http2_directive():
        assert "deprecated" not in n.error_log(), n.error_log()[-2000:]


def test_cookie_crumbs(redis, nginx, cert):
    """HTTP/2 may split Cookie into one field per cookie (RFC 9113
    8.2.3): loyalty_customer $cookie_cid finds cid in any of them."""
    n = nginx(read_conf(cert), redis_port=redis.port)
    redis.seed("g1", points=250, lifetime=1500, orders=4)
    c = client(n, "h2c")
    try:
        for crumbs in (["cid=g1"], ["a=1", "cid=g1"], ["a=1", "cid=g1", "b=2"],
                       ["cid=g1", "b=2"]):
            r = c.get("/checkout", [("cookie", v) for v in crumbs])
            assert r.status == 200, r
            assert r.loyalty == expected("ok", "g1", 250, 1500, 4, "gold",
                                         "vip", "VIP10"), (crumbs, r.loyalty)
        r = c.get("/checkout", [("cookie", "a=1"), ("cookie", "b=2")])
        assert r.loyalty == expected("anonymous"), r.loyalty
    finally:
        c.close()


# --------------------------------------------------------------------------
# 2. many streams of one connection suspended on Redis at once


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_many_streams_suspended_at_once(redis, gate, nginx, cert, transport):
    """60 streams on one HTTP/2 connection, 40 customers (some asked for
    by two streams, by header or by cookie), new ones and anonymous ones.
    Every read is at Redis (its replies held by the gate) before any is
    answered; the anonymous streams are answered meanwhile, the others
    are not; once the replies go, every stream gets its own record."""
    n = nginx(read_conf(cert), redis_port=gate.port, workers=1)
    want = seed_many(redis, "m", 40)
    workers = n.workers()
    c = client(n, transport)
    try:
        assert c.get("/hcheckout", [("x-customer", "m1")]).loyalty == \
            want["m1"]
        assert gate.accepted == 1

        plan = []                       # (path, headers, expected)
        for i in range(60):
            if i % 10 == 9:
                plan.append(("/hcheckout", [], expected("anonymous")))
                continue
            cid = "new%d" % i if i % 10 == 8 else "m%d" % (i % 40)
            w = want.get(cid) or expected("new", cid, 0, 0, 0, None,
                                          "welcome", "HELLO")
            if i % 2:
                plan.append(("/checkout", [("cookie", "cid=" + cid)], w))
            else:
                plan.append(("/hcheckout", [("x-customer", cid)], w))
        reads = len([p for p in plan if p[1]])
        assert reads == 54

        gate.hold(down=True)
        before = redis.hmget_calls()
        sids = [c.request(path, hdrs) for path, hdrs, _ in plan]
        wait_until(lambda: redis.hmget_calls() == before + reads, 20,
                   message="the 54 reads at Redis")
        anon = [s for s, p in zip(sids, plan) if not p[1]]
        for s in c.wait(anon):
            assert s.response().loyalty == expected("anonymous")
        c.idle(0.3)
        early = [c.streams[s] for s, p in zip(sids, plan)
                 if p[1] and c.streams[s].answered]
        assert early == [], "answered while Redis held its reply: %r" % early

        gate.release()
        got = c.wait(sids, 30)
        for (path, hdrs, w), s in zip(plan, got):
            r = s.response()
            assert r.status == 200, (hdrs, r)
            assert r.loyalty == w, (path, hdrs, r.loyalty, w)
        assert gate.accepted == 1, "the worker reconnected to Redis"
        assert redis.hmget_calls() == before + reads

        # the connection goes on: a second burst, nothing held
        sids = [c.request("/hcheckout", [("x-customer", "m%d" % i)])
                for i in range(40)]
        for i, s in enumerate(c.wait(sids, 30)):
            assert s.response().loyalty == want["m%d" % i], i
    finally:
        c.close()
    check_healthy(n, workers)
    wait_connections_closed(n, "the HTTP/2 connection to be closed")


# --------------------------------------------------------------------------
# 3. credits over HTTP/2


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_credits_on_one_connection(redis, nginx, cert, transport):
    """18 orders of 6 customers at once on one HTTP/2 connection, and one
    order id sent on 5 streams: every order credited exactly once, with
    the tier read at the start of its request."""
    n = nginx(edge_conf(server=h2_server(*cert) + TIERS),
              redis_port=redis.port, workers=1)
    workers = n.workers()
    redis.seed("hc0", points=10, lifetime=1500, orders=3)      # gold, x1.5
    orders = [("hc%d" % (i % 6), "h2-%s-%d" % (transport, i),
               "%d.%02d" % (3 + 5 * i, i)) for i in range(18)]

    def earned(cid, total):
        return int(Decimal(total) * Decimal("1.5" if cid == "hc0" else "1"))

    dup = ("hc1", "h2-dup-" + transport, "5")
    c = client(n, transport)
    try:
        sids = [c.request(order_path("/buy", total, oid),
                          [("x-customer", cid)]) for cid, oid, total in orders]
        dups = [c.request(order_path("/buy", dup[2], dup[1]),
                          [("x-customer", dup[0])]) for _ in range(5)]
        got = c.wait(sids + dups, 30)
    finally:
        c.close()
    for (cid, oid, total), s in zip(orders, got):
        r = s.response()
        assert r.status == 200, r
        assert r.header("X-Loyalty-Status") in ("ok", "new"), r
        assert r.header("X-Loyalty-Earned") == str(earned(cid, total)), (
            cid, total, r.headers)
    for s in got[len(orders):]:
        assert s.response().status == 200

    for cid, oid, total in orders:
        assert wait_marker(redis.client, cid, oid) == "%d:0" % earned(
            cid, total)
    assert wait_marker(redis.client, *dup[:2]) == "5:0"
    wait_until(lambda: len([l for l in log_lines(n.error_log(), "info")
                            if "credited before" in l]) == 4, 10,
               message="four 'credited before' info lines")
    settle(lambda: {c: record(redis.client, c) for c in
                    ("hc0", "hc1", "hc2", "hc3", "hc4", "hc5")}, quiet=1.5)
    for k in range(6):
        cid = "hc%d" % k
        mine = [(oid, total) for c_, oid, total in orders if c_ == cid]
        pts = sum(earned(cid, t) for _, t in mine) + (5 if cid == "hc1"
                                                      else 0)
        base = (10, 1500, 3) if cid == "hc0" else (0, 0, 0)
        rec = record(redis.client, cid)
        assert (rec["points"], rec["lifetime"], rec["orders"]) == (
            base[0] + pts, base[1] + pts,
            base[2] + len(mine) + (cid == "hc1")), (cid, rec)
        ledger = sorted(e["order"] for e in ledger_entries(redis.client, cid))
        assert ledger == sorted([oid for oid, _ in mine] + (
            [dup[1]] if cid == "hc1" else [])), (cid, ledger)
    check_healthy(n, workers)


# --------------------------------------------------------------------------
# 4. streams that go away while they wait


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_streams_reset_while_waiting(redis, gate, nginx, cert, transport):
    """24 streams wait on Redis (20 checkouts, 4 balance lookups, which
    wait in the content phase); 9 of them are reset (RST_STREAM CANCEL).
    The connection serves new streams meanwhile, and once Redis answers,
    every stream left gets its own record, a new one too, nothing is
    logged above info, and the worker lives on."""
    n = nginx(read_conf(cert), redis_port=gate.port, workers=1)
    want = seed_many(redis, "r", 20)
    workers = n.workers()
    c = client(n, transport)
    try:
        assert c.get("/hcheckout", [("x-customer", "r0")]).loyalty == \
            want["r0"]
        gate.hold(down=True)
        before = redis.hmget_calls()
        checkouts = [c.request("/hcheckout", [("x-customer", "r%d" % i)])
                     for i in range(20)]
        balances = [c.request("/balance", [("x-customer", "r%d" % i)])
                    for i in range(4)]
        wait_until(lambda: redis.hmget_calls() == before + 24, 20,
                   message="the 24 reads at Redis")
        c.idle(0.2)
        assert not [s for s in checkouts + balances
                    if c.streams[s].answered], "answered before Redis"

        reset = checkouts[::3] + balances[:2]           # 7 + 2
        for s in reset:
            c.reset(s)
        wait_until(lambda: len(canceled_streams(n)) == len(reset), 10,
                   message="nginx logging %d canceled streams" % len(reset))

        # the connection still serves while the others wait
        r = c.get("/hcheckout")
        assert r.loyalty == expected("anonymous"), r
        assert c.get("/plain").body == "plain"

        gate.release()
        left = [s for s in checkouts if s not in reset]
        for s in c.wait(left, 30):
            i = checkouts.index(s.sid)
            r = s.response()
            assert r.status == 200, r
            assert r.loyalty == want["r%d" % i], (i, r.loyalty)
        for s in c.wait(balances[2:], 30):
            i = balances.index(s.sid)
            r = s.response()
            assert r.status == 200, r
            w = want["r%d" % i]
            assert json.loads(r.body) == {
                "status": "ok", "customer": "r%d" % i,
                "points": int(w["X-Loyalty-Points"]),
                "lifetime": int(w["X-Loyalty-Lifetime"]),
                "orders": int(w["X-Loyalty-Orders"]),
                "tier": w.get("X-Loyalty-Tier"),
                "offer": w.get("X-Loyalty-Offer"),
                "offer_code": w.get("X-Loyalty-Offer-Code")}, r.body
        c.idle(0.3)
        for s in reset:
            assert c.streams[s].headers is None, c.streams[s]

        # a new stream after the late replies: its own record
        for i in (3, 6, 19):
            r = c.get("/hcheckout", [("x-customer", "r%d" % i)])
            assert r.loyalty == want["r%d" % i], (i, r.loyalty)
        r = c.get("/balance", [("x-customer", "r5")])
        assert json.loads(r.body)["customer"] == "r5", r
        assert c.terminated is None and not c.closed
    finally:
        c.close()
    check_healthy(n, workers)
    wait_connections_closed(n, "the HTTP/2 connection to be closed")
    assert gate.accepted == 1, "the worker reconnected to Redis"


def test_streams_reset_then_read_times_out(redis, gate, nginx, cert):
    """Streams wait on a Redis that answers only after
    loyalty_redis_timeout (3 s); half of them are reset first.  The others
    get `unavailable`, and the late replies are given to no stream: new
    streams get their own records (whether the module keeps the connection
    and drops the late replies, or resets it, as the README says it does
    on 1.22 today)."""
    n = nginx(read_conf(cert, timeout="%ds" % (3 * SLOW)),
              redis_port=gate.port, workers=1)
    want = seed_many(redis, "t", 12)
    workers = n.workers()
    c = client(n, "h2c")
    try:
        assert c.get("/hcheckout", [("x-customer", "t0")]).loyalty == \
            want["t0"]
        gate.hold(down=True)
        before = redis.hmget_calls()
        sids = [c.request("/hcheckout", [("x-customer", "t%d" % i)])
                for i in range(12)]
        wait_until(lambda: redis.hmget_calls() == before + 12, 20,
                   message="the 12 reads at Redis")
        assert not [s for s in sids if c.streams[s].answered]
        reset = sids[::2]
        for s in reset:
            c.reset(s)
        wait_until(lambda: len(canceled_streams(n)) == len(reset), 10,
                   message="nginx logging %d canceled streams" % len(reset))
        for s in c.wait(sids[1::2], 30):
            assert s.response().loyalty == expected("unavailable"), s
        gate.release()

        def fresh_read():
            r = c.get("/hcheckout", [("x-customer", "t7")])
            return r if r.loyalty["X-Loyalty-Status"] != "unavailable" \
                else None
        r = wait_until(fresh_read, 20, 0.2, "a read that is not unavailable")
        assert r.loyalty == want["t7"], r.loyalty
        for i in (1, 2, 11):
            r = c.get("/hcheckout", [("x-customer", "t%d" % i)])
            assert r.loyalty == want["t%d" % i], (i, r.loyalty)
    finally:
        c.close()
    check_healthy(n, workers)
    wait_connections_closed(n, "the HTTP/2 connection to be closed")


@pytest.mark.parametrize("how", ["fin", "rst", "goaway-fin"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_connection_closed_while_waiting(redis, gate, nginx, cert, transport,
                                         how):
    """The client closes the whole connection (FIN, RST, or GOAWAY then
    FIN) while 22 of its streams wait on Redis: nginx closes the connection
    and frees its streams without waiting for the replies; once they come
    the worker is fine and a new connection is served right."""
    n = nginx(read_conf(cert), redis_port=gate.port, workers=1)
    want = seed_many(redis, "w", 20)
    workers = n.workers()
    c = client(n, transport)
    try:
        assert c.get("/hcheckout", [("x-customer", "w0")]).loyalty == \
            want["w0"]
        gate.hold(down=True)
        before = redis.hmget_calls()
        sids = [c.request("/checkout", [("cookie", "cid=w%d" % i)])
                for i in range(20)]
        sids += [c.request("/balance", [("x-customer", "w%d" % i)])
                 for i in (1, 2)]
        wait_until(lambda: redis.hmget_calls() == before + 22, 20,
                   message="the 22 reads at Redis")
        c.idle(0.2)
        assert not [s for s in sids if c.streams[s].answered], \
            "answered before Redis"
        if how == "goaway-fin":
            c.goaway()
    finally:
        c.close(rst=how == "rst")
    wait_connections_closed(n, "nginx to close the HTTP/2 connection while "
                               "Redis still holds the replies")
    ended = [l for l in log_lines(n.error_log(), "info")
             if "client prematurely closed connection, " in l]
    assert len(ended) == 22 and \
        len([l for l in ended if "GET /balance HTTP/2.0" in l]) == 2, ended
    gate.release()
    wait_until(lambda: not any(gate.held()), 10, message="replies delivered")

    c = client(n, transport)
    try:
        for i in (0, 5, 19):
            r = c.get("/checkout", [("cookie", "cid=w%d" % i)])
            assert r.loyalty == want["w%d" % i], (i, r.loyalty)
        r = c.get("/balance", [("x-customer", "w2")])
        assert r.status == 200 and json.loads(r.body)["customer"] == "w2"
    finally:
        c.close()
    check_healthy(n, workers)
    assert gate.accepted == 1, "the worker reconnected to Redis"
    wait_connections_closed(n, "the second HTTP/2 connection to be closed")


# --------------------------------------------------------------------------
# confirmed orders whose client goes away


@pytest.mark.parametrize("how,redis_late", [
    ("reset", False), ("close", False), ("reset", True)])
def test_confirmed_order_credited_once_when_client_leaves(
        redis, gate, nginx, cert, how, redis_late):
    """The shop confirms 4 orders (response headers sent to the client, the
    body still coming) while Redis does not get the credits (the gate holds
    them); then the client resets the streams or closes the connection,
    which ends the requests.  Once Redis gets the credits each order is
    credited exactly once.  With redis_late, the credits first miss
    loyalty_redis_timeout (the module gives up on the connection and
    retries them); the late original and the retry still count once."""
    shop = TrickleShop()
    cleanup = [shop.stop]
    try:
        n = nginx(edge_conf(server=h2_server(*cert), locations="""
    location /warm {
        loyalty on;
        proxy_pass http://127.0.0.1:{port}/__harness_ready;
    }
    location /trickle {
        loyalty on;
        %s
        proxy_pass http://127.0.0.1:{trickle_port};
    }""" % ("" if redis_late else "loyalty_redis_timeout 10s;")),
                  redis_port=gate.port, trickle_port=shop.port, workers=1)
        workers = n.workers()
        redis.seed("cl0", points=100, lifetime=100, orders=1)      # silver
        orders = [("cl%d" % (i % 2), "leave-%d" % i, "%d.50" % (10 + i))
                  for i in range(4)]
        c = client(n, "h2c")
        cleanup.append(c.close)
        r = c.get("/warm", [("x-customer", "cl0")])
        assert r.status == 204 and r.header("X-Loyalty-Status") == "ok", r
        evals0 = evalsha_calls(redis)
        sids = [c.request(order_path("/trickle", total, oid),
                          [("x-customer", cid)]) for cid, oid, total in orders]
        wait_until(lambda: shop.received == 4, 20,
                   message="the 4 orders at the shop")
        gate.hold(up=True, down=False)
        shop.release()
        got = c.wait(sids, 20, what="answered")
        for (cid, oid, total), s in zip(orders, got):
            assert s.status == 200, s
            assert dict(s.headers).get("x-loyalty-earned") == str(
                int(float(total))), s.headers
            assert not s.ended, "the shop's body is not complete: %r" % s
        wait_until(lambda: gate.held_commands("EVALSHA") == 4, 10,
                   message="the 4 credits held on their way to Redis")
        assert [redis.client.exists(marker(cid, oid))
                for cid, oid, _ in orders] == [0] * 4
        if redis_late:
            wait_until(lambda: gate.closed_by_nginx() >= 1, 20 * SLOW,
                       message="the module giving up on the connection")

        if how == "reset":
            for s in sids:
                c.reset(s)
            wait_until(lambda: len(canceled_streams(n)) == 4, 10,
                       message="nginx logging 4 canceled streams")
        else:
            c.close()
        wait_until(lambda: shop.closed_by_peer == 4, 10,
                   message="nginx closing the 4 shop connections")

        gate.release()
        for cid, oid, total in orders:
            assert wait_marker(redis.client, cid, oid, timeout=20) == \
                "%d:0" % int(float(total))
        if redis_late:
            # the originals, late, and the retries all ran at Redis
            wait_until(lambda: evalsha_calls(redis) >= evals0 + 8, 20,
                       message="the 4 credits and their 4 retries at Redis")
        settle(lambda: (record(redis.client, "cl0"),
                        record(redis.client, "cl1"),
                        evalsha_calls(redis)), quiet=3.0)
        if not redis_late:
            assert evalsha_calls(redis) == evals0 + 4
        rec0, rec1 = record(redis.client, "cl0"), record(redis.client, "cl1")
        assert (rec0["points"], rec0["lifetime"], rec0["orders"]) == (
            100 + 10 + 12, 100 + 10 + 12, 3), rec0
        assert (rec1["points"], rec1["lifetime"], rec1["orders"]) == (
            11 + 13, 11 + 13, 2), rec1
        for cid in ("cl0", "cl1"):
            assert sorted(e["order"] for e in ledger_entries(
                redis.client, cid)) == sorted(
                    oid for c_, oid, _ in orders if c_ == cid), cid
        assert "unapplied credit" not in n.error_log()
        if how == "reset":
            r = c.get("/warm", [("x-customer", "cl1")])
            assert r.header("X-Loyalty-Points") == "24", r
            c.close()
        check_healthy(n, workers)
        wait_connections_closed(n, "the HTTP/2 connection to be closed")
    finally:
        for f in reversed(cleanup):
            f()


# --------------------------------------------------------------------------
# 5. loyalty_balance over HTTP/2


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_balance_json(redis, nginx, cert, transport):
    n = nginx(read_conf(cert), redis_port=redis.port)
    redis.seed("g1", points=250, lifetime=1500, orders=4)
    port = h2_port(n, transport)
    version, r = curl_h2(port, "/balance", [("X-Customer", "g1")],
                         tls=transport == "tls")
    assert version == "2"
    assert r.status == 200, r
    assert r.header("Content-Type").split(";")[0] == "application/json", r
    assert r.header_all("Cache-Control") == ["no-store"], r.headers
    assert json.loads(r.body) == {
        "status": "ok", "customer": "g1", "points": 250, "lifetime": 1500,
        "orders": 4, "tier": "gold", "offer": "vip", "offer_code": "VIP10"}
    version, r = curl_h2(port, "/balance", tls=transport == "tls")
    assert (version, r.status) == ("2", 401), r
    assert json.loads(r.body) == {"status": "anonymous"}
