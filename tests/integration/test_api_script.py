"""The refund and adjustment script on its own: every path of
ngx_module/ngx_http_loyalty_api.lua, run by a real redis-server, against
a model of it written in Python with exact integer arithmetic.

Orders are credited by the credit script (ngx_http_loyalty_credit.lua,
modelled in test_credit_script.py), then refunded in any order, partly,
fully, again and again, while adjustments come and go and the clock moves
past the release of locked points.  After every call the reply, the whole
customer hash, every marker (value and expiry) and the whole ledger are
compared with the model.  The hostile cases feed the script what another
tool, a hand edit or a bug could leave behind: records that are not
counts, pending lists that are not lists, markers that are not an
order's, arguments that are not numbers.

What the script must do (the SPEC of refunds and adjustments):
  refund   ARGV[7] is the order's cumulative refunded amount (^\\d{1,12}
           (\\.\\d{1,4})?$) or "all".  The points reversed are
           floor(earned * refunded / amount) less those reversed before,
           taken from the order's own still-locked pending entry first,
           then from points; what points cannot cover is forgiven.  A
           full refund also gives back the points the order redeemed
           (once).  lifetime drops by what was not taken from pending.
  adjust   ARGV[7] is a signed number of points; a negative one larger
           than points is insufficient; a marker makes it idempotent.
Nothing is written unless the reply is "applied"; due pending entries
(release <= now) count as released in every reply.

LOYALTY_API_SCRIPT runs the same cases against another version of the
script.
"""

import os
import random
import re
import time

import pytest

from test_credit_script import (LIMIT, MALFORMED_PENDING, count, evalsha,
                                hostile_count, hostile_pending, number,
                                pending_list, pending_text)
from test_credit_script import SCRIPT as CREDIT_SCRIPT
from test_credit_script import model as credit_model

API_SCRIPT = os.environ.get("LOYALTY_API_SCRIPT") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "ngx_module",
    "ngx_http_loyalty_api.lua")

KEY = "loyalty:{a}"
MARKER = "loyalty:{a}:order:o"
ADJUST = "loyalty:{a}:adjust:j"
LEDGER = "loyalty:{a}:ledger"
NOW = 1700000000
SEEDED_TTL = 5000           # the expiry given to markers seeded by a test


# --------------------------------------------------------------------------
# the model


def fixed(s):
    """An amount ("59.9", "120", "0.0001") in ten-thousandths, or None."""
    if not isinstance(s, str):
        return None
    m = re.fullmatch(r"([0-9]+)(\.?)([0-9]*)", s)
    if (not m or len(m.group(1)) > 12 or len(m.group(3)) > 4
            or (m.group(2) and not m.group(3))):
        return None
    return int(m.group(1) + m.group(3).ljust(4, "0"))


def show(x, rnd=None):
    """An amount of x ten-thousandths as the shop may send it: with or
    without trailing zeros in the fraction, with leading zeros."""
    ip, fp = divmod(x, 10 ** 4)
    frac = "%04d" % fp
    k = len(frac.rstrip("0"))
    pad = 0
    if rnd is not None:
        k = rnd.randint(k, 4)
        pad = rnd.choice([0, 0, 0, 1, 3])
    ints = str(ip)
    if len(ints) + pad <= 12:
        ints = "0" * pad + ints
    return ints + ("." + frac[:k] if k else "")


class Invalid:
    """An {"invalid", "error", why} reply: why is free text."""

    def __eq__(self, other):
        return (isinstance(other, list) and len(other) == 3
                and other[:2] == ["invalid", "error"]
                and isinstance(other[2], str) and other[2] != "")

    def __repr__(self):
        return "['invalid', 'error', <why>]"


INVALID = Invalid()


def invalid():
    return [INVALID], None, None, None


def same(got, want):
    if want and want[0] is INVALID:
        return INVALID == got
    return got == want


def error(message):
    return ("error", message), None, None, None


def record(h, now, key):
    """The customer's record with the due pending entries released, or
    an error message."""
    points = count(h.get("points", "0"))
    lifetime = count(h.get("lifetime", "0"))
    if points is None:
        return None, "LOYALTY points of %s is not a count" % key
    if lifetime is None:
        return None, "LOYALTY lifetime of %s is not a count" % key
    entries = pending_list(h.get("pending"))
    if entries is None:
        return None, "LOYALTY pending of %s is not a list" % key
    due = sum(v for t, v in entries if t <= now)
    left = [[t, v] for t, v in entries if t > now]
    rec = dict(p=int(points) + due, l=int(lifetime) + due, left=left,
               still=sum(v for _, v in left), list=h.get("pending"))
    if rec["p"] + rec["still"] >= LIMIT or rec["l"] + rec["still"] >= LIMIT:
        return None, "LOYALTY balance of %s would overflow" % key
    return rec, None


def stored(h, rec):
    """The hash an applied call writes."""
    new = dict(h)
    new["points"], new["lifetime"] = str(rec["p"]), str(rec["l"])
    entries = [e for e in rec["left"] if e[1] > 0]
    if entries:
        new["pending"] = pending_text(entries)
    elif rec["list"]:
        del new["pending"]
    return new


def balance(status, rec):
    return [status, "points", rec["p"], "pending", rec["still"]]


def unchanged(h, now, key):
    rec, err = record(h, now, key)
    if err:
        return error(err)
    return balance("unchanged", rec), None, None, None


def parse_marker(mark):
    """The fields of an order's marker, or None when it is not one."""
    f = mark.split(":")
    if len(f) not in (2, 7):
        return None
    m = dict(e=count(f[0]), r=count(f[1]), amount="", refunded="0",
             reversed="0", restored="0", release="0", raw=f)
    if len(f) == 7:
        m.update(amount=f[2], refunded=f[3], reversed=count(f[4]),
                 restored=count(f[5]), release=count(f[6]))
    counts = [m[k] for k in ("e", "r", "reversed", "restored", "release")]
    if (None in counts or int(m["e"]) >= LIMIT
            or any(int(c) >= LIMIT for c in counts)
            or (m["amount"] != "" and fixed(m["amount"]) is None)
            or (m["refunded"] != "all" and fixed(m["refunded"]) is None)):
        return None
    return m


