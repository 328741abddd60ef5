"""loyalty_api (SPEC §11): GET .../ledger, the method and path answers,
and Redis unavailable.  POST .../refund and POST .../adjust are in
test_refunds.py."""

import json

import pytest

from conftest import SLOW, http_request, log_lines, wait_until
from credit_support import (WEIRD_ORDER_ID, edge_conf, ledger, order,
                            stop_redis_keeping_data)


API = """
    location /api/ {
        allow 127.0.0.1;
        deny all;
        loyalty_api;
    }
    location /closed/ {
        deny all;
        loyalty_api;
    }
    location /short/ {
        loyalty_ledger 2;
        loyalty_api;
    }
    location /weird/ {
        loyalty on;
        proxy_pass http://127.0.0.1:{shop_port};
    }
"""


def api(n, path, method="GET", body=None):
    r = http_request(n.port, path, method=method,
                     body=body.encode() if body else None)
    assert r.header("Content-Type") == "application/json", r
    return r, json.loads(r.body)


def edge(nginx, redis):
    return nginx(edge_conf(locations=API), redis_port=redis.port)


def buy(n, cid, total, oid):
    r = order(n, cid, total, oid)
    assert r.status == 200, r


def test_ledger_newest_first(redis, nginx):
    n = edge(nginx, redis)
    for i, total in enumerate(["10.00", "2.50", "7"]):
        buy(n, "la1", total, "la1-%d" % i)
    wait_until(lambda: redis.client.xlen(ledger("la1")) == 3, 5 * SLOW, 0.05,
               "3 ledger entries")
    r, doc = api(n, "/api/ledger?customer=la1")
    assert r.status == 200, r
    assert r.header("Cache-Control") == "no-store"
    assert doc["status"] == "ok" and doc["customer"] == "la1"
    got = doc["entries"]
    assert [e["id"] for e in got] == [
        i for i, _ in redis.client.xrevrange(ledger("la1"))]
    assert [e["order"] for e in got] == ["la1-2", "la1-1", "la1-0"]
    assert [e["amount"] for e in got] == ["7", "2.50", "10.00"]
    assert [e["earned"] for e in got] == [7, 2, 10]
    assert [e["points"] for e in got] == [19, 12, 10]
    assert all(isinstance(e["ts"], int) and e["redeemed"] == 0 for e in got)
    # count, and the cap of the location's loyalty_ledger
    _, doc = api(n, "/api/ledger?customer=la1&count=2")
    assert [e["order"] for e in doc["entries"]] == ["la1-2", "la1-1"]
    _, doc = api(n, "/short/ledger?customer=la1&count=10")
    assert len(doc["entries"]) == 2
    r = http_request(n.port, "/api/ledger?customer=la1", method="HEAD")
    assert r.status == 200 and r.body == "", r


def test_ledger_default_count(redis, nginx):
    n = edge(nginx, redis)
    for i in range(25):
        redis.client.xadd(ledger("la2"), {"order": "o%d" % i, "earned": "1",
                                          "points": str(i + 1)})
    r, doc = api(n, "/api/ledger?customer=la2")
    assert r.status == 200, (doc, n.error_log()[-2000:])
    assert len(doc["entries"]) == 20
    assert doc["entries"][0]["order"] == "o24"


def test_ledger_escaped_customer(redis, nginx):
    """The customer argument is URL-decoded: %40 is "@", as a form or a
    client library sends it; "%20" gives an id with a blank: invalid."""
    n = edge(nginx, redis)
    redis.client.xadd(ledger("a@b:c"), {"order": "o1"})
    r, doc = api(n, "/api/ledger?customer=a%40b%3Ac")
    assert r.status == 200, r
    assert doc["customer"] == "a@b:c"
    assert [e["order"] for e in doc["entries"]] == ["o1"]


def test_ledger_unknown_customer(redis, nginx):
    n = edge(nginx, redis)
    r, doc = api(n, "/api/ledger?customer=nobody")
    assert r.status == 200
    assert doc == {"status": "ok", "customer": "nobody", "entries": []}


def test_ledger_strings_escaped(redis, nginx):
    """Order ids and fields that JSON must escape come out as valid JSON,
    as they are; a count field that is not a plain count is a string."""
    n = edge(nginx, redis)
    r = order(n, "la3", "3", path="/weird/")
    assert r.status == 200, r
    wait_until(lambda: redis.client.xlen(ledger("la3")) == 1, 5 * SLOW, 0.05,
               "the ledger entry")
    redis.client.xadd(ledger("la3"), {'we"ird\\': 'a"b\\c\nd', "earned": "07",
                                      "points": "x"})
    _, doc = api(n, "/api/ledger?customer=la3")
    first, second = doc["entries"]
    assert first['we"ird\\'] == 'a"b\\c\nd'
    assert first["earned"] == "07" and first["points"] == "x"
    assert second["order"] == WEIRD_ORDER_ID


