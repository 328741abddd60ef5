"""The credit script on its own (issues #3 and #5): every path of
ngx_module/ngx_http_loyalty_credit.lua, run by a real redis-server, against
a model of it written in Python.

The module calls the script with well-formed arguments; these tests also
feed it what another tool, a hand edit or a bug could leave in a record:
leading zeros, fields that are not counts, balances next to 2^53, dates on
either side of the order's, "pending" lists that are not lists, entries
due and not due, releases of the same second.  Each case checks the
reply, every field of the hash afterwards, the marker (its long form
"<earned>:<redeemed>:<amount>:0:0:0:<release>") and its expiry (ARGV[9],
the order_ttl), the ledger entry and the expiry of the record, and that a
refused credit writes nothing.

LOYALTY_CREDIT_SCRIPT runs the same cases against another version of the
script (to compare a rewrite with the script it replaces).

The model (model(), pending_list()) is also used by test_api_script.py,
which credits orders before refunding them.
"""

import os
import random
import re

import pytest
import redis as redis_lib

SCRIPT = os.environ.get("LOYALTY_CREDIT_SCRIPT") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "ngx_module",
    "ngx_http_loyalty_credit.lua")

LIMIT = 2 ** 53
MARK_TTL = 2592000              # ARGV[9] when not given: 30 days
FIELDS = ("points", "lifetime", "orders", "first_order", "last_order")
KEY = "loyalty:{m}"


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


def pending_list(s):
    """The entries of a stored "pending" field as [[release, points], ...]
    ([] when the field is missing or empty), or None when it is not a
    list "<release>:<points>[,<release>:<points>...]" of counts below 2^53
    (leading zeros allowed, as in every count of the record)."""
    if s is None or s == "":
        return []
    out = []
    for part in s.split(","):
        bits = part.split(":")
        if len(bits) != 2:
            return None
        t, v = count(bits[0]), count(bits[1])
        if t is None or v is None or int(t) >= LIMIT or int(v) >= LIMIT:
            return None
        out.append([int(t), int(v)])
    return out


def pending_text(entries):
    return ",".join("%d:%d" % (t, v) for t, v in entries)


def is_amount(s):
    """What the credit script keeps of ARGV[7] in the marker: an amount
    as nginx takes one (SPEC §6), which a refund can divide by."""
    return re.fullmatch(r"[0-9]{1,12}(\.[0-9]{1,4})?", s) is not None


def marker_ttl(args):
    """The marker's expiry that a credit with args must write (ARGV[9])."""
    return int(count(args[8])) if len(args) > 8 else MARK_TTL


def error(message):
    return ("error", message), None, None, None


def model(rec, args, marked, key=KEY):
    """What the script must answer and write: (reply, new hash or None,
    marker value or None, ledger entry or None).  An error reply is
    ("error", message).  args are ARGV[1..7] and optionally ARGV[8..10]."""
    earned, redeem, ts = (count(a) for a in args[:3])
    ttl = count(args[8]) if len(args) > 8 else str(MARK_TTL)
    release = count(args[9]) if len(args) > 9 else "0"
    if None in (earned, redeem, ts, ttl, release) or ttl == "0" \
            or int(release) >= LIMIT:
        return error("LOYALTY bad arguments")

    canon = {}
    for f in ("points", "lifetime", "orders"):
        v = count(rec.get(f, "0"))
        if v is None:
            return error("LOYALTY %s of %s is not a count" % (f, key))
        canon[f] = int(v)
    p, l, o = canon["points"], canon["lifetime"], canon["orders"]
    e, now = int(earned), int(ts)

    # the pending points: those due (release <= ts) are released first
    stored = rec.get("pending")
    entries = pending_list(stored)
    if entries is None:
        return error("LOYALTY pending of %s is not a list" % key)
    due = sum(v for t, v in entries if t <= now)
    left = [[t, v] for t, v in entries if t > now]
    still = sum(v for t, v in left)
    if stored and (p + due + still >= LIMIT or l + due + still >= LIMIT):
        return error("LOYALTY balance of %s would overflow" % key)
    p, l = p + due, l + due

    redeemed, short = (p, 1) if p < int(redeem) else (int(redeem), 0)

    if p + e + still >= LIMIT or l + e + still >= LIMIT or o + 1 >= LIMIT:
        return error("LOYALTY balance of %s would overflow" % key)

    # locked when it earns points, until a release after the order
    release = int(release) if e > 0 and less(ts, release) else 0

    amount = args[6] if is_amount(args[6]) else ""
    mark = "%s:%d:%s:0:0:0:%d" % (earned, redeemed, amount, release)
    if marked is not None:
        return [0, marked], None, None, None

    after = p - redeemed
    if release == 0:
        after, l = after + e, l + e
    else:
        # by release time; an entry of the same second takes the points
        at = len(left)
        while at > 0 and left[at - 1][0] > release:
            at -= 1
        if at > 0 and left[at - 1][0] == release:
            left[at - 1][1] += e
        else:
            left.insert(at, [release, e])
        still += e

    new = dict(rec)
    new.update(points=str(after), lifetime=str(l), orders=str(o + 1))
    first, last = count(rec.get("first_order")), count(rec.get("last_order"))
    if first is None or less(ts, first):
        new["first_order"] = ts
    if last is None or less(last, ts):
        new["last_order"] = ts
    if left:
        new["pending"] = pending_text(left)
    elif stored:
        del new["pending"]
    entry = None
    if number(args[3]) > 0:
        entry = dict(order=args[5], amount=args[6], earned=earned,
                     redeemed=str(redeemed), points=str(after), ts=ts)
        if release:
            entry["pending"] = str(still)
    return [1, mark, after, short, still], new, mark, entry


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


