"""The credit script on its own (issues #3 and #5): every path of
ngx_module/ngx_http_loyalty_credit.lua, run by a real redis-server, against
a model of it written in Python.

The module calls the script with well-formed arguments; these tests also
feed it what another tool, a hand edit or a bug could leave in a record:
leading zeros, fields that are not counts, balances next to 2^53, dates on
either side of the order's.  Each case checks the reply, every field of the
hash afterwards, the marker, the ledger entry and the expiry, and that a
refused credit writes nothing.

LOYALTY_CREDIT_SCRIPT runs the same cases against another version of the
script (to compare a rewrite with the script it replaces).
"""

import os
import random

import pytest
import redis as redis_lib

SCRIPT = os.environ.get("LOYALTY_CREDIT_SCRIPT") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "ngx_module",
    "ngx_http_loyalty_credit.lua")

LIMIT = 2 ** 53
MARK_TTL = 2592000
FIELDS = ("points", "lifetime", "orders", "first_order", "last_order")


def count(s):
    """Canonical decimal string of a count, or None."""
    if s is None or s == "" or not s.isascii() or not s.isdigit():
        return None
    return s.lstrip("0") or "0"


def less(a, b):
    return (len(a), a) < (len(b), b)


def number(s):
    """A decimal string as a Lua number (a double, inf when too long)."""
    try:
        return float(s)
    except OverflowError:
        return float("inf")


def model(rec, args, marked):
    """What the script must answer and write: (reply, new hash or None,
    marker value or None, ledger entry or None).  An error reply is
    ("error", message)."""
    key = "loyalty:{m}"
    earned, redeem, ts = (count(a) for a in args[:3])
    if earned is None or redeem is None or ts is None:
        return ("error", "LOYALTY bad arguments"), None, None, None

    canon = {}
    for f in ("points", "lifetime", "orders"):
        v = count(rec.get(f, "0"))
        if v is None:
            return (("error", "LOYALTY %s of %s is not a count" % (f, key)),
                    None, None, None)
        canon[f] = v

    points, lifetime, orders = (canon[f] for f in ("points", "lifetime",
                                                    "orders"))
    redeemed, short = (points, 1) if less(points, redeem) else (redeem, 0)

    e = number(earned)
    if (number(points) + e >= LIMIT or number(lifetime) + e >= LIMIT
            or number(orders) + 1 >= LIMIT):
        return (("error", "LOYALTY balance of %s would overflow" % key),
                None, None, None)

    mark = "%s:%s" % (earned, redeemed)
    if marked is not None:
        return [0, marked], None, None, None

    after = int(points) - int(redeemed) + int(earned)
    new = dict(rec)
    new.update(points=str(after), lifetime=str(int(lifetime) + int(earned)),
               orders=str(int(orders) + 1))
    first, last = count(rec.get("first_order")), count(rec.get("last_order"))
    if first is None or less(ts, first):
        new["first_order"] = ts
    if last is None or less(last, ts):
        new["last_order"] = ts
    entry = None
    if number(args[3]) > 0:
        entry = dict(order=args[5], amount=args[6], earned=earned,
                     redeemed=redeemed, points=str(after), ts=ts)
    return [1, mark, after, short], new, mark, entry


def hostile_count(rnd, near=None):
    """A stored count as anything might have written it."""
    kind = rnd.randrange(12)
    if kind == 0:
        return None                             # field missing
    if kind == 1:
        return rnd.choice(["", "abc", "-1", "1.5", " 7", "7 ", "1e3",
                           "0x10", "+3", "\u0663"])
    if kind == 2:
        return "0" * rnd.randint(1, 5) + str(rnd.randint(0, 10 ** 6))
    if kind == 3:
        return str(LIMIT - rnd.randint(1, 3000))
    if kind == 4:
        return "9" * rnd.randint(16, 400)
    if kind == 5:
        return "0"
    if kind == 6 and near is not None:
        return str(max(0, int(near) + rnd.randint(-2, 2)))
    return str(rnd.randint(0, 10 ** rnd.randint(1, 9)))


def hostile_arg(rnd, near=None):
    kind = rnd.randrange(10)
    if kind == 0:
        return rnd.choice(["", "x", "-5", "2.0", " 1", "1 "])
    if kind == 1:
        return "0" * rnd.randint(1, 4) + str(rnd.randint(0, 999))
    if kind == 2:
        return str(rnd.randint(LIMIT - 5000, LIMIT + 5000))
    if kind == 3:
        return "9" * rnd.randint(17, 30)
    if kind == 4 and near is not None:
        return str(max(0, int(near) + rnd.randint(-1, 1)))
    if kind == 5:
        return "0"
    return str(rnd.randint(0, 10 ** rnd.randint(1, 6)))


