"""Redis Sentinel: `loyalty_redis <sentinels> sentinel=<name>` (each worker
asks a sentinel for the master, subscribes to +switch-master, checks ROLE
on the master it connects to and asks again when the master is lost,
answers READONLY or is not the master), and the ROLE check of a plain
`loyalty_redis`.

Real sentinels, master and replica: sentinel_support.SentinelGroup (the
shared group is reset between tests and never fails over; tests that
fail over or kill start their own).  What real sentinels do not do on
demand (name a replica, miss a switch, send +switch-master for another
name) a scripted sentinel does: sentinel_support.make_fake_sentinel().

test_fixture_* check the fixtures themselves (no module involved).

The failover tests measure what Redis loses (asynchronous replication,
no loyalty_credit_wait) and print it; they assert that no order is
credited twice and that reads recover within RECOVERY s of the moment
the sentinels name the new master."""

import itertools
import re
import threading
import time

import pytest
import redis as redis_lib

from conftest import (SLOW, check_location, checkout_conf, expected,
                      log_lines, wait_until)
from credit_support import (JOURNAL, amount_of, did, hkey, journal_path,
                            ledger_entries, marker, order, read_journal,
                            record, replay, settle, wait_marker)
from sentinel_support import (NAME, make_fake_sentinel, pair,
                              sentinel_edge_conf, start_group, wait_replicated)


UNAVAILABLE = expected("unavailable")
RECOVERY = 5.0 * SLOW          # s from the sentinels' report to reads ok

SAYS = r'loyalty: sentinel says the master of "%s" is 127\.0\.0\.1:%d$'
SWITCH = (r'loyalty: \+switch-master: the master of "%s" is '
          r'127\.0\.0\.1:%d now$')
UNKNOWN = r'loyalty: sentinel does not know master "%s"$'
NOT_MASTER = r'loyalty: redis is not the master \(ROLE "%s"\)$'
READONLY = r"loyalty: redis answered READONLY, looking for the master again"

# what nginx and the module append to a message: ", client: ...",
# ", redis: <address>", ", sentinel: <address>, master: "<name>""
CONTEXT = re.compile(r", (?:client|server|request|host|upstream|redis|"
                     r"sentinel|master|cluster): ")


def message(line):
    """The text of an error log line after its level, without the context
    that nginx and the module append to it (the patterns above match
    that text, `$` being its end)."""
    return CONTEXT.split(line.split("] ", 1)[-1], 1)[0]


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def shared_group(tmp_root):
    g = start_group(tmp_root)
    yield g
    g.stop()


@pytest.fixture
def group(shared_group):
    shared_group.reset()
    yield shared_group


@pytest.fixture(scope="module")
def shared_auth_group(tmp_root):
    g = start_group(tmp_root, password="mp", sentinel_password="sp")
    yield g
    g.stop()


@pytest.fixture
def auth_group(shared_auth_group):
    """The shared group with passwords: requirepass mp on the master and
    the replica, requirepass sp on the sentinels."""
    shared_auth_group.reset()
    yield shared_auth_group


@pytest.fixture
def groups(tmp_root):
    """groups(**kw) -> a started SentinelGroup of this test only."""
    made = []

    def make(**kw):
        g = start_group(tmp_root, **kw)
        made.append(g)
        return g
    yield make
    for g in made:
        g.stop()


@pytest.fixture
def fakes():
    made = []

    def make(master=None, name=NAME):
        f = make_fake_sentinel(name=name, master=master)
        made.append(f)
        return f
    yield make
    for f in made:
        f.stop()
    for f in made:
        assert not f.errors, f.errors


# --------------------------------------------------------------------------
# helpers


def lines(n, level, pattern):
    rx = re.compile(pattern)
    return [line for line in log_lines(n.error_log(), level)
            if rx.search(message(line))]


def wait_line(n, level, pattern, timeout=5, what=None):
    return wait_until(lambda: lines(n, level, pattern), timeout * SLOW,
                      0.05, what or "[%s] %s in the error log" % (level,
                                                                  pattern))


def checkout(n, cid):
    """The X-Loyalty-* headers the backend got for a read of cid."""
    r = n.get("/checkout", cookies={"cid": cid})
    assert r.status == 200, r
    return r.loyalty


def visit(n, cid):
    """A visit to the edge without an order: (status, points)."""
    r = order(n, cid)
    assert r.status == 200, r
    return r.header("X-Loyalty-Status"), r.header("X-Loyalty-Points")


def wait_streak(fn, want, timeout, streak=10, allowed=(), what="reads"):
    """Poll fn() until it gives `want` `streak` times in a row (two
    workers: both must answer); any other value must be in allowed.
    Returns the time (monotonic) of the first read of the streak."""
    run = [0, None]

    def done():
        t = time.monotonic()
        got = fn()
        assert got == want or got in allowed, (what, got)
        if got == want:
            run[0] += 1
            run[1] = run[1] if run[0] > 1 else t
        else:
            run[0] = 0
        return run[0] >= streak
    wait_until(done, timeout, 0.01, "%s: %d in a row %r" % (what, streak,
                                                            want))
    return run[1]


