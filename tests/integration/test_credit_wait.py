"""Durable credits: `loyalty_credit_wait N [time]` (SPEC §10).

A credit counts as applied only once `WAIT N time`, sent right behind it
on the connection that ran it, reports N replicas; otherwise it is sent
again, idempotently, until confirmed or journaled.  A resend answered as
a duplicate writes its marker again, so that its WAIT covers the first
write.  Credits then have a connection of their own per worker, so that
reads never queue behind a WAIT.

Real servers: a master and a replica (sentinel_support.pair); the
replica is paused with SIGSTOP to hold the WAITs back.  The Sentinel and
Cluster cases are in test_sentinel.py and test_cluster.py."""

import json
import re
import subprocess

import pytest

from cluster_support import metric, metrics
from conftest import SLOW, Paused, check_location, log_lines, wait_until
from credit_support import (JOURNAL, PYTHON, REPLAY, edge_conf, hkey, journal_path, ledger,
                            marker, order, read_journal, record, replay,
                            settle, wait_marker)
from sentinel_support import pair, wait_replicated


METRICS = "location = /metrics { loyalty_status; }"
APPLIED = 'loyalty_credits_total{result="applied"}'
DUPLICATE = 'loyalty_credits_total{result="duplicate"}'
RETRIED = 'loyalty_credits_total{result="retried"}'
JOURNALED = 'loyalty_credits_total{result="journaled"}'
CONNECTIONS = "loyalty_redis_connections"
UNCONFIRMED = re.compile(r'loyalty: credit of order "([^"]+)" for customer '
                         r'"([^"]+)" reached 0 of 1 replicas within '
                         r'(\d+) ms, sent again')


def edge(nginx, m, wait="loyalty_credit_wait 1 1s;", workers=1, loc=""):
    return nginx(edge_conf(http=JOURNAL + wait + "\n", loc=loc,
                           locations=METRICS),
                 redis_port=m.port, workers=workers)


def counts(n):
    m = metrics(n.port)
    return {k: metric(m, k) for k in (APPLIED, DUPLICATE, RETRIED,
                                      JOURNALED)}


def waits(server):
    """WAIT commands the server has run."""
    stats = server.client.info("commandstats")
    return int(stats.get("cmdstat_wait", {}).get("calls", 0))


# --------------------------------------------------------------------------
# nginx -t


@pytest.mark.parametrize("line", [
    "loyalty_credit_wait 1;",
    "loyalty_credit_wait 2 250ms;",
    "loyalty_credit_wait 64 5s;",
    "loyalty_credit_wait off;",
])
def test_config_accepted(nginx, line):
    rc, out = check_location(nginx, line)
    assert rc == 0, out
    rc, out = check_location(nginx, "", http=line + "\n")
    assert rc == 0, out


@pytest.mark.parametrize("line,words", [
    ("loyalty_credit_wait 0;", ['invalid number of replicas "0"',
                                "1 to 64"]),
    ("loyalty_credit_wait 65;", ['invalid number of replicas "65"']),
    ("loyalty_credit_wait x;", ['invalid number of replicas "x"']),
    ("loyalty_credit_wait -1;", ['invalid number of replicas "-1"']),
    ("loyalty_credit_wait 1 0s;", ['invalid time "0s"']),
    ("loyalty_credit_wait 1 soon;", ['invalid time "soon"']),
    ("loyalty_credit_wait off 1s;", ["takes no time"]),
    ("loyalty_credit_wait 1 1s 2;", ["invalid number of arguments"]),
    ("loyalty_credit_wait 1; loyalty_credit_wait 2;", ["is duplicate"]),
])
def test_config_refused(nginx, line, words):
    chk = check_location(nginx, line)
    rc, out = chk
    assert rc != 0, "nginx -t accepted:\n%s" % out
    where = "in %s:%d" % (chk.conf, chk.line_of(line))
    hits = [x for x in out.splitlines() if where in x
            and "loyalty_credit_wait" in x]
    assert hits and "[emerg]" in hits[0], (where, out)
    for w in words:
        assert w in hits[0], (w, hits[0])


