"""Refunds, adjustments and pending points (SPEC §11, issue #16), through a
real nginx with the module and a real redis-server: POST .../refund and
POST .../adjust of loyalty_api, loyalty_pending, loyalty_order_ttl, and
the headers, variables, balance JSON and metrics that go with them.

The arithmetic of the scripts on their own, against a model, is in
test_api_script.py and test_credit_script.py; this file is what a shop
and its backend see."""

import json
import random
import threading
import time
import urllib.parse

import pytest

from conftest import SLOW, check_location, http_request, log_lines, \
    wait_until
from credit_support import (edge_conf, hkey, journal_path, ledger,
                            ledger_entries, marker, order, read_journal,
                            replay, stop_redis_keeping_data, wait_marker)


API = """
    location /api/ {
        allow 127.0.0.1;
        deny all;
        loyalty_api;
    }
    location /pend/ {
        loyalty on;
        loyalty_pending 2s;
        proxy_pass http://127.0.0.1:{shop_port}/;
    }
    location /pend-api/ {
        loyalty_pending 2s;
        loyalty_api;
    }
    location = /balance {
        loyalty_balance;
    }
    location = /pend-balance {
        loyalty_pending 2s;
        loyalty_balance;
    }
    location = /metrics {
        loyalty_status;
    }
"""

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def edge(nginx, redis, **kw):
    return nginx(edge_conf(locations=API, **kw), redis_port=redis.port)


def call(n, path, body=None, query=None, headers=FORM, method="POST"):
    if isinstance(body, dict):
        body = urllib.parse.urlencode(body)
    if query is not None:
        path += "?" + (urllib.parse.urlencode(query)
                       if isinstance(query, dict) else query)
    r = http_request(n.port, path, method=method, headers=headers,
                     body=body.encode() if body is not None else None)
    assert r.header("Content-Type") == "application/json", r
    return r, json.loads(r.body)


def refund(n, cid, oid, refunded, reason=None, path="/api/refund"):
    args = {"customer": cid, "order": oid, "refunded": refunded}
    if reason is not None:
        args["reason"] = reason
    return call(n, path, args)


def adjust(n, cid, points, aid, reason="customer service",
           path="/api/adjust"):
    return call(n, path, {"customer": cid, "points": points, "id": aid,
                          "reason": reason})


def buy(n, cid, total, oid, redeem=None, path="/buy", client=None):
    r = order(n, cid, total, oid, redeem=redeem, path=path)
    assert r.status == 200, r
    if client is not None:
        wait_marker(client, cid, oid)
    return r


def counts(client, cid):
    """points, lifetime and the raw pending field of a customer"""
    h = client.hgetall(hkey(cid))
    return int(h.get("points", 0)), int(h.get("lifetime", 0)), \
        h.get("pending")


def seen(backend):
    return {k.lower(): v for k, v in backend.loyalty_headers()}


def metric(n, name):
    body = http_request(n.port, "/metrics").body
    for line in body.splitlines():
        if line.startswith(name + " "):
            return int(line.split()[-1])
    raise AssertionError("%s not in %s" % (name, body))


def metric_sum(n, name):
    """The sum of a counter over all its labels"""
    body = http_request(n.port, "/metrics").body
    return sum(int(line.split()[-1]) for line in body.splitlines()
               if line.startswith(name + "{"))


# --------------------------------------------------------------------------
# refunds


def test_partial_refunds_are_cumulative(redis, nginx):
    """refunded is the order's total refunded so far: the points taken
    back are floor(earned * refunded / amount) less what earlier refunds
    took; the same total again, or a lower one arriving late, changes
    nothing; the full amount takes the rest."""
    c = redis.client
    n = edge(nginx, redis)
    buy(n, "rf1", "59.90", "o1", client=c)         # earns 59
    buy(n, "rf1", "10", "o2", client=c)            # 69 in all

    r, doc = refund(n, "rf1", "o1", "20", reason="one item back")
    assert r.status == 200, doc
    # floor(59 * 20 / 59.90) = 19
    assert doc == {"status": "applied", "customer": "rf1", "order": "o1",
                   "reversed": 19, "restored": 0, "forgiven": 0,
                   "points": 50, "pending": 0}
    assert counts(c, "rf1") == (50, 50, None)

    for again in ("20", "20.0000", "10", "0"):
        r, doc = refund(n, "rf1", "o1", again)
        assert r.status == 200 and doc["status"] == "unchanged", again
        assert doc["points"] == 50
    assert counts(c, "rf1") == (50, 50, None)

    # floor(59 * 30.5 / 59.9) = 30: 11 more
    r, doc = refund(n, "rf1", "o1", "30.5")
    assert (doc["status"], doc["reversed"], doc["points"]) == \
        ("applied", 11, 39)
    # the whole amount: the rest of the 59
    r, doc = refund(n, "rf1", "o1", "59.90")
    assert (doc["status"], doc["reversed"], doc["points"]) == \
        ("applied", 29, 10)
    assert counts(c, "rf1") == (10, 10, None)
    for again in ("all", "59.9", "30"):
        r, doc = refund(n, "rf1", "o1", again)
        assert doc["status"] == "unchanged", again
    assert c.get(marker("rf1", "o1")) == "59:0:59.90:all:59:0:0"

    kinds = [(e.get("kind"), e.get("order"), e.get("reversed"))
             for e in ledger_entries(c, "rf1")]
    assert kinds == [(None, "o1", None), (None, "o2", None),
                     ("refund", "o1", "19"), ("refund", "o1", "11"),
                     ("refund", "o1", "29")]
    first = ledger_entries(c, "rf1")[2]
    assert first["reason"] == "one item back" and first["refunded"] == "20"
    assert first["points"] == "50" and first["forgiven"] == "0"