def api_model(h, mark, args, key=KEY, mkey=MARKER):
    """What the API script must answer and write: (reply, new hash or
    None, new marker value or None, ledger entry or None).  An error
    reply is ("error", message).  Nothing is written unless the reply is
    applied."""
    kind, now_s, keep, expire, ottl, ident, value, reason = args
    # times and lengths Redis takes (at most 12 digits), a marker's life
    # not 0: checked before anything is written
    small = [count(a) for a in (now_s, keep, expire, ottl)]
    if None in small or any(len(a) > 12 for a in small) or small[3] == "0":
        return error("LOYALTY bad arguments")
    now = int(now_s)
    ts = count(now_s)

    if kind == "refund":
        if mark is None:
            return ["unknown_order"], None, None, None
        m = parse_marker(mark)
        if m is None:
            return error("LOYALTY marker %s is not an order's" % mkey)
        e, redeemed = int(m["e"]), int(m["r"])
        rev, rst, rel = (int(m[k]) for k in ("reversed", "restored",
                                              "release"))
        amount = m["amount"]
        total = fixed(amount) if amount != "" else None
        before = total if m["refunded"] == "all" else fixed(m["refunded"])
        # "all" marks a full refund (an order of amount 0 refunded 0 is
        # not refunded yet: its redeemed points are still to give back)
        done = m["refunded"] == "all"
        if value == "all":
            full, now_refunded = True, amount if amount != "" else "all"
        else:
            want = fixed(value)
            if want is None:
                return invalid()
            if total is None:
                if done:
                    return unchanged(h, now, key)
                return invalid()
            if want > total:
                return invalid()
            # the whole amount is a full refund, also of an order of 0
            if done or (not before < want and want != total):
                return unchanged(h, now, key)
            full, now_refunded, before = want == total, value, want

        rec, err = record(h, now, key)
        if err:
            return error(err)
        if done:
            return balance("unchanged", rec), None, None, None

        if full:
            target = e
        else:
            target = 0 if total == 0 else e * before // total
        take = max(0, target - rev)
        give = 0
        if full:
            give = max(0, redeemed - rst)
            rst += give
            if rec["p"] + give + rec["still"] >= LIMIT:
                return error("LOYALTY balance of %s would overflow" % key)
            rec["p"] += give

        # from the order's own entry still locked first, then from points
        locked = 0
        if rel > now:
            for entry in rec["left"]:
                if entry[0] == rel:
                    locked = min(take, entry[1], max(0, e - rev))
                    entry[1] -= locked
                    rec["still"] -= locked
                    break
        rest = take - locked
        taken = min(rest, rec["p"])
        forgiven = rest - taken
        rec["p"] -= taken
        rec["l"] = max(0, rec["l"] - rest)

        f = m["raw"]
        mark2 = ":".join([f[0], f[1], amount,
                          "all" if full else now_refunded, str(target),
                          str(rst), str(rel)])
        new = stored(h, rec)
        entry = None
        if count(keep) != "0":
            entry = dict(kind="refund", order=ident, refunded=now_refunded,
                         reversed=str(take), restored=str(give),
                         forgiven=str(forgiven), points=str(rec["p"]), ts=ts)
            if new.get("pending"):
                entry["pending"] = str(rec["still"])
            if reason != "":
                entry["reason"] = reason
        return (["applied", "reversed", take, "restored", give,
                 "forgiven", forgiven, "points", rec["p"], "pending",
                 rec["still"]], new, mark2, entry)

    if kind == "adjust":
        sign, digits = value[:1], value
        if sign in ("+", "-"):
            digits = value[1:]
        d = count(digits)
        if d is None or len(digits) > 18:
            return invalid()
        if reason == "":
            return invalid()
        rec, err = record(h, now, key)
        if err:
            return error(err)
        if mark is not None:
            return balance("unchanged", rec), None, None, None
        n = int(d)
        if sign == "-":
            if rec["p"] < n:
                return balance("insufficient", rec), None, None, None
            rec["p"] -= n
            earned, redeemed, mark2 = "0", d, "-" + d
        else:
            if (len(d) > 16 or rec["p"] + rec["still"] + n >= LIMIT
                    or rec["l"] + rec["still"] + n >= LIMIT):
                return invalid()
            rec["p"] += n
            rec["l"] += n
            earned, redeemed, mark2 = d, "0", "+" + d
        entry = None
        if count(keep) != "0":
            entry = dict(kind="adjust", adjustment=ident, earned=earned,
                         redeemed=redeemed, points=str(rec["p"]), ts=ts,
                         reason=reason)
        return (balance("applied", rec), stored(h, rec), mark2, entry)

    return error("LOYALTY bad arguments")


# --------------------------------------------------------------------------
# running it


@pytest.fixture(scope="module")
def script_redis(tmp_root):
    """One real redis-server for the module (these tests only run
    scripts), flushed before each test."""
    from conftest import RedisServer
    server = RedisServer(tmp_root).start()
    yield server
    server.stop()


@pytest.fixture
def scripts(script_redis):
    """(client, sha of the credit script, sha of the API script) on an
    empty database."""
    r = script_redis.client
    r.flushall()
    with open(CREDIT_SCRIPT) as f:
        credit = r.script_load(f.read())
    with open(API_SCRIPT) as f:
        api = r.script_load(f.read())
    return r, credit, api


def check_ttl(got_ms, spec, where):
    """got_ms a PTTL; spec None (no expiry), "gone", or (set at
    monotonic time, seconds)."""
    if spec == "gone":
        assert got_ms == -2, where
    elif spec is None:
        assert got_ms == -1, where
    else:
        t0, seconds = spec
        elapsed = (time.monotonic() - t0) * 1000
        assert seconds * 1000 - elapsed - 1500 <= got_ms <= seconds * 1000, (
            got_ms, spec, where)


def run_api_case(r, sha, rec, mark, args, mkey=MARKER):
    """One call on a seeded customer (hash rec, marker mark with an
    expiry of SEEDED_TTL s): the reply and everything written checked
    against the model.  Returns the reply."""
    r.delete(KEY, mkey, LEDGER)
    if rec:
        r.hset(KEY, mapping=rec)
    if mark is not None:
        r.set(mkey, mark, ex=SEEDED_TTL)
    t0 = time.monotonic()
    reply = evalsha(r, sha, (KEY, mkey, LEDGER), args)
    want, new, mark2, entry = api_model(rec, mark, args, KEY, mkey)
    where = "record %r, marker %r, args %r: got %r" % (rec, mark, args,
                                                      reply)
    assert same(reply, want), where

    seeded = None if mark is None else (t0, SEEDED_TTL)
    if new is None:
        assert r.hgetall(KEY) == rec, where
        assert r.ttl(KEY) == (-1 if rec else -2), where
        assert r.get(mkey) == mark, where
        check_ttl(r.pttl(mkey), seeded or "gone", where)
        assert not r.exists(LEDGER), where
        return reply

    assert reply[0] == "applied", where
    assert r.hgetall(KEY) == new, where
    assert r.get(mkey) == mark2, where
    if args[0] == "adjust":
        assert r.ttl(mkey) == int(args[4]), where
    else:
        check_ttl(r.pttl(mkey), seeded, where)           # KEEPTTL
    entries = [e for _, e in r.xrange(LEDGER)]
    assert entries == ([entry] if entry else []), where
    expire = int(count(args[3]))
    for k, exists in ((KEY, True), (LEDGER, entry is not None)):
        ttl = r.ttl(k)
        if not exists:
            assert ttl == -2, (k, where)
        elif expire:
            assert ttl == expire, (k, where)
        else:
            assert ttl == -1, (k, where)
    assert int(new["points"]) >= 0 and int(new["lifetime"]) >= 0, where
    return reply


def refund(oid, value, now=NOW, reason="", keep="100", expire="0"):
    return ["refund", str(now), keep, expire, "3600", oid, value, reason]


def adjust(aid, value, now=NOW, reason="goodwill", keep="100", expire="0",
           ottl="3600"):
    return ["adjust", str(now), keep, expire, ottl, aid, value, reason]


class World:
    """A customer in Redis and in the model side by side; every call is
    made on both and compared, verify() compares everything stored."""

    def __init__(self, r, credit_sha, api_sha, cid):
        self.r, self.credit_sha, self.api_sha = r, credit_sha, api_sha
        self.key = "loyalty:{%s}" % cid
        self.ledger = self.key + ":ledger"
        self.hash, self.marks, self.ttls, self.entries = {}, {}, {}, []
        self.hash_ttl = self.ledger_ttl = None
        self.orders = {}            # oid -> what the replies did to it
        self.seen = set()

    def order_key(self, oid):
        return "%s:order:%s" % (self.key, oid)

    def adjust_key(self, aid):
        return "%s:adjust:%s" % (self.key, aid)

    def _expire(self, seconds, ledger):
        t = time.monotonic()
        self.hash_ttl = (t, seconds)
        if ledger and self.entries:
            self.ledger_ttl = (t, seconds)

    def credit(self, args, legacy=False):
        """ARGV[1..10] of the credit script; legacy: then rewrite the
        marker in the short form of markers written before refunds."""
        mkey = self.order_key(args[5])
        reply = evalsha(self.r, self.credit_sha,
                        (self.key, mkey, self.ledger), args)
        want, new, mark, entry = credit_model(self.hash, args,
                                              self.marks.get(mkey),
                                              key=self.key)
        assert reply == want, ("credit", args, self.hash)
        self.seen.add("credit %s" % (reply[0],))
        if new is not None:
            self.hash = new
            if legacy:
                mark = ":".join(mark.split(":")[:2])
                self.r.set(mkey, mark, keepttl=True)
            self.marks[mkey] = mark
            self.ttls[mkey] = (time.monotonic(), int(count(args[8])))
            if entry is not None:
                self.entries.append(entry)
            if number(args[4]) > 0:
                self._expire(int(args[4]), number(args[3]) > 0)
            self.orders[args[5]] = dict(earned=int(count(args[0])),
                                        redeemed=int(mark.split(":")[1]),
                                        reversed=0, restored=0)
        return reply

    def api(self, args):
        mkey = (self.order_key if args[0] == "refund"
                else self.adjust_key)(args[5])
        reply = evalsha(self.r, self.api_sha, (self.key, mkey, self.ledger),
                        args)
        want, new, mark, entry = api_model(self.hash, self.marks.get(mkey),
                                           args, self.key, mkey)
        where = ("api", args, self.hash, self.marks.get(mkey), reply)
        assert same(reply, want), where
        self.seen.add("%s %s" % (args[0], reply[0]))
        if new is not None:
            self.hash = new
            self.marks[mkey] = mark
            if args[0] == "adjust":
                self.ttls[mkey] = (time.monotonic(), int(count(args[4])))
            if entry is not None:
                self.entries.append(entry)
            if count(args[3]) != "0":
                self._expire(int(count(args[3])), count(args[2]) != "0")
        if args[0] == "refund" and reply[0] == "applied":
            o = self.orders[args[5]]
            o["reversed"] += reply[2]
            assert o["reversed"] <= o["earned"], where
            if reply[4]:
                assert o["restored"] == 0, where     # restored only once
                o["restored"] = reply[4]
                assert o["restored"] == o["redeemed"], where
            if reply[6]:
                self.seen.add("forgiven")
            if reply[4]:
                self.seen.add("restored")
        return reply

    def verify(self):
        keys = sorted(self.marks)
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(self.key)
        pipe.pttl(self.key)
        pipe.xrange(self.ledger)
        pipe.pttl(self.ledger)
        pipe.keys(self.key + "*")
        for k in keys:
            pipe.get(k)
            pipe.pttl(k)
        got = pipe.execute()
        assert got[0] == self.hash
        check_ttl(got[1], self.hash_ttl if self.hash else "gone", "hash")
        assert [e for _, e in got[2]] == self.entries
        check_ttl(got[3], self.ledger_ttl if self.entries else "gone",
                  "ledger")
        want_keys = set(keys) | ({self.key} if self.hash else set()) | (
            {self.ledger} if self.entries else set())
        assert set(got[4]) == want_keys
        for i, k in enumerate(keys):
            assert got[5 + 2 * i] == self.marks[k], k
            check_ttl(got[6 + 2 * i], self.ttls[k], k)
        if self.hash:
            assert int(self.hash["points"]) >= 0


