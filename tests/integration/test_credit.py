"""Credit (write) path, issue #3: earn, redeem, exactly-once, ledger, expiry,
journal and replay, Redis failures and nginx reloads during a stream of
orders.  See credit_support.py for the stand-in shop behind the edge."""

import json
import os
import re
import resource
import select
import signal
import socket
import time

import pytest

from conftest import log_lines, run_parallel, wait_until
from credit_support import (JOURNAL, MARKER_TTL, SHOP, TIERS, did,
                            WEIRD_ORDER_ID, HeldShop, amount_of,
                            applied_and_journaled, check_covered,
                            check_exact, edge_conf, error_log_credits,
                            expected_balances, journal_path, stream_orders,
                            hkey, ledger, ledger_entries, marker, order,
                            read_journal, record, replay, settle,
                            stop_redis_keeping_data, wait_marker)


RATES = """
    location /r01/ {
        loyalty on; loyalty_earn_rate 0.1;
        proxy_pass http://127.0.0.1:{shop_port}/;
    }
    location /r100/ {
        loyalty on; loyalty_earn_rate 100;
        proxy_pass http://127.0.0.1:{shop_port}/;
    }
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
    location /r2_5/ {
        loyalty on; loyalty_earn_rate 2.5;
        proxy_pass http://127.0.0.1:{shop_port}/;
    }
"""


# path, tier lifetime (None: new customer), amount, earned
ARITHMETIC = [
    ("/buy", None, "19.99", 19),
    ("/buy", None, "20", 20),
    ("/buy", None, "0012.50", 12),
    ("/buy", None, "0.9999", 0),
    ("/buy", None, "999999999999.9999", 999999999999),
    ("/r01/buy", None, "59.90", 5),
    ("/r01/buy", None, "59.99", 5),
    ("/r01/buy", None, "60", 6),
    ("/r100/buy", None, "0.29", 29),        # 0.29 * 100 < 29 in binary FP
    ("/r100/buy", None, "0.57", 57),        # 56.99999999999999 in FP
    ("/r100/buy", None, "4.35", 435),       # 434.99999999999994 in FP
    ("/r00001/buy", None, "19.99", 0),
    ("/r00001/buy", None, "10000", 1),
    ("/r2_5/buy", None, "0.4", 1),
    ("/r10000/buy", None, "99999999999.9999", 999999999999999),
    ("/r10000/buy", None, "100000000000", 10 ** 15),
    ("/rmax/buy", None, "1", 999999),
    ("/rmax/buy", None, "0.0001", 99),
    ("/rmax/buy", None, "1000000000", 999999999900000),
    ("/r2_5/buy", None, "1.1", 2),
    # tiers: silver (100, multiplier 1), gold (1000, 1.5), platinum (10000, 2)
    ("/buy", 150, "19.99", 19),
    ("/buy", 1500, "19.99", 29),            # 29.985
    ("/buy", 1500, "10", 15),
    ("/buy", 20000, "19.99", 39),           # 39.98
    ("/buy", 20000, "100", 200),
    ("/r01/buy", 20000, "59.90", 11),       # 11.98
    ("/r01/buy", 1500, "59.90", 8),         # 8.985
    ("/r100/buy", 1500, "0.29", 43),        # 43.5
    ("/r2_5/buy", 1500, "0.4", 1),          # 1.5
]


def test_credit_arithmetic(redis, nginx):
    n = nginx(edge_conf(server=TIERS, locations=RATES),
              redis_port=redis.port)
    for i, (path, lifetime, amount, earned) in enumerate(ARITHMETIC):
        cid = "arith-%d" % i
        if lifetime is not None:
            redis.seed(cid, points=7, lifetime=lifetime, orders=3)
        before = record(redis.client, cid)
        r = order(n, cid, amount, "o-%d" % i, path=path)
        assert r.status == 200, r
        assert r.header("X-Loyalty-Earned") == str(earned), (path, amount, r)
        assert wait_marker(redis.client, cid, "o-%d" % i) == "%d:0" % earned
        after = record(redis.client, cid)
        assert after["points"] == before.get("points", 0) + earned, (
            path, amount, after)
        assert after["lifetime"] == before.get("lifetime", 0) + earned
        assert after["orders"] == before.get("orders", 0) + 1


FEATURES = """
    location /l3/ {
        loyalty on; loyalty_ledger 3;
        proxy_pass http://127.0.0.1:{shop_port}/;
    }
    location /loff/ {
        loyalty on; loyalty_ledger off;
        proxy_pass http://127.0.0.1:{shop_port}/;
    }
    location /exp30/ {
        loyalty on; loyalty_expire 30d;
        proxy_pass http://127.0.0.1:{shop_port}/;
    }
    location /exp1h/ {
        loyalty on; loyalty_expire 1h;
        proxy_pass http://127.0.0.1:{shop_port}/;
    }
    location /expnl/ {
        loyalty on; loyalty_expire 30d; loyalty_ledger off;
        proxy_pass http://127.0.0.1:{shop_port}/;
    }
    location /a/ {
        loyalty on; loyalty_redis_prefix shopA:;
        proxy_pass http://127.0.0.1:{shop_port}/;
    }
    location /b/ {
        loyalty on; loyalty_redis_prefix shopB:;
        proxy_pass http://127.0.0.1:{shop_port}/;
    }
    location /nohdr/ {
        loyalty on; loyalty_response_headers off;
        proxy_pass http://127.0.0.1:{shop_port}/;
    }
    location /sp1/ {
        loyalty on; loyalty_earn " $upstream_http_x_order_total";
        proxy_pass http://127.0.0.1:{shop_port}/;
    }
    location /sp2/ {
        loyalty on; loyalty_earn "$upstream_http_x_order_total ";
        proxy_pass http://127.0.0.1:{shop_port}/;
    }
"""


_sentinels = iter(range(1, 1000000))


def flush_credits(n, client):
    """Send one more order and wait until it is credited.  With one worker
    every credit goes over one pipelined connection in order, so any credit
    the edge sent before this one has been applied by then: what is still
    missing afterwards was never sent."""
    oid = "sentinel-%d" % next(_sentinels)
    r = order(n, "sentinel", "1", oid)
    assert r.status == 200, r
    wait_marker(client, "sentinel", oid)


def message_of(line):
    """An error log line without the request context (", client: ..."),
    which repeats the query string."""
    return line.split(", client: ")[0]


def warn_messages(n, needle):
    return [message_of(l) for l in log_lines(n.error_log(), "warn")
            if needle in message_of(l)]


# --------------------------------------------------------------------------
# arithmetic and the record


def test_tier_read_at_request_start(redis, nginx):
    n = nginx(edge_conf(server=TIERS), redis_port=redis.port)
    redis.seed("t", points=0, lifetime=999, orders=1)       # silver
    r = order(n, "t", "10", "t1")
    assert r.header("X-Loyalty-Tier") == "silver"
    assert r.header("X-Loyalty-Earned") == "10"
    wait_marker(redis.client, "t", "t1")
    assert record(redis.client, "t")["lifetime"] == 1009     # now gold
    r = order(n, "t", "10", "t2")
    assert r.header("X-Loyalty-Tier") == "gold"
    assert r.header("X-Loyalty-Earned") == "15"
    assert wait_marker(redis.client, "t", "t2") == "15:0"
    rec = record(redis.client, "t")
    assert (rec["points"], rec["lifetime"], rec["orders"]) == (25, 1024, 3)


def test_record_fields_first_and_last_order(redis, nginx):
    n = nginx(edge_conf(), redis_port=redis.port)
    t0 = int(time.time())
    assert order(n, "fresh", "3.50", "f1").status == 200
    wait_marker(redis.client, "fresh", "f1")
    t1 = int(time.time())
    rec = record(redis.client, "fresh")
    assert set(rec) == {"points", "lifetime", "orders", "first_order",
                        "last_order"}, rec
    assert (rec["points"], rec["lifetime"], rec["orders"]) == (3, 3, 1)
    assert t0 <= rec["first_order"] == rec["last_order"] <= t1

    old = t0 - 40 * 86400
    redis.seed("old", points=5, lifetime=5, orders=1, first_order=old,
               last_order=old)
    assert order(n, "old", "1", "o1").status == 200
    wait_marker(redis.client, "old", "o1")
    rec = record(redis.client, "old")
    assert rec["first_order"] == old
    assert t0 <= rec["last_order"] <= int(time.time())
    assert (rec["points"], rec["lifetime"], rec["orders"]) == (6, 6, 2)


@pytest.mark.parametrize("path,status,credited", [
    ("/st201/buy", 201, True), ("/st204/buy", 204, True),
    ("/st302/buy", 302, False), ("/st404/buy", 404, False),
    ("/st500/buy", 500, False), ("/st503/buy", 503, False)])