def test_refund_above_amount_and_malformed(redis, nginx):
    """A total above the order's amount, or one that is not an amount, is
    400 invalid with the reason why, and writes nothing."""
    c = redis.client
    n = edge(nginx, redis)
    buy(n, "rf2", "12.50", "o1", client=c)
    before = c.hgetall(hkey("rf2")), c.get(marker("rf2", "o1")), \
        c.xlen(ledger("rf2"))
    for bad in ("12.5001", "13", "-1", "1e3", "", " 5", "5 ", "1.00000",
                "1234567890123", "ALL", "12,5", "0x10"):
        r, doc = refund(n, "rf2", "o1", bad)
        assert (r.status, doc["status"]) == (400, "invalid"), (bad, doc)
        assert isinstance(doc["error"], str) and doc["error"], doc
    assert (c.hgetall(hkey("rf2")), c.get(marker("rf2", "o1")),
            c.xlen(ledger("rf2"))) == before


@pytest.mark.parametrize("args,field", [
    ({"order": "o1", "refunded": "all"}, "customer"),
    ({"customer": "bad id", "order": "o1", "refunded": "all"}, "customer"),
    ({"customer": "x" * 129, "order": "o1", "refunded": "all"}, "customer"),
    ({"customer": "rf3", "refunded": "all"}, "order"),
    ({"customer": "rf3", "order": "o 1", "refunded": "all"}, "order"),
    ({"customer": "rf3", "order": "o" * 129, "refunded": "all"}, "order"),
    ({"customer": "rf3", "order": "o1"}, "refunded"),
    ({"customer": "rf3", "order": "o1", "refunded": "all",
      "reason": ""}, "reason"),
    ({"customer": "rf3", "order": "o1", "refunded": "all",
      "reason": "r" * 201}, "reason"),
    ({"customer": "rf3", "order": "o1", "refunded": "all",
      "reason": "line\nbreak"}, "reason"),
])
def test_refund_bad_arguments(redis, nginx, args, field):
    c = redis.client
    n = edge(nginx, redis)
    buy(n, "rf3", "5", "o1", client=c)
    r, doc = call(n, "/api/refund", args)
    assert (r.status, doc["status"]) == (400, "invalid"), doc
    assert field in doc["error"], doc
    assert c.get(marker("rf3", "o1")) == "5:0:5:0:0:0:0"
    assert c.xlen(ledger("rf3")) == 1


def test_unknown_order(redis, nginx):
    c = redis.client
    n = edge(nginx, redis)
    r, doc = refund(n, "rf4", "never", "all")
    assert r.status == 404, doc
    assert doc == {"status": "unknown_order", "customer": "rf4",
                   "order": "never"}
    assert not c.exists(hkey("rf4"), ledger("rf4"), marker("rf4", "never"))


def test_spent_points_are_forgiven(redis, nginx):
    """Points already spent cannot be taken back: the balance stops at 0,
    the rest is forgiven, logged at notice and counted."""
    c = redis.client
    n = edge(nginx, redis)
    buy(n, "rf5", "100", "o1", client=c)
    buy(n, "rf5", "0", "o2", redeem="80", client=c)        # spends 80
    assert counts(c, "rf5") == (20, 100, None)
    r, doc = refund(n, "rf5", "o1", "all")
    assert doc == {"status": "applied", "customer": "rf5", "order": "o1",
                   "reversed": 100, "restored": 0, "forgiven": 80,
                   "points": 0, "pending": 0}, doc
    assert counts(c, "rf5") == (0, 0, None)
    assert any('refund of order "o1" of customer "rf5": 80 points forgiven'
               in line for line in log_lines(n.error_log(), "notice")), \
        n.error_log()[-2000:]
    assert metric(n, "loyalty_points_forgiven_total") == 80
    assert metric(n, "loyalty_points_reversed_total") == 100
    # the redeeming order of amount 0, refunded in full ("0" is its whole
    # amount), gives its 80 back, once
    r, doc = refund(n, "rf5", "o2", "0")
    assert (doc["status"], doc["restored"], doc["reversed"],
            doc["points"]) == ("applied", 80, 0, 80), doc
    for again in ("0", "all"):
        r, doc = refund(n, "rf5", "o2", again)
        assert doc["status"] == "unchanged", (again, doc)