# --------------------------------------------------------------------------
# a master and its replica


def test_credits_confirmed(redis_factory, nginx):
    """Each credit is followed by a WAIT on the master and counted
    applied; reads and credits use two connections per worker."""
    m, r = pair(redis_factory)
    n = edge(nginx, m, workers=2)
    before = waits(m)
    for i in range(6):
        resp = order(n, "cw1", "10.00", "cw1-%d" % i)
        assert resp.status == 200, resp
    wait_until(lambda: counts(n)[APPLIED] == 6, 10 * SLOW, 0.05,
               "6 credits applied")
    c = counts(n)
    assert (c[DUPLICATE], c[RETRIED], c[JOURNALED]) == (0, 0, 0), c
    assert waits(m) - before >= 6
    assert record(m.client, "cw1")["points"] == 60
    wait_replicated(m, r)
    assert record(r.client, "cw1")["points"] == 60
    # a read and a credit in each worker: at most 2 connections each
    assert 2 <= metric(metrics(n.port), CONNECTIONS) <= 4
    assert n.stop() is None
    assert read_journal(journal_path(n)) == []


def test_off_sends_no_wait(redis_factory, nginx):
    """Without loyalty_credit_wait (or with "off" below one), no WAIT is
    sent and a credit counts applied at its reply."""
    m, r = pair(redis_factory)
    n = edge(nginx, m, wait="loyalty_credit_wait 1;",
             loc="loyalty_credit_wait off;")
    before = waits(m)
    with Paused(r):
        assert order(n, "cw2", "5.00", "cw2-a").status == 200
        wait_until(lambda: counts(n)[APPLIED] == 1, 5 * SLOW, 0.05,
                   "applied with the replica paused")
    assert waits(m) == before
    # one connection: reads and credits share it
    assert metric(metrics(n.port), CONNECTIONS) == 1


def test_paused_replica(redis_factory, nginx):
    """With the replica stopped, a confirmed order's credit runs on the
    master but is not counted applied: it is sent again (warn line) and
    reads of other customers are still ok, on their own connection, not
    behind the WAITs.  Once the replica runs again the credit is applied
    exactly once and counted once."""
    m, r = pair(redis_factory)
    m.client.hset(hkey("other"), mapping={"points": 3, "lifetime": 3,
                                            "orders": 1})
    wait_replicated(m, r)
    # WAIT up to 1 s each: a read queued behind one would miss its 500 ms
    n = edge(nginx, m)
    with Paused(r):
        assert order(n, "cw3", "12.00", "cw3-a").status == 200
        wait_marker(m.client, "cw3", "cw3-a")
        wait_until(lambda: counts(n)[RETRIED] >= 2, 10 * SLOW, 0.05,
                   "the credit sent again")
        c = counts(n)
        assert (c[APPLIED], c[DUPLICATE], c[JOURNALED]) == (0, 0, 0), c
        # other customers are read meanwhile, none unavailable
        for _ in range(10):
            resp = order(n, "other")
            assert resp.status == 200, resp
            assert resp.header("X-Loyalty-Status") == "ok", resp
            assert resp.header("X-Loyalty-Points") == "3", resp
        hits = [UNCONFIRMED.search(x) for x in log_lines(n.error_log(),
                                                         "warn")]
        hits = [h.groups() for h in hits if h]
        assert ("cw3-a", "cw3", "1000") in hits, hits
        assert record(m.client, "cw3")["points"] == 12
    wait_until(lambda: counts(n)[APPLIED] == 1, 10 * SLOW, 0.05,
               "applied once the replica runs")
    settle(lambda: counts(n), quiet=1.5, timeout=10 * SLOW)
    c = counts(n)
    assert (c[APPLIED], c[DUPLICATE], c[JOURNALED]) == (1, 0, 0), c
    rec = record(m.client, "cw3")
    assert (rec["points"], rec["orders"]) == (12, 1), rec
    assert m.client.xlen(ledger("cw3")) == 1
    wait_replicated(m, r)
    assert record(r.client, "cw3")["points"] == 12
    assert n.stop() is None
    assert read_journal(journal_path(n)) == []