# "pending" fields that are not lists of counts: refused, nothing written
MALFORMED_PENDING = [
    "abc", "100", "100:", ":5", ":", ",", "100:5,", ",100:5", "100:5,,200:1",
    "100:5:6", "100;5", "100:5;200:1", "100:5,200", "1e3:5", "100:1e3",
    "0x10:5", "100:0x5", " 100:5", "100:5 ", "100 :5", "100: 5", "100:-5",
    "-100:5", "+100:5", "100:+5", "100:5.0", "100.0:5", "100:5.5", "inf:5",
    "100:inf", "nan:5", "100:nan", "100:%d" % LIMIT, "%d:5" % LIMIT,
    "9" * 20 + ":5", "100:" + "9" * 17, "100:5\n", "\u0663:5", "100:\u0665",
    "100:5,abc", "100:5,200:1,",
]


def hostile_pending(rnd, now, lock=0):
    """A "pending" field as anything might have written it, around the
    order's time now: missing, empty, malformed, or a list (by release,
    releases of the same second allowed) whose entries are due, not due,
    or due exactly now, with leading zeros and points next to 2^53."""
    kind = rnd.randrange(12)
    if kind == 0:
        return None
    if kind == 1:
        return ""
    if kind == 2:
        return rnd.choice(MALFORMED_PENDING)
    n = rnd.randint(1, 4)
    releases = sorted(max(0, min(LIMIT - 1, rnd.choice([
        now, now - 1, now + 1, now + lock, now + lock, now - 3600,
        now + rnd.randint(1, 7200), now - rnd.randint(1, 10 ** 6),
        now + lock + rnd.choice([-1, 1])]))) for _ in range(n))
    entries = []
    for t in releases:
        v = rnd.choice([0, rnd.randint(1, 1000), rnd.randint(1, 10 ** 9),
                        (LIMIT - 1) // n - rnd.randint(0, 3),
                        rnd.randint(0, LIMIT - 1)])
        zt = "0" * rnd.choice([0, 0, 0, 1, 3])
        zv = "0" * rnd.choice([0, 0, 0, 1, 2])
        entries.append("%s%d:%s%d" % (zt, t, zv, v))
    return ",".join(entries)


def evalsha(r, sha, keys, args):
    try:
        return r.evalsha(sha, len(keys), *(list(keys) + list(args)))
    except redis_lib.ResponseError as err:
        return ("error", str(err))


def run_case(r, sha, rec, args, marked):
    key, marker, ledger = KEY, "loyalty:{m}:order:o", "loyalty:{m}:ledger"
    r.delete(key, marker, ledger)
    if rec:
        r.hset(key, mapping=rec)
    if marked is not None:
        r.set(marker, marked)
    reply = evalsha(r, sha, (key, marker, ledger), args)

    want_reply, want_hash, want_mark, want_entry = model(rec, args, marked)
    where = "record %r, args %r, marker %r" % (rec, args, marked)
    assert reply == want_reply, where

    got_hash = r.hgetall(key)
    if want_hash is None:
        # refused or a duplicate: nothing written
        assert got_hash == rec, where
        assert r.ttl(key) == (-1 if rec else -2), where
        assert r.get(marker) == marked, where
        assert r.ttl(marker) == (-2 if marked is None else -1), where
        assert not r.exists(ledger), where
        return reply

    assert got_hash == want_hash, where
    assert r.get(marker) == want_mark, where
    assert r.ttl(marker) == marker_ttl(args), where

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