def test_status_decides_credit(redis, nginx, path, status, credited):
    n = nginx(edge_conf(), redis_port=redis.port)
    redis.seed("s", points=40, lifetime=40, orders=1)
    for attempt in range(2):
        oid = "s-%d" % attempt
        r = order(n, "s", "12.5", oid, path=path)
        assert r.status == status, r
        assert r.header("X-Loyalty-Status") == "ok"
        if credited:
            assert r.header("X-Loyalty-Earned") == "12"
            assert r.header("X-Loyalty-Points") == str(40 + 12 * (attempt + 1))
            assert wait_marker(redis.client, "s", oid) == "12:0"
        else:
            assert r.header("X-Loyalty-Earned") is None, r
            assert r.header("X-Loyalty-Points") == "40"
    flush_credits(n, redis.client)
    rec = record(redis.client, "s")
    if credited:
        assert (rec["points"], rec["lifetime"], rec["orders"]) == (64, 64, 3)
    else:
        assert (rec["points"], rec["lifetime"], rec["orders"]) == (40, 40, 1)
        assert redis.client.keys("loyalty:{s}:*") == []


def test_no_order_without_amount(redis, nginx):
    """An empty loyalty_earn is no order: no credit, no log line; and an
    anonymous or invalid customer is never credited."""
    n = nginx(edge_conf(), redis_port=redis.port)
    redis.seed("e", points=3, lifetime=3, orders=1)
    for args in ({}, {"oid": "e1"}, {"oid": "e2", "redeem": "2"},
                 {"total": "", "oid": "e3"}):
        r = order(n, "e", path="/buy", **args)
        assert r.status == 200 and r.header("X-Loyalty-Status") == "ok"
        assert r.header("X-Loyalty-Earned") is None
        assert r.header("X-Loyalty-Points") == "3"
    # no customer, or an invalid one: nothing to credit
    assert order(n, None, "10", "anon1").header("X-Loyalty-Status") == \
        "anonymous"
    assert order(n, "bad id", "10", "inv1").header("X-Loyalty-Status") == \
        "invalid"
    flush_credits(n, redis.client)
    rec = record(redis.client, "e")
    assert (rec["points"], rec["lifetime"], rec["orders"]) == (3, 3, 1)
    assert redis.client.keys("loyalty:{e}:*") == []
    assert [k for k in redis.client.keys("*")
            if not k.startswith("loyalty:{sentinel}")] == ["loyalty:{e}"]
    assert [l for l in n.error_log().splitlines()
            if '"e"' in message_of(l) and "loyalty" in l] == []


def test_amount_zero_is_an_order(redis, nginx):
    n = nginx(edge_conf(), redis_port=redis.port)
    redis.seed("z", points=9, lifetime=20, orders=2)
    for i, amount in enumerate(("0", "0.0000", "0.5")):
        r = order(n, "z", amount, "z%d" % i)
        assert r.header("X-Loyalty-Earned") == "0"
        assert wait_marker(redis.client, "z", "z%d" % i) == "0:0"
    rec = record(redis.client, "z")
    assert (rec["points"], rec["lifetime"], rec["orders"]) == (9, 20, 5)
    entries = ledger_entries(redis.client, "z")
    assert [(e["amount"], e["earned"], e["points"]) for e in entries] == [
        ("0", "0", "9"), ("0.0000", "0", "9"), ("0.5", "0", "9")]
    # redeem applies on a zero order
    r = order(n, "z", "0", "z9", redeem="4")
    assert wait_marker(redis.client, "z", "z9") == "0:4"
    assert record(redis.client, "z")["points"] == 5


INVALID_AMOUNTS = ["-1", "1e3", "1.23456", "abc", "1.", ".5", "1,5",
                   "1234567890123", "0x10", "12.3.4", "NaN", "1_000"]


def test_invalid_amounts(redis, nginx):
    n = nginx(edge_conf(locations=FEATURES), redis_port=redis.port)
    redis.seed("inv", points=11, lifetime=11, orders=1)
    cases = [("/buy", a, a) for a in INVALID_AMOUNTS]
    # a value with blanks: the shop cannot send one (header values are
    # trimmed), so the earn value itself adds them
    cases += [("/sp1/buy", "5", " 5"), ("/sp2/buy", "5", "5 ")]
    for i, (path, sent, value) in enumerate(cases):
        r = order(n, "inv", sent, "inv-%d" % i, path=path)
        assert r.status == 200, r
        assert r.header("X-Loyalty-Earned") is None, (value, r)
        assert r.header("X-Loyalty-Points") == "11"
        msgs = warn_messages(n, 'invalid amount "%s"' % value)
        assert len(msgs) == 1, (value, msgs, n.error_log()[-3000:])
        assert 'customer "inv"' in msgs[0], msgs
    flush_credits(n, redis.client)
    rec = record(redis.client, "inv")
    assert (rec["points"], rec["lifetime"], rec["orders"]) == (11, 11, 1)
    assert redis.client.keys("loyalty:{inv}:*") == []
    # the same customer earns again once the amount is valid
    order(n, "inv", "2.5", "inv-ok")
    assert wait_marker(redis.client, "inv", "inv-ok") == "2:0"


def test_invalid_order_id(redis, nginx):
    n = nginx(edge_conf(), redis_port=redis.port)
    long_ok, too_long = "L" * 128, "L" * 129
    r = order(n, "oi", "4", too_long)
    assert r.status == 200 and r.header("X-Loyalty-Earned") is None
    msgs = warn_messages(n, "invalid order id")
    assert len(msgs) == 1 and 'customer "oi"' in msgs[0], msgs
    order(n, "oi", "4", long_ok)
    assert wait_marker(redis.client, "oi", long_ok) == "4:0"
    flush_credits(n, redis.client)
    assert record(redis.client, "oi")["orders"] == 1
    assert redis.client.exists(marker("oi", too_long)) == 0


# --------------------------------------------------------------------------
# exactly once


def test_repeated_order_id_credited_once(redis, nginx):
    n = nginx(edge_conf(), redis_port=redis.port)
    redis.seed("d", points=100, lifetime=100, orders=1)
    for total, redeem in (("25.5", "10"), ("25.5", "10"), ("999", "0"),
                          ("1", "")):
        r = order(n, "d", total, "dup-1", redeem=redeem)
        assert r.status == 200
    assert wait_marker(redis.client, "d", "dup-1") == "25:10"
    flush_credits(n, redis.client)
    rec = record(redis.client, "d")
    assert (rec["points"], rec["lifetime"], rec["orders"]) == (115, 125, 2)
    assert len(ledger_entries(redis.client, "d")) == 1
    assert 0 < redis.client.ttl(marker("d", "dup-1")) <= MARKER_TTL
    assert redis.client.ttl(marker("d", "dup-1")) > MARKER_TTL - 60
    wait_until(lambda: len([l for l in log_lines(n.error_log(), "info")
                            if "credited before" in l]) == 3, 5,
               message="three 'credited before' info lines")
    # the same order id of another customer is another order
    order(n, "d2", "3", "dup-1")
    assert wait_marker(redis.client, "d2", "dup-1") == "3:0"
    # concurrent duplicates, over two workers' connections too
    n2 = nginx(edge_conf(), redis_port=redis.port, workers=2)
    results = run_parallel(lambda _: order(n2, "dc", "7", "same").status,
                           range(40), threads=16)
    assert results == [200] * 40
    assert wait_marker(redis.client, "dc", "same") == "7:0"
    wait_until(lambda: len([l for l in log_lines(n2.error_log(), "info")
                            if "credited before" in l]) == 39, 10,
               message="39 duplicates answered")
    rec = record(redis.client, "dc")
    assert (rec["points"], rec["orders"]) == (7, 1)
    assert len(ledger_entries(redis.client, "dc")) == 1


# --------------------------------------------------------------------------
# redeem


def test_redeem_within_balance(redis, nginx):
    n = nginx(edge_conf(), redis_port=redis.port)
    redis.seed("rw", points=100, lifetime=500, orders=2)
    r = order(n, "rw", "10", "rw1", redeem="30")
    assert r.header("X-Loyalty-Earned") == "10"
    assert r.header("X-Loyalty-Points") == "80"
    assert wait_marker(redis.client, "rw", "rw1") == "10:30"
    rec = record(redis.client, "rw")
    assert (rec["points"], rec["lifetime"], rec["orders"]) == (80, 510, 3)
    # the whole balance, exactly
    r = order(n, "rw", "0", "rw2", redeem="80")
    assert r.header("X-Loyalty-Points") == "0"
    assert wait_marker(redis.client, "rw", "rw2") == "0:80"
    rec = record(redis.client, "rw")
    assert (rec["points"], rec["lifetime"], rec["orders"]) == (0, 510, 4)
    e = ledger_entries(redis.client, "rw")
    assert [(x["earned"], x["redeemed"], x["points"]) for x in e] == [
        ("10", "30", "80"), ("0", "80", "0")]
    flush_credits(n, redis.client)
    assert warn_messages(n, "more than the balance") == []