def stays(fn, want, seconds, what="reads"):
    """fn() gives want every time for `seconds`."""
    t0 = time.monotonic()
    count = 0
    while time.monotonic() - t0 < seconds:
        got = fn()
        assert got == want, (what, got, "after %.2f s" %
                             (time.monotonic() - t0))
        count += 1
        time.sleep(0.05)
    return count


def subscribed(g):
    return sum(len(s.subscribed_clients()) for s in g.running_sentinels())


class Stream:
    """Orders placed from `threads` threads until stop(): order k is
    (cids[k % len(cids)], "<tag>-k", amount_of(k * 7)).  results: [(order,
    HTTP status or the exception's repr, X-Loyalty-Status, answered at)]."""

    def __init__(self, n, cids, tag, threads=4, pause=0.01):
        self.n, self.cids, self.tag, self.pause = n, cids, tag, pause
        self.results = []
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True)
                         for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self):
        while not self._stop.is_set():
            with self._lock:
                k = next(self._counter)
            o = (self.cids[k % len(self.cids)], "%s-%05d" % (self.tag, k),
                 amount_of(k * 7))
            try:
                r = order(self.n, o[0], o[2], o[1], timeout=10)
                res = (o, r.status, r.header("X-Loyalty-Status"),
                       time.monotonic())
            except Exception as e:          # noqa: BLE001
                res = (o, repr(e), None, time.monotonic())
            with self._lock:
                self.results.append(res)
            time.sleep(self.pause)

    def count(self):
        with self._lock:
            return len(self.results)

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(30 * SLOW)
        assert not any(t.is_alive() for t in self._threads), \
            "order threads still running"
        return list(self.results)


def at_most_once(client, orders):
    """In client (the master after the switch): every customer's record
    counts exactly the orders whose marker is there, each once (orders,
    points and lifetime; the customers were seeded at 0), and no order is
    twice in a ledger.  Returns the set of (cid, oid) applied."""
    by = {}
    for cid, oid, total in orders:
        by.setdefault(cid, []).append((oid, total))
    applied = set()
    for cid, mine in sorted(by.items()):
        pipe = client.pipeline()
        for oid, _ in mine:
            pipe.exists(marker(cid, oid))
        present = [(o, t) for (o, t), e in zip(mine, pipe.execute()) if e]
        pts = sum(int(t.split(".")[0]) for _, t in present)
        rec = record(client, cid)
        got = (rec.get("orders", 0), rec.get("points", 0),
               rec.get("lifetime", 0))
        assert got == (len(present), pts, pts), (
            "%s: record (orders, points, lifetime) %r, but %d orders "
            "applied for %d points: credited twice or in part"
            % (cid, got, len(present), pts))
        ids = [e["order"] for e in ledger_entries(client, cid)]
        assert len(ids) == len(set(ids)), "an order twice in the ledger " \
            "of %s" % cid
        assert set(ids) <= {o for o, _ in present}, cid
        applied |= {(cid, o) for o, _ in present}
    return applied


def orders_total(client, cids):
    pipe = client.pipeline()
    for c in cids:
        pipe.hget(hkey(c), "orders")
    return sum(int(v or 0) for v in pipe.execute())


# --------------------------------------------------------------------------
# the fixtures themselves