def test_full_refund_gives_redeemed_back(redis, nginx):
    """Refunded in full, the order's redeemed points come back first, once;
    a partial refund gives none back."""
    c = redis.client
    n = edge(nginx, redis)
    buy(n, "rf6", "50", "o1", client=c)
    buy(n, "rf6", "20", "o2", redeem="30", client=c)       # 50 - 30 + 20
    assert counts(c, "rf6") == (40, 70, None)
    r, doc = refund(n, "rf6", "o2", "10")
    assert (doc["reversed"], doc["restored"], doc["points"]) == (10, 0, 30)
    r, doc = refund(n, "rf6", "o2", "20")
    assert (doc["reversed"], doc["restored"], doc["points"]) == (10, 30, 50)
    r, doc = refund(n, "rf6", "o2", "all")
    assert doc["status"] == "unchanged"
    assert counts(c, "rf6") == (50, 50, None)
    assert c.get(marker("rf6", "o2")) == "20:30:20:all:20:30:0"


def test_short_marker_full_refund_only(redis, nginx):
    """A marker written before refunds existed ("earned:redeemed") has no
    amount: "all" reverses it whole, a partial total is invalid."""
    c = redis.client
    n = edge(nginx, redis)
    c.hset(hkey("rf7"), mapping={"points": "40", "lifetime": "60",
                                 "orders": "2"})
    c.set(marker("rf7", "old"), "25:5", ex=3600)
    r, doc = refund(n, "rf7", "old", "10")
    assert (r.status, doc["status"]) == (400, "invalid"), doc
    assert "all" in doc["error"]
    r, doc = refund(n, "rf7", "old", "all")
    assert (doc["status"], doc["reversed"], doc["restored"],
            doc["points"]) == ("applied", 25, 5, 20), doc
    assert counts(c, "rf7") == (20, 35, None)
    assert c.get(marker("rf7", "old")) == "25:5::all:25:5:0"
    assert 3500 < c.ttl(marker("rf7", "old")) <= 3600
    for again in ("all", "10"):
        r, doc = refund(n, "rf7", "old", again)
        assert doc["status"] == "unchanged", again


def test_refund_arguments_in_query_and_body(redis, nginx):
    """Arguments come from the query string or a form body, the body
    first; "+" and %XX are decoded as a form's."""
    c = redis.client
    n = edge(nginx, redis)
    buy(n, "a@b", "10", "q1", client=c)
    buy(n, "a@b", "10", "q2", client=c)
    r, doc = call(n, "/api/refund", body=None, headers={},
                  query="customer=a%40b&order=q1&refunded=all&reason=in+query")
    assert doc["status"] == "applied", doc
    r, doc = call(n, "/api/refund", query="customer=nobody&order=x",
                  body="customer=a%40b&order=q2&refunded=5")
    assert (doc["status"], doc["customer"], doc["reversed"]) == \
        ("applied", "a@b", 5), doc
    reasons = [e.get("reason") for e in ledger_entries(c, "a@b")]
    assert reasons == [None, None, "in query", None]
    # a body of another type is refused, even with the query complete
    r, doc = call(n, "/api/refund", body='{"customer": "a@b"}',
                  headers={"Content-Type": "application/json"},
                  query="customer=a%40b&order=q2&refunded=all")
    assert (r.status, doc["status"]) == (400, "invalid"), doc
    assert "x-www-form-urlencoded" in doc["error"]
    r, doc = call(n, "/api/refund",
                  body="customer=a%4&order=q2&refunded=all")
    assert (r.status, doc["status"]) == (400, "invalid"), doc
    assert c.get(marker("a@b", "q2")) == "10:0:10:5:5:0:0"


def test_large_body_refused(redis, nginx):
    """A body that does not fit client_body_buffer_size (nginx wrote it to
    a file) is refused as invalid, not read from the disk."""
    n = edge(nginx, redis, server="client_body_buffer_size 1k;")
    body = "customer=big&order=o1&refunded=all&pad=" + "x" * 4000
    r, doc = call(n, "/api/refund", body=body)
    assert (r.status, doc["status"]) == (400, "invalid"), doc
    assert "client_body_buffer_size" in doc["error"]


def test_redis_down_writes_nothing(redis, nginx):
    c = redis.client
    n = edge(nginx, redis)
    buy(n, "rf8", "30", "o1", client=c)
    state = c.hgetall(hkey("rf8")), c.get(marker("rf8", "o1"))
    stop_redis_keeping_data(redis)
    for r, doc in (refund(n, "rf8", "o1", "all"),
                   adjust(n, "rf8", "+5", "a1")):
        assert (r.status, doc) == (503, {"status": "unavailable"}), doc
    redis.start()
    c = redis.client
    assert (c.hgetall(hkey("rf8")), c.get(marker("rf8", "o1"))) == state
    assert not c.exists(hkey("rf8") + ":adjust:a1")
    # the caller sends it again once Redis is back
    wait_until(lambda: refund(n, "rf8", "o1", "all")[1]["status"]
               == "applied", 10 * SLOW, 0.2, "the refund applied")
    assert int(c.hget(hkey("rf8"), "points")) == 0