def outcome(reply):
    """The path a reply took, for the coverage checks."""
    if reply[0] == "error":
        return reply[1].split(" of ")[0]
    if reply[0] == 0:
        return 0
    return ("applied", reply[3])


@pytest.fixture(scope="module")
def script_redis(tmp_root):
    """One real redis-server for the module: these tests only run
    scripts, each on keys it first deletes, so they share it (a server per
    test would spend most of the run starting servers)."""
    from conftest import RedisServer
    server = RedisServer(tmp_root).start()
    yield server
    server.stop()


@pytest.fixture
def script(script_redis):
    """(client, sha of the credit script) on an empty database."""
    r = script_redis.client
    r.flushall()
    with open(SCRIPT) as f:
        return r, r.script_load(f.read())


def test_script_ordinary_credits(script):
    """Well-formed records and arguments, as the module sends them: with
    and without a release time (ARGV[10]) and an order_ttl (ARGV[9]), the
    marker
    in its long form and the record's pending list as the script keeps
    it."""
    r, sha = script
    rnd = random.Random(5)
    for i in range(300):
        rec = {f: str(rnd.randint(0, 10 ** 6)) for f in FIELDS
               if rnd.random() < 0.9}
        ts = 1700000000 + rnd.randint(-10 ** 6, 10 ** 6)
        if rnd.random() < 0.3:
            rec["pending"] = pending_text(sorted(
                [ts + rnd.randint(-3600, 3600), rnd.randint(0, 500)]
                for _ in range(rnd.randint(1, 3))))
        args = [str(rnd.randint(0, 5000)),
                str(rnd.choice([0, 0, rnd.randint(0, 10 ** 6)])),
                str(ts),
                rnd.choice(["0", "100"]), rnd.choice(["0", "0", "86400"]),
                "order-%d" % i, "%d.%02d" % (rnd.randint(0, 999),
                                             rnd.randint(0, 99))]
        if rnd.random() < 0.6:
            args += ["", rnd.choice(["2592000", "86400", "60"]),
                     rnd.choice(["0", "0", str(ts + 3600), str(ts + 1)])]
        reply = run_case(r, sha, rec, args,
                         rnd.choice([None] * 9 + ["3:0", "3:0:1:0:0:0:0"]))
        assert reply[0] in (0, 1)


def test_script_hostile_records_and_arguments(script):
    """Leading zeros, fields that are not counts, values at 2^53, dates on
    either side of the order's, duplicates, hostile order_ttl and release
    arguments and hostile pending lists: the script agrees with the model
    on every case, and a refused credit writes nothing."""
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
        now = int(count(ts)) if count(ts) and int(ts) < LIMIT else 1700000000
        release = rnd.choice(["0", str(now + 60), str(now + 3600),
                              "00" + str(now + 60), str(now), str(now - 1),
                              "60", "", "x", "-60", "1.5", " %d" % (now + 1),
                              str(LIMIT), str(LIMIT - 1), "9" * 20])
        lock = int(release) - now if count(release) and \
            now < int(release) < LIMIT else 0
        pending = hostile_pending(rnd, now, lock)
        if pending is not None:
            rec["pending"] = pending
        args = [hostile_arg(rnd), hostile_arg(rnd, near=rec.get("points")
                                              if count(rec.get("points"))
                                              else None),
                ts, rnd.choice(["0", "3", "03", "3.0", " 3"]),
                rnd.choice(["0", "600", "0600", "6e2", "600.0"]),
                "o-%d" % i, rnd.choice(["1.00", "", "12,5", "7", "1.",
                                        "0012.50", " 1"])]
        extra = rnd.randrange(4)
        if extra >= 1:
            args.append(rnd.choice(["", "0", "1"]))
        if extra >= 2:
            args.append(rnd.choice(["60", "0060", "2592000", "0", "000",
                                    "", "x", "-1", "1.5", " 60"]))
        if extra >= 3:
            args.append(release)
        reply = run_case(r, sha, rec, args,
                         rnd.choice([None] * 15 + ["7:1", "7:1:5:0:0:0:9"]))
        seen.add(outcome(reply))

    # every path was taken
    assert seen >= {0, ("applied", 0), ("applied", 1),
                    "LOYALTY bad arguments", "LOYALTY points",
                    "LOYALTY lifetime", "LOYALTY orders",
                    "LOYALTY pending", "LOYALTY balance"}, seen