# --------------------------------------------------------------------------
# refunds, case by case


def credit_args(oid, earned, redeem, amount, ts=NOW, lock=0, ttl=86400,
                keep="100"):
    return [str(earned), str(redeem), str(ts), keep, "0", oid, amount, "",
            str(ttl), str(ts + lock if lock else 0)]


def test_api_refund_unknown_order(scripts):
    """A refund of an order without a marker (never credited, or its
    marker expired): {"unknown_order"}, nothing written, whatever the
    record holds and whatever is refunded."""
    r, _, sha = scripts
    for rec in ({}, {"points": "5", "lifetime": "7",
                     "pending": "%d:3" % (NOW - 1)},
                {"points": "x"}):
        for value in ("all", "10", "abc"):
            assert run_api_case(r, sha, rec, None, refund("o", value)) == [
                "unknown_order"]


def test_api_refund_partial_then_full(scripts):
    """Refunds of one order, the cumulative amount growing: each reverses
    floor(earned * refunded / amount) less what was reversed before; an
    amount not above the last is unchanged; one above the order's amount
    is invalid; the full refund reverses the rest and gives back the
    redeemed points, once."""
    r, credit, sha = scripts
    w = World(r, credit, sha, "a")
    r.hset(w.key, mapping={"points": "30", "lifetime": "30"})
    w.hash = {"points": "30", "lifetime": "30"}
    assert w.credit(credit_args("o", 100, 20, "50.00")) == [
        1, "100:20:50.00:0:0:0:0", 110, 0, 0]
    steps = [
        ("10", ["applied", "reversed", 20, "restored", 0, "forgiven", 0,
                "points", 90, "pending", 0], "100:20:50.00:10:20:0:0"),
        ("10.00", ["unchanged", "points", 90, "pending", 0], None),
        ("5", ["unchanged", "points", 90, "pending", 0], None),
        ("0", ["unchanged", "points", 90, "pending", 0], None),
        ("25.5", ["applied", "reversed", 31, "restored", 0, "forgiven", 0,
                  "points", 59, "pending", 0], "100:20:50.00:25.5:51:0:0"),
        ("25.5001", ["applied", "reversed", 0, "restored", 0, "forgiven", 0,
                     "points", 59, "pending", 0],
         "100:20:50.00:25.5001:51:0:0"),
        ("50.0001", INVALID, None),
        ("050", ["applied", "reversed", 49, "restored", 20, "forgiven", 0,
                 "points", 30, "pending", 0], "100:20:50.00:all:100:20:0"),
        ("all", ["unchanged", "points", 30, "pending", 0], None),
        ("50", ["unchanged", "points", 30, "pending", 0], None),
        ("49", ["unchanged", "points", 30, "pending", 0], None),
        ("60", INVALID, None),
    ]
    mkey = w.order_key("o")
    for value, want, mark in steps:
        before = w.marks[mkey]
        reply = w.api(refund("o", value, reason="r%s" % value))
        assert INVALID == reply if want is INVALID else reply == want, value
        assert w.marks[mkey] == (mark or before), value
        w.verify()
    assert w.hash == {"points": "30", "lifetime": "30", "orders": "1",
                      "first_order": str(NOW), "last_order": str(NOW)}
    assert [e["reversed"] for e in w.entries[1:]] == ["20", "31", "0", "49"]
    assert w.entries[-1] == dict(kind="refund", order="o", refunded="050",
                                 reversed="49", restored="20", forgiven="0",
                                 points="30", ts=str(NOW), reason="r050")


def test_api_refund_all_with_amount(scripts):
    """"all" on an order with an amount is the full refund: the marker
    then holds "all" as refunded; later numeric refunds up to the amount
    are unchanged, above it invalid."""
    r, credit, sha = scripts
    w = World(r, credit, sha, "a")
    w.credit(credit_args("o", 7, 0, "19.99"))
    assert w.api(refund("o", "9.99")) == [
        "applied", "reversed", 3, "restored", 0, "forgiven", 0, "points", 4,
        "pending", 0]
    assert w.api(refund("o", "all")) == [
        "applied", "reversed", 4, "restored", 0, "forgiven", 0, "points", 0,
        "pending", 0]
    assert w.marks[w.order_key("o")] == "7:0:19.99:all:7:0:0"
    for value in ("19.99", "19.9900", "10", "all"):
        assert w.api(refund("o", value)) == ["unchanged", "points", 0,
                                             "pending", 0]
    assert INVALID == w.api(refund("o", "20"))
    w.verify()


@pytest.mark.parametrize("mark,redeemed", [("12:5", 5), ("012:005", 5),
                                           ("12:0", 0), ("0:3", 3)])
def test_api_refund_short_form_marker(scripts, mark, redeemed):
    """A marker written before refunds ("<earned>:<redeemed>") has no
    amount: a numeric refund is invalid, "all" reverses everything and
    gives back the redeemed points, and writes
    "<earned>:<redeemed>::all:<earned>:<restored>:0"; afterwards any
    refund is unchanged (an invalid amount still invalid)."""
    r, _, sha = scripts
    rec = {"points": "100", "lifetime": "200"}
    f = mark.split(":")
    e = int(f[0])
    assert INVALID == run_api_case(r, sha, rec, mark, refund("o", "1"))
    reply = run_api_case(r, sha, rec, mark, refund("o", "all"))
    assert reply == ["applied", "reversed", e, "restored", redeemed,
                     "forgiven", 0, "points", 100 + redeemed - e,
                     "pending", 0]
    assert r.get(MARKER) == "%s:%s::all:%d:%d:0" % (f[0], f[1], e, redeemed)
    done = r.get(MARKER)
    rec = r.hgetall(KEY)
    for value in ("all", "1", "0", "999999999999.9999"):
        assert run_api_case(r, sha, rec, done, refund("o", value)) == [
            "unchanged", "points", 100 + redeemed - e, "pending", 0], value
    assert INVALID == run_api_case(r, sha, rec, done, refund("o", "x"))


def test_api_refund_no_amount_marker(scripts):
    """An order credited with an amount that is not a number has an empty
    amount in its (long) marker: only "all" refunds it, locked points
    included."""
    r, credit, sha = scripts
    w = World(r, credit, sha, "a")
    w.credit(credit_args("o", 40, 0, "12,50", lock=600))
    assert w.marks[w.order_key("o")] == "40:0::0:0:0:%d" % (NOW + 600)
    assert INVALID == w.api(refund("o", "12.50"))
    assert w.api(refund("o", "all", now=NOW + 10)) == [
        "applied", "reversed", 40, "restored", 0, "forgiven", 0, "points", 0,
        "pending", 0]
    assert w.marks[w.order_key("o")] == "40:0::all:40:0:%d" % (NOW + 600)
    assert "pending" not in w.hash
    assert w.api(refund("o", "5")) == ["unchanged", "points", 0, "pending", 0]
    w.verify()