@pytest.mark.parametrize("auth", ["plain", "passwords"])
def test_fixture_group_kill_restart_failover(groups, auth):
    kw = dict(password="mp", sentinel_password="sp") if auth != "plain" \
        else {}
    g = groups(**kw)
    first, second = g.master, g.replicas()[0]
    assert first.role() == "master" and second.role() == "slave"
    assert second.link_up(first.port)
    assert len(g.sentinels) == 3
    assert [g.reported_master(s) for s in g.sentinels] == [first.port] * 3
    for s in g.sentinels:
        assert s.client.execute_command("ROLE")[0] == "sentinel"
        assert {int(o["port"]) for o in s.others(NAME)} == \
            {o.port for o in g.sentinels if o is not s}
        assert [int(r["port"]) for r in s.replicas(NAME)] == [second.port]
    if auth != "plain":
        for port in (g.sentinels[0].port, first.port):
            for pw in (None, "wrong"):
                c = redis_lib.Redis(host="127.0.0.1", port=port, password=pw,
                                    socket_timeout=2)
                # NOAUTH, WRONGPASS (redis-py 4 raises the latter as a
                # plain ResponseError)
                with pytest.raises((redis_lib.exceptions.AuthenticationError,
                                    redis_lib.exceptions.ResponseError),
                                   match="NOAUTH|WRONGPASS|[Aa]uthentication|invalid username-password"):
                    c.ping()
                c.close()
    g.seed("fx", points=3, lifetime=3, orders=1)
    g.wait_replicated()
    assert second.client.hget(hkey("fx"), "points") == "3"

    pid = first.proc.pid
    sw = g.kill_master()
    print("kill -9 of :%d: :%d promoted after %.2f s" % (
        sw.old, sw.new, sw.reported - sw.started))
    assert (sw.old, sw.new) == (first.port, second.port)
    assert first.proc.returncode == -9 and not first.running, pid
    assert g.master is second and second.role() == "master"
    assert g.agreed_master() == second.port
    assert sw.reported - sw.started < 15 * SLOW
    assert second.client.hget(hkey("fx"), "points") == "3"

    g.restart_as_replica(first)
    assert first.role() == "slave" and first.link_up(second.port)
    assert first.client.hget(hkey("fx"), "points") == "3"
    second.client.hset(hkey("fx"), "points", 4)
    g.wait_replicated()
    assert first.client.hget(hkey("fx"), "points") == "4"

    sw = g.failover()
    print("SENTINEL FAILOVER: :%d to :%d in %.2f s" % (
        sw.old, sw.new, sw.reported - sw.started))
    assert (sw.old, sw.new) == (second.port, first.port)
    assert g.master is first and first.role() == "master"
    assert [g.reported_master(s) for s in g.sentinels] == [first.port] * 3
    assert sw.reported - sw.started < 10 * SLOW
    first.client.hset(hkey("fx"), "points", 5)     # writable: the master
    assert second.running, "a failover keeps the old master running"


def test_fixture_fake_sentinel(fakes):
    f = fakes(master=1234)
    c = redis_lib.Redis(host="127.0.0.1", port=f.port, decode_responses=True,
                        socket_timeout=2)
    try:
        assert c.execute_command("SENTINEL", "get-master-addr-by-name",
                                 NAME) == ["127.0.0.1", "1234"]
        assert c.execute_command("SENTINEL", "get-master-addr-by-name",
                                 "other") is None
        f.master = None
        assert c.execute_command("SENTINEL", "get-master-addr-by-name",
                                 NAME) is None
        assert c.execute_command("ROLE") == ["sentinel", [NAME]]
        with pytest.raises(redis_lib.exceptions.ResponseError):
            c.execute_command("HMGET", "k", "f")
        p = c.pubsub()
        p.subscribe("+switch-master")
        m = p.get_message(timeout=2)
        assert m["type"] == "subscribe" and m["channel"] == "+switch-master"
        wait_until(lambda: f.subscriptions() == 1, 2, 0.01, "subscribed")
        assert f.switch(1, 2) == 1
        m = p.get_message(timeout=2)
        assert (m["type"], m["channel"], m["data"]) == (
            "message", "+switch-master",
            "mymaster 127.0.0.1 1 127.0.0.1 2")
        p.close()
        wait_until(lambda: f.subscriptions() == 0, 2, 0.01, "unsubscribed")
        assert len(f.asked()) == 3
    finally:
        c.close()


# --------------------------------------------------------------------------
# nginx -t


SENTINELS = "127.0.0.1:26379 127.0.0.1:26380 127.0.0.1:26381"


@pytest.mark.parametrize("line", [
    "loyalty_redis %s sentinel=mymaster;" % SENTINELS,
    "loyalty_redis 127.0.0.1:26379 sentinel=mymaster;",
    "loyalty_redis %s sentinel=mymaster password=p user=u "
    "sentinel_password=sp sentinel_user=su db=3;" % SENTINELS,
    "loyalty_redis %s sentinel=mymaster sentinel_password=sp;" % SENTINELS,
], ids=["three", "one", "every-param", "sentinel-password"])
def test_config_sentinel_accepted(nginx, line):
    rc, out = check_location(nginx, line)
    assert rc == 0, out
    rc, out = check_location(nginx, "", http=line + "\n")
    assert rc == 0, out


REFUSED = [
    # id, line, words the [emerg] line must hold, the same line accepted
    # one address: several need cluster or sentinel= anyway
    ("sentinel-password-without-sentinel",
     "loyalty_redis 127.0.0.1:26379 sentinel_password=sp;",
     ['"sentinel_password=" in "loyalty_redis" requires "sentinel="'],
     "loyalty_redis 127.0.0.1:26379 sentinel=mymaster sentinel_password=sp;"),
    ("sentinel-user-without-sentinel",
     "loyalty_redis 127.0.0.1:26379 sentinel_user=su sentinel_password=sp;",
     ['requires "sentinel="'],
     "loyalty_redis 127.0.0.1:26379 sentinel=mymaster sentinel_user=su "
     "sentinel_password=sp;"),
    ("sentinel-and-cluster",
     "loyalty_redis %s cluster sentinel=mymaster;" % SENTINELS,
     ["cluster", "sentinel="],
     "loyalty_redis %s sentinel=mymaster;" % SENTINELS),
    ("sentinel-empty-name", "loyalty_redis %s sentinel=;" % SENTINELS,
     ["sentinel="], "loyalty_redis %s sentinel=m;" % SENTINELS),
]