def run_case(r, sha, rec, args, marked):
    key, marker, ledger = "loyalty:{m}", "loyalty:{m}:order:o", \
        "loyalty:{m}:ledger"
    r.delete(key, marker, ledger)
    if rec:
        r.hset(key, mapping=rec)
    if marked is not None:
        r.set(marker, marked)
    try:
        reply = r.evalsha(sha, 3, key, marker, ledger, *args)
    except redis_lib.ResponseError as err:
        reply = ("error", str(err))

    want_reply, want_hash, want_mark, want_entry = model(rec, args, marked)
    where = "record %r, args %r, marker %r" % (rec, args, marked)
    assert reply == want_reply, where

    got_hash = r.hgetall(key)
    if want_hash is None:
        # refused or a duplicate: nothing written
        assert got_hash == rec, where
        assert r.ttl(key) == (-1 if rec else -2), where
        assert r.get(marker) == marked, where
        assert not r.exists(ledger), where
        return reply

    assert got_hash == want_hash, where
    assert r.get(marker) == want_mark, where
    assert 0 < r.ttl(marker) <= MARK_TTL, where

    entries = r.xrange(ledger)
    if want_entry is None:
        assert entries == [], where
    else:
        assert len(entries) == 1 and entries[0][1] == want_entry, where

    expire = int(number(args[4]))
    for k, exists in ((key, True), (ledger, want_entry is not None)):
        ttl = r.ttl(k)
        if not exists:
            assert ttl == -2, (k, where)
        elif expire > 0:
            assert 0 < ttl <= expire, (k, where)
        else:
            assert ttl == -1, (k, where)
    return reply


@pytest.fixture
def script(redis):
    r = redis.client
    with open(SCRIPT) as f:
        return r, r.script_load(f.read())


def test_script_ordinary_credits(script):
    """Well-formed records and arguments, as the module sends them."""
    r, sha = script
    rnd = random.Random(5)
    for i in range(300):
        rec = {f: str(rnd.randint(0, 10 ** 6)) for f in FIELDS
               if rnd.random() < 0.9}
        args = [str(rnd.randint(0, 5000)),
                str(rnd.choice([0, 0, rnd.randint(0, 10 ** 6)])),
                str(1700000000 + rnd.randint(-10 ** 6, 10 ** 6)),
                rnd.choice(["0", "100"]), rnd.choice(["0", "0", "86400"]),
                "order-%d" % i, "%d.%02d" % (rnd.randint(0, 999),
                                             rnd.randint(0, 99))]
        reply = run_case(r, sha, rec, args,
                         rnd.choice([None] * 9 + ["3:0"]))
        assert reply[0] in (0, 1)


def test_script_hostile_records_and_arguments(script):
    """Leading zeros, fields that are not counts, values at 2^53, dates on
    either side of the order's, duplicates: the script agrees with the
    model on every case, and a refused credit writes nothing."""
    r, sha = script
    rnd = random.Random(53)
    seen = set()
    for i in range(2500):
        rec = {}
        for f in ("points", "lifetime", "orders"):
            v = hostile_count(rnd)
            if v is not None:
                rec[f] = v
        ts = hostile_arg(rnd)
        for f in ("first_order", "last_order"):
            v = hostile_count(rnd, near=ts if count(ts) else None)
            if v is not None:
                rec[f] = v
        if rnd.random() < 0.1:
            rec["note"] = "a field the script does not know"
        args = [hostile_arg(rnd), hostile_arg(rnd, near=rec.get("points")
                                              if count(rec.get("points"))
                                              else None),
                ts, rnd.choice(["0", "3", "03", "3.0", " 3"]),
                rnd.choice(["0", "600", "0600", "6e2", "600.0"]),
                "o-%d" % i, rnd.choice(["1.00", "", "12,5"])]
        reply = run_case(r, sha, rec, args,
                         rnd.choice([None] * 15 + ["7:1"]))
        seen.add(reply[1].split(" of ")[0] if reply[0] == "error"
                 else reply[0] if reply[0] == 0 else ("applied", reply[3]))

    # every path was taken
    assert seen >= {0, ("applied", 0), ("applied", 1),
                    "LOYALTY bad arguments", "LOYALTY points",
                    "LOYALTY lifetime", "LOYALTY orders",
                    "LOYALTY balance"}, seen


@pytest.mark.parametrize("points,redeem,earned,want", [
    ("100", "100", "0", [1, "0:100", 0, 0]),        # the whole balance
    ("100", "101", "0", [1, "0:100", 0, 1]),        # one point short
    ("0100", "00101", "005", [1, "5:100", 5, 1]),   # leading zeros
    (str(LIMIT - 2), "0", "1", [1, "1:0", LIMIT - 1, 0]),
    ("0", "9" * 30, "7", [1, "7:0", 7, 1]),
])
def test_script_edges(script, points, redeem, earned, want):
    r, sha = script
    rec = dict(points=points, lifetime="5", orders="1")
    args = [earned, redeem, "1700000000", "0", "0", "o", "1"]
    assert run_case(r, sha, rec, args, None) == want