def test_own_locations_under_server_loyalty_on(redis, nginx):
    """"loyalty on" and "loyalty_fail reject" at the server level, as a
    shop may write them, reach the module's own locations too.  API calls
    and scrapes are not checkouts: they read no customer, even with the
    customer's header set; the balance reads its record once, itself.  So
    Redis down still answers their JSON 503, not nginx's HTML page of the
    checkout's reject."""
    c = redis.client
    n = nginx(edge_conf(server="loyalty on; loyalty_fail reject;",
                        locations=API), redis_port=redis.port)
    buy(n, "rs1", "30", "o1", client=c)
    headers = dict(FORM, **{"X-Customer": "rs1"})

    def requests():
        return metric_sum(n, "loyalty_requests_total")

    before = requests()
    r, doc = call(n, "/api/refund", {"customer": "rs1", "order": "o1",
                                     "refunded": "10"}, headers=headers)
    assert (r.status, doc["status"]) == (200, "applied"), doc
    r, doc = call(n, "/api/ledger", query={"customer": "rs1"},
                  headers={"X-Customer": "rs1"}, method="GET")
    assert (r.status, doc["status"]) == (200, "ok"), doc
    # no read was counted for the two calls and the scrapes
    assert requests() == before
    r, doc = call(n, "/balance", headers={"X-Customer": "rs1"}, method="GET")
    assert (r.status, doc["status"], doc["points"]) == (200, "ok", 20), doc
    assert requests() == before + 1

    stop_redis_keeping_data(redis)
    r, doc = call(n, "/api/refund", {"customer": "rs1", "order": "o1",
                                     "refunded": "all"}, headers=headers)
    assert (r.status, doc) == (503, {"status": "unavailable"}), doc
    r, doc = call(n, "/balance", headers={"X-Customer": "rs1"}, method="GET")
    assert (r.status, doc) == (503, {"status": "unavailable"}), doc
    assert "loyalty_requests_total" in http_request(n.port, "/metrics").body
    # while a checkout of the same server is rejected, as configured
    assert order(n, "rs1", "5", "o2").status == 503


BLOCKS = """
    location = /metrics-if { loyalty_status; if ($arg_x) { set $d 1; } }
    location = /balance-if { loyalty_balance; if ($arg_x) { set $d 1; } }
    location /api-if/ { loyalty_api; if ($arg_x) { set $d 1; } }
    location /api-le/ {
        loyalty_api;
        limit_except GET { allow 127.0.0.1; deny all; }
    }
"""


def test_own_locations_with_if_and_limit_except(redis, nginx):
    """An "if" or "limit_except" block in those locations answers as the
    location does: no read in the access phase, the location's handler
    (limit_except has none of its own: a POST allowed by it got 404).
    Regression for both."""
    c = redis.client
    n = nginx(edge_conf(server="loyalty on; loyalty_fail reject;",
                        locations=API + BLOCKS), redis_port=redis.port)
    buy(n, "rb1", "30", "o1", client=c)
    cust = {"X-Customer": "rb1"}
    before = metric_sum(n, "loyalty_requests_total")
    r, doc = call(n, "/api-le/refund", {"customer": "rb1", "order": "o1",
                                        "refunded": "10"},
                  headers=dict(FORM, **cust))
    assert (r.status, doc["status"]) == (200, "applied"), doc
    r, doc = call(n, "/api-if/ledger", query="customer=rb1&x=1",
                  headers=cust, method="GET")
    assert (r.status, doc["status"]) == (200, "ok"), doc
    r = http_request(n.port, "/metrics-if?x=1", headers=cust)
    assert r.status == 200 and "loyalty_requests_total" in r.body
    assert metric_sum(n, "loyalty_requests_total") == before
    r, doc = call(n, "/balance-if", query="x=1", headers=cust, method="GET")
    assert (r.status, doc["points"]) == (200, 20), doc
    assert metric_sum(n, "loyalty_requests_total") == before + 1

    stop_redis_keeping_data(redis)
    for path, body, method in (
            ("/api-if/refund?x=1", {"customer": "rb1", "order": "o1",
                                    "refunded": "all"}, "POST"),
            ("/api-le/refund", {"customer": "rb1", "order": "o1",
                                "refunded": "all"}, "POST"),
            ("/balance-if?x=1", None, "GET")):
        r, doc = call(n, path, body, headers=dict(FORM, **cust),
                      method=method)
        assert (r.status, doc) == (503, {"status": "unavailable"}), path
    r = http_request(n.port, "/metrics-if?x=1", headers=cust)
    assert r.status == 200, r


def test_script_error_is_unavailable(redis, nginx):
    """A record another tool broke: 503 unavailable, a warn naming the
    order, customer and Redis' words, and nothing written."""
    c = redis.client
    n = edge(nginx, redis)
    buy(n, "rf9", "30", "o1", client=c)
    c.hset(hkey("rf9"), "points", "lots")
    r, doc = refund(n, "rf9", "o1", "all")
    assert (r.status, doc) == (503, {"status": "unavailable"})
    assert any('refund "o1" of customer "rf9" failed: "LOYALTY points of '
               in line for line in log_lines(n.error_log(), "warn")), \
        n.error_log()[-2000:]
    assert c.get(marker("rf9", "o1")) == "30:0:30:0:0:0:0"


# --------------------------------------------------------------------------
# adjustments