@pytest.mark.parametrize("line,words,good", [c[1:] for c in REFUSED],
                         ids=[c[0] for c in REFUSED])
@pytest.mark.parametrize("level", ["location", "http"])
def test_config_sentinel_refused(nginx, line, words, good, level):
    chk = check_location(nginx, line) if level == "location" else \
        check_location(nginx, "", http=line + "\n")
    rc, out = chk
    assert rc != 0, "nginx -t accepted:\n%s" % out
    where = "in %s:%d" % (chk.conf, chk.line_of(line))
    hits = [x for x in out.splitlines() if where in x
            and re.search(r"\bloyalty_redis\b", x)]
    assert hits and "[emerg]" in hits[0], (where, out)
    for w in words:
        assert w in hits[0], (w, hits[0])
    # the same line without the fault is valid: the refusal is about it
    rc, out = check_location(nginx, good)
    assert rc == 0, out


# --------------------------------------------------------------------------
# reads through the sentinels


def test_reads_through_sentinels(group, nginx):
    g = group
    g.seed("s1", points=5, lifetime=5, orders=1)
    g.seed("s2", points=7, lifetime=70, orders=2)
    g.wait_replicated()
    replica = g.replicas()[0]
    n = nginx(checkout_conf(redis=g.loyalty_redis()), workers=2)
    want = expected("ok", "s1", 5, 5, 1)
    wait_streak(lambda: checkout(n, "s1"), want, 5 * SLOW,
                allowed=[UNAVAILABLE], what="reads through the sentinels")
    m0, r0 = g.master.hmget_calls(), replica.hmget_calls()
    for _ in range(10):
        assert checkout(n, "s1") == want
        assert checkout(n, "s2") == expected("ok", "s2", 7, 70, 2)
        assert checkout(n, "nobody") == expected("new", "nobody")
    assert g.master.hmget_calls() - m0 == 30, "reads not on the master"
    assert replica.hmget_calls() == r0, "reads on the replica"
    said = lines(n, "info", r'loyalty: sentinel says the master of ')
    assert said, n.error_log()[-3000:]
    assert all(re.search(SAYS % (NAME, g.master_port()), message(x))
               for x in said), said
    # one sentinel connection, subscribed, per worker
    wait_until(lambda: (checkout(n, "s1") == want and subscribed(g) == 2),
               5 * SLOW, 0.05, "two subscribed sentinel connections "
               "(one per worker): %d" % subscribed(g))
    before = [int(s.client.info("stats")["total_connections_received"])
              for s in g.sentinels]
    for _ in range(20):
        assert checkout(n, "s1") == want
    time.sleep(0.5)
    after = [int(s.client.info("stats")["total_connections_received"])
             for s in g.sentinels]
    assert after == before, "sentinel connections made per request: " \
        "%r -> %r" % (before, after)
    assert subscribed(g) == 2


@pytest.mark.parametrize("first", ["stopped", "silent"])
def test_first_sentinel_down(group, nginx, silent_redis, first):
    g = group
    g.seed("d1", points=3, lifetime=3, orders=1)
    if first == "stopped":
        g.sentinels[0].stop()
        addresses = g.addresses()
    else:
        addresses = "127.0.0.1:%d %s" % (silent_redis.port,
                                         g.addresses(g.sentinels[1:]))
    n = nginx(checkout_conf("loyalty_redis_timeout 300ms;",
                            redis=g.loyalty_redis(addresses=addresses)))
    want = expected("ok", "d1", 3, 3, 1)
    t0 = time.monotonic()
    wait_streak(lambda: checkout(n, "d1"), want, 5 * SLOW,
                allowed=[UNAVAILABLE], what="reads via the next sentinel")
    print("ok after %.2f s with the first sentinel %s" % (
        time.monotonic() - t0, first))
    stays(lambda: checkout(n, "d1"), want, 1.0)
    wait_line(n, "info", SAYS % (NAME, g.master_port()))
    assert sum(len(s.subscribed_clients()) for s in g.sentinels[1:]) == 1
    if first == "silent":
        assert silent_redis.accepted >= 1


@pytest.mark.parametrize("case", ["right", "wrong-sentinel-password",
                                  "no-sentinel-password",
                                  "wrong-master-password"])