@pytest.mark.parametrize("field,value,earned,refused", [
    ("points", LIMIT - 1, "1", True),
    ("points", LIMIT - 2, "1", False),
    ("lifetime", LIMIT - 5, "5", True),
    ("lifetime", LIMIT - 6, "5", False),
    ("orders", LIMIT - 1, "0", True),
    ("orders", LIMIT - 2, "0", False),
])
def test_script_overflow_refused(script, field, value, earned, refused):
    """A count that would reach 2^53, where Lua numbers stop being exact,
    is refused; one below it is credited exactly."""
    r, sha = script
    rec = dict(points="0", lifetime="0", orders="0")
    rec[field] = str(value)
    reply = run_case(r, sha, rec,
                     [earned, "0", "1700000000", "3", "0", "o", "1"], None)
    if refused:
        assert reply == ("error", "LOYALTY balance of loyalty:{m} would "
                                  "overflow")
    else:
        assert reply[0] == 1


@pytest.mark.parametrize("kind", ["string", "hash"])
def test_script_ledger_wrong_type_refused(script, kind):
    """A ledger that is not a stream: the credit is refused with an error
    naming the ledger, and nothing is written, the marker included, so
    that the order can be retried or replayed once the key is repaired."""
    r, sha = script
    key, mark, ledger = ("loyalty:{m}", "loyalty:{m}:order:o",
                         "loyalty:{m}:ledger")
    r.delete(key, mark, ledger)
    rec = {"points": "7", "lifetime": "9", "orders": "1",
           "first_order": "1600000000", "last_order": "1600000000"}
    r.hset(key, mapping=rec)
    if kind == "string":
        r.set(ledger, "not a stream")
    else:
        r.hset(ledger, "not", "a stream")
    args = ["5", "2", "1700000000", "100", "86400", "o", "5.00"]
    with pytest.raises(redis_lib.ResponseError,
                       match=r"^LOYALTY ledger loyalty:\{m\}:ledger: "
                             r"WRONGTYPE "):
        r.evalsha(sha, 3, key, mark, ledger, *args)
    assert r.hgetall(key) == rec
    assert r.ttl(key) == -1
    assert not r.exists(mark)
    assert r.type(ledger) == kind
    assert r.ttl(ledger) == -1

    # without a ledger the same credit applies
    reply = r.evalsha(sha, 3, key, mark, ledger, "5", "2", "1700000000",
                      "0", "0", "o", "5.00")
    assert reply == [1, "5:2", 10, 0]
    assert r.type(ledger) == kind


def test_script_wrong_type_refused(script):
    """A record that is not a hash: Redis refuses the read, and nothing is
    written."""
    r, sha = script
    r.delete("loyalty:{m}:order:o", "loyalty:{m}:ledger")
    r.set("loyalty:{m}", "not a hash")
    with pytest.raises(redis_lib.ResponseError, match="WRONGTYPE"):
        r.evalsha(sha, 3, "loyalty:{m}", "loyalty:{m}:order:o",
                  "loyalty:{m}:ledger", "1", "0", "1700000000", "3", "0",
                  "o", "1")
    assert r.get("loyalty:{m}") == "not a hash"
    assert not r.exists("loyalty:{m}:order:o", "loyalty:{m}:ledger")


@pytest.mark.parametrize("ttl", [MARK_TTL, None], ids=["marker-ttl",
                                                       "marker-no-ttl"])
def test_script_duplicate_writes_for_wait(script, ttl):
    """ARGV[8] "1" (loyalty_credit_wait): a duplicate writes its marker
    again, the same value and expiry, so that a WAIT behind it covers the
    order's first write (Redis counts a change).  Without it a
    duplicate writes nothing.  The record, ledger and reply are those of
    any duplicate."""
    r, sha = script
    key, marker, ledger = "loyalty:{w}", "loyalty:{w}:order:o", \
        "loyalty:{w}:ledger"
    r.delete(key, marker, ledger)
    r.hset(key, mapping={"points": "5", "lifetime": "5", "orders": "1"})
    if ttl:
        r.set(marker, "5:0", ex=ttl)
    else:
        r.set(marker, "5:0")
    args = ["5", "0", "1700000000", "100", "0", "o", "5.00"]

    def offset():
        # writes since the last save: what is replicated, and WAIT covers
        return int(r.info("persistence")["rdb_changes_since_last_save"])

    def run(*extra):
        before = offset()
        reply = r.evalsha(sha, 3, key, marker, ledger, *(args + list(extra)))
        return reply, offset() - before

    pttl = r.pttl(marker)
    reply, moved = run()
    assert (reply, moved) == ([0, "5:0"], 0)
    for extra in ("0", ""):
        assert run(extra) == ([0, "5:0"], 0), extra
    reply, moved = run("1")
    assert reply == [0, "5:0"] and moved > 0
    assert r.get(marker) == "5:0"
    if ttl:
        assert pttl - 2000 <= r.pttl(marker) <= pttl
    else:
        assert r.ttl(marker) == -1
    assert r.hgetall(key) == {"points": "5", "lifetime": "5", "orders": "1"}
    assert not r.exists(ledger)