def test_api_refund_locked_points(scripts):
    """Points of an order still locked are taken back from its own
    pending entry first (lifetime untouched by that part); once released
    they are taken from points and lifetime."""
    r, credit, sha = scripts
    w = World(r, credit, sha, "a")
    w.hash = {"points": "50", "lifetime": "50"}
    r.hset(w.key, mapping=w.hash)
    # another order locked until the same second, and one until later
    w.credit(credit_args("b", 30, 0, "30", lock=3600))
    w.credit(credit_args("o", 100, 0, "100", lock=3600))
    w.credit(credit_args("c", 8, 0, "8", ts=NOW + 1, lock=3600))
    assert w.hash["pending"] == "%d:130,%d:8" % (NOW + 3600, NOW + 3601)
    assert w.api(refund("o", "25", now=NOW + 100)) == [
        "applied", "reversed", 25, "restored", 0, "forgiven", 0,
        "points", 50, "pending", 113]
    assert w.hash["pending"] == "%d:105,%d:8" % (NOW + 3600, NOW + 3601)
    assert w.hash["lifetime"] == "50"
    assert w.entries[-1]["pending"] == "113"
    w.verify()
    # released (now past the release second): from points and lifetime
    assert w.api(refund("o", "50", now=NOW + 3600)) == [
        "applied", "reversed", 25, "restored", 0, "forgiven", 0,
        "points", 130, "pending", 8]
    assert (w.hash["points"], w.hash["lifetime"]) == ("130", "130")
    assert w.hash["pending"] == "%d:8" % (NOW + 3601)
    w.verify()
    # the other order of that second, fully, after its release
    assert w.api(refund("b", "all", now=NOW + 3602)) == [
        "applied", "reversed", 30, "restored", 0, "forgiven", 0,
        "points", 108, "pending", 0]
    assert "pending" not in w.hash
    assert (w.hash["points"], w.hash["lifetime"]) == ("108", "108")
    w.verify()


def test_api_refund_locked_full_before_release(scripts):
    """A full refund before the release takes the whole entry of the
    order: the entry goes, the field goes when none remains, and the
    ledger entry has no "pending" then (it has one while entries
    remain)."""
    r, credit, sha = scripts
    w = World(r, credit, sha, "a")
    w.credit(credit_args("o", 10, 0, "10.00", lock=60))
    w.credit(credit_args("p", 4, 0, "4", lock=120))
    reply = w.api(refund("o", "all", now=NOW + 10))
    assert reply == ["applied", "reversed", 10, "restored", 0, "forgiven", 0,
                     "points", 0, "pending", 4]
    assert w.hash["pending"] == "%d:4" % (NOW + 120)
    assert r.xrange(w.ledger)[-1][1]["pending"] == "4"
    reply = w.api(refund("p", "4", now=NOW + 10))
    assert reply == ["applied", "reversed", 4, "restored", 0, "forgiven", 0,
                     "points", 0, "pending", 0]
    assert "pending" not in r.hgetall(w.key)
    last = r.xrange(w.ledger)[-1][1]
    assert "pending" not in last, last
    w.verify()


def test_api_refund_forgiven(scripts):
    """Points already spent cannot be taken back: what points cannot
    cover is forgiven, points never go below 0, lifetime drops by all
    that was reversed (not below 0)."""
    r, credit, sha = scripts
    w = World(r, credit, sha, "a")
    w.credit(credit_args("o", 100, 0, "100"))
    w.credit(credit_args("spend", 0, 70, "1"))
    assert w.hash["points"] == "30"
    assert w.api(refund("o", "50")) == [
        "applied", "reversed", 50, "restored", 0, "forgiven", 20,
        "points", 0, "pending", 0]
    assert w.hash["lifetime"] == "50"
    assert w.api(refund("o", "all")) == [
        "applied", "reversed", 50, "restored", 0, "forgiven", 50,
        "points", 0, "pending", 0]
    assert (w.hash["points"], w.hash["lifetime"]) == ("0", "0")
    # the spending order refunded: its redeemed points come back
    assert w.api(refund("spend", "all")) == [
        "applied", "reversed", 0, "restored", 70, "forgiven", 0,
        "points", 70, "pending", 0]
    w.verify()
    # lifetime clamped at 0 (a record edited by hand)
    rec = {"points": "0", "lifetime": "3"}
    assert run_api_case(r, sha, rec, "10:0:10:0:0:0:0",
                        refund("o", "all")) == [
        "applied", "reversed", 10, "restored", 0, "forgiven", 10,
        "points", 0, "pending", 0]
    assert r.hget(KEY, "lifetime") == "0"


def test_api_refund_due_entries_count_released(scripts):
    """Pending entries whose release has come count as released in every
    reply; only an applied call writes the release."""
    r, _, sha = scripts
    rec = {"points": "5", "lifetime": "5",
           "pending": "%d:10,%d:20,%d:40" % (NOW - 5, NOW, NOW + 5)}
    # unchanged, insufficient: nothing written, the due counted
    assert run_api_case(r, sha, rec, "10:0:10:10:10:0:0",
                        refund("o", "5")) == [
        "unchanged", "points", 35, "pending", 40]
    assert run_api_case(r, sha, rec, None, adjust("j", "-36"),
                        mkey=ADJUST) == ["insufficient", "points", 35,
                                         "pending", 40]
    assert run_api_case(r, sha, rec, "+1", adjust("j", "-5"),
                        mkey=ADJUST) == ["unchanged", "points", 35,
                                         "pending", 40]
    # applied: written, the field keeps what is not due
    assert run_api_case(r, sha, rec, None, adjust("j", "-35"),
                        mkey=ADJUST) == ["applied", "points", 0,
                                         "pending", 40]
    assert r.hgetall(KEY) == {"points": "0", "lifetime": "35",
                              "pending": "%d:40" % (NOW + 5)}
    assert run_api_case(r, sha, rec, "10:0:10:5:5:0:0",
                        refund("o", "10", now=NOW + 5)) == [
        "applied", "reversed", 5, "restored", 0, "forgiven", 0,
        "points", 70, "pending", 0]
    assert r.hgetall(KEY) == {"points": "70", "lifetime": "70"}


@pytest.mark.parametrize("value", [
    "", "abc", "1.", ".5", "1.23456", "-1", "+1", "1e3", "1234567890123",
    "0000000000001", " 1", "1 ", "1\n", "ALL", "All", "all ", "0x10", "1,5",
    "1.2.3", "\u0661", "inf", "nan", "1_0",
])
def test_api_refund_refunded_not_an_amount(scripts, value):
    """A refunded amount that is not ^\\d{1,12}(\\.\\d{1,4})?$ nor "all"
    is invalid, and nothing is written."""
    r, _, sha = scripts
    rec = {"points": "50", "lifetime": "50"}
    assert INVALID == run_api_case(r, sha, rec, "10:0:100:0:0:0:0",
                                   refund("o", value))


@pytest.mark.parametrize("value,target", [
    ("999999999999.9999", 10), ("000000000001", 0), ("99.9999", 0),
    ("100000000000", 1), ("099999999999.9999", 0), ("0.0001", 0),
    ("999999999999.9998", 9), ("000999999999999.9999", None),
    ("1000000000000", None),
])
def test_api_refund_amount_forms(scripts, value, target):
    """Refunded amounts at the edges of the form: 12 integer and 4
    fraction digits, leading zeros (at most 12 integer digits in all)."""
    r, _, sha = scripts
    rec = {"points": "50", "lifetime": "50"}
    mark = "10:0:999999999999.9999:0:0:0:0"
    reply = run_api_case(r, sha, rec, mark, refund("o", value))
    if target is None:
        assert INVALID == reply
    else:
        assert reply[:3] == ["applied", "reversed", target]