def test_adjust_both_ways(redis, nginx):
    c = redis.client
    n = edge(nginx, redis)
    r, doc = adjust(n, "ad1", "120", "welcome-gift", reason="goodwill")
    assert r.status == 200
    assert doc == {"status": "applied", "customer": "ad1",
                   "id": "welcome-gift", "points": 120, "pending": 0}
    assert counts(c, "ad1") == (120, 120, None)
    r, doc = adjust(n, "ad1", "-50", "fix-1", reason="double credit")
    assert (doc["status"], doc["points"]) == ("applied", 70)
    assert counts(c, "ad1") == (70, 120, None)
    r, doc = adjust(n, "ad1", "+5", "plus-sign")
    assert doc["points"] == 75
    entries = ledger_entries(c, "ad1")
    assert [(e["kind"], e["adjustment"], e["earned"], e["redeemed"],
             e["points"], e["reason"]) for e in entries] == [
        ("adjust", "welcome-gift", "120", "0", "120", "goodwill"),
        ("adjust", "fix-1", "0", "50", "70", "double credit"),
        ("adjust", "plus-sign", "5", "0", "75", "customer service")]
    assert c.get(hkey("ad1") + ":adjust:fix-1") == "-50"
    ttl = c.ttl(hkey("ad1") + ":adjust:fix-1")
    assert 30 * 86400 - 60 < ttl <= 30 * 86400


def test_adjust_insufficient(redis, nginx):
    c = redis.client
    n = edge(nginx, redis)
    adjust(n, "ad2", "30", "a1")
    r, doc = adjust(n, "ad2", "-31", "a2")
    assert r.status == 409
    assert doc == {"status": "insufficient", "customer": "ad2", "id": "a2",
                   "points": 30, "pending": 0}
    assert not c.exists(hkey("ad2") + ":adjust:a2")
    assert c.xlen(ledger("ad2")) == 1
    # not spent: the same id can go through once the balance allows it
    r, doc = adjust(n, "ad2", "-30", "a2")
    assert (doc["status"], doc["points"]) == ("applied", 0)


def test_adjust_idempotent(redis, nginx):
    """The same id again is unchanged, whatever its points say; an
    unknown customer's record is created by a positive one."""
    c = redis.client
    n = edge(nginx, redis)
    for i in range(3):
        r, doc = adjust(n, "ad3", "+40" if i == 0 else "-999", "same")
        assert r.status == 200
        assert doc["status"] == ("applied" if i == 0 else "unchanged")
        assert doc["points"] == 40
    assert c.xlen(ledger("ad3")) == 1


@pytest.mark.parametrize("points", [
    "", "+", "-", "1.5", "1e3", " 5", "5 ", "++5", "0x10",
    "1234567890123456789", "-1234567890123456789", "\u0663"])
def test_adjust_bad_points(redis, nginx, points):
    n = edge(nginx, redis)
    r, doc = adjust(n, "ad4", points, "x")
    assert (r.status, doc["status"]) == (400, "invalid"), (points, doc)
    assert "points" in doc["error"]
    assert not redis.client.exists(hkey("ad4"))


def test_adjust_needs_a_reason(redis, nginx):
    n = edge(nginx, redis)
    r, doc = call(n, "/api/adjust", {"customer": "ad5", "points": "5",
                                     "id": "x"})
    assert (r.status, doc["status"]) == (400, "invalid")
    assert "reason" in doc["error"]
    r, doc = adjust(n, "ad5", "5", "x", reason="caf\u00e9 " + "\u20ac" * 195)
    assert doc["status"] == "applied", doc
    assert ledger_entries(redis.client, "ad5")[0]["reason"] == \
        "caf\u00e9 " + "\u20ac" * 195
    r, doc = adjust(n, "ad5", "5", "y", reason="\u20ac" * 201)
    assert (r.status, doc["status"]) == (400, "invalid")


def test_adjust_overflow_refused(redis, nginx):
    c = redis.client
    n = edge(nginx, redis)
    c.hset(hkey("ad6"), mapping={"points": str(2 ** 53 - 10),
                                 "lifetime": str(2 ** 53 - 10)})
    r, doc = adjust(n, "ad6", "10", "big")
    assert (r.status, doc["status"]) == (400, "invalid"), doc
    r, doc = adjust(n, "ad6", "9", "fits")
    assert (doc["status"], doc["points"]) == ("applied", 2 ** 53 - 1)
    r, doc = adjust(n, "ad6", "999999999999999999", "huge")
    assert (r.status, doc["status"]) == (400, "invalid"), doc
    r, doc = adjust(n, "ad6", "-999999999999999999", "huge-minus")
    assert (r.status, doc["status"]) == (409, "insufficient"), doc


# --------------------------------------------------------------------------
# pending points