def test_redeem_beyond_balance(redis, nginx):
    n = nginx(edge_conf(), redis_port=redis.port)
    redis.seed("rb", points=10, lifetime=10, orders=1)
    r = order(n, "rb", "7", "rb1", redeem="50")
    assert r.header("X-Loyalty-Earned") == "7"
    assert r.header("X-Loyalty-Points") == "7"          # 10 - 10 + 7
    assert wait_marker(redis.client, "rb", "rb1") == "7:10"
    rec = record(redis.client, "rb")
    assert (rec["points"], rec["lifetime"], rec["orders"]) == (7, 17, 2)
    e = ledger_entries(redis.client, "rb")
    assert (e[-1]["redeemed"], e[-1]["points"]) == ("10", "7")
    wait_until(lambda: warn_messages(n, "more than the balance"), 5,
               message="the shortfall warning")
    [msg] = warn_messages(n, "more than the balance")
    assert '"rb1"' in msg and '"rb"' in msg and "40" in msg, msg

    # zero order, redeem beyond: points 0
    order(n, "rb", "0", "rb2", redeem="999999999999999999")   # 18 digits
    assert wait_marker(redis.client, "rb", "rb2") == "0:7"
    assert record(redis.client, "rb")["points"] == 0
    # the shortfall is logged exactly: 999999999999999999 - 7
    wait_until(lambda: warn_messages(n, '"rb2"'), 5,
               message="the shortfall warning of rb2")
    [msg] = warn_messages(n, '"rb2"')
    assert re.search(r"\b999999999999999992 more than the balance", msg), msg
    # a new customer has nothing to redeem
    r = order(n, "rbnew", "0", "n1", redeem="5")
    assert r.header("X-Loyalty-Points") == "0"
    assert wait_marker(redis.client, "rbnew", "n1") == "0:0"
    rec = record(redis.client, "rbnew")
    assert (rec["points"], rec["lifetime"], rec["orders"]) == (0, 0, 1)
    wait_until(lambda: len(warn_messages(n, "more than the balance")) == 3,
               5, message="one shortfall warning per short order")
    for v in record(redis.client, "rb").values():
        assert v >= 0


INVALID_REDEEMS = ["-5", "abc", "1.5", "1234567890123456789", "1e3", "5x"]


def test_invalid_redeem_earn_still_applies(redis, nginx):
    n = nginx(edge_conf(), redis_port=redis.port)
    redis.seed("ir", points=50, lifetime=50, orders=1)
    for i, value in enumerate(INVALID_REDEEMS):
        r = order(n, "ir", "3", "ir%d" % i, redeem=value)
        assert r.header("X-Loyalty-Earned") == "3"
        assert r.header("X-Loyalty-Points") == str(50 + 3 * (i + 1))
        assert wait_marker(redis.client, "ir", "ir%d" % i) == "3:0"
        msgs = warn_messages(n, 'invalid redeem "%s"' % value)
        assert len(msgs) == 1 and 'customer "ir"' in msgs[0], (value, msgs)
    rec = record(redis.client, "ir")
    k = len(INVALID_REDEEMS)
    assert (rec["points"], rec["lifetime"], rec["orders"]) == (
        50 + 3 * k, 50 + 3 * k, 1 + k)


# --------------------------------------------------------------------------
# ledger, expiry, prefix


def test_ledger_entries(redis, nginx):
    n = nginx(edge_conf(), redis_port=redis.port)
    redis.seed("lg", points=5, lifetime=5, orders=1)
    t0 = int(time.time())
    steps = [("0012.50", "", "lg-a", 12, 0, 17),
             ("3.99", "10", "lg-b", 3, 10, 10),
             ("1", "100", "lg-c", 1, 10, 1)]
    for total, redeem, oid, _, _, _ in steps:
        order(n, "lg", total, oid, redeem=redeem)
        wait_marker(redis.client, "lg", oid)
    t1 = int(time.time())
    entries = redis.client.xrange(ledger("lg"))
    assert len(entries) == 3
    for (eid, fields), (total, _, oid, earned, redeemed, after) in zip(
            entries, steps):
        assert sorted(fields) == sorted(["order", "amount", "earned",
                                         "redeemed", "points", "ts"]), fields
        assert fields["order"] == oid
        assert fields["amount"] == total
        assert fields["earned"] == str(earned)
        assert fields["redeemed"] == str(redeemed)
        assert fields["points"] == str(after)
        assert t0 <= int(fields["ts"]) <= t1
    assert record(redis.client, "lg")["points"] == 1
    assert redis.client.ttl(ledger("lg")) == -1


def test_ledger_maxlen_and_off(redis, nginx):
    n = nginx(edge_conf(locations=FEATURES), redis_port=redis.port)
    # small stream nodes, so that `MAXLEN ~ 3` can trim whole nodes
    redis.client.config_set("stream-node-max-entries", 2)
    for i in range(20):
        order(n, "l3", str(i), "l3-%d" % i, path="/l3/buy")
    assert wait_marker(redis.client, "l3", "l3-19") == "19:0"
    xlen = redis.client.xlen(ledger("l3"))
    assert 3 <= xlen <= 3 + 2, xlen
    newest = redis.client.xrevrange(ledger("l3"), count=1)[0][1]
    assert (newest["order"], newest["earned"], newest["points"]) == (
        "l3-19", "19", str(sum(range(20))))
    assert record(redis.client, "l3")["orders"] == 20

    # default node size: the stream never grows past a node of 100
    redis.client.config_set("stream-node-max-entries", 100)
    for i in range(5):
        order(n, "l3b", "1", "l3b-%d" % i, path="/l3/buy")
    wait_marker(redis.client, "l3b", "l3b-4")
    assert redis.client.xlen(ledger("l3b")) <= 100

    for i in range(3):
        order(n, "loff", "2", "lo-%d" % i, path="/loff/buy")
    wait_marker(redis.client, "loff", "lo-2")
    assert redis.client.exists(ledger("loff")) == 0
    rec = record(redis.client, "loff")
    assert (rec["points"], rec["orders"]) == (6, 3)


def test_expire(redis, nginx):
    n = nginx(edge_conf(locations=FEATURES), redis_port=redis.port)
    order(n, "x30", "1", "x1", path="/exp30/buy")
    wait_marker(redis.client, "x30", "x1")
    for key in (hkey("x30"), ledger("x30"), marker("x30", "x1")):
        ttl = redis.client.ttl(key)
        assert MARKER_TTL - 60 < ttl <= MARKER_TTL, (key, ttl)

    # each credit renews it
    redis.client.expire(hkey("x30"), 100)
    redis.client.expire(ledger("x30"), 100)
    order(n, "x30", "1", "x2", path="/exp30/buy")
    wait_marker(redis.client, "x30", "x2")
    assert redis.client.ttl(hkey("x30")) > MARKER_TTL - 60
    assert redis.client.ttl(ledger("x30")) > MARKER_TTL - 60

    order(n, "x1h", "1", "h1", path="/exp1h/buy")
    wait_marker(redis.client, "x1h", "h1")
    assert 3540 < redis.client.ttl(hkey("x1h")) <= 3600
    assert 3540 < redis.client.ttl(ledger("x1h")) <= 3600
    assert redis.client.ttl(marker("x1h", "h1")) > MARKER_TTL - 60

    order(n, "xnl", "1", "n1", path="/expnl/buy")
    wait_marker(redis.client, "xnl", "n1")
    assert redis.client.ttl(hkey("xnl")) > MARKER_TTL - 60
    assert redis.client.exists(ledger("xnl")) == 0

    # off (the default): the record stays, only the marker expires
    order(n, "xoff", "1", "o1")
    wait_marker(redis.client, "xoff", "o1")
    assert redis.client.ttl(hkey("xoff")) == -1
    assert redis.client.ttl(ledger("xoff")) == -1
    assert redis.client.ttl(marker("xoff", "o1")) > MARKER_TTL - 60