def test_duplicate_waits_too(redis_factory, nginx):
    """An order credited before (by another edge, say) is answered as a
    duplicate; it counts only once a WAIT behind a write confirms it: with
    the replica stopped it is not counted at all."""
    m, r = pair(redis_factory)
    n = edge(nginx, m)
    assert order(n, "cw4", "4.00", "cw4-a").status == 200
    wait_until(lambda: counts(n)[APPLIED] == 1, 10 * SLOW, 0.05, "applied")
    wait_replicated(m, r)
    with Paused(r):
        assert order(n, "cw4", "4.00", "cw4-a").status == 200
        wait_until(lambda: counts(n)[RETRIED] >= 1, 10 * SLOW, 0.05,
                   "the duplicate sent again")
        assert counts(n)[DUPLICATE] == 0
    wait_until(lambda: counts(n)[DUPLICATE] == 1, 10 * SLOW, 0.05,
               "the duplicate counted once the replica runs")
    assert counts(n)[APPLIED] == 1
    assert record(m.client, "cw4")["points"] == 4
    assert m.client.ttl(marker("cw4", "cw4-a")) > 29 * 86400


def test_unconfirmed_journaled_at_exit(redis_factory, nginx):
    """A credit still unconfirmed when nginx stops is journaled, once, and
    nothing is counted applied."""
    m, r = pair(redis_factory)
    n = edge(nginx, m)
    with Paused(r):
        assert order(n, "cw5", "9.00", "cw5-a").status == 200
        wait_until(lambda: counts(n)[RETRIED] >= 1, 10 * SLOW, 0.05,
                   "the credit sent again")
        assert n.stop() is None
        entries = read_journal(journal_path(n))
        assert [(e["customer"], e["order"]) for e in entries] == \
            [("cw5", "cw5-a")], entries
        assert entries[0]["reason"] == "worker exiting"
        # what the replay is to confirm, as nginx would have
        assert (entries[0]["wait"], entries[0]["wait_ms"]) == (1, 1000)
        assert record(m.client, "cw5")["points"] == 9

        # it ran on the master: a replay finds it applied, but the paused
        # replica does not confirm it, so the line fails, to be replayed
        before = waits(m)
        rc, applied, already, failed, out = replay(journal_path(n))
        assert (rc, applied, already, failed) == (1, 0, 0, 1), out
        assert "unconfirmed: already applied order cw5-a of cw5 reached " \
            "0 of 1 replicas within 1000 ms" in out, out
        assert waits(m) == before + 1

    # the replica runs again: the same replay is confirmed, nothing doubled
    rc, applied, already, failed, out = replay(journal_path(n))
    assert (rc, applied, already, failed) == (0, 0, 1, 0), out
    assert waits(m) == before + 2
    assert record(m.client, "cw5")["points"] == 9
    wait_replicated(m, r)
    assert r.client.hget(hkey("cw5"), "points") == "9"


def test_no_replica(redis, nginx):
    """A master without replicas never confirms: credits are retried, not
    counted applied, and journaled when nginx stops."""
    n = edge(nginx, redis, wait="loyalty_credit_wait 1 100ms;")
    assert order(n, "cw6", "3.00", "cw6-a").status == 200
    wait_until(lambda: counts(n)[RETRIED] >= 2, 10 * SLOW, 0.05,
               "the credit sent again")
    assert counts(n)[APPLIED] == 0
    assert n.stop() is None
    assert [e["order"] for e in read_journal(journal_path(n))] == ["cw6-a"]