def test_script_hostile_pending(script):
    """A record whose pending list is anything: malformed lists are
    refused, due entries are released into points and lifetime before
    the redeem is checked, entries not due are kept (canonical), a locked
    order's points join the entry of their release second or are
    inserted by release time, totals at 2^53 are refused, and the field
    is deleted when no entry remains."""
    r, sha = script
    rnd = random.Random(1053)
    seen = set()
    for i in range(1500):
        now = rnd.choice([1700000000, rnd.randint(0, 10 ** 10),
                          LIMIT - rnd.randint(1, 10 ** 6)])
        lock = rnd.choice([0, 0, 1, 60, 3600, rnd.randint(1, 10 ** 6)])
        rec = {"points": str(rnd.choice([0, rnd.randint(0, 10 ** 6),
                                         LIMIT - rnd.randint(1, 10 ** 6)])),
               "lifetime": str(rnd.choice([0, rnd.randint(0, 10 ** 9),
                                           LIMIT - rnd.randint(1, 10 ** 6)])),
               "orders": str(rnd.randint(0, 100))}
        pending = hostile_pending(rnd, now, lock)
        if pending is not None:
            rec["pending"] = pending
        args = [str(rnd.choice([0, rnd.randint(1, 10 ** 4),
                                rnd.randint(0, 10 ** 9)])),
                str(rnd.choice([0, rnd.randint(0, 10 ** 6), int(rec["points"])
                                + rnd.randint(0, 10 ** 6)])),
                str(now), rnd.choice(["0", "100"]),
                rnd.choice(["0", "86400"]), "o-%d" % i, "9.99", "",
                str(rnd.choice([60, 86400, MARK_TTL])),
                str(now + lock) if lock else "0"]
        reply = run_case(r, sha, rec, args, rnd.choice([None] * 20 + ["1:0"]))
        o = outcome(reply)
        if reply[0] == 1:
            o = ("applied", reply[3], reply[1].endswith(":0"),
                 bool(reply[4]))
        seen.add(o)
    assert seen >= {0, "LOYALTY pending", "LOYALTY balance",
                    ("applied", 0, True, False), ("applied", 0, True, True),
                    ("applied", 0, False, True), ("applied", 1, False, True),
                    ("applied", 1, True, False)}, seen


@pytest.mark.parametrize("pending", MALFORMED_PENDING)
def test_script_malformed_pending_refused(script, pending):
    """A pending field that is not a list of counts below 2^53 is refused
    with "pending of <key> is not a list", and nothing is written, also
    for a credit that is a duplicate or that is not locked."""
    r, sha = script
    rec = {"points": "10", "lifetime": "10", "orders": "1",
           "pending": pending}
    for args in (["5", "0", "1000", "100", "600", "o", "1", "", "60", "1030"],
                 ["5", "0", "1000", "100", "600", "o", "1"]):
        for marked in (None, "5:0"):
            reply = run_case(r, sha, rec, args, marked)
            assert reply == ("error", "LOYALTY pending of loyalty:{m} is "
                                      "not a list"), (args, marked)