def test_pending_points(redis, nginx):
    """With loyalty_pending an order's points are locked: not in points,
    lifetime or the tier, not redeemable; the response says so, and a
    read after the release time counts them at once, with no write in
    between."""
    c = redis.client
    n = edge(nginx, redis)
    adjust(n, "pd1", "10", "start")
    r = buy(n, "pd1", "50", "o1", path="/pend/buy", client=c)
    assert r.header("X-Loyalty-Points") == "10"
    assert r.header("X-Loyalty-Pending") == "50"
    assert r.header("X-Loyalty-Earned") == "50"
    points, lifetime, pending = counts(c, "pd1")
    assert (points, lifetime) == (10, 10)
    release, locked = pending.split(":")
    assert locked == "50" and abs(int(release) - time.time() - 2) <= 2
    assert c.get(marker("pd1", "o1")) == "50:0:50:0:0:0:" + release
    # the order's time plus the lock period exactly
    (_, entry), = c.xrevrange("loyalty:{pd1}:ledger", count=1)
    assert (entry["order"], int(entry["ts"]) + 2) == ("o1", int(release))

    # only the 10 points are redeemable: the redeem of 30 takes 10
    r = buy(n, "pd1", "0", "o2", redeem="30", path="/pend/buy", client=c)
    assert r.header("X-Loyalty-Points") == "0"
    assert r.header("X-Loyalty-Pending") == "50"
    assert counts(c, "pd1")[0] == 0

    r = http_request(n.port, "/pend-balance", headers={"X-Customer": "pd1"})
    doc = json.loads(r.body)
    assert (doc["points"], doc["lifetime"], doc["pending"],
            doc["pending_release"]) == (0, 10, 50, int(release)), doc
    # without loyalty_pending the balance has no pending fields
    doc = json.loads(http_request(n.port, "/balance",
                                  headers={"X-Customer": "pd1"}).body)
    assert "pending" not in doc and doc["points"] == 0

    wait_until(lambda: time.time() > int(release) + 0.2, 5, 0.05,
               "the release time")
    # nothing wrote: the hash still holds the entry, the read counts it
    assert counts(c, "pd1")[2] == pending
    doc = json.loads(http_request(n.port, "/pend-balance",
                                  headers={"X-Customer": "pd1"}).body)
    assert (doc["points"], doc["lifetime"], doc["pending"],
            doc["pending_release"]) == (50, 60, 0, None), doc
    r = order(n, "pd1", path="/pend/buy")
    assert r.status == 200
    # the next write stores the release
    buy(n, "pd1", "1", "o3", path="/pend/buy", client=c)
    points, lifetime, pending = counts(c, "pd1")
    assert (points, lifetime) == (50, 60)
    assert pending.endswith(":1") and "," not in pending


def test_pending_request_headers(redis, nginx, capture_backend):
    """X-Loyalty-Pending and $loyalty_pending reach the backend with
    loyalty_pending only; "0" when nothing is locked."""
    c = redis.client
    n = nginx(edge_conf(locations=API + """
    location /seen/ {
        loyalty on;
        loyalty_pending 1h;
        add_header X-Var "[$loyalty_pending]" always;
        proxy_pass http://127.0.0.1:%d/;
    }
    location /unseen/ {
        loyalty on;
        add_header X-Var "[$loyalty_pending]" always;
        proxy_pass http://127.0.0.1:%d/;
    }
""" % (capture_backend.port, capture_backend.port)), redis_port=redis.port)
    c.hset(hkey("pd2"), mapping={"points": "7", "lifetime": "7",
                                 "pending": "%d:5,%d:6" % (
                                     time.time() + 3600, time.time() + 7200)})
    r = http_request(n.port, "/seen/x", headers={"X-Customer": "pd2"})
    assert r.header("X-Var") == "[11]"
    got = seen(capture_backend)
    assert got.get("x-loyalty-pending") == "11"
    assert got.get("x-loyalty-points") == "7"
    r = http_request(n.port, "/unseen/x", headers={"X-Customer": "pd2"})
    assert r.header("X-Var") == "[]"
    assert "x-loyalty-pending" not in seen(capture_backend)
    r = http_request(n.port, "/seen/x", headers={"X-Customer": "pd-new"})
    assert seen(capture_backend).get("x-loyalty-pending") == "0"


def test_pending_inherited_from_server(redis, nginx):
    c = redis.client
    n = edge(nginx, redis, server="loyalty_pending 1h;")
    r = buy(n, "pd3", "12", "o1", client=c)
    assert r.header("X-Loyalty-Pending") == "12"
    assert counts(c, "pd3")[:2] == (0, 0)


def test_refund_during_lock(redis, nginx):
    """A refund while the order's points are still locked takes them from
    its pending points: nothing is forgiven, lifetime does not move."""
    c = redis.client
    n = nginx(edge_conf(locations=API, server="loyalty_pending 1h;"),
              redis_port=redis.port)
    adjust(n, "pd4", "5", "start")
    buy(n, "pd4", "40", "o1", client=c)
    buy(n, "pd4", "30", "o2", client=c)
    r, doc = refund(n, "pd4", "o1", "10")
    assert (doc["reversed"], doc["forgiven"], doc["points"],
            doc["pending"]) == (10, 0, 5, 60), doc
    r, doc = refund(n, "pd4", "o1", "all")
    assert (doc["reversed"], doc["forgiven"], doc["points"],
            doc["pending"]) == (30, 0, 5, 30), doc
    points, lifetime, pending = counts(c, "pd4")
    assert (points, lifetime) == (5, 5)
    assert pending.endswith(":30") and "," not in pending
    entry = ledger_entries(c, "pd4")[-1]
    assert (entry["kind"], entry["pending"], entry["forgiven"]) == \
        ("refund", "30", "0")


def test_refund_after_release(redis, nginx):
    """Released points are reversed from points and from lifetime; what
    was spent of them is forgiven."""
    c = redis.client
    n = edge(nginx, redis)
    buy(n, "pd5", "40", "o1", path="/pend/buy", client=c)
    release = int(counts(c, "pd5")[2].split(":")[0])
    wait_until(lambda: time.time() > release + 0.2, 5, 0.05, "the release")
    buy(n, "pd5", "0", "o2", redeem="35", path="/pend/buy", client=c)
    assert counts(c, "pd5") == (5, 40, None)
    r, doc = refund(n, "pd5", "o1", "all", path="/pend-api/refund")
    assert (doc["reversed"], doc["forgiven"], doc["points"],
            doc["pending"]) == (40, 35, 0, 0), doc
    assert counts(c, "pd5") == (0, 0, None)