def test_prefix_isolation(redis, nginx):
    n = nginx(edge_conf(locations=FEATURES), redis_port=redis.port)
    redis.seed("p", points=100, lifetime=100, orders=1, prefix="shopA:")
    r = order(n, "p", "10", "same", path="/a/buy")
    assert r.header("X-Loyalty-Points") == "110"
    r = order(n, "p", "3", "same", path="/b/buy")
    assert r.header("X-Loyalty-Status") == "new"
    assert r.header("X-Loyalty-Points") == "3"
    assert wait_marker(redis.client, "p", "same", prefix="shopA:") == "10:0"
    assert wait_marker(redis.client, "p", "same", prefix="shopB:") == "3:0"
    # a repeat on A is a duplicate there, and changes nothing on B
    order(n, "p", "10", "same", path="/a/buy")
    r = order(n, "p", "4", "b2", path="/b/buy", redeem="2")
    assert r.header("X-Loyalty-Points") == "5"
    wait_marker(redis.client, "p", "b2", prefix="shopB:")
    a, b = (record(redis.client, "p", prefix=p) for p in ("shopA:", "shopB:"))
    assert (a["points"], a["lifetime"], a["orders"]) == (110, 110, 2)
    assert (b["points"], b["lifetime"], b["orders"]) == (5, 7, 2)
    assert len(ledger_entries(redis.client, "p", "shopA:")) == 1
    assert len(ledger_entries(redis.client, "p", "shopB:")) == 2
    assert redis.client.keys("loyalty:*") == []
    assert all(k.startswith(("shopA:{p}", "shopB:{p}"))
               for k in redis.client.keys("*")), redis.client.keys("*")


# --------------------------------------------------------------------------
# headers and the variable


def module_headers(r):
    """The X-Loyalty-* response headers but the shop's X-Loyalty-Redeem,
    which the edge passes on as any upstream header."""
    h = r.loyalty_response_headers()
    h.pop("X-Loyalty-Redeem", None)
    return h


def test_response_headers(redis, nginx):
    n = nginx(edge_conf(locations=FEATURES), redis_port=redis.port)
    r = order(n, "rh-new", "19.99", "h1")
    assert module_headers(r) == {
        "X-Loyalty-Status": "new", "X-Loyalty-Points": "19",
        "X-Loyalty-Earned": "19"}
    redis.seed("rh", points=100, lifetime=100, orders=1)
    r = order(n, "rh", "19.99", "h2", redeem="30")
    assert module_headers(r) == {
        "X-Loyalty-Status": "ok", "X-Loyalty-Points": "89",
        "X-Loyalty-Earned": "19"}
    wait_marker(redis.client, "rh", "h2")
    r = order(n, "rh", "1", "h3", redeem="500")
    assert r.header("X-Loyalty-Earned") == "1"
    assert r.header("X-Loyalty-Points") == "1"      # 89 - 89 + 1
    wait_marker(redis.client, "rh", "h3")
    assert record(redis.client, "rh")["points"] == 1
    # earned 0 is sent as 0
    r = order(n, "rh", "0.99", "h4")
    assert r.header("X-Loyalty-Earned") == "0"
    # off: nothing on the response, the credit still happens
    r = order(n, "rh", "5", "h5", path="/nohdr/buy")
    assert module_headers(r) == {}
    assert wait_marker(redis.client, "rh", "h5") == "5:0"


def test_loyalty_earned_in_access_log(redis, nginx):
    http = ('log_format credit "$loyalty_customer|$loyalty_status|'
            '$loyalty_earned|$status";')
    n = nginx(edge_conf(http=http, server=TIERS,
                        loc="access_log {prefix}/credit.log credit;"),
              redis_port=redis.port)
    redis.seed("g", points=0, lifetime=1500, orders=1)      # gold
    order(n, "g", "10", "v1")
    order(n, "g", "", "v2")
    order(n, "g", "10", "v3", path="/st500/buy")
    order(n, "nw", "2.5", "v4")
    order(n, "g", "abc", "v5")

    def lines():
        try:
            return n.read_file("credit.log").splitlines()
        except FileNotFoundError:
            return []
    wait_until(lambda: len(lines()) == 5, 5, message="5 access log lines")
    # no credit: $loyalty_earned is empty (logged as "" or "-")
    assert [l.replace("|-|", "||") for l in lines()] == [
        "g|ok|15|200", "g|ok||200", "g|ok||500", "nw|new|2|200", "g|ok||200"]


# --------------------------------------------------------------------------
# internal redirects and subrequests


REDIRECTS = """
    location /ep/ {
        loyalty on;
        proxy_intercept_errors on;
        error_page 404 = /buy?$args;
        proxy_pass http://127.0.0.1:{shop_port}/st404/;
    }
    location /ax/ {
        loyalty on;
        proxy_pass http://127.0.0.1:{shop_port}/accel/;
    }
    location /inner/ {
        internal;
        loyalty on;
        proxy_pass http://127.0.0.1:{shop_port}/;
    }
    location /page/ {
        loyalty on;
        ssi on;
        proxy_pass http://127.0.0.1:{shop_port}/ssi/;
    }
"""


@pytest.mark.parametrize("path,body", [("/ep/buy", "ordered\n"),
                                       ("/ax/buy", "ordered\n"),
                                       ("/page/buy", "page ordered\n end")])
def test_credit_once_across_redirects(redis, nginx, path, body):
    n = nginx(edge_conf(locations=REDIRECTS), redis_port=redis.port)
    redis.seed("rd", points=10, lifetime=10, orders=1)
    for i in range(2):
        before = redis.hmget_calls()
        r = order(n, "rd", "8", "rd%d" % i, path=path)
        assert (r.status, r.body) == (200, body), r
        assert r.header_all("X-Loyalty-Earned") == ["8"], r
        assert r.header_all("X-Loyalty-Points") == [str(18 + 8 * i)], r
        assert wait_marker(redis.client, "rd", "rd%d" % i) == "8:0"
        assert redis.hmget_calls() == before + 1, "customer read twice"
    flush_credits(n, redis.client)
    rec = record(redis.client, "rd")
    assert (rec["points"], rec["lifetime"], rec["orders"]) == (26, 26, 3)
    assert len(ledger_entries(redis.client, "rd")) == 2
    # the SSI subrequest's own order (total 7) is not credited
    assert redis.client.keys("loyalty:{rd}:order:*-sub") == []


# --------------------------------------------------------------------------
# a request stays bound to the location where its read ran (SPEC §2): its
# credit uses that location's Redis, prefix, expiry and journal, whatever
# location error_page, try_files or X-Accel-Redirect end it in


BOUND_EDGE = """
server {
    listen 127.0.0.1:{port};
    location = /__harness_ready { return 204; }

    loyalty_customer $http_x_customer;
    loyalty_earn $upstream_http_x_order_total;
    loyalty_order_id $upstream_http_x_order_id;
    loyalty_response_headers on;
    @SERVER@

    # the read runs in these, on shop A's Redis and prefix
    location /ep/ {
        @SHOP_A@
        proxy_intercept_errors on;
        error_page 404 =200 /other;
        proxy_pass http://127.0.0.1:{shop_port}/st404/;
    }
    location /eo/ {
        @SHOP_A@
        proxy_intercept_errors on;
        error_page 404 = /on/buy?$args;
        proxy_pass http://127.0.0.1:{shop_port}/st404/;
    }
    location /en/ {
        @SHOP_A@
        proxy_intercept_errors on;
        error_page 404 = @on;
        proxy_pass http://127.0.0.1:{shop_port}/st404/;
    }
    location /tf/ {
        @SHOP_A@
        try_files /nonexistent @off;
    }
    location /ax/ {
        @SHOP_A@
        proxy_pass http://127.0.0.1:{shop_port}/accel/;
    }

    # where they end: without loyalty, or with "loyalty on" and shop B's
    # prefix, on the server's Redis (when it has one)
    location = /other {
        loyalty_redis_prefix other:;
        return 200 "other\n";
    }
    location /inner/ {
        internal;
        loyalty_redis_prefix other:;
        proxy_pass http://127.0.0.1:{shop_port}/;
    }
    location @off {
        loyalty_redis_prefix other:;
        proxy_pass http://127.0.0.1:{shop_port};
    }
    location /on/ {
        loyalty on;
        loyalty_redis_prefix shopB:;
        proxy_pass http://127.0.0.1:{shop_port}/;
    }
    location @on {
        loyalty on;
        loyalty_redis_prefix shopB:;
        proxy_pass http://127.0.0.1:{shop_port};
    }
}
""" + SHOP

SHOP_A = """loyalty on;
        loyalty_redis 127.0.0.1:{redis_port};
        loyalty_redis_prefix shopA:;
        loyalty_expire 30d;"""


def bound_conf(server="", shop_a=""):
    return (BOUND_EDGE.replace("@SERVER@", server)
            .replace("@SHOP_A@", SHOP_A + shop_a))