@pytest.mark.parametrize("points,earned,args,want_reply,want_hash,entry", [
    # locked: earned goes into a pending entry, not into points/lifetime
    ("10", "5", ("2", "1000", "4600"),
     [1, "5:2:9.99:0:0:0:4600", 8, 0, 5],
     {"points": "8", "lifetime": "10", "pending": "4600:5"}, "5"),
    # a release of 0 is no lock
    ("10", "5", ("2", "1000", "0"), [1, "5:2:9.99:0:0:0:0", 13, 0, 0],
     {"points": "13", "lifetime": "15"}, None),
    # nor is one that is not after the order
    ("10", "5", ("2", "1000", "1000"), [1, "5:2:9.99:0:0:0:0", 13, 0, 0],
     {"points": "13", "lifetime": "15"}, None),
    ("10", "5", ("2", "1000", "999"), [1, "5:2:9.99:0:0:0:0", 13, 0, 0],
     {"points": "13", "lifetime": "15"}, None),
    # an order that earns nothing locks nothing
    ("10", "0", ("2", "1000", "4600"), [1, "0:2:9.99:0:0:0:0", 8, 0, 0],
     {"points": "8", "lifetime": "10"}, None),
    # leading zeros in the release
    ("10", "5", ("0", "1000", "0001060"),
     [1, "5:0:9.99:0:0:0:1060", 10, 0, 5],
     {"points": "10", "lifetime": "10", "pending": "1060:5"}, "5"),
    # the release at 2^53 - 1 is kept exactly
    ("0", "1", ("0", "1000", str(LIMIT - 1)),
     [1, "1:0:9.99:0:0:0:%d" % (LIMIT - 1), 0, 0, 1],
     {"points": "0", "lifetime": "10", "pending": "%d:1" % (LIMIT - 1)},
     "1"),
    # short: the redeem is checked against points, not pending
    ("3", "5", ("4", "1000", "1060"), [1, "5:3:9.99:0:0:0:1060", 0, 1, 5],
     {"points": "0", "lifetime": "10", "pending": "1060:5"}, "5"),
])
def test_script_lock(script, points, earned, args, want_reply, want_hash,
                     entry):
    """ARGV[10]: an order's points are locked until its release time (ts
    plus loyalty_pending, as nginx sends it), when that is after ts; the
    marker carries the release; the reply's fifth element and the
    ledger's "pending" are the points still locked after it."""
    r, sha = script
    rec = {"points": points, "lifetime": "10", "orders": "1"}
    redeem, ts, release = args
    full = [earned, redeem, ts, "100", "0", "o", "9.99", "", "600", release]
    assert run_case(r, sha, rec, full, None) == want_reply
    got = r.hgetall(KEY)
    assert {k: got[k] for k in got if k not in ("orders", "first_order",
                                                "last_order")} == want_hash
    ledger = r.xrange("loyalty:{m}:ledger")[0][1]
    assert ledger.get("pending") == entry


@pytest.mark.parametrize("ts,release,refused", [
    (1000, LIMIT, True),
    (1000, LIMIT - 1, False),
    (LIMIT - 2, LIMIT - 1, False),
    (1000, 10 ** 16, True),
    (1000, int("9" * 30), True),
])
def test_script_lock_overflow_refused(script, ts, release, refused):
    """A release time at 2^53 or beyond is refused as bad arguments
    (nothing written); one just below it is kept exactly."""
    r, sha = script
    rec = {"points": "0", "lifetime": "0", "orders": "0"}
    reply = run_case(r, sha, rec, ["1", "0", str(ts), "3", "0", "o", "1",
                                   "", "60", str(release)], None)
    if refused:
        assert reply == ("error", "LOYALTY bad arguments")
    else:
        assert reply == [1, "1:0:1:0:0:0:%d" % release, 0, 0, 1]


@pytest.mark.parametrize("ttl,want", [
    (None, MARK_TTL), ("60", 60), ("0060", 60), ("86400", 86400),
    ("2", 2), ("31536000", 31536000),
    ("0", None), ("000", None), ("", None), ("x", None), ("-60", None),
    ("60.0", None), (" 60", None), ("6e1", None),
])
def test_script_order_ttl(script, ttl, want):
    """ARGV[9]: the marker lives order_ttl seconds (30 days when not
    given); "0" or anything but a count is refused as bad arguments and
    writes nothing."""
    r, sha = script
    rec = {"points": "1", "lifetime": "1", "orders": "1"}
    args = ["5", "0", "1700000000", "100", "0", "o", "5.00"]
    if ttl is not None:
        args += ["", ttl]
    reply = run_case(r, sha, rec, args, None)
    if want is None:
        assert reply == ("error", "LOYALTY bad arguments")
    else:
        assert reply == [1, "5:0:5.00:0:0:0:0", 6, 0, 0]
        assert r.ttl("loyalty:{m}:order:o") == want


def test_script_order_ttl_too_large_refused(script):
    """An order_ttl Redis cannot keep as an expiry: the credit is refused
    with an error and nothing is written."""
    r, sha = script
    rec = {"points": "1", "lifetime": "1", "orders": "1"}
    key, marker, ledger = KEY, "loyalty:{m}:order:o", "loyalty:{m}:ledger"
    for ttl in ("9" * 30, str(2 ** 63), str(2 ** 62)):
        r.delete(key, marker, ledger)
        r.hset(key, mapping=rec)
        reply = evalsha(r, sha, (key, marker, ledger),
                        ["5", "0", "1700000000", "100", "0", "o", "5", "",
                         ttl, "60"])
        assert reply[0] == "error", ttl
        assert r.hgetall(key) == rec, ttl
        assert not r.exists(marker, ledger), ttl