def test_order_ttl(redis, nginx):
    """loyalty_order_ttl is the marker's life: the window for refunds."""
    c = redis.client
    n = edge(nginx, redis, loc="loyalty_order_ttl 90d;")
    buy(n, "tt1", "3", "o1", client=c)
    assert 90 * 86400 - 60 < c.ttl(marker("tt1", "o1")) <= 90 * 86400
    n2 = edge(nginx, redis, loc="loyalty_order_ttl 2s;")
    buy(n2, "tt2", "3", "o1", client=c)
    assert 0 < c.ttl(marker("tt2", "o1")) <= 2
    wait_until(lambda: not c.exists(marker("tt2", "o1")), 5, 0.1,
               "the marker gone")
    r, doc = refund(n2, "tt2", "o1", "all")
    assert r.status == 404


@pytest.mark.parametrize("lines,error", [
    ("loyalty_pending 14d; loyalty_order_ttl 7d;",
     '"loyalty_order_ttl" of 604800 s is shorter than "loyalty_pending" '
     'of 1209600 s'),
    ("loyalty_pending 0;", 'invalid time "0" in "loyalty_pending"'),
    ("loyalty_pending soon;", 'invalid time "soon" in "loyalty_pending"'),
    ("loyalty_pending 1d; loyalty_pending 2d;",
     '"loyalty_pending" directive is duplicate'),
    ("loyalty_order_ttl 0;", '"loyalty_order_ttl" directive must be more '
                             'than 0 and at most 100 years'),
    ("loyalty_order_ttl 101y;", '"loyalty_order_ttl" directive must be '
                                'more than 0 and at most 100 years'),
    ("loyalty_pending 101y;", 'invalid time "101y" in "loyalty_pending", '
                              'it must be more than 0 and at most 100 years'),
    ("loyalty_expire 1000y;", 'invalid time "1000y" in "loyalty_expire"'),
    ("loyalty_pending 14d; loyalty_order_ttl 30d; loyalty_expire 1d;",
     '"loyalty_expire" of 86400 s is shorter than "loyalty_pending" of '
     '1209600 s: a record must outlive the points locked in it'),
    ("loyalty_order_ttl x;", '"loyalty_order_ttl" directive invalid value'),
])
def test_config_errors(nginx, lines, error):
    rc, out = check_location(nginx, lines)
    assert rc != 0 and error in out, out
    assert "nginx.conf:" in out


def test_config_ttl_checked_where_inherited(nginx):
    """The lock period inherited from http against a location's shorter
    order life fails too; equal lengths are fine."""
    rc, out = check_location(nginx, "loyalty_order_ttl 1h;",
                             http="loyalty_pending 2h;")
    assert rc != 0 and "is shorter than" in out, out
    rc, out = check_location(nginx, "loyalty_order_ttl 2h;",
                             http="loyalty_pending 2h;")
    assert rc == 0, out
    rc, out = check_location(nginx, "loyalty_pending off;",
                             http="loyalty_pending 60d;")
    assert rc != 0 and "is shorter than" in out, out
    rc, out = check_location(nginx, "loyalty_pending off; "
                                    "loyalty_order_ttl 1d;",
                             http="loyalty_pending 60d; "
                                  "loyalty_order_ttl 60d;")
    assert rc == 0, out


def test_journal_keeps_order_ttl_and_pending(redis, nginx):
    """A credit journaled with loyalty_pending and loyalty_order_ttl is
    replayed with them: locked, with the marker's life."""
    n = nginx(edge_conf(locations=API, server="""
        loyalty_pending 1h;
        loyalty_order_ttl 40d;
        loyalty_journal {prefix}/loyalty.journal;
    """), redis_port=redis.port)
    stop_redis_keeping_data(redis)
    buy(n, "jr1", "25", "o1")
    n.stop()
    entries = read_journal(journal_path(n))
    assert [(e["order"], e["order_ttl"], e["pending"]) for e in entries] == \
        [("o1", 40 * 86400, 3600)]
    redis.start()
    rc, applied, _, failed, out = replay(
        journal_path(n), redis_addr="127.0.0.1:%d" % redis.port)
    assert (rc, applied, failed) == (0, 1, 0), out
    c = redis.client
    points, lifetime, pending = counts(c, "jr1")
    # released an hour after the order's time, as the live credit does
    assert (points, lifetime, pending) == (
        0, 0, "%d:25" % (entries[0]["ts"] + 3600))
    assert 40 * 86400 - 60 < c.ttl(marker("jr1", "o1")) <= 40 * 86400


# --------------------------------------------------------------------------
# metrics, and refunds racing with orders