# path, the body the client gets
BOUND = [
    ("/ep/buy", "other\n"),     # error_page to a location without loyalty
    ("/eo/buy", "ordered\n"),   # error_page to a location with loyalty on
    ("/en/buy", "ordered\n"),   # ... and to a named one
    ("/tf/buy", "ordered\n"),   # try_files to a named one without loyalty
    ("/ax/buy", "ordered\n"),   # X-Accel-Redirect to one without loyalty
]


def test_credit_after_error_page_to_location_without_redis(redis, nginx):
    """The issue's configuration: no Redis at the server level, so the
    location the request ends in has none; the credit must use the one of
    the location where the read ran."""
    n = nginx(bound_conf(), redis_port=redis.port)
    workers = n.workers()
    redis.seed("al", points=10, lifetime=10, orders=1, prefix="shopA:")
    r = order(n, "al", "8", "np1", path="/ep/buy")
    assert (r.status, r.body) == (200, "other\n"), r
    assert r.header_all("X-Loyalty-Earned") == ["8"], r
    assert wait_marker(redis.client, "al", "np1", prefix="shopA:") == "8:0"
    flush = order(n, "al", "1", "np2", path="/ep/buy")
    assert flush.status == 200, flush
    wait_marker(redis.client, "al", "np2", prefix="shopA:")
    assert n.workers() == workers, "a worker died"
    assert "exited on signal" not in n.error_log()
    rec = record(redis.client, "al", prefix="shopA:")
    assert (rec["points"], rec["lifetime"], rec["orders"]) == (19, 19, 3)


@pytest.mark.parametrize("path,body", BOUND,
                         ids=[p.split("/")[1] for p, _ in BOUND])
def test_credit_bound_to_read_location(redis_factory, nginx, path, body):
    shop_a, other = redis_factory(), redis_factory()
    n = nginx(bound_conf(server="loyalty_redis 127.0.0.1:{other_port};"),
              redis_port=shop_a.port, other_port=other.port)
    shop_a.seed("al", points=10, lifetime=10, orders=1, prefix="shopA:")
    seeded = sorted(other.seed("al", points=500, lifetime=500, orders=9,
                               prefix=p) for p in ("other:", "shopB:"))
    for i in range(2):
        before = (shop_a.hmget_calls(), other.hmget_calls())
        r = order(n, "al", "8", "b%d" % i, path=path)
        assert (r.status, r.body) == (200, body), r
        assert r.header_all("X-Loyalty-Earned") == ["8"], r
        assert r.header_all("X-Loyalty-Points") == [str(18 + 8 * i)], r
        assert wait_marker(shop_a.client, "al", "b%d" % i,
                           prefix="shopA:") == "8:0"
        assert (shop_a.hmget_calls(), other.hmget_calls()) == (
            before[0] + 1, before[1]), "read twice, or not in shop A"
    rec = record(shop_a.client, "al", prefix="shopA:")
    assert (rec["points"], rec["lifetime"], rec["orders"]) == (26, 26, 3)
    assert len(ledger_entries(shop_a.client, "al", "shopA:")) == 2
    # shop A's loyalty_expire, not the server's (off)
    assert shop_a.client.ttl(hkey("al", "shopA:")) > 29 * 86400
    assert shop_a.client.ttl(ledger("al", "shopA:")) > 29 * 86400
    assert sorted(shop_a.client.keys("*")) == sorted(
        [hkey("al", "shopA:"), ledger("al", "shopA:"),
         marker("al", "b0", "shopA:"), marker("al", "b1", "shopA:")])
    assert sorted(other.client.keys("*")) == seeded
    assert "exited on signal" not in n.error_log()


def test_journal_of_read_location(redis_factory, nginx):
    """Shop A's Redis is down: the credit is journaled in shop A's journal,
    naming shop A's Redis and prefix, not in the server's."""
    shop_a, other = redis_factory(start=False), redis_factory()
    n = nginx(bound_conf(server="loyalty_redis 127.0.0.1:{other_port};\n"
                                "    loyalty_journal {prefix}/other.journal;",
                         shop_a="\n        loyalty_journal "
                                "{prefix}/shopA.journal;"),
              redis_port=shop_a.port, other_port=other.port)
    t0 = int(time.time())
    r = order(n, "al", "8", "jb1", path="/ep/buy")
    assert (r.status, r.body) == (200, "other\n"), r
    assert r.header("X-Loyalty-Status") == "unavailable", r
    t1 = int(time.time())
    assert n.stop() is None
    [e] = read_journal(n.prefix + "/shopA.journal")
    assert (e["redis"], e["prefix"], e["expire"]) == (
        "127.0.0.1:%d" % shop_a.port, "shopA:", 30 * 86400), e
    assert (e["customer"], e["order"], e["amount"], e["earned"]) == (
        "al", "jb1", "8", 8), e
    assert t0 <= e["ts"] <= t1 and e["reason"] == "worker exiting", e
    assert read_journal(n.prefix + "/other.journal") == []
    assert other.client.keys("*") == []


# --------------------------------------------------------------------------
# NOSCRIPT


def test_noscript_after_script_flush(redis, nginx):
    n = nginx(edge_conf(), redis_port=redis.port)

    def evals():
        stats = redis.client.info("commandstats")
        return int(stats.get("cmdstat_eval", {}).get("calls", 0))

    order(n, "ns", "1", "ns1")
    wait_marker(redis.client, "ns", "ns1")
    for i in range(2, 5):
        redis.client.script_flush()
        e0 = evals()
        r = order(n, "ns", "2", "ns%d" % i)
        assert r.status == 200
        assert wait_marker(redis.client, "ns", "ns%d" % i) == "2:0"
        assert evals() == e0 + 1, "the script was not re-sent with EVAL"
    # cached again: plain EVALSHA from here on
    e0 = evals()
    order(n, "ns", "3", "ns5")
    wait_marker(redis.client, "ns", "ns5")
    assert evals() == e0
    # a duplicate after a flush is still a duplicate
    redis.client.script_flush()
    order(n, "ns", "50", "ns2")
    flush_credits(n, redis.client)
    rec = record(redis.client, "ns")
    assert (rec["points"], rec["orders"]) == (1 + 2 * 3 + 3, 5)
    assert warn_messages(n, "failed") == []


# --------------------------------------------------------------------------
# many orders at once


def test_concurrency_exact(redis, nginx):
    n = nginx(edge_conf(), redis_port=redis.port, workers=4)
    customers = ["cc%02d" % i for i in range(20)]
    orders = [(customers[(i * 7) % 20], "cc-order-%04d" % i, amount_of(i))
              for i in range(2000)]

    def place(o):
        cid, oid, total = o
        r = order(n, cid, total, oid, timeout=10)
        return r.status, r.header("X-Loyalty-Earned")

    t0 = time.monotonic()
    results = run_parallel(place, orders, threads=16, timeout=60)
    elapsed = time.monotonic() - t0
    assert [s for s, _ in results] == [200] * 2000
    assert [e for _, e in results] == [str(int(t.split(".")[0]))
                                       for _, _, t in orders]
    want = expected_balances(orders)

    def all_counted():
        return all(record(redis.client, c).get("orders", 0) >= want[c][1]
                   for c in customers)
    wait_until(all_counted, 20, 0.1, "all 2000 orders counted")
    check_exact(redis.client, orders)
    print("2000 orders in %.1f s" % elapsed)


# --------------------------------------------------------------------------
# Redis failures, journal and replay


@pytest.mark.parametrize("when", ["restart-during-stream",
                                  "restart-after-nginx-stop"])