@pytest.mark.parametrize("query", [
    "", "?customer=", "?customer=a%20b", "?customer=" + "x" * 200,
    "?customer=ok&count=0", "?customer=ok&count=-1", "?customer=ok&count=x",
    "?count=3"])
def test_ledger_invalid(redis, nginx, query):
    n = edge(nginx, redis)
    r, doc = api(n, "/api/ledger" + query)
    assert (r.status, doc["status"]) == (400, "invalid"), query
    assert ("count" if "count=" in query and "customer=ok" in query
            else "customer") in doc["error"], doc


def test_methods_and_paths(redis, nginx):
    """Another method is 405 with Allow, another path 404, both with the
    status "invalid" and what is wrong."""
    n = edge(nginx, redis)
    r, doc = api(n, "/api/ledger?customer=a", method="POST", body="x=1")
    assert (r.status, doc) == (405, {"status": "invalid",
                                     "error": "method not allowed"})
    assert r.header("Allow") == "GET, HEAD"
    for call in ("refund", "adjust"):
        for method in ("GET", "PUT", "DELETE"):
            r, doc = api(n, "/api/" + call + "?customer=a&order=o&"
                         "refunded=all", method=method)
            assert (r.status, doc["status"]) == (405, "invalid"), call
            assert r.header("Allow") == "POST"
    assert not redis.client.keys("*")
    for path in ("/api/", "/api/ledgers", "/api/x/ledger2", "/api/balance",
                 "/api/refunds"):
        r, doc = api(n, path)
        assert (r.status, doc) == (404, {"status": "invalid",
                                         "error": "no such call"}), path
    # a sub-path ending in a call name is that call
    r, doc = api(n, "/api/v1/ledger?customer=a")
    assert r.status == 200 and doc["entries"] == []


def test_access_control(redis, nginx):
    n = edge(nginx, redis)
    r = http_request(n.port, "/closed/ledger?customer=a")
    assert r.status == 403


def test_redis_unavailable(redis, nginx):
    n = edge(nginx, redis)
    stop_redis_keeping_data(redis)
    r, doc = api(n, "/api/ledger?customer=a")
    assert (r.status, doc) == (503, {"status": "unavailable"})


def test_ledger_not_a_stream(redis, nginx):
    n = edge(nginx, redis)
    redis.client.set(ledger("la4"), "not a stream")
    r, doc = api(n, "/api/ledger?customer=la4")
    assert (r.status, doc) == (503, {"status": "unavailable"})
    assert any('ledger of customer "la4" not read: "WRONGTYPE' in x
               for x in log_lines(n.error_log(), "warn")), n.error_log()


def test_ledger_hostile_entry_ids(fake_redis, nginx):
    """Entry ids are escaped like every other string, however many bytes
    JSON makes of them.  Regression: the answer's buffer counted an id's
    bytes once, so that ids of quotes and control bytes from a hostile
    Redis overflowed it."""
    from fake_redis import array, bulk
    f = fake_redis
    weird = '"\\\x01' * 40
    f.queue("XREVRANGE", array(
        array(bulk(weird), array(bulk("order"), bulk("o1"))),
        array(bulk("1-0"), array(bulk("order"), bulk("o0")))))
    n = nginx(edge_conf(locations=API), redis_port=f.port)
    r, doc = api(n, "/api/ledger?customer=h1")
    assert r.status == 200, r
    assert [(e["id"], e["order"]) for e in doc["entries"]] == [
        (weird, "o1"), ("1-0", "o0")]


def test_ledger_count_bounded(redis, nginx):
    """count is capped at 1000 entries, whatever loyalty_ledger keeps, so
    that an answer stays within what the connection reads."""
    n = nginx(edge_conf(locations=API.replace("loyalty_ledger 2;",
                                              "loyalty_ledger 100000;")),
              redis_port=redis.port)
    pipe = redis.client.pipeline()
    for i in range(1200):
        pipe.xadd(ledger("lb"), {"order": "o%d" % i})
    pipe.execute()
    _, doc = api(n, "/short/ledger?customer=lb&count=5000")
    assert len(doc["entries"]) == 1000
    assert doc["entries"][0]["order"] == "o1199"
    r, _ = api(n, "/api/ledger?customer=lb")
    assert r.status == 200