@pytest.mark.parametrize("pending,ts,redeem,want_reply,want_points,"
                         "want_lifetime,want_pending", [
    # due entries (release <= ts) are released before the redeem check
    ("999:50", 1000, "40", [1, "0:40:1:0:0:0:0", 10, 0, 0], 10, 60, None),
    ("1000:50", 1000, "40", [1, "0:40:1:0:0:0:0", 10, 0, 0], 10, 60, None),
    ("1001:50", 1000, "40", [1, "0:0:1:0:0:0:0", 0, 1, 50], 0, 10,
     "1001:50"),
    ("0900:5,01000:6,1001:7,2000:8", 1000, "20",
     [1, "0:11:1:0:0:0:0", 0, 1, 15], 0, 21, "1001:7,2000:8"),
    # an entry of 0 points not due is kept; one due goes
    ("500:0,1500:0", 1000, "0", [1, "0:0:1:0:0:0:0", 0, 0, 0], 0, 10,
     "1500:0"),
    # empty: nothing to release, the field is left as it is
    ("", 1000, "0", [1, "0:0:1:0:0:0:0", 0, 0, 0], 0, 10, ""),
])
def test_script_pending_released(script, pending, ts, redeem, want_reply,
                                 want_points, want_lifetime, want_pending):
    """Entries whose release time has come are released into points and
    lifetime by the credit, the redeem sees them; the others are kept,
    and the field is deleted when none remains."""
    r, sha = script
    rec = {"points": "0", "lifetime": "10", "orders": "1",
           "pending": pending}
    reply = run_case(r, sha, rec, ["0", redeem, str(ts), "100", "0", "o",
                                   "1", "", "60", str(ts + 3600)], None)
    assert reply == want_reply
    got = r.hgetall(KEY)
    assert int(got["points"]) == want_points
    assert int(got["lifetime"]) == want_lifetime
    assert got.get("pending") == want_pending


@pytest.mark.parametrize("pending,ts,lock,want", [
    # the same second: merged
    ("1060:5", 1000, 60, "1060:12"),
    ("1030:1,1060:5,1090:2", 1000, 60, "1030:1,1060:12,1090:2"),
    # before, between and after existing entries
    ("1090:2", 1000, 60, "1060:7,1090:2"),
    ("1030:1,1090:2", 1000, 60, "1030:1,1060:7,1090:2"),
    ("1030:1", 1000, 60, "1030:1,1060:7"),
    # a due entry released while the order's is inserted
    ("999:4,1090:2", 1000, 60, "1060:7,1090:2"),
    ("0999:4,001060:05", 1000, 60, "1060:12"),
])
def test_script_pending_insertion(script, pending, ts, lock, want):
    """A locked order's points join the entry of its release second, or
    a new entry inserted by release time, wherever it falls."""
    r, sha = script
    rec = {"points": "0", "lifetime": "0", "orders": "0",
           "pending": pending}
    reply = run_case(r, sha, rec, ["7", "0", str(ts), "100", "0", "o", "1",
                                   "", "60", str(ts + lock)], None)
    assert reply[0] == 1 and reply[4] == sum(
        v for _, v in pending_list(want))
    assert r.hget(KEY, "pending") == want