def test_redis_killed_mid_stream(redis, nginx, when):
    n = nginx(edge_conf(http=JOURNAL), redis_port=redis.port, workers=2)
    journal = journal_path(n)
    customers = ["k%02d" % i for i in range(10)]
    orders = [(customers[i % 10], "k-%03d" % i, amount_of(i * 13))
              for i in range(200)]
    progress, results = [0], [None] * 200
    threads = stream_orders(n, orders, progress, results, pause=0.02)
    try:
        wait_until(lambda: progress[0] >= 60, 30, message="60 orders")
        stop_redis_keeping_data(redis)
        down_at, down_since = progress[0], time.monotonic()
        if when == "restart-during-stream":
            # down long enough for the retry timer (1 s) to find it down
            wait_until(lambda: progress[0] >= 130
                       and time.monotonic() - down_since >= 1.5, 30,
                       message="130 orders and 1.5 s")
            redis.start()
            up_at = progress[0]
    finally:
        for t in threads:
            t.join(60)
    assert not any(t.is_alive() for t in threads)
    # loyalty_fail pass: every order was confirmed, Redis or not
    assert results == [200] * 200, [r for r in results if r != 200][:5]
    assert down_at < 200

    if when == "restart-during-stream":
        assert up_at < 200
        # the worker lives and Redis is back: the retry queue drains
        last = settle(lambda: applied_and_journaled(redis.client, journal,
                                                    customers))
        assert last[0] == 200, "credits still unapplied while Redis is up "\
            "and the workers live: applied %d, journaled %d" % last
        assert n.stop() is None
    else:
        # stopped while Redis is down: the queues go to the journal
        up_at = None
        assert n.stop() is None
        redis.start()

    entries = read_journal(journal)
    for e in entries:
        assert e["reason"] in ("worker exiting", "retry queue full",
                               "retries exhausted"), e
    applied, journaled = check_covered(redis.client, orders, entries)
    print("%s: Redis down after %d orders, up after %s; %d applied, "
          "%d journaled" % (when, down_at, up_at, applied, journaled))
    if when == "restart-after-nginx-stop":
        assert journaled >= 200 - down_at, "orders placed while Redis "\
            "was down must be journaled at shutdown"

    rc, n_applied, n_already, n_failed, out = replay(journal)
    assert (rc, n_failed) == (0, 0), out
    assert n_applied + n_already == len(entries), out
    assert n_applied == 200 - applied, out
    check_exact(redis.client, orders)

    rc, n_applied, n_already, n_failed, out = replay(journal)
    assert (rc, n_applied, n_already, n_failed) == (0, 0, len(entries), 0), \
        out
    check_exact(redis.client, orders)
    assert not n.bad_log_lines()


@pytest.mark.timing
@pytest.mark.parametrize("redis_state", ["redis-up", "redis-down-at-reload"])
def test_reload_during_stream(redis, nginx, redis_state):
    n = nginx(edge_conf(http=JOURNAL), redis_port=redis.port, workers=2)
    journal = journal_path(n)
    customers = ["rl%02d" % i for i in range(12)]
    orders = [(customers[i % 12], "rl-%03d" % i, amount_of(i * 31))
              for i in range(360)]
    progress, results = [0], [None] * 360
    threads = stream_orders(n, orders, progress, results, threads=4,
                            pause=0.01)
    reloads = []
    try:
        for at in (60, 160, 260):
            wait_until(lambda: progress[0] >= at, 30,
                       message="%d orders" % at)
            if redis_state == "redis-down-at-reload" and at == 60:
                stop_redis_keeping_data(redis)
                # credits wait in the old workers' retry queues
                wait_until(lambda: progress[0] >= at + 20, 30,
                           message="%d orders" % (at + 20))
            n.reload()
            reloads.append(progress[0])
            if redis_state == "redis-down-at-reload" and at == 160:
                redis.start()
    finally:
        for t in threads:
            t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert results == [200] * 360, [r for r in results if r != 200][:5]
    assert all(r < 360 for r in reloads), ("reloads after the stream",
                                           reloads)
    settle(lambda: applied_and_journaled(redis.client, journal, customers))
    assert n.stop() is None
    entries = read_journal(journal)
    applied, journaled = check_covered(redis.client, orders, entries)
    print("%s, reloads at %r: %d applied, %d journaled"
          % (redis_state, reloads, applied, journaled))
    if redis_state == "redis-down-at-reload":
        assert journaled >= 20, "the old workers' queues were not journaled"
        assert {e["reason"] for e in entries} == {"worker exiting"}
    rc, _, _, n_failed, out = replay(journal)
    assert (rc, n_failed) == (0, 0), out
    check_exact(redis.client, orders)


def journal_fields_ok(e, redis_port, cid, oid, amount, earned, redeem, t0,
                      t1, reason="worker exiting"):
    assert set(e) == {"ts", "redis", "db", "prefix", "customer", "order",
                      "amount", "earned", "redeem", "ledger", "expire",
                      "order_ttl", "pending", "reason"}, e
    assert (e["redis"], e["db"], e["prefix"]) == (
        "127.0.0.1:%d" % redis_port, 0, "loyalty:"), e
    assert (e["customer"], e["order"], e["amount"]) == (cid, oid, amount), e
    assert (e["earned"], e["redeem"]) == (earned, redeem), e
    assert (e["ledger"], e["expire"]) == (100, 0), e
    assert (e["order_ttl"], e["pending"]) == (MARKER_TTL, 0), e
    assert t0 <= e["ts"] <= t1 and e["reason"] == reason, e


def test_journal_then_replay(redis_factory, nginx):
    """Redis down the whole time: credits wait in the queue and are
    journaled when nginx stops; the earn was computed at multiplier 1
    (no tier known); replay applies them once."""
    redis = redis_factory(start=False)
    n = nginx(edge_conf(http=JOURNAL, server=TIERS), redis_port=redis.port)
    t0 = int(time.time())
    placed = [("j1", "jo-1", "19.99", "", 19, 0),
              ("j1", "jo-2", "5", "3", 5, 3),
              ("j2", "jo-3", "0", "", 0, 0),
              ("j\"q", "jo-4", "1.5", "", 1, 0)]
    for cid, oid, total, redeem, _, _ in placed[:3]:
        r = order(n, cid, total, oid, redeem=redeem)
        assert r.status == 200
        assert module_headers(r) == {"X-Loyalty-Status": "unavailable"}
    t1 = int(time.time())
    assert read_journal(journal_path(n)) == []
    assert n.stop() is None
    entries = read_journal(journal_path(n))
    assert len(entries) == 3, entries
    for e, (cid, oid, total, redeem, earned, red) in zip(
            sorted(entries, key=lambda e: e["order"]), placed):
        journal_fields_ok(e, redis.port, cid, oid, total, earned,
                          int(redeem or 0), t0, t1)
    assert len(warn_messages(n, "journaled: worker exiting")) == 3
    assert "unapplied credit" not in n.error_log()

    redis.start()
    redis.seed("j1", points=10, lifetime=20000, orders=4)     # platinum
    rc, applied, already, failed, out = replay(journal_path(n))
    assert (rc, applied, already, failed) == (0, 3, 0, 0), out
    rec = record(redis.client, "j1")
    assert (rec["points"], rec["lifetime"], rec["orders"]) == (
        10 + 19 - 3 + 5, 20000 + 24, 6)
    assert did(redis.client.get(marker("j1", "jo-2"))) == "5:3"
    assert record(redis.client, "j2")["orders"] == 1
    rc, applied, already, failed, out = replay(journal_path(n))
    assert (rc, applied, already, failed) == (0, 0, 3, 0), out
    assert record(redis.client, "j1")["points"] == 31


def test_journal_off_goes_to_error_log(redis_factory, nginx, tmp_path):
    redis = redis_factory(start=False)
    n = nginx(edge_conf(), redis_port=redis.port)
    t0 = int(time.time())
    order(n, "eo", "19.99", "eo-1", redeem="2")
    order(n, "eo", "4", "eo-2")
    t1 = int(time.time())
    assert n.stop() is None
    entries = error_log_credits(n.error_log())
    assert len(entries) == 2, n.error_log()[-3000:]
    entries.sort(key=lambda e: e["order"])
    journal_fields_ok(entries[0], redis.port, "eo", "eo-1", "19.99", 19, 2,
                      t0, t1)
    journal_fields_ok(entries[1], redis.port, "eo", "eo-2", "4", 4, 0,
                      t0, t1)
    assert len([l for l in log_lines(n.error_log(), "error")
                if "unapplied credit" in l]) == 2
    # the logged JSON is a journal line as it stands
    path = tmp_path / "from-error-log.journal"
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    redis.start()
    rc, applied, already, failed, out = replay(str(path))
    assert (rc, applied, already, failed) == (0, 2, 0, 0), out
    rec = record(redis.client, "eo")
    assert (rec["points"], rec["lifetime"], rec["orders"]) == (23, 23, 2)


def test_retries_exhausted_journaled(redis, nginx):
    """An error reply (here: a record whose points are not a count) is
    retried a few times, then journaled; replay applies it once the record
    is repaired."""
    n = nginx(edge_conf(http=JOURNAL), redis_port=redis.port)
    redis.seed("bad", points="lots", lifetime=5, orders=1)
    t0 = int(time.time())
    r = order(n, "bad", "6", "bad-1")
    assert r.status == 200
    wait_until(lambda: read_journal(journal_path(n)), 20, 0.1,
               "the credit to be journaled after its retries")
    [e] = read_journal(journal_path(n))
    journal_fields_ok(e, redis.port, "bad", "bad-1", "6", 6, 0, t0,
                      int(time.time()), reason="retries exhausted")
    failures = warn_messages(n, 'credit of order "bad-1" for customer "bad" '
                                'failed')
    assert 2 <= len(failures) <= 5, failures
    assert redis.client.exists(marker("bad", "bad-1")) == 0
    assert redis.client.hget(hkey("bad"), "points") == "lots"

    redis.client.hset(hkey("bad"), "points", 4)
    rc, applied, already, failed, out = replay(journal_path(n))
    assert (rc, applied, already, failed) == (0, 1, 0, 0), out
    rec = record(redis.client, "bad")
    assert (rec["points"], rec["lifetime"], rec["orders"]) == (10, 11, 2)
    assert n.stop() is None
    assert len(read_journal(journal_path(n))) == 1, "journaled twice"