def test_sentinel_auth(auth_group, nginx, case):
    g = auth_group
    g.seed("a1", points=9, lifetime=9, orders=1)
    sp, mp = {"right": ("sp", "mp"),
              "wrong-sentinel-password": ("wrong", "mp"),
              "no-sentinel-password": ("", "mp"),
              "wrong-master-password": ("sp", "wrong")}[case]
    n = nginx(checkout_conf(redis=g.loyalty_redis(password=mp,
                                                  sentinel_password=sp)))
    if case == "right":
        want = expected("ok", "a1", 9, 9, 1)
        wait_streak(lambda: checkout(n, "a1"), want, 5 * SLOW,
                    allowed=[UNAVAILABLE], what="reads with sentinel AUTH")
        stays(lambda: checkout(n, "a1"), want, 0.5)
        wait_line(n, "info", SAYS % (NAME, g.master_port()))
        assert subscribed(g) == 1
        assert not lines(n, "error", "AUTH")
        return
    stays(lambda: checkout(n, "a1"), UNAVAILABLE, 1.5)
    if case == "wrong-master-password":
        # the sentinel answered: the master refused
        wait_line(n, "info", SAYS % (NAME, g.master_port()))
        wait_line(n, "error", r"loyalty: redis refused AUTH")
    else:
        wait_line(n, "error", r"loyalty: .*AUTH")
        assert subscribed(g) == 0
        assert not lines(n, "info", r"loyalty: sentinel says")


def test_unknown_master_name(group, nginx):
    g = group
    g.seed("u1", points=1, lifetime=1, orders=1)
    n = nginx(checkout_conf(redis=g.loyalty_redis(name="othername")))
    stays(lambda: checkout(n, "u1"), UNAVAILABLE, 1.5)
    wait_line(n, "error", UNKNOWN % "othername")
    assert not lines(n, "info", r"loyalty: sentinel says")
    # anonymous requests still served
    assert n.get("/checkout").loyalty == expected("anonymous")


# --------------------------------------------------------------------------
# the ROLE check of a plain loyalty_redis


def test_plain_redis_at_replica(group, nginx):
    g = group
    g.seed("p1", points=4, lifetime=4, orders=1)
    g.wait_replicated()
    replica = g.replicas()[0]
    assert replica.client.hget(hkey("p1"), "points") == "4"
    before = replica.hmget_calls()
    n = nginx(checkout_conf(redis="127.0.0.1:%d" % replica.port))
    stays(lambda: checkout(n, "p1"), UNAVAILABLE, 1.5)
    wait_line(n, "error", NOT_MASTER % "slave")
    assert replica.hmget_calls() == before, "read from a replica"
    # the same configuration at the master reads
    m = nginx(checkout_conf(redis="127.0.0.1:%d" % g.master_port()))
    wait_streak(lambda: checkout(m, "p1"), expected("ok", "p1", 4, 4, 1),
                5 * SLOW, allowed=[UNAVAILABLE], what="reads at the master")
    assert not lines(m, "error", r"not the master")


def test_plain_redis_at_sentinel(group, nginx):
    g = group
    g.seed("p2", points=4, lifetime=4, orders=1)
    n = nginx(checkout_conf(redis="127.0.0.1:%d" % g.sentinels[0].port))
    stays(lambda: checkout(n, "p2"), UNAVAILABLE, 1.5)
    wait_line(n, "error", r'loyalty: .*\bsentinel\b',
              what="an error line naming the sentinel role")


# --------------------------------------------------------------------------
# scripted sentinel: switch messages, a replica named, READONLY


def test_switch_master_message(fakes, redis_factory, nginx):
    a, b = redis_factory(), redis_factory()     # two masters, no replication
    a.seed("w1", points=1, lifetime=1, orders=1)
    b.seed("w1", points=2, lifetime=2, orders=1)
    f = fakes(master=a.port)
    n = nginx(checkout_conf(redis="127.0.0.1:%d sentinel=%s" % (f.port,
                                                                 NAME)),
              workers=2)
    on_a = expected("ok", "w1", 1, 1, 1)
    on_b = expected("ok", "w1", 2, 2, 1)
    wait_streak(lambda: checkout(n, "w1"), on_a, 5 * SLOW,
                allowed=[UNAVAILABLE], what="reads on the named master")
    assert all(q[2] == NAME.encode() for q in f.asked()), f.asked()
    wait_until(lambda: checkout(n, "w1") == on_a and f.subscriptions() == 2,
               5 * SLOW, 0.05, "both workers subscribed")
    subs = f.calls("SUBSCRIBE")
    assert subs and all(s[1:] == [b"+switch-master"] for s in subs), subs
    wait_line(n, "info", SAYS % (NAME, a.port))

    # another master's switch changes nothing
    assert f.switch(a.port, b.port, name="othername") == 2
    stays(lambda: checkout(n, "w1"), on_a, 0.7)
    assert not lines(n, "warn", r"\+switch-master")

    f.master = b.port
    assert f.switch(a.port, b.port) == 2
    t0 = time.monotonic()
    wait_streak(lambda: checkout(n, "w1"), on_b, 2 * SLOW,
                allowed=[on_a, UNAVAILABLE], what="reads on the new master")
    print("reads on the new master %.2f s after +switch-master"
          % (time.monotonic() - t0))
    wait_line(n, "warn", SWITCH % (NAME, b.port))
    # the old master's connections dropped at once (only the test's own
    # client is left on it)
    wait_until(lambda: a.client.info("clients")["connected_clients"] == 1,
               2 * SLOW, 0.05, "the old master's connections closed")
    before = a.hmget_calls()
    stays(lambda: checkout(n, "w1"), on_b, 0.5)
    assert a.hmget_calls() == before