@pytest.mark.parametrize("points,lifetime,pending,earned,ts,refused", [
    # totals with pending at 2^53 are refused
    (LIMIT - 11, 0, "2000:10", 0, 1000, False),
    (LIMIT - 10, 0, "2000:10", 0, 1000, True),
    (LIMIT - 11, 0, "2000:10", 1, 1000, True),
    (0, LIMIT - 11, "2000:10", 0, 1000, False),
    (0, LIMIT - 10, "2000:10", 0, 1000, True),
    # due entries count the same
    (LIMIT - 11, 0, "500:10", 0, 1000, False),
    (LIMIT - 10, 0, "500:10", 0, 1000, True),
    (LIMIT - 12, 0, "500:5,2000:5", 1, 1000, False),
    (LIMIT - 11, 0, "500:5,2000:5", 1, 1000, True),
    # entries that each fit but add up to 2^53
    (0, 0, "2000:%d,3000:%d" % (LIMIT // 2, LIMIT // 2), 0, 1000, True),
    (0, 0, "2000:%d,3000:%d" % (LIMIT // 2, LIMIT // 2 - 1), 0, 1000,
     False),
    (0, 0, "500:%d,3000:%d" % (LIMIT // 2, LIMIT // 2), 0, 1000, True),
    (0, 0, "500:%d,3000:%d" % (LIMIT - 1, LIMIT - 1), 0, 1000, True),
])
def test_script_pending_overflow_refused(script, points, lifetime, pending,
                                         earned, ts, refused):
    """Overflow checks include the pending totals: points or lifetime
    plus all pending (due or not) plus the order's earned at 2^53 is
    refused; one below is credited exactly."""
    r, sha = script
    rec = {"points": str(points), "lifetime": str(lifetime), "orders": "0",
           "pending": pending}
    for release in ("0", str(ts + 3600)):
        reply = run_case(r, sha, rec, [str(earned), "0", str(ts), "3", "0",
                                       "o", "1", "", "60", release], None)
        if refused:
            assert reply == ("error", "LOYALTY balance of loyalty:{m} would "
                                      "overflow"), release
        else:
            assert reply[0] == 1, release


@pytest.mark.parametrize("pending", ["2000:1,1000:2", "3000:1,2000:2",
                                     "2000:1,1500:2,3000:3"])
def test_script_unsorted_pending(script, pending):
    """The field is kept by release time: a stored list out of order is
    either refused as not a list (nothing written) or written back in
    order, no point lost."""
    r, sha = script
    rec = {"points": "0", "lifetime": "0", "orders": "0",
           "pending": pending}
    key, marker, ledger = KEY, "loyalty:{m}:order:o", "loyalty:{m}:ledger"
    r.delete(key, marker, ledger)
    r.hset(key, mapping=rec)
    reply = evalsha(r, sha, (key, marker, ledger),
                    ["7", "0", "100", "0", "0", "o", "1", "", "60", "1750"])
    if reply[0] == "error":
        assert reply[1] == "LOYALTY pending of loyalty:{m} is not a list"
        assert r.hgetall(key) == rec and not r.exists(marker)
        return
    got = pending_list(r.hget(key, "pending"))
    releases = [t for t, _ in got]
    assert releases == sorted(set(releases)), (pending, got)
    assert sum(v for _, v in got) == sum(
        v for _, v in pending_list(pending)) + 7


def test_script_credit_sequence(script):
    """One customer, many orders over time with and without locks, late
    and repeated orders: after every credit, the whole record, every
    marker and its expiry, and the whole ledger are what the model says;
    no point is ever lost (points + pending + redeemed = earned, lifetime
    + pending = earned).  Same-second merges, insertions before later
    entries and releases all happen."""
    r, sha = script
    rnd = random.Random(77)
    key, ledger = "loyalty:{seq}", "loyalty:{seq}:ledger"
    r.delete(key, ledger)
    rec, marks, entries = {}, {}, []
    now, earned_total, redeemed_total = 1700000000, 0, 0
    seen = {"merged": 0, "inserted": 0, "released": 0, "entries": 0}
    for i in range(400):
        now += rnd.choice([0, 0, 1, 10, 59, 60, 61, 600, 3600])
        ts = now - rnd.choice([0, 0, 0, 1, 60, 3600])
        oid = "o%d" % rnd.randint(0, 250)
        marker = "%s:order:%s" % (key, oid)
        points = int(rec.get("points", "0"))
        lock = rnd.choice([0, 0, 1, 60, 60, 3600])
        args = [str(rnd.choice([0, rnd.randint(1, 100),
                                rnd.randint(1, 10 ** 6)])),
                str(rnd.choice([0, 0, rnd.randint(0, points + 10)])),
                str(ts), "1000", rnd.choice(["0", "86400"]), oid,
                "%d.%02d" % (rnd.randint(0, 99), rnd.randint(0, 99)),
                rnd.choice(["", "1"]),
                str(rnd.choice([3600, 86400, MARK_TTL])),
                str(ts + lock if lock else 0)]
        reply = evalsha(r, sha, (key, marker, ledger), args)
        want_reply, want_hash, want_mark, want_entry = model(
            rec, args, marks.get(oid), key=key)
        where = "step %d: record %r, args %r" % (i, rec, args)
        assert reply == want_reply, where
        if want_hash is not None:
            before = pending_list(rec.get("pending"))
            later = [t for t, _ in before if t > ts]
            if lock and int(args[0]):
                if ts + lock in later:
                    seen["merged"] += 1
                elif any(t > ts + lock for t in later):
                    seen["inserted"] += 1
            if len(later) < len(before):
                seen["released"] += 1
            rec = want_hash
            marks[oid] = want_mark
            entries.append(want_entry)
            earned_total += int(args[0])
            redeemed_total += int(want_mark.split(":")[1])
            assert r.ttl(marker) == int(args[8]), where
            seen["entries"] = max(seen["entries"], len(pending_list(
                rec.get("pending"))))
        assert r.hgetall(key) == rec, where
        assert [e for _, e in r.xrange(ledger)] == entries, where
        assert r.get(marker) == marks.get(oid), where
        pend = sum(v for _, v in pending_list(rec.get("pending")))
        assert int(rec["points"]) + pend + redeemed_total == earned_total
        assert int(rec["lifetime"]) + pend == earned_total
    for oid, value in marks.items():
        assert r.get("%s:order:%s" % (key, oid)) == value
    assert min(seen.values()) > 0 and seen["entries"] >= 3, seen


@pytest.mark.parametrize("points,redeem,earned,want", [
    ("100", "100", "0", [1, "0:100:1:0:0:0:0", 0, 0, 0]),  # the whole balance
    ("100", "101", "0", [1, "0:100:1:0:0:0:0", 0, 1, 0]),  # one point short
    ("0100", "00101", "005",
     [1, "5:100:1:0:0:0:0", 5, 1, 0]),                     # leading zeros
    (str(LIMIT - 2), "0", "1", [1, "1:0:1:0:0:0:0", LIMIT - 1, 0, 0]),
    ("0", "9" * 30, "7", [1, "7:0:1:0:0:0:0", 7, 1, 0]),
])
def test_script_edges(script, points, redeem, earned, want):
    r, sha = script
    rec = dict(points=points, lifetime="5", orders="1")
    args = [earned, redeem, "1700000000", "0", "0", "o", "1"]
    assert run_case(r, sha, rec, args, None) == want


@pytest.mark.parametrize("amount,kept", [
    ("19.99", "19.99"), ("0", "0"), ("0012.5000", "0012.5000"),
    ("120", "120"), ("12.", ""), ("", ""), ("12,5", ""), ("-1", ""),
    ("1.2345", "1.2345"), ("1.23456", ""), ("999999999999.9999",
                                            "999999999999.9999"),
    ("1234567890123", ""),
    (" 1", ""), ("1e3", ""), ("1.2.3", ""), (".5", ""), ("abc", ""),
])
def test_script_marker_amount(script, amount, kept):
    """The marker keeps ARGV[7] as sent when it is a decimal number, else
    an empty amount; the ledger keeps ARGV[7] as sent."""
    r, sha = script
    rec = dict(points="0", lifetime="0", orders="0")
    reply = run_case(r, sha, rec, ["3", "0", "1700000000", "5", "0", "o",
                                   amount], None)
    assert reply == [1, "3:0:%s:0:0:0:0" % kept, 3, 0, 0]
    assert r.xrange("loyalty:{m}:ledger")[0][1]["amount"] == amount


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
           "first_order": "1600000000", "last_order": "1600000000",
           "pending": "1600000000:3,1800000000:4"}
    r.hset(key, mapping=rec)
    if kind == "string":
        r.set(ledger, "not a stream")
    else:
        r.hset(ledger, "not", "a stream")
    for lock in ("0", "60"):
        args = ["5", "2", "1700000000", "100", "86400", "o", "5.00", "",
                "600", lock]
        with pytest.raises(redis_lib.ResponseError,
                           match=r"^LOYALTY ledger loyalty:\{m\}:ledger: "
                                 r"WRONGTYPE "):
            r.evalsha(sha, 3, key, mark, ledger, *args)
        assert r.hgetall(key) == rec
        assert r.ttl(key) == -1
        assert not r.exists(mark)
        assert r.type(ledger) == kind
        assert r.ttl(ledger) == -1

    # without a ledger the same credit applies (the due entry released)
    reply = r.evalsha(sha, 3, key, mark, ledger, "5", "2", "1700000000",
                      "0", "0", "o", "5.00")
    assert reply == [1, "5:2:5.00:0:0:0:0", 13, 0, 4]
    assert r.hget(key, "pending") == "1800000000:4"
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
    assert run("0", "60", "1700003600") == ([0, "5:0"], 0)
    reply, moved = run("1")
    assert reply == [0, "5:0"] and moved > 0
    reply, moved = run("1", "60", "1700003600")
    assert reply == [0, "5:0"] and moved > 0
    assert r.get(marker) == "5:0"
    if ttl:
        assert pttl - 2000 <= r.pttl(marker) <= pttl
    else:
        assert r.ttl(marker) == -1
    assert r.hgetall(key) == {"points": "5", "lifetime": "5", "orders": "1"}
    assert not r.exists(ledger)