def test_replay_wait_arguments(redis, tmp_path):
    """loyalty-replay's WAIT: a recorded "wait" that is not a count of 0
    to 64 replicas, or a "wait_ms" not above 0, is a bad line (nothing
    sent); --wait and --wait-ms out of range are usage errors; --wait 1
    confirms a line that records none, and --wait-ms shortens its WAIT."""
    base = {"ts": 1700000000, "redis": "127.0.0.1:%d" % redis.port,
            "db": 0, "prefix": "loyalty:", "customer": "rw1",
            "amount": "3.00", "earned": 3, "redeem": 0, "ledger": 100,
            "expire": 0, "reason": "retries exhausted"}
    journal = tmp_path / "wait.journal"

    def write(*entries):
        journal.write_text("".join(json.dumps(dict(base, **e)) + "\n"
                                   for e in entries))
        return str(journal)

    bad = [{"order": "b%d" % i, **e} for i, e in enumerate([
        {"wait": "1"}, {"wait": True}, {"wait": 65}, {"wait": -1},
        {"wait": 1, "wait_ms": 0}, {"wait": 1, "wait_ms": "100"},
        {"wait": 1, "wait_ms": True}, {"wait": 1, "wait_ms": 3600001}])]
    rc, applied, already, failed, out = replay(write(*bad))
    assert (rc, applied, already, failed) == (1, 0, 0, len(bad)), out
    assert out.count(": bad line: wait") == len(bad), out
    # a negative lock period is no release before the order either
    rc, applied, already, failed, out = replay(write({"order": "p1",
                                                      "pending": -60}))
    assert (rc, failed) == (1, 1) and ": bad line: pending -60" in out, out
    assert not redis.client.exists(hkey("rw1"))

    for extra in (["--wait", "65"], ["--wait", "-1"], ["--wait-ms", "0"]):
        p = subprocess.run([PYTHON, REPLAY] + extra + [str(journal)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=60)
        assert p.returncode == 2 and b"--wait" in p.stderr, (extra, p)

    # no replica here: WAIT 1 reports 0, after the 50 ms asked for
    rc, applied, already, failed, out = replay(
        write({"order": "w1"}), extra=["--wait", "1", "--wait-ms", "50"])
    assert (rc, applied, already, failed) == (1, 0, 0, 1), out
    assert "unconfirmed: applied order w1 of rw1 reached 0 of 1 replicas " \
        "within 50 ms" in out, out
    assert record(redis.client, "rw1")["points"] == 3
    rc, applied, already, failed, out = replay(
        write({"order": "w1", "wait": 1, "wait_ms": 60000}),
        extra=["--wait-ms", "50"])
    assert (rc, failed) == (1, 1) and "within 50 ms" in out, out
    # --wait-ms stands in for a recorded one that is not a time
    rc, applied, already, failed, out = replay(
        write({"order": "w1", "wait": 1, "wait_ms": "x"}),
        extra=["--wait-ms", "50"])
    assert (rc, failed) == (1, 1) and "within 50 ms" in out, out
    rc, applied, already, failed, out = replay(write({"order": "w1"}))
    assert (rc, applied, already, failed) == (0, 0, 1, 0), out
    assert waits(redis) == 3


@pytest.mark.parametrize("answer", [
    b"-ERR WAIT cannot be used with replica instances\r\n",
    b"+OK\r\n"], ids=["error", "status"])
def test_wait_refused(fake_redis, nginx, answer):
    """A WAIT answered with an error (renamed, refused by an ACL) or with
    no count is a credit error: 5 attempts, then the journal."""
    f = fake_redis
    f.queue("WAIT", *[answer] * 8)
    n = nginx(edge_conf(http=JOURNAL + "loyalty_credit_wait 1;\n",
                        locations=METRICS), redis_port=f.port)
    assert order(n, "cw7", "2.00", "cw7-a").status == 200
    wait_until(lambda: read_journal(journal_path(n)), 20 * SLOW, 0.1,
               "the credit journaled")
    entries = read_journal(journal_path(n))
    assert [(e["order"], e["reason"]) for e in entries] == \
        [("cw7-a", "retries exhausted")], entries
    assert counts(n)[APPLIED] == 0
    assert len(f.calls("WAIT")) == 5
    assert any('WAIT after the credit of order "cw7-a"' in x
               for x in log_lines(n.error_log(), "warn"))