def test_silent_sentinel_left(fakes, redis_factory, nginx):
    """A subscribed sentinel that stops answering without closing (cut
    off): the PING every second finds it silent, its connection is
    closed, and the next sentinel is asked and subscribed to; reads on
    the master go on meanwhile."""
    a = redis_factory()
    a.seed("q1", points=3, lifetime=3, orders=1)
    f1, f2 = fakes(master=a.port), fakes(master=a.port)
    n = nginx(checkout_conf(redis="127.0.0.1:%d 127.0.0.1:%d sentinel=%s"
                            % (f1.port, f2.port, NAME)))
    on_a = expected("ok", "q1", 3, 3, 1)
    wait_until(lambda: checkout(n, "q1") == on_a and f1.subscriptions() == 1,
               5 * SLOW, 0.05, "subscribed to the first sentinel")
    wait_until(lambda: f1.calls("PING"), 3 * SLOW, 0.05, "a PING")
    assert f2.asked() == []
    f1.silent = True
    t0 = time.monotonic()
    # silent for 10 x loyalty_redis_timeout (100 ms here, and SLOW s under
    # valgrind), at least 1 s; then the next sentinel is asked
    wait_until(lambda: f2.subscriptions() == 1, 15 * SLOW, 0.05,
               "subscribed to the second sentinel")
    print("the silent sentinel left %.2f s later" % (time.monotonic() - t0))
    assert f2.asked()
    wait_line(n, "warn", r"loyalty: no reply from redis for \d+ ms, "
              r"closing the connection")
    stays(lambda: checkout(n, "q1"), on_a, 0.5)


def test_credit_wait_exit_through_sentinel(fakes, redis_factory, nginx):
    """loyalty_credit_wait with Sentinel: nginx stopped fast (SIGTERM)
    while a credit's WAIT is pending on the credits' connection.  That
    connection closes with the master's address still valid (it lives
    with the sentinel state, freed with the master's server): the exit
    line names it, and the credit is journaled.  Regression: the master's
    server went first and freed the address the copy's connection logged
    with."""
    import signal as signal_lib
    a = redis_factory()                         # no replica: WAIT waits
    f = fakes(master=a.port)
    http = JOURNAL + "\nloyalty_credit_wait 1 5s;\n"
    n = nginx(sentinel_edge_conf("127.0.0.1:%d sentinel=%s" % (f.port, NAME),
                                 http=http))
    wait_line(n, "info", SAYS % (NAME, a.port))
    assert order(n, "x1", "6.00", "x1-a").status == 200
    wait_marker(a.client, "x1", "x1-a")
    n.proc.send_signal(signal_lib.SIGTERM)
    n.proc.wait(10 * SLOW)
    exits = [x for x in log_lines(n.error_log(), "info")
             if "worker exiting" in x and "redis replies not waited" in x]
    assert exits, n.error_log()
    assert all(", redis: 127.0.0.1:%d, master: \"%s\"" % (a.port, NAME)
               in x for x in exits), exits
    entries = read_journal(journal_path(n))
    assert [(e["order"], e["reason"]) for e in entries] == \
        [("x1-a", "worker exiting")], entries


def test_sentinel_names_a_replica(fakes, redis_factory, nginx):
    m, r = pair(redis_factory)
    m.seed("n1", points=6, lifetime=6, orders=1)
    wait_replicated(m, r)
    before = r.hmget_calls()
    f = fakes(master=r.port)
    n = nginx(checkout_conf(redis="127.0.0.1:%d sentinel=%s" % (f.port,
                                                                 NAME)))
    stays(lambda: checkout(n, "n1"), UNAVAILABLE, 1.5)
    wait_line(n, "error", NOT_MASTER % "slave")
    assert r.hmget_calls() == before, "read from a replica"
    # not the master: the worker asks the sentinel again
    wait_until(lambda: len(f.asked()) >= 2, 5 * SLOW, 0.05,
               "the sentinel asked again (%d)" % len(f.asked()))
    f.master = m.port
    wait_streak(lambda: checkout(n, "n1"), expected("ok", "n1", 6, 6, 1),
                5 * SLOW, allowed=[UNAVAILABLE],
                what="reads once the sentinel names the master")
    assert r.hmget_calls() == before