def muldiv_cases(rnd):
    """(earned, amount, refunded before, refunded now): the arithmetic at
    its limits and at random."""
    top = 10 ** 16 - 1                  # 999999999999.9999
    earned = [LIMIT - 1, LIMIT - 2, LIMIT // 2 + 1, 2 ** 52 - 1,
              10 ** 15 + 7, 123456789, 1, 0]
    amounts = [top, top - 1, 1, 10 ** 4, 10 ** 12, 10 ** 16 // 3,
               1234567890123456, 10 ** 15 + 1, 9007199254740993,
               9007199254740991, 2]
    cases = []
    for e in earned:
        for a in amounts:
            for y in {a - 1, 1, a // 2, a // 3 * 2, max(1, a - 10 ** 4), a}:
                if 0 < y <= a:
                    cases.append((e, a, 0, y))
            if a > 2:
                cases.append((e, a, a // 2, a - 1))
                cases.append((e, a, 1, a - 1))
    for _ in range(3000):
        e = rnd.choice([rnd.randint(0, LIMIT - 1),
                        LIMIT - 1 - rnd.randint(0, 10 ** 6),
                        rnd.randint(0, 10 ** rnd.randint(1, 15))])
        a = rnd.choice([rnd.randint(1, top), top - rnd.randint(0, 10 ** 6),
                        rnd.randint(1, 10 ** rnd.randint(1, 16) - 1)])
        y = rnd.choice([rnd.randint(1, a), a - 1, a, max(1, a // 2)])
        x = rnd.choice([0, 0, rnd.randint(0, y)])
        if 0 < y:
            cases.append((e, a, min(x, y - 1) if y > 1 else 0, y))
    return cases


def test_api_refund_arithmetic(scripts):
    """The unit test for the arithmetic (no overflow): a partial refund
    reverses exactly floor(earned * refunded / amount) less what was
    reversed before (a full one: earned less that), with amounts of 12
    integer and 4 fraction digits (999999999999.9999), earned up to
    2^53 - 1 and refunded = amount - 0.0001, where the product has 32
    digits and a double would round; and thousands of random cases."""
    r, _, sha = scripts
    rnd = random.Random(1953)
    cases = muldiv_cases(rnd)
    top = 10 ** 16 - 1
    assert (LIMIT - 1, top, 0, top - 1) in cases
    # a double gets at least one of these wrong: the test can tell
    assert any(int((e * 1.0) * y / a) != e * y // a
               for e, a, x, y in cases if y < a)
    for start in range(0, len(cases), 400):
        batch = cases[start:start + 400]
        pipe = r.pipeline(transaction=False)
        wants = []
        for i, (e, a, x, y) in enumerate(batch):
            key = "loyalty:{m%d}" % i
            marker, ledger = key + ":order:o", key + ":ledger"
            before = e * x // a if x else 0
            amount, refunded = show(a, rnd), show(y, rnd)
            mark = "%d:0:%s:%s:%d:0:0" % (e, amount, show(x, rnd), before)
            target = e if y == a else e * y // a
            points = rnd.choice([LIMIT - 1, 0, target - before])
            pipe.delete(key, marker, ledger)
            pipe.hset(key, mapping={"points": str(points),
                                    "lifetime": str(LIMIT - 1)})
            pipe.set(marker, mark)
            pipe.evalsha(sha, 3, key, marker, ledger,
                         *refund("o", refunded, keep="0"))
            pipe.get(marker)
            taken = min(points, target - before)
            wants.append(((e, amount, mark, refunded),
                          ["applied", "reversed", target - before,
                           "restored", 0, "forgiven",
                           target - before - taken, "points",
                           points - taken, "pending", 0],
                          "%d:0:%s:%s:%d:0:0" % (e, amount, "all" if y == a
                                                 else refunded, target)))
        got = pipe.execute(raise_on_error=False)
        for i, (where, reply, mark) in enumerate(wants):
            assert got[5 * i + 3] == reply, where
            assert got[5 * i + 4] == mark, where


def test_api_refund_arithmetic_sum(scripts):
    """Any number of partial refunds of one order, in steps as small as
    0.0001, reverse in total exactly floor(earned * last refunded /
    amount): never more than earned, nothing lost to rounding."""
    r, credit, sha = scripts
    rnd = random.Random(4)
    orders = [(LIMIT - 1, 10 ** 16 - 1), (7, 3), (10 ** 15 + 3, 10 ** 12 + 7),
              (3, 10 ** 16 - 1),
              (rnd.randint(1, LIMIT - 1), rnd.randint(1, 10 ** 16 - 1))]
    for n, (e, a) in enumerate(orders):
        w = World(r, credit, sha, "s%d" % n)
        w.hash = {"points": str(LIMIT - 1 - e), "lifetime": "0"}
        r.hset(w.key, mapping=w.hash)
        w.credit(credit_args("o", e, 0, show(a), keep="0"))
        y, total = 0, 0
        while y < a:
            y = min(a, y + rnd.choice([1, 2, rnd.randint(1, a // 7 + 1)]))
            reply = w.api(refund("o", show(y, rnd), keep="0"))
            if reply[0] == "applied":
                total += reply[2]
            assert total == (e if y == a else e * y // a)
        assert total == e
        w.verify()


@pytest.mark.parametrize("mark", [
    "", "x", "5", "5:", ":5", "5:0:", "5:0:10:0:0:0", "5:0:10:0:0:0:0:0",
    "5:0:abc:0:0:0:0", "5:0:10:abc:0:0:0", "5:0:10:0:x:0:0",
    "5:0:10:0:0:-1:0", "5:0:10:0:0:0:1.5", "%d:0" % LIMIT,
    "%d:0:1:0:0:0:0" % LIMIT, "5:-1", "-5:0", "5:0:1234567890123:0:0:0:0",
    "5:0:1.23456:0:0:0:0", "5:0:5.:0:0:0:0", "5:0:.5:0:0:0:0",
    "5:0:10:ALL:0:0:0", "5:0:10:10.:0:0:0", " 5:0", "5:0 ",
    "5:0:10:0:0:0:0 ", "5:0:10:0:0:0:", "5:0:10:0::0:0", "\u0665:0",
    "5:0:10:1234567890123:0:0:0", "5:0:10:0:0:0:0\n", "+5:0",
])
def test_api_refund_corrupt_marker(scripts, mark):
    """A marker that is not an order's: a LOYALTY error naming it, and
    nothing written, whatever the refund."""
    r, _, sha = scripts
    rec = {"points": "50", "lifetime": "50"}
    for value in ("all", "5", "x"):
        assert run_api_case(r, sha, rec, mark, refund("o", value)) == (
            "error", "LOYALTY marker %s is not an order's" % MARKER), value


@pytest.mark.parametrize("mark", [
    "5:99999999999999999999:10:0:0:0:0",        # redeemed beyond 2^53
    "5:%d:10:0:0:0:0" % LIMIT,
    "5:0:10:0:99999999999999999999:0:0",        # reversed beyond 2^53
    "5:0:10:0:0:99999999999999999999:0",        # restored beyond 2^53
    "5:0:10:0:0:%d:0" % LIMIT,
    "5:0:10:0:0:0:99999999999999999999",        # release beyond 2^53
    "5:0:10:0:0:0:%d" % LIMIT,
])
def test_api_refund_marker_counts_beyond_2_53(scripts, mark):
    """A marker with a count at 2^53 or beyond (no script writes one; Lua
    numbers are not exact there) is corrupt: a LOYALTY error, nothing
    written."""
    r, _, sha = scripts
    rec = {"points": "50", "lifetime": "50", "pending": "%d:1" % (NOW + 9)}
    for value in ("all", "5"):
        reply = run_api_case(r, sha, rec, mark, refund("o", value))
        assert reply == ("error", "LOYALTY marker %s is not an order's"
                         % MARKER), (value, reply)


@pytest.mark.parametrize("mark", [
    "5:0:10:0:6:0:0",           # more reversed than earned
    "5:2:10:0:0:3:0",           # more restored than redeemed
    "5:2:10:20:0:0:0",          # more refunded than the amount
    "5:2:10:all:9:9:0",
])
def test_api_refund_inconsistent_marker(scripts, mark):
    """A marker no script can have written (more reversed than earned,
    more restored than redeemed, more refunded than the amount) is either
    refused with a LOYALTY error, or the refund writes a marker and a
    record that are still well formed (counts, the marker readable), with
    nothing reversed beyond earned."""
    r, _, sha = scripts
    rec = {"points": "50", "lifetime": "50"}
    for value in ("all", "5", "10"):
        r.delete(KEY, MARKER, LEDGER)
        r.hset(KEY, mapping=rec)
        r.set(MARKER, mark)
        reply = evalsha(r, sha, (KEY, MARKER, LEDGER), refund("o", value))
        if reply[0] == "error":
            assert reply[1].startswith("LOYALTY "), reply
            assert r.hgetall(KEY) == rec and r.get(MARKER) == mark
            continue
        new = r.get(MARKER)
        if reply[0] != "applied":
            assert new == mark and r.hgetall(KEY) == rec, (value, reply)
            continue
        assert parse_marker(new) is not None, (value, new)
        assert int(parse_marker(new)["reversed"]) <= 5, (value, new)
        h = r.hgetall(KEY)
        assert count(h["points"]) and count(h["lifetime"]), h
        if reply[0] == "applied":
            assert reply[2] <= 5, reply


def test_api_refund_amount_zero(scripts):
    """An order of amount 0 paid with points (it earned nothing): its
    first full refund ("all") is not "fully refunded before": it gives
    the redeemed points back; the next one is unchanged."""
    r, credit, sha = scripts
    w = World(r, credit, sha, "a")
    w.hash = {"points": "50", "lifetime": "50"}
    r.hset(w.key, mapping=w.hash)
    assert w.credit(credit_args("o", 0, 30, "0")) == [
        1, "0:30:0:0:0:0:0", 20, 0, 0]
    reply = evalsha(r, sha, (w.key, w.order_key("o"), w.ledger),
                    refund("o", "all"))
    assert reply == ["applied", "reversed", 0, "restored", 30, "forgiven", 0,
                     "points", 50, "pending", 0], reply
    assert r.hget(w.key, "points") == "50"
    reply = evalsha(r, sha, (w.key, w.order_key("o"), w.ledger),
                    refund("o", "all"))
    assert reply == ["unchanged", "points", 50, "pending", 0], reply


def test_api_refund_restored_overflow(scripts):
    """Giving back redeemed points that would take points to 2^53 is a
    LOYALTY overflow error, nothing written; one below is applied."""
    r, _, sha = scripts
    rec = {"points": str(LIMIT - 11), "lifetime": "0",
           "pending": "%d:5" % (NOW + 10)}
    assert run_api_case(r, sha, rec, "0:6:10:0:0:0:0",
                        refund("o", "all")) == (
        "error", "LOYALTY balance of %s would overflow" % KEY)
    assert run_api_case(r, sha, rec, "0:5:10:0:0:0:0",
                        refund("o", "all"))[:5] == [
        "applied", "reversed", 0, "restored", 5]


# --------------------------------------------------------------------------
# adjustments


def test_api_adjust(scripts):
    """Adjustments: a positive one adds to points and lifetime, a
    negative one takes from points (insufficient when larger than
    points); the marker ("+N"/"-N", order_ttl) makes each one apply once;
    the ledger entry says what it did and why."""
    r, credit, sha = scripts
    w = World(r, credit, sha, "a")
    w.hash = {"points": "10", "lifetime": "10",
              "pending": "%d:7,%d:100" % (NOW - 1, NOW + 60)}
    r.hset(w.key, mapping=w.hash)
    steps = [
        (adjust("j1", "+50"), ["applied", "points", 67, "pending", 100],
         "+50"),
        (adjust("j1", "+50"), ["unchanged", "points", 67, "pending", 100],
         None),
        (adjust("j1", "-500"), ["unchanged", "points", 67, "pending", 100],
         None),
        (adjust("j2", "-68"), ["insufficient", "points", 67, "pending", 100],
         None),
        (adjust("j2", "-67"), ["applied", "points", 0, "pending", 100],
         "-67"),
        (adjust("j3", "0007"), ["applied", "points", 7, "pending", 100],
         "+7"),
        (adjust("j4", "-007"), ["applied", "points", 0, "pending", 100],
         "-7"),
        (adjust("j5", "+0"), ["applied", "points", 0, "pending", 100], "+0"),
        (adjust("j6", "-" + "9" * 18),
         ["insufficient", "points", 0, "pending", 100], None),
        (adjust("j7", "5", now=NOW + 60),
         ["applied", "points", 105, "pending", 0], "+5"),
    ]
    for args, want, mark in steps:
        assert w.api(args) == want, args
        if mark:
            assert w.marks[w.adjust_key(args[5])] == mark
        w.verify()
    assert w.hash == {"points": "105", "lifetime": "179"}
    assert w.entries[0] == dict(kind="adjust", adjustment="j1", earned="50",
                                redeemed="0", points="67", ts=str(NOW),
                                reason="goodwill")
    assert w.entries[1] == dict(kind="adjust", adjustment="j2", earned="0",
                                redeemed="67", points="0", ts=str(NOW),
                                reason="goodwill")
    assert r.ttl(w.adjust_key("j1")) > 3000


@pytest.mark.parametrize("value", [
    "", "+", "-", "abc", "1.5", "1e3", " 5", "5 ", "+-5", "--5", "++5",
    "1" * 19, "+" + "1" * 19, "-" + "0" * 19, "\u0665", "0x10", "5-",
])
def test_api_adjust_not_points(scripts, value):
    """Points that are not a signed integer of at most 18 digits:
    invalid, nothing written."""
    r, _, sha = scripts
    assert INVALID == run_api_case(r, sha, {"points": "5"}, None,
                                   adjust("j", value), mkey=ADJUST)


def test_api_adjust_no_reason(scripts):
    """An adjustment needs a reason: without one it is invalid, nothing
    written."""
    r, _, sha = scripts
    assert INVALID == run_api_case(r, sha, {"points": "5"}, None,
                                   adjust("j", "+5", reason=""), mkey=ADJUST)


@pytest.mark.parametrize("points,lifetime,pending,value,applied", [
    (0, 0, "", str(LIMIT - 1), True),
    (0, 0, "", str(LIMIT), False),
    (0, 0, "", "1" * 17, False),
    (0, 0, "", "0" * 16 + "1", True),
    (10, 0, "%d:5" % (NOW + 9), str(LIMIT - 16), True),
    (10, 0, "%d:5" % (NOW + 9), str(LIMIT - 15), False),
    (10, 0, "%d:5" % (NOW - 9), str(LIMIT - 16), True),
    (0, LIMIT - 6, "%d:5" % (NOW + 9), "1", False),
    (0, LIMIT - 7, "%d:5" % (NOW + 9), "1", True),
])
def test_api_adjust_overflow(scripts, points, lifetime, pending, value,
                             applied):
    """A positive adjustment that would take points or lifetime (with
    pending) to 2^53 is invalid, nothing written; one below applies
    exactly."""
    r, _, sha = scripts
    rec = {"points": str(points), "lifetime": str(lifetime)}
    if pending:
        rec["pending"] = pending
    reply = run_api_case(r, sha, rec, None, adjust("j", value), mkey=ADJUST)
    if applied:
        assert reply[0] == "applied", reply
    else:
        assert INVALID == reply


# --------------------------------------------------------------------------
# refused calls write nothing


@pytest.mark.parametrize("field,value", [
    ("points", "x"), ("points", ""), ("points", "-1"), ("points", "1.5"),
    ("lifetime", "x"), ("points", str(LIMIT)), ("lifetime", "9" * 40),
] + [("pending", p) for p in MALFORMED_PENDING] + [
    ("pending", "%d:%d" % (NOW + 9, LIMIT - 40)),
    ("pending", "%d:%d" % (NOW - 9, LIMIT - 40)),
])
def test_api_corrupt_record(scripts, field, value):
    """A record whose points, lifetime or pending are not what they must
    be: every call that reads it answers a LOYALTY error naming it (the
    balance overflow included), and nothing is written."""
    r, _, sha = scripts
    rec = {"points": "50", "lifetime": "50"}
    rec[field] = value
    calls = [("10:0:100:0:0:0:0", refund("o", "all"), MARKER),
             ("10:0:100:0:0:0:0", refund("o", "50"), MARKER),
             ("10:0:100:100:10:0:0", refund("o", "all"), MARKER),
             (None, adjust("j", "+1"), ADJUST),
             (None, adjust("j", "-1"), ADJUST),
             ("+1", adjust("j", "-1"), ADJUST)]
    for mark, args, mkey in calls:
        reply = run_api_case(r, sha, rec, mark, args, mkey=mkey)
        assert reply[0] == "error" and reply[1].startswith("LOYALTY "), (
            args, reply)
        assert KEY in reply[1]


@pytest.mark.parametrize("kind", ["string", "hash"])
def test_api_ledger_wrong_type(scripts, kind):
    """A ledger that is not a stream: the call is refused with an error
    naming the ledger, and nothing is written (marker and record
    included)."""
    r, _, sha = scripts
    rec = {"points": "50", "lifetime": "50"}
    for mark, args, mkey in (("10:0:100:0:0:0:0", refund("o", "all"),
                              MARKER),
                             (None, adjust("j", "+5"), ADJUST)):
        r.delete(KEY, mkey, LEDGER)
        r.hset(KEY, mapping=rec)
        if mark:
            r.set(mkey, mark)
        if kind == "string":
            r.set(LEDGER, "not a stream")
        else:
            r.hset(LEDGER, "not", "a stream")
        reply = evalsha(r, sha, (KEY, mkey, LEDGER), args)
        assert reply[0] == "error", reply
        assert re.match(r"^LOYALTY ledger loyalty:\{a\}:ledger: WRONGTYPE ",
                        reply[1]), reply
        assert r.hgetall(KEY) == rec and r.get(mkey) == mark
        assert r.type(LEDGER) == kind
        # without a ledger it applies
        reply = evalsha(r, sha, (KEY, mkey, LEDGER), args[:2] + ["0"]
                        + args[3:])
        assert reply[0] == "applied", reply


@pytest.mark.parametrize("position,value", [
    (0, ""), (0, "x"), (0, "REFUND"), (0, "Adjust"),
    (1, ""), (1, "x"), (1, "-1"), (1, "1.5"), (1, " 1"),
    (2, ""), (2, "x"), (2, "-1"), (2, "1e2"),
    (3, ""), (3, "x"), (3, "-1"), (3, "6e2"),
    (4, ""), (4, "x"), (4, "-1"), (4, "60.0"),
])
def test_api_bad_arguments(scripts, position, value):
    """Arguments that are not what the module sends: "LOYALTY bad
    arguments", nothing written."""
    r, _, sha = scripts
    rec = {"points": "50", "lifetime": "50"}
    for mark, args, mkey in (("10:0:100:0:0:0:0", refund("o", "all"),
                              MARKER),
                             (None, adjust("j", "+5"), ADJUST)):
        args = list(args)
        args[position] = value
        assert run_api_case(r, sha, rec, mark, args, mkey=mkey) == (
            "error", "LOYALTY bad arguments"), args


@pytest.mark.parametrize("mark,args,mkey", [
    (None, adjust("j", "+5", ottl="0"), ADJUST),
    (None, adjust("j", "+5", ottl="000"), ADJUST),
    (None, adjust("j", "+5", ottl="9" * 30), ADJUST),
    (None, adjust("j", "+5", ottl=str(2 ** 62)), ADJUST),
    (None, adjust("j", "+5", expire="9" * 30), ADJUST),
    ("10:0:100:0:0:0:0", refund("o", "all", expire="9" * 30), MARKER),
    ("10:0:100:0:0:0:0", refund("o", "all", keep="9" * 30), MARKER),
    (None, adjust("j", "+5", keep="9" * 30), ADJUST),
], ids=["adjust-ttl-0", "adjust-ttl-000", "adjust-ttl-huge",
        "adjust-ttl-2^62", "adjust-expire-huge", "refund-expire-huge",
        "refund-keep-huge", "adjust-keep-huge"])
def test_api_unusable_expiry_writes_nothing(scripts, mark, args, mkey):
    """An order_ttl, expire or ledger length Redis cannot use: the call
    is refused with an error, and nothing at all is written (no ledger
    entry, no record, no marker): the script is atomic only if it checks
    before its first write."""
    r, _, sha = scripts
    rec = {"points": "50", "lifetime": "50"}
    r.delete(KEY, mkey, LEDGER)
    r.hset(KEY, mapping=rec)
    if mark:
        r.set(mkey, mark)
    reply = evalsha(r, sha, (KEY, mkey, LEDGER), args)
    state = (r.hgetall(KEY), r.ttl(KEY), r.get(mkey),
             r.xrange(LEDGER) if r.type(LEDGER) == "stream" else None)
    assert reply[0] == "error", (args, reply, state)
    assert state == (rec, -1, mark, None), (args, reply, state)


@pytest.mark.parametrize("kind", ["refund", "adjust"])
@pytest.mark.parametrize("pending", ["%d:1,%d:2" % (NOW + 20, NOW + 10),
                                     "%d:1,%d:2,%d:3" % (NOW + 20, NOW - 1,
                                                         NOW + 10)])
def test_api_unsorted_pending(scripts, kind, pending):
    """The field is kept by release time: a stored list out of order is
    either refused as not a list (nothing written) or written back in
    order, no point lost."""
    r, _, sha = scripts
    rec = {"points": "50", "lifetime": "50", "pending": pending}
    mark, args, mkey = (("10:0:100:0:0:0:0", refund("o", "1"), MARKER)
                        if kind == "refund" else
                        (None, adjust("j", "+1"), ADJUST))
    r.delete(KEY, mkey, LEDGER)
    r.hset(KEY, mapping=rec)
    if mark:
        r.set(mkey, mark)
    reply = evalsha(r, sha, (KEY, mkey, LEDGER), args)
    if reply[0] == "error":
        assert reply[1] == "LOYALTY pending of %s is not a list" % KEY
        assert r.hgetall(KEY) == rec
        return
    got = pending_list(r.hget(KEY, "pending"))
    releases = [t for t, _ in got]
    assert releases == sorted(set(releases)), (pending, got)
    assert sum(v for _, v in got) == sum(
        v for t, v in pending_list(pending) if t > NOW)


# --------------------------------------------------------------------------
# property tests


BAD_REFUNDED = ["", "x", "1.", ".5", "1.23456", "-1", "1e3", "1234567890123",
                " 1", "ALL", "0x10"]
BAD_POINTS = ["", "+", "-", "x", "1.5", "1" * 19, "+-1", " 1"]


def random_amount(rnd):
    """An order amount in ten-thousandths."""
    return rnd.choice([0, rnd.randint(1, 10 ** 4), rnd.randint(1, 10 ** 7),
                       rnd.randint(1, 10 ** 16 - 1), 10 ** 16 - 1])


def refunded_choice(rnd, w, oid):
    """A refunded amount for an order: partial, repeated, lower, equal,
    above, "all", or not an amount."""
    mark = w.marks.get(w.order_key(oid))
    m = parse_marker(mark) if mark else None
    total = fixed(m["amount"]) if m and m["amount"] else None
    if rnd.random() < 0.1:
        return "all"
    if rnd.random() < 0.04:
        return rnd.choice(BAD_REFUNDED)
    if total is None:
        return show(random_amount(rnd), rnd)
    last = total if m["refunded"] == "all" else fixed(m["refunded"])
    kind = rnd.randrange(8)
    if kind == 0:
        x = last
    elif kind == 1:
        x = rnd.randint(0, last)
    elif kind == 2:
        x = total
    elif kind == 3:
        x = total + rnd.randint(1, 3)
    elif kind == 4:
        x = min(total, last + rnd.randint(1, 3))
    else:
        x = rnd.randint(last, total)
    return show(x, rnd) if x < 10 ** 16 else str(x)


def adjust_choice(rnd, w):
    p, _ = record(w.hash, 0, w.key)
    points = p["p"] if p else 0
    kind = rnd.randrange(10)
    if kind == 0:
        return rnd.choice(BAD_POINTS)
    n = rnd.choice([rnd.randint(0, 100), points, points + 1,
                    rnd.randint(0, points + 10), rnd.randint(0, 10 ** 6)])
    return rnd.choice(["", "+", "-", "-", "-"]) + str(n)


def sequence(w, rnd, steps, hostile=False):
    """Credits, refunds, adjustments and time passing, on one customer,
    checked after every call."""
    now = NOW
    oids, aids = [], []
    keep = rnd.choice(["1000", "1000", "0"])
    expire = rnd.choice(["0", "86400"])
    for step in range(steps):
        now += rnd.choice([0, 0, 1, 30, 59, 60, 61, 600, 3599, 3601])
        what = rnd.random()
        if what < 0.3 or not oids:
            if oids and rnd.random() < 0.1:
                oid = rnd.choice(oids)                  # a duplicate
            else:
                oid = "o%d" % len(oids)
                oids.append(oid)
            p = int(w.hash.get("points", "0"))
            amount = rnd.choice([show(random_amount(rnd), rnd)] * 9
                                + ["12,5"])
            args = credit_args(
                oid, rnd.choice([0, rnd.randint(1, 100),
                                 rnd.randint(1, 10 ** 6)]),
                rnd.choice([0, 0, rnd.randint(0, p + 10)]), amount,
                ts=now - rnd.choice([0, 0, 0, 1, 30]),
                lock=rnd.choice([0, 0, 60, 60, 3600]),
                ttl=rnd.choice([3600, 86400]), keep=keep)
            args[4] = expire
            w.credit(args, legacy=rnd.random() < 0.08)
        elif what < 0.75:
            oid = rnd.choice(oids + ["never"])
            value = refunded_choice(rnd, w, oid)
            w.api(["refund", str(now), keep, expire, "3600", oid, value,
                   rnd.choice(["", "", "damaged"])])
        elif what < 0.95:
            if aids and rnd.random() < 0.2:
                aid = rnd.choice(aids)
            else:
                aid = "a%d" % len(aids)
                aids.append(aid)
            w.api(["adjust", str(now), keep, expire,
                   str(rnd.choice([3600, 86400])), aid, adjust_choice(rnd, w),
                   rnd.choice(["goodwill"] * 9 + [""])])
        else:
            # hostile: a record or marker hand-edited, then repaired
            if not hostile:
                continue
            saved = dict(w.hash)
            field = rnd.choice(["points", "lifetime", "pending"])
            w.r.hset(w.key, field, rnd.choice(
                ["x", "1:2:3", "5:", ","] if field == "pending"
                else ["x", "", "-1", "1.5"]))
            w.hash = dict(w.hash, **{field: w.r.hget(w.key, field)})
            oid = rnd.choice(oids)
            reply = w.api(["refund", str(now), keep, expire, "3600", oid,
                           "all", ""])
            assert reply[0] in ("error", "unchanged"), reply
            w.r.delete(w.key)
            w.r.hset(w.key, mapping=saved)
            if w.hash_ttl:
                w.r.expire(w.key, w.hash_ttl[1])
                w.hash_ttl = (time.monotonic(), w.hash_ttl[1])
            w.hash = saved
        w.verify()


def test_api_sequences(scripts):
    """Many customers, each a random sequence of credits (locked or not,
    late, duplicated, some with markers of the short form), refunds in
    any order (partial, repeated, lower, full, above, "all", not an
    amount, of unknown orders), adjustments (new, repeated, insufficient,
    invalid) and time passing the releases: after every call the reply,
    the whole record, every marker and its expiry and the whole ledger
    are what the model says; points never go below 0; the points
    reversed of an order never exceed what it earned; its redeemed points
    are given back once."""
    r, credit, sha = scripts
    seen = set()
    for n in range(8):
        w = World(r, credit, sha, "c%d" % n)
        sequence(w, random.Random(n), 250, hostile=n % 2 == 1)
        seen |= w.seen
    assert seen >= {"credit 0", "credit 1", "refund applied",
                    "refund unchanged", "refund invalid",
                    "refund unknown_order", "adjust applied",
                    "adjust unchanged", "adjust insufficient",
                    "adjust invalid", "refund error", "forgiven",
                    "restored"}, seen


def hostile_marker(rnd, now):
    """An order's marker as a script writes it (long or short form, any
    refunds done), with leading zeros; or one that is not an order's."""
    kind = rnd.randrange(10)
    if kind == 0:
        return None
    if kind == 1:
        return rnd.choice(["x", "5", "5:0:", "5:0:10:0:0:0", "5:0:abc:0:0:0:0",
                           "%d:0" % LIMIT, "5:0:10:0:0:0:", "5:-1",
                           "5:0:1.23456:0:0:0:0", "5:0:10:ALL:0:0:0"])
    e = rnd.choice([0, rnd.randint(1, 1000), rnd.randint(1, 10 ** 9),
                    LIMIT - 1 - rnd.randint(0, 10)])
    red = rnd.choice([0, 0, rnd.randint(0, 1000)])
    z = "0" * rnd.choice([0, 0, 0, 1, 2])
    if kind == 2:
        return "%s%d:%s%d" % (z, e, z, red)
    release = rnd.choice([0, 0, now + rnd.randint(1, 3600),
                          now - rnd.randint(0, 3600), now])
    if rnd.random() < 0.1:
        amount, total = "", None
    else:
        total = random_amount(rnd)
        amount = show(total, rnd)
    state = rnd.randrange(4)
    if total is None:
        if state == 0:
            return "%d:%d::all:%d:%d:%d" % (e, red, e, red, release)
        return "%d:%d::0:0:0:%d" % (e, red, release)
    if state == 1:
        # refunded in full
        return "%d:%s%d:%s:all:%s%d:%d:%d" % (e, z, red, amount, z, e, red,
                                              release)
    y = 0 if state == 0 else rnd.randint(0, max(0, total - 1))
    target = e * y // total if total else 0
    # some restored already (restored <= redeemed): the rest is given back
    restored = rnd.choice([0, 0, 0, rnd.randint(0, red)])
    return "%d:%s%d:%s:%s:%s%d:%d:%d" % (e, z, red, amount, show(y, rnd), z,
                                         target, restored, release)


def test_api_hostile_calls(scripts):
    """Single calls on records, markers and arguments as anything might
    have left them: hostile counts, pending lists (malformed, due, not
    due, holding the order's entry), markers of every form and corrupt
    ones, refunded amounts and points that are not numbers, hostile
    arguments.  The script agrees with the model on every case, and a
    call that is not applied writes nothing."""
    r, _, sha = scripts
    rnd = random.Random(2053)
    seen = set()
    for i in range(2500):
        now = rnd.choice([NOW, NOW, rnd.randint(0, 10 ** 10)])
        now_s = rnd.choice([str(now)] * 12 + ["0" + str(now),
                                              hostile_arg_now(rnd)])
        rec = {}
        for f in ("points", "lifetime"):
            v = rnd.choice([hostile_count(rnd), str(rnd.randint(0, 10 ** 6)),
                            str(rnd.randint(0, 10 ** 6))])
            if v is not None:
                rec[f] = v
        kind = rnd.choice(["refund"] * 6 + ["adjust"] * 3 + ["other"])
        mark = hostile_marker(rnd, now)
        pending = hostile_pending(rnd, now, 3600)
        m = parse_marker(mark) if mark else None
        if m and m["release"] != "0" and rnd.random() < 0.6:
            entries = pending_list(pending) or []
            entries.append([int(m["release"]), rnd.choice(
                [int(m["e"]), rnd.randint(0, int(m["e"]) + 5)])])
            entries.sort()
            pending = pending_text(entries)
        if pending is not None:
            rec["pending"] = pending
        if kind == "refund":
            total = fixed(m["amount"]) if m and m["amount"] else None
            value = rnd.choice(
                ["all"] * 3 + BAD_REFUNDED[:4]
                + [show(rnd.randint(0, total), rnd)] * 8
                + [show(total, rnd), show(total + 1, rnd)] * 2
                if total is not None and total + 1 < 10 ** 16 else
                ["all", "all", "5", show(random_amount(rnd), rnd)]
                + BAD_REFUNDED)
            mkey = MARKER
        else:
            value = rnd.choice(BAD_POINTS + ["+5", "-5", "5", "-0", "+0"]
                               + [str(rnd.randint(-10 ** 6, 10 ** 6))] * 6)
            if kind == "adjust" and mark is not None and rnd.random() < 0.6:
                mark = None
            mkey = ADJUST
        args = [kind if kind != "other" else rnd.choice(["", "x", "REFUND"]),
                now_s, rnd.choice(["0", "100", "0100", "x"]
                                  if rnd.random() < 0.1 else ["0", "100"]),
                rnd.choice(["0", "600", "0600"] + ["6e2"] *
                           (rnd.random() < 0.1)),
                rnd.choice(["60", "3600", "03600"]),
                "o-%d" % i, value,
                rnd.choice(["", "goodwill", "a reason, with: colons"])]
        reply = run_api_case(r, sha, rec, mark, args, mkey=mkey)
        if isinstance(reply, tuple):
            seen.add(reply[1].split(" of ")[0].split(" loyalty")[0])
        else:
            seen.add("%s %s" % (args[0], reply[0]))
    assert seen >= {"refund applied", "refund unchanged", "refund invalid",
                    "refund unknown_order", "adjust applied",
                    "adjust unchanged", "adjust insufficient",
                    "adjust invalid", "LOYALTY bad arguments",
                    "LOYALTY points", "LOYALTY lifetime", "LOYALTY pending",
                    "LOYALTY balance", "LOYALTY marker"}, seen


def hostile_arg_now(rnd):
    return rnd.choice(["", "x", "-5", "1.5", " 1", str(LIMIT + 7),
                       "9" * 25, "0"])