def test_api_metrics(redis, nginx):
    c = redis.client
    n = edge(nginx, redis)
    buy(n, "mt1", "10", "o1", client=c)
    refund(n, "mt1", "o1", "4")
    refund(n, "mt1", "o1", "4")
    refund(n, "mt1", "o9", "4")
    refund(n, "mt1", "o1", "x")
    adjust(n, "mt1", "-100", "a1")
    adjust(n, "mt1", "+1", "a2")
    adjust(n, "mt1", "+1", "a2")
    http_request(n.port, "/api/ledger?customer=mt1")
    http_request(n.port, "/api/refund")                    # 405
    body = http_request(n.port, "/metrics").body
    for op, status, value in (
            ("refund", "applied", 1), ("refund", "unchanged", 1),
            ("refund", "unknown_order", 1), ("refund", "invalid", 2),
            ("refund", "unavailable", 0), ("adjust", "insufficient", 1),
            ("adjust", "applied", 1), ("adjust", "unchanged", 1),
            ("ledger", "ok", 1)):
        line = 'loyalty_api_requests_total{op="%s",status="%s"} %d' % (
            op, status, value)
        assert line in body, (line, body)
    assert "loyalty_points_reversed_total 4\n" in body
    assert "# TYPE loyalty_api_requests_total counter" in body


def test_refunds_racing_orders(redis, nginx):
    """Several threads place orders, redeem and refund (partial totals in
    any order, repeats, full) for the same customers at once, on 2
    workers.  The balance never falls short, so every change commutes: at
    the end points and lifetime are what the model says, to the point."""
    c = redis.client
    n = nginx(edge_conf(locations=API), redis_port=redis.port, workers=2)
    customers = ["race%d" % i for i in range(3)]
    for cid in customers:
        r, doc = adjust(n, cid, "+1000000", "seed")
        assert doc["status"] == "applied"
    lock = threading.Lock()
    want = {cid: {"points": 1000000, "lifetime": 1000000}
            for cid in customers}
    failures = []

    def worker(seed):
        rnd = random.Random(seed)
        for k in range(12):
            cid = rnd.choice(customers)
            oid = "t%d-%d" % (seed, k)
            cents = rnd.randint(100, 99999)
            total = "%d.%02d" % divmod(cents, 100)
            redeem = rnd.choice([0, 0, rnd.randint(1, 500)])
            r = order(n, cid, total, oid, redeem=str(redeem))
            if r.status != 200:
                failures.append(("order", oid, r.status))
                continue
            wait_marker(c, cid, oid)
            earned = cents // 100
            # refunds: a few cumulative totals sent in a random order
            totals = sorted(rnd.sample(range(0, cents + 1), 3))
            if rnd.random() < 0.4:
                totals.append(cents)
            sent = totals[:]
            rnd.shuffle(sent)
            for t in sent + [rnd.choice(totals)]:
                arg = "%d.%02d" % divmod(t, 100)
                r, doc = refund(n, cid, oid, arg)
                if doc["status"] not in ("applied", "unchanged"):
                    failures.append(("refund", oid, arg, doc))
            final = max(totals)
            reversed_ = earned if final == cents else earned * final // cents
            restored = redeem if final == cents else 0
            with lock:
                w = want[cid]
                w["points"] += earned - redeem - reversed_ + restored
                w["lifetime"] += earned - reversed_
            if rnd.random() < 0.3:
                pts = rnd.randint(1, 300)
                sign = rnd.choice(["+", "-"])
                r, doc = adjust(n, cid, sign + str(pts), "adj-" + oid)
                if doc["status"] != "applied":
                    failures.append(("adjust", oid, doc))
                with lock:
                    want[cid]["points"] += pts if sign == "+" else -pts
                    if sign == "+":
                        want[cid]["lifetime"] += pts

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120 * SLOW)
    assert not any(t.is_alive() for t in threads)
    assert failures == []
    for cid in customers:
        points, lifetime, _ = counts(c, cid)
        assert (points, lifetime) == (want[cid]["points"],
                                      want[cid]["lifetime"]), cid
    assert metric(n, "loyalty_points_forgiven_total") == 0


def test_api_script_sent_once(redis, nginx):
    """Calls name the API script by its SHA1 (EVALSHA, a few hundred
    bytes): the first one on a Redis that does not know it yet gets
    NOSCRIPT and sends the script itself (EVAL), which Redis then keeps;
    after SCRIPT FLUSH, once more.  Regression: every call sent the whole
    script, so that a few at once filled the connection's buffer that
    checkout reads share."""
    c = redis.client
    n = edge(nginx, redis)
    c.config_resetstat()

    def calls(cmd):
        return c.info("commandstats").get("cmdstat_" + cmd, {}).get(
            "calls", 0)

    for i in range(5):
        r, doc = adjust(n, "so1", "+1", "a%d" % i)
        assert doc["status"] == "applied", doc
    assert calls("eval") == 1
    assert calls("evalsha") == 5
    c.script_flush()
    r, doc = refund(n, "so1", "nothing", "all")
    assert r.status == 404
    r, doc = adjust(n, "so1", "-5", "back")
    assert (doc["status"], doc["points"]) == ("applied", 0)
    assert calls("eval") == 2
    assert calls("evalsha") == 7
    # many at once: none is refused for want of room
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(
        adjust(n, "so2", "+1", "burst-%d" % i)[1]["status"]))
        for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30 * SLOW)
    assert results == ["applied"] * 40
    assert int(c.hget(hkey("so2"), "points")) == 40