def test_readonly_reply_finds_the_master(fakes, redis_factory, nginx):
    m, r = pair(redis_factory)
    m.seed("ro1")
    f = fakes(master=m.port)
    n = nginx(sentinel_edge_conf("127.0.0.1:%d sentinel=%s" % (f.port, NAME),
                                 http=JOURNAL))
    wait_streak(lambda: visit(n, "ro1"), ("ok", "0"), 5 * SLOW,
                allowed=[("unavailable", None)], what="reads")
    assert order(n, "ro1", "10", "ro-1").status == 200
    wait_marker(m.client, "ro1", "ro-1")
    wait_replicated(m, r)
    asked = len(f.asked())
    # the master becomes a replica behind the module's back (no
    # +switch-master): its connection stays open, writes get READONLY
    r.client.replicaof("NO", "ONE")
    m.client.replicaof("127.0.0.1", r.port)
    f.master = r.port
    assert m.client.execute_command("ROLE")[0] == "slave"
    assert order(n, "ro1", "5", "ro-2").status == 200
    wait_marker(r.client, "ro1", "ro-2", timeout=10 * SLOW)
    wait_line(n, "warn", READONLY)
    assert len(f.asked()) > asked, "the sentinel was not asked again"
    settle(lambda: record(r.client, "ro1"), quiet=2.0, timeout=20 * SLOW)
    rec = record(r.client, "ro1")
    assert (rec["points"], rec["lifetime"], rec["orders"]) == (15, 15, 2), rec
    assert sorted(e["order"] for e in ledger_entries(r.client, "ro1")) == \
        ["ro-1", "ro-2"]
    before = r.hmget_calls()
    wait_streak(lambda: visit(n, "ro1"), ("ok", "15"), 5 * SLOW,
                allowed=[("unavailable", None)], what="reads after READONLY")
    assert r.hmget_calls() > before, "reads not on the new master"
    assert n.stop() is None
    assert read_journal(journal_path(n)) == []


# --------------------------------------------------------------------------
# failovers during a stream of orders


def failover_during_stream(groups, nginx, how, wait=False):
    """Orders from 4 threads on 2 workers; after 60 of them the master is
    failed over (SENTINEL FAILOVER) or killed (kill -9).  Right after the
    sentinels name the new master, a probe customer gets a value there
    only: reads must give it within RECOVERY s; every order answered
    later than that reads ok; none is credited twice in the new master.
    Prints what was lost.  With wait (loyalty_credit_wait 1), nothing may
    be lost: every confirmed order is applied in the new master or
    journaled; a killed master is started again as a replica, so that the
    new master has one to confirm credits."""
    g = groups()
    cids = ["%s%02d" % (how[:2], i) for i in range(8)]
    for cid in cids:
        g.seed(cid)
    g.seed("probe", points=1, lifetime=1, orders=1)
    g.wait_replicated()
    http = JOURNAL + ("\nloyalty_credit_wait 1;\n" if wait else "")
    n = nginx(sentinel_edge_conf(g.loyalty_redis(), http=http),
              workers=2)
    wait_streak(lambda: visit(n, "probe"), ("ok", "1"), 5 * SLOW,
                allowed=[("unavailable", None)], what="reads before")
    old = g.master
    stream = Stream(n, cids, how)
    try:
        wait_until(lambda: stream.count() >= 60, 30 * SLOW, 0.01,
                   "60 orders")
        at = stream.count()
        sw = g.failover() if how == "failover" else g.kill_master()
        g.master.client.hset(hkey("probe"), "points", 2)
        recovered = wait_streak(
            lambda: visit(n, "probe"), ("ok", "2"), RECOVERY + 2 * SLOW,
            allowed=[("ok", "1"), ("unavailable", None)],
            what="reads on the new master")
        new_before = g.master.hmget_calls()
        if wait and how == "kill":
            g.restart_as_replica(old)
        # orders go on past the recovery bound
        wait_until(lambda: time.monotonic() > sw.reported + RECOVERY + 1.5,
                   RECOVERY + 5, 0.05, "the stream to go on")
        if how == "failover":
            # the old master still runs: nothing read there any more
            old_before = old.hmget_calls()
            time.sleep(0.5)
            assert old.hmget_calls() == old_before, "reads on the old master"
    finally:
        results = stream.stop()
    recovery = recovered - sw.reported
    assert at < len(results)
    assert [x for x in results if x[1] != 200] == [], "orders not confirmed"
    late = [x for x in results if x[3] > sw.reported + RECOVERY]
    assert late, "no order after the recovery bound"
    assert all(x[2] == "ok" for x in late), [x for x in late
                                             if x[2] != "ok"][:10]
    assert g.master.hmget_calls() > new_before, "reads not on the new master"
    if how == "failover":
        wait_line(n, "warn", SWITCH % (NAME, sw.new))
    else:
        # the master was lost: asked again, or told by +switch-master
        wait_until(lambda: lines(n, "info", SAYS % (NAME, sw.new))
                   or lines(n, "warn", SWITCH % (NAME, sw.new)), 5 * SLOW,
                   0.05, "the new master :%d in the error log" % sw.new)

    orders = [x[0] for x in results]
    client = g.master.client
    settle(lambda: (orders_total(client, cids),
                    len(read_journal(journal_path(n)))),
           quiet=2.5, timeout=40 * SLOW)
    assert n.stop() is None
    entries = read_journal(journal_path(n))
    journaled = {(e["customer"], e["order"]) for e in entries}
    assert len(journaled) == len(entries), "an order journaled twice"
    applied = at_most_once(client, orders)
    lost = [o for o in orders if (o[0], o[1]) not in applied
            and (o[0], o[1]) not in journaled]
    print("%s%s of :%d after %d orders: :%d named %.2f s later, reads ok "
          "%.2f s after that; %d orders confirmed, %d applied in the new "
          "master, %d journaled, LOST %d (confirmed, in neither), none "
          "credited twice"
          % ("SENTINEL FAILOVER" if how == "failover" else "kill -9",
             " (loyalty_credit_wait 1)" if wait else "",
             sw.old, at, sw.new, sw.reported - sw.started, recovery,
             len(orders), len(applied), len(entries), len(lost)))
    if lost:
        print("lost: %r" % lost[:20])
    assert recovery <= RECOVERY, "reads ok %.2f s after the sentinels " \
        "named the new master" % recovery
    if wait:
        assert lost == [], "confirmed orders lost with loyalty_credit_wait"