def test_ledger_wrong_type_journaled(redis, nginx):
    """A ledger key that is not a stream fails the credit as a whole: no
    marker, no points, a warning naming the ledger, then the journal after
    the retries; replay applies it once the key is repaired."""
    n = nginx(edge_conf(http=JOURNAL), redis_port=redis.port)
    redis.seed("wl", points=4, lifetime=5, orders=1)
    before = record(redis.client, "wl")
    redis.client.set(ledger("wl"), "not a stream")
    assert order(n, "wl", "6", "wl-1").status == 200
    wait_until(lambda: read_journal(journal_path(n)), 20, 0.1,
               "the credit to be journaled after its retries")
    [e] = read_journal(journal_path(n))
    assert (e["customer"], e["order"], e["reason"]) == (
        "wl", "wl-1", "retries exhausted")
    failures = warn_messages(n, 'credit of order "wl-1" for customer "wl" '
                                'failed: "LOYALTY ledger %s: WRONGTYPE '
                                % ledger("wl"))
    assert 2 <= len(failures) <= 5, n.error_log()
    assert redis.client.exists(marker("wl", "wl-1")) == 0
    assert record(redis.client, "wl") == before
    assert redis.client.get(ledger("wl")) == "not a stream"

    redis.client.delete(ledger("wl"))
    rc, applied, already, failed, out = replay(journal_path(n))
    assert (rc, applied, already, failed) == (0, 1, 0, 0), out
    rec = record(redis.client, "wl")
    assert (rec["points"], rec["lifetime"], rec["orders"]) == (10, 11, 2)
    assert [x["order"] for x in ledger_entries(redis.client, "wl")] == [
        "wl-1"]
    assert n.stop() is None


def test_unavailable_credit_applied_by_retry(redis, nginx):
    """Redis down at request time: the order is confirmed (status
    unavailable, multiplier 1), $loyalty_earned is logged, and the credit
    is applied once Redis is back, without a journal line."""
    http = JOURNAL + ' log_format credit "$loyalty_status|$loyalty_earned";'
    n = nginx(edge_conf(http=http, server=TIERS,
                        loc="access_log {prefix}/credit.log credit;"),
              redis_port=redis.port)
    redis.seed("u", points=1, lifetime=20000, orders=1)       # platinum
    stop_redis_keeping_data(redis)
    r = order(n, "u", "100", "u-1")
    assert r.status == 200
    assert module_headers(r) == {"X-Loyalty-Status": "unavailable"}
    wait_until(lambda: "unavailable|100" in n.read_file("credit.log"), 5,
               message="the access log line")
    time.sleep(1.2)             # at least one retry while Redis is down
    redis.start()
    assert wait_marker(redis.client, "u", "u-1", timeout=10) == "100:0"
    rec = record(redis.client, "u")
    assert (rec["points"], rec["lifetime"], rec["orders"]) == (101, 20100, 2)
    assert read_journal(journal_path(n)) == []
    assert n.stop() is None
    assert read_journal(journal_path(n)) == []


def test_earn_over_the_cap_credits_nothing(redis, nginx):
    """An amount that would earn more than the module can keep exact is
    refused like an invalid one: a warning naming the customer and the
    amount, nothing credited."""
    n = nginx(edge_conf(locations=RATES), redis_port=redis.port)
    r = order(n, "cap", "999999999999.9999", "cap-1", path="/rmax/buy")
    assert r.status == 200 and r.header("X-Loyalty-Earned") is None
    msgs = warn_messages(n, '"999999999999.9999"')
    assert len(msgs) == 1 and 'customer "cap"' in msgs[0], msgs
    flush_credits(n, redis.client)
    assert redis.client.keys("loyalty:{cap}*") == []


def test_default_order_id_is_request_id(redis, nginx):
    conf = edge_conf().replace("loyalty_order_id $upstream_http_x_order_id;",
                               "")
    assert "loyalty_order_id" not in conf
    n = nginx(conf, redis_port=redis.port)
    for _ in range(3):
        assert order(n, "rid", "2", "ignored").status == 200
    wait_until(lambda: record(redis.client, "rid").get("orders") == 3, 5,
               message="three orders")
    markers = redis.client.keys(marker("rid", "*"))
    ids = sorted(k.split(":order:")[1] for k in markers)
    assert len(ids) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", i)
                                 for i in ids), ids
    assert sorted(e["order"] for e in ledger_entries(redis.client, "rid")) \
        == ids


def test_journal_keeps_ids_exact(redis_factory, nginx):
    """Order ids may hold any printable character: the journal's JSON and
    the replayed marker key carry them byte for byte."""
    redis = redis_factory(start=False)
    n = nginx(edge_conf(http=JOURNAL), redis_port=redis.port)
    cid = "a+b@shop.example:7_x-y"
    assert order(n, cid, "12.34", path="/weird/x").status == 200
    assert n.stop() is None
    with open(journal_path(n)) as f:
        text = f.read()
    assert text.count("\n") == 1 and text.endswith("\n"), text
    [e] = read_journal(journal_path(n))
    assert (e["customer"], e["order"], e["amount"], e["earned"]) == (
        cid, WEIRD_ORDER_ID, "12.34", 12), e
    redis.start()
    rc, applied, _, failed, out = replay(journal_path(n))
    assert (rc, applied, failed) == (0, 1, 0), out
    assert did(redis.client.get(marker(cid, WEIRD_ORDER_ID))) == "12:0"
    assert ledger_entries(redis.client, cid)[0]["order"] == WEIRD_ORDER_ID


def test_noscript_with_pipelined_credits(redis, nginx):
    """After SCRIPT FLUSH, many credits in flight at once all get NOSCRIPT
    and all are re-sent; none is lost or doubled."""
    n = nginx(edge_conf(), redis_port=redis.port, workers=2)
    order(n, "np", "1", "np-0")
    wait_marker(redis.client, "np", "np-0")
    redis.client.script_flush()
    orders = [("np%d" % (i % 4), "np-%d" % i, "%d.5" % i)
              for i in range(1, 61)]
    statuses = run_parallel(lambda o: order(n, o[0], o[2], o[1]).status,
                            orders, threads=16)
    assert statuses == [200] * 60
    want = expected_balances(orders)
    wait_until(lambda: all(record(redis.client, c).get("orders") == k
                           for c, (_, k) in want.items()), 10,
               message="every credit after the flush")
    check_exact(redis.client, orders)
    assert warn_messages(n, "failed") == []


def test_retry_queue_full_is_journaled(redis, nginx):
    """Redis down while more orders come than the retry queue holds: the
    overflow is journaled at once, the queue drains when Redis returns,
    and after replay every balance is exact."""
    n = nginx(edge_conf(http=JOURNAL), redis_port=redis.port)
    journal = journal_path(n)
    customers = ["qf%02d" % i for i in range(20)]
    total = 8192 + 300
    orders = [(customers[i % 20], "qf-%05d" % i, amount_of(i))
              for i in range(total)]
    stop_redis_keeping_data(redis)
    t0 = time.monotonic()
    statuses = run_parallel(lambda o: order(n, o[0], o[2], o[1]).status,
                            orders, threads=16, timeout=60)
    assert statuses == [200] * total
    entries = read_journal(journal)
    assert len(entries) >= 300, len(entries)
    assert {e["reason"] for e in entries} == {"retry queue full"}
    print("%d orders with Redis down in %.1f s, %d journaled"
          % (total, time.monotonic() - t0, len(entries)))
    redis.start()
    t1 = time.monotonic()
    queued = total - len(entries)

    def applied():
        return applied_and_journaled(redis.client, journal, customers)[0]
    # one worker applies 2,000 fresh orders in about a second (see
    # test_concurrency_exact); its backlog must not take much longer
    try:
        wait_until(lambda: applied() >= queued, 15, 0.2,
                   "the retry queue (%d credits) to drain" % queued)
    finally:
        storm = len(warn_messages(n, "too many commands queued"))
        print("drained %d of %d in %.1f s; %d 'too many commands queued' "
              "warnings" % (applied(), queued, time.monotonic() - t1, storm))
    assert storm <= total, "log storm: %d warnings for %d credits" % (
        storm, total)
    assert n.stop() is None
    entries = read_journal(journal)
    applied, journaled = check_covered(redis.client, orders, entries)
    rc, n_applied, _, n_failed, out = replay(journal)
    assert (rc, n_failed, n_applied) == (0, 0, total - applied), out
    check_exact(redis.client, orders)