def test_failover_during_stream(groups, nginx):
    failover_during_stream(groups, nginx, "failover")


def test_kill_master_during_stream(groups, nginx):
    failover_during_stream(groups, nginx, "kill")


def test_failover_during_stream_credit_wait(groups, nginx):
    failover_during_stream(groups, nginx, "failover", wait=True)


def test_kill_master_during_stream_credit_wait(groups, nginx):
    failover_during_stream(groups, nginx, "kill", wait=True)


# --------------------------------------------------------------------------
# the journal


def test_journal_replayed_through_sentinels(groups, nginx):
    """A credit journaled while the master is gone names the sentinels and
    the master's name; tools/loyalty-replay asks the sentinels and applies
    it on the master they name after the failover, once."""
    g = groups()
    g.seed("j1")
    n = nginx(sentinel_edge_conf(g.loyalty_redis(), http=JOURNAL),
              workers=1)
    wait_until(lambda: order(n, "j1", total=5, oid="warm").header(
        "X-Loyalty-Status") == "ok" or None, 5 * SLOW, 0.05,
        "an order read through the sentinels")
    wait_until(lambda: g.master.client.get(marker("j1", "warm")), 5 * SLOW,
               0.05, "the first credit")
    g.wait_replicated()
    old = g.master
    old.kill()
    # the master is gone before the sentinels know: the credit waits in
    # the retry queue, and the worker journals it as it exits
    r = order(n, "j1", total=7, oid="o1")
    assert r.status == 200 and r.header("X-Loyalty-Status") == \
        "unavailable", r
    assert n.stop() is None
    journal = read_journal(journal_path(n))
    entries = [e for e in journal if e["order"] == "o1"]
    assert len(entries) == 1, journal
    # the warm-up may have sent "warm" more than once before the read was
    # ok: a resend of it still retried at the exit is journaled too, and
    # replayed as a duplicate
    others = [e for e in journal if e["order"] != "o1"]
    assert all(x["order"] == "warm" for x in others), journal
    e = entries[0]
    assert e["sentinel"] == NAME and e["redis"] == g.addresses(), e
    assert e["reason"] == "worker exiting", e
    # the sentinels promote the replica; the replay follows them
    wait_until(lambda: g.agreed_master() not in (None, old.port),
               20 * SLOW, 0.1, "the sentinels to name a new master")
    new = g.server(g.agreed_master())
    wait_until(lambda: new.role() == "master", 10 * SLOW, 0.1,
               "the replica to be master")
    rc, applied, already, failed, out = replay(journal_path(n))
    assert (rc, applied, already, failed) == (0, 1, len(others), 0), out
    rec = record(new.client, "j1")
    assert (rec["points"], rec["lifetime"], rec["orders"]) == (12, 12, 2), rec
    assert did(new.client.get(marker("j1", "o1"))) == "7:0"
    # again: nothing more
    rc, applied, already, failed, out = replay(journal_path(n))
    assert (rc, applied, already, failed) == (0, 0, 1 + len(others), 0), out
    assert record(new.client, "j1")["points"] == 12