def test_fast_shutdown_journals(redis_factory, nginx):
    redis = redis_factory(start=False)
    n = nginx(edge_conf(http=JOURNAL), redis_port=redis.port, workers=2)
    orders = [("fs%d" % (i % 3), "fs-%d" % i, amount_of(i)) for i in range(12)]
    for cid, oid, total in orders:
        assert order(n, cid, total, oid).status == 200
    n.workers()
    n.proc.send_signal(signal.SIGTERM)          # fast shutdown
    n.proc.wait(10)
    entries = read_journal(journal_path(n))
    assert sorted(e["order"] for e in entries) == sorted(
        o[1] for o in orders)
    assert {e["reason"] for e in entries} == {"worker exiting"}
    redis.start()
    rc, applied, _, failed, out = replay(journal_path(n))
    assert (rc, applied, failed) == (0, 12, 0), out
    check_exact(redis.client, orders)


def applied_orders(client, orders):
    """The orders whose marker is in Redis."""
    pipe = client.pipeline()
    for cid, oid, _ in orders:
        pipe.exists(marker(cid, oid))
    return [o for o, a in zip(orders, pipe.execute()) if a]


def quit_(n):
    """Graceful shutdown (SIGQUIT), within the harness's bound."""
    assert n.stop() is None


def terminate(n):
    """Fast shutdown: SIGTERM to the master, which passes it on."""
    n.workers()
    n.proc.send_signal(signal.SIGTERM)
    n.proc.wait(10)


def check_journaled_and_replayed(redis, n, orders, confirmed):
    """After a fast shutdown: the journal holds only credits of the exit,
    its replay fails none, and then every confirmed order is applied
    exactly once.  An order whose client saw the connection close may have
    been confirmed by the shop all the same: it counts if it was applied.
    Returns the journal's entries."""
    entries = read_journal(journal_path(n))
    assert {e["reason"] for e in entries} <= {"worker exiting"}
    rc, _, _, n_failed, out = replay(journal_path(n))
    assert (rc, n_failed) == (0, 0), out
    applied = applied_orders(redis.client, orders)
    assert set(confirmed) <= set(applied), "confirmed orders lost"
    print("%d confirmed, %d applied, %d of them from the journal"
          % (len(confirmed), len(applied), len(entries)))
    check_exact(redis.client, applied)
    return entries


def stop_during_stream(n, tag, stop):
    """8 clients order without pause; after 400 answers, stop(n).  Returns
    (orders, the ones answered 200)."""
    customers = ["%s%d" % (tag, i) for i in range(8)]
    orders = [(customers[i % 8], "%s-%04d" % (tag, i), amount_of(i * 11))
              for i in range(4000)]
    progress, results = [0], [None] * len(orders)
    threads = stream_orders(n, orders, progress, results, threads=8,
                            pause=0)
    try:
        wait_until(lambda: progress[0] >= 400, 30, message="400 orders")
        stop(n)
    finally:
        for t in threads:
            t.join(60)
    confirmed = [o for o, r in zip(orders, results) if r == 200]
    assert 400 <= len(confirmed) < len(orders), \
        "%d confirmed: the stream did not meet the stop" % len(confirmed)
    return orders, confirmed


def test_graceful_quit_during_stream(redis, nginx):
    """SIGQUIT while 8 clients order without pause: every order the shop
    confirmed is applied, none waits in the journal.  A worker that shuts
    down sends the credits it still holds before it exits."""
    n = nginx(edge_conf(http=JOURNAL), redis_port=redis.port, workers=2)
    _, confirmed = stop_during_stream(n, "gq", quit_)
    assert read_journal(journal_path(n)) == []
    check_exact(redis.client, confirmed)


def test_fast_shutdown_during_stream(redis, nginx):
    """SIGTERM while 8 clients order without pause: credits in flight and
    credits still waiting to be sent go to the journal, and replaying it
    makes every confirmed order applied exactly once."""
    n = nginx(edge_conf(http=JOURNAL), redis_port=redis.port, workers=2)
    orders, confirmed = stop_during_stream(n, "ft", terminate)
    check_journaled_and_replayed(redis, n, orders, confirmed)


HELD = """
    location /held {
        loyalty on;
        proxy_pass http://127.0.0.1:{held_port};
    }
"""

BURST = 400         # within worker_connections 1024 (a client and a shop
                    # connection each) and the 512 events of one epoll_wait


def stop_during_burst(redis, nginx, tag, stop):
    """BURST orders held by the shop are answered together while the only
    worker is stopped (SIGSTOP), so that it takes all the answers in one
    event loop iteration and queues BURST credits at once, of which it
    sends at most 64 per iteration.  As soon as the first client has its
    answer, stop(n).  Returns (orders, the ones answered 200, nginx)."""
    # the test holds 2 x BURST sockets, and nginx 2 x BURST connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * BURST if hard == resource.RLIM_INFINITY else min(hard,
                                                                4 * BURST)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    shop = HeldShop()
    clients = []
    try:
        n = nginx(edge_conf(http=JOURNAL, locations=HELD),
                  redis_port=redis.port, held_port=shop.port)
        orders = [("%s%d" % (tag, i % 24), "%s-%04d" % (tag, i),
                   amount_of(i * 13)) for i in range(BURST)]
        for cid, oid, total in orders:
            c = socket.create_connection(("127.0.0.1", n.port), timeout=30)
            c.sendall(("GET /held?total=%s&oid=%s HTTP/1.0\r\n"
                       "Host: edge\r\nX-Customer: %s\r\n\r\n"
                       % (total, oid, cid)).encode())
            clients.append(c)
        wait_until(lambda: shop.held == BURST, 30,
                   message="the shop to hold %d orders" % BURST)
        [worker] = n.workers()
        os.kill(worker, signal.SIGSTOP)
        try:
            shop.release()
            wait_until(lambda: shop.answered == BURST, 30,
                       message="the shop to answer %d orders" % BURST)
        finally:
            os.kill(worker, signal.SIGCONT)
        readable, _, _ = select.select(clients, [], [], 30)
        assert readable, "no client was answered"
        stop(n)
        statuses = []
        for c in clients:
            data = b""
            while True:
                chunk = c.recv(65536)
                if not chunk:
                    break
                data += chunk
            statuses.append(int(data.split(b" ", 2)[1]) if data else None)
    finally:
        for c in clients:
            c.close()
        shop.stop()
    confirmed = [o for o, st in zip(orders, statuses) if st == 200]
    assert confirmed, "no order was answered 200: %r" % statuses[:10]
    return orders, confirmed, n


def test_graceful_quit_during_burst(redis, nginx):
    """SIGQUIT while the worker holds hundreds of credits waiting to be
    sent: it sends them all before it exits, none goes to the journal."""
    orders, confirmed, n = stop_during_burst(redis, nginx, "gb", quit_)
    assert read_journal(journal_path(n)) == []
    applied = applied_orders(redis.client, orders)
    assert set(confirmed) <= set(applied), "confirmed orders lost"
    check_exact(redis.client, applied)


def test_fast_shutdown_during_burst(redis, nginx):
    """SIGTERM while the worker holds hundreds of credits waiting to be
    sent: those waiting go to the journal with those in flight, and a
    replay makes every confirmed order applied exactly once."""
    orders, confirmed, n = stop_during_burst(redis, nginx, "fb", terminate)
    entries = check_journaled_and_replayed(redis, n, orders, confirmed)
    # the case sought: more than one iteration's portion (at most 64) was
    # still unsent when the worker exited
    assert len(entries) > 64, "%d journaled: the burst was over" % len(
        entries)


def test_journal_reopened_on_usr1(redis_factory, nginx):
    """The journal is opened like an access_log: after it is moved away,
    USR1 makes nginx write a new one."""
    redis = redis_factory(start=False)
    n = nginx(edge_conf(http=JOURNAL), redis_port=redis.port, workers=2)
    journal = journal_path(n)
    assert order(n, "ro", "5", "ro-1").status == 200
    os.rename(journal, journal + ".1")
    n.proc.send_signal(signal.SIGUSR1)
    wait_until(lambda: n.error_log().count("reopening logs") >= 3, 5,
               message="master and both workers to reopen their files")
    assert os.path.exists(journal)
    assert n.stop() is None
    assert read_journal(journal + ".1") == []
    [e] = read_journal(journal)
    assert (e["customer"], e["order"]) == ("ro", "ro-1")
