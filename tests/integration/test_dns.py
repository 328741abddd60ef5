"""DNS failover: `loyalty_redis NAME:PORT` with nginx's `resolver` in force.

The name is resolved by getaddrinfo when nginx reads its configuration;
with a `resolver` (that has addresses) the module resolves it again with
nginx's resolver before each reconnect after a failure, and connects to
what it answers:

    info  loyalty: redis host "NAME" resolves to ADDR now    (a new answer)
    warn  loyalty: could not resolve redis host "NAME" ...   (keeps its last
                                                              addresses)

Without a resolver nothing changes.

The name is "localhost": /etc/hosts has it, so `nginx -t` and the start
resolve it (127.0.0.1 on Debian 12; Debian 13 may list ::1 too), and the
test's DNS server (dns_support.DnsServer) answers for it as well, nginx's
resolver reading no /etc/hosts.  Two Redis servers on the same port: A on
127.0.0.1 only, B on [::1] only, each with its own record of the
customer, so that a read shows which one answered.  Only loopback
addresses are used.

test_fixture_* check the DNS server, nginx's resolver against it and the
Redis pair themselves (no loyalty module involved)."""

import re
import socket
import time

import pytest

from conftest import (BACKEND, SLOW, RedisServer, checkout_conf, expected,
                      parse_echo, run_parallel, wait_until)
from credit_support import (JOURNAL, did, edge_conf, journal_path,
                            ledger_entries,
                            marker, order, read_journal, record, settle,
                            wait_marker)
from dns_support import (AA, NOERROR, NXDOMAIN, QR, RA, RD, SERVFAIL,
                         V6RedisServer, build_query, dns_query,
                         dns_server, dual_port)  # noqa: F401


CID = "dns-c"
RECORDS = {                     # who -> (points, lifetime, orders)
    "A": (100, 100, 1),         # Redis A, 127.0.0.1
    "B": (200, 200, 2),         # Redis B, [::1]
    "A again": (101, 101, 1),   # Redis A after a restart (no data kept)
}
UNAVAILABLE = expected("unavailable")

RESOLVER = "resolver 127.0.0.1:{dns_port} valid=1s ipv6=on;\n"
# a resolver that does not answer must give up before the module's
# reconnect is much delayed: nginx's default resolver_timeout is 30 s
RESOLVER_1S = RESOLVER + "resolver_timeout 1s;\n"

RESOLVES = re.compile(r'\[info\] (\d+)#\d+: .*loyalty: redis host '
                      r'"localhost" resolves to (.+) now')
NOT_RESOLVED = re.compile(r'\[warn\] .*loyalty: could not resolve redis '
                          r'host "localhost"')


def localhost_addresses(port):
    """{"A": [...], "AAAA": [...]} of localhost as nginx's `nginx -t` gets
    them (getaddrinfo, AF_UNSPEC, SOCK_STREAM, AI_ADDRCONFIG)."""
    out = {"A": [], "AAAA": []}
    for fam, _, _, _, sa in socket.getaddrinfo(
            "localhost", port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
            socket.AI_ADDRCONFIG):
        key = "A" if fam == socket.AF_INET else "AAAA"
        if sa[0] not in out[key]:
            out[key].append(sa[0])
    return out


# --------------------------------------------------------------------------
# the Redis pair: A on 127.0.0.1:P, B on [::1]:P


class Pair:
    def __init__(self, tmp_root):
        self.port = dual_port()
        self.a = RedisServer(tmp_root, port=self.port)
        self.b = V6RedisServer(tmp_root, port=self.port)

    def start(self, who):
        """Start A ("A": record A, "A again": record "A again") or B,
        and seed its record of the customer."""
        server = self.b if who == "B" else self.a
        server.start()
        points, lifetime, orders = RECORDS[who]
        server.seed(CID, points=points, lifetime=lifetime, orders=orders)
        return server

    def stop(self):
        self.a.stop()
        self.b.stop()


@pytest.fixture
def pair(tmp_root):
    p = Pair(tmp_root)
    yield p
    p.stop()


# --------------------------------------------------------------------------
# reads


def read_from(n):
    """(which Redis answered a read of /checkout: "A", "B", "A again" or
    "unavailable", the pid of the worker that served it); anything else
    fails the test."""
    r = n.get("/checkout", cookies={"cid": CID})
    assert r.status == 200, r
    pid = int(r.header("X-Worker"))
    got = r.loyalty
    for name, rec in RECORDS.items():
        if got == expected("ok", CID, *rec):
            return name, pid
    if got == expected("new", CID):
        # an empty Redis: A in the moment between its restart and its seed
        return "new", pid
    assert got == UNAVAILABLE, "a read neither of the records nor "\
        "unavailable: %r" % got
    return "unavailable", pid


def who(n):
    return read_from(n)[0]


def wait_resolved(n, dns, since, workers, read):
    """Reading, until each worker has asked the DNS server for localhost
    (AAAA) since then: a reconnect after a failure resolves the name
    first, and an idle connection that Redis closed is made again only
    for a request."""
    def asked():
        assert read(n)[0] == "unavailable"
        return dns.count("localhost", "AAAA", since=since) >= workers
    wait_until(asked, 10 * SLOW, 0.05, "every worker to ask the resolver")


def edge_read(n):
    """The same through the credit edge (one worker): a GET without an
    order total credits nothing, and the response headers carry the
    balance."""
    r = order(n, CID)
    assert r.status == 200, r
    status = r.header("X-Loyalty-Status")
    if status == "unavailable":
        return "unavailable", None
    assert status == "ok", r
    points = int(r.header("X-Loyalty-Points"))
    for name, rec in RECORDS.items():
        if points == rec[0]:
            return name, None
    if points == RECORDS["B"][0] + 10:
        return "B", None            # with dns-o1 (10) applied there
    raise AssertionError("a read of neither record: %r" % r)


def wait_for(n, want, timeout=10, rounds=3, allowed=("unavailable",),
             read=read_from, batch=8):
    """Read, `batch` reads at once from as many threads, until `rounds`
    rounds in a row all come from `want` and, among them, every worker
    served at least two (with read_from: it says which worker did);
    bounded by timeout.  Meanwhile any read must come from `want` or be
    one of `allowed`.  Returns the time it took."""
    seen = []
    clean = []                  # the current run of clean rounds

    def done():
        got = run_parallel(lambda _: read(n), range(batch), threads=batch)
        names = [w for w, _ in got]
        seen.append(names)
        bad = [w for w in names if w != want and w not in allowed]
        assert not bad, "a read from %r while waiting for %r: %r" % (
            bad[0], want, seen[-10:])
        if names != [want] * batch:
            clean.clear()
            return False
        clean.append([pid for _, pid in got])
        served = [pid for r in clean for pid in r]
        if None not in served and any(served.count(w) < 2
                                      for w in n.workers()):
            return False
        return len(clean) >= rounds
    t0 = time.monotonic()
    try:
        wait_until(done, timeout * SLOW, 0.02, "%d rounds of reads from %s, "
                   "every worker serving" % (rounds, want))
    except AssertionError as e:
        raise AssertionError("%s; the last rounds: %r" % (e, seen[-10:]))
    return time.monotonic() - t0


def all_from(n, want, count=40, threads=8):
    """count reads at once from several threads: all from want."""
    got = run_parallel(lambda _: who(n), range(count), threads=threads)
    assert got == [want] * count, got


def stays(n, want, seconds=3.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        assert who(n) == want
        time.sleep(0.1)


def matches(n, pattern):
    return [m for m in map(pattern.search, n.error_log().splitlines()) if m]


def conf(http=""):
    return checkout_conf("add_header X-Worker $pid;", http=http,
                         redis="localhost:{redis_port}")


# --------------------------------------------------------------------------
# the fixtures themselves


def test_fixture_dns_server(dns_server):
    dns = dns_server
    dns.set("localhost", A=["127.0.0.1"])
    dns.set("both.test", A=["127.0.0.1", "127.0.0.2"], AAAA=["::1"])

    r = dns_query(dns.port, "localhost", "A")
    assert r.rcode == NOERROR and r.addresses == ["127.0.0.1"], r
    assert r.flags & (QR | AA | RD | RA) == QR | AA | RD | RA, r
    assert r.question == ("localhost", 1, 1)
    assert [a[:4] for a in r.answers] == [("localhost", 1, 1, 1)]  # TTL 1

    # NODATA: the name is known, no record of the type
    r = dns_query(dns.port, "localhost", "AAAA")
    assert r.rcode == NOERROR and r.answers == [], r
    assert [a[1] for a in r.authority] == [6]                   # an SOA

    r = dns_query(dns.port, "both.test", "A")
    assert r.addresses == ["127.0.0.1", "127.0.0.2"], r
    r = dns_query(dns.port, "BOTH.test", "AAAA", rd=False)
    assert r.addresses == ["::1"], r
    assert r.question == ("BOTH.test", 28, 1), "question not echoed as sent"
    assert not r.flags & RD, r

    r = dns_query(dns.port, "unknown.test", "A")
    assert r.rcode == NXDOMAIN and r.answers == [], r

    # answers with and without compression pointers
    qid, msg = build_query("both.test", "AAAA", qid=4242)
    with_ptr = dns.handle(msg)
    dns.compress = False
    without = dns.handle(msg)
    dns.compress = True
    assert with_ptr[:2] == without[:2] == b"\x10\x92"           # the id
    assert b"\xc0\x0c" in with_ptr and b"\xc0" not in without
    assert len(without) == len(with_ptr) + len(b"\x04both\x04test\x00") - 2

    dns.mode = "servfail"
    r = dns_query(dns.port, "localhost", "A")
    assert r.rcode == SERVFAIL and r.answers == [], r
    dns.mode = "ignore"
    before = dns.count("localhost", "A")
    assert dns_query(dns.port, "localhost", "A", timeout=0.3) is None
    assert dns.count("localhost", "A") == before + 1, "ignored but counted"
    dns.mode = None

    dns.set("localhost", AAAA=["::1"])
    r = dns_query(dns.port, "localhost", "AAAA")
    assert r.addresses == ["::1"], r
    assert dns_query(dns.port, "localhost", "A").answers == []
    dns.remove("localhost")
    assert dns_query(dns.port, "localhost", "A").rcode == NXDOMAIN

    # a query that does not parse: FORMERR, and recorded as an error
    r = dns_query(dns.port, None, None, raw=b"\x00\x07\x01\x00\x00\x01"
                  b"\x00\x00\x00\x00\x00\x00\x05ab")
    assert r.id == 7 and r.rcode == 1, r
    assert len(dns.errors) == 1, dns.errors
    dns.errors.clear()

    assert dns.count("localhost", "A") == 5
    assert dns.count("both.test") == 2 + 2      # two via handle()


RESOLVING_PROXY = RESOLVER_1S + """
server {
    listen 127.0.0.1:{port};
    location = /__harness_ready { return 204; }
    location /v4 {
        set $h "backend.test";
        proxy_pass http://$h:{backend_port};
    }
    location /v6 {
        set $h "backend6.test";
        proxy_pass http://$h:{backend_port};
    }
}
server {
    listen [::1]:{backend_port};
    location / { return 200 "v6 backend"; }
}
""" + BACKEND


def test_fixture_dns_with_nginx_resolver(dns_server, nginx):
    """nginx's own resolver (proxy_pass with a variable) takes the
    server's answers: A only, AAAA only (NODATA for A), uncompressed
    names, and sees its NXDOMAIN, SERVFAIL and silence."""
    dns = dns_server
    dns.set("backend.test", A=["127.0.0.1"])
    dns.set("backend6.test", AAAA=["::1"])
    n = nginx(RESOLVING_PROXY, load_module=False, dns_port=dns.port,
              backend_port=dual_port())

    def v4():
        return n.get("/v4")

    r = v4()
    assert r.status == 200 and r.echo["uri"] == "/v4", r
    # ipv6=on: both types asked
    assert dns.count("backend.test", "A") >= 1
    assert dns.count("backend.test", "AAAA") >= 1
    r = n.get("/v6")
    assert (r.status, r.body) == (200, "v6 backend"), r

    # the answer is cached for valid=1s; then asked again, uncompressed
    dns.compress = False
    t = time.monotonic()
    wait_until(lambda: v4().status == 200
               and dns.count("backend.test", since=t) >= 2, 5 * SLOW, 0.1,
               "nginx to ask again for backend.test")
    assert parse_echo(v4().body)["uri"] == "/v4"
    t = time.monotonic()
    wait_until(lambda: n.get("/v6").body == "v6 backend"
               and dns.count("backend6.test", since=t) >= 2, 5 * SLOW, 0.1,
               "nginx to ask again for backend6.test")
    dns.compress = True

    for change, why in (
            (lambda: dns.remove("backend.test"), "(3: Host not found)"),
            (lambda: setattr(dns, "mode", "servfail"),
             "(2: Server failure)"),
            (lambda: setattr(dns, "mode", "ignore"),
             "(110: Operation timed out)")):
        dns.set("backend.test", A=["127.0.0.1"])
        dns.mode = None
        wait_until(lambda: v4().status == 200, 5 * SLOW, 0.1, "backend ok")
        change()
        wait_until(lambda: v4().status == 502, 5 * SLOW, 0.1,
                   "502 after %s" % why)
        assert "backend.test could not be resolved %s" % why \
            in n.error_log(), n.error_log()[-2000:]
    dns.mode = None
    wait_until(lambda: v4().status == 200, 5 * SLOW, 0.1, "backend again")


def test_fixture_redis_pair(pair):
    pair.start("A")
    pair.start("B")
    assert pair.a.client.hget("loyalty:{%s}" % CID, "points") == "100"
    assert pair.b.client.hget("loyalty:{%s}" % CID, "points") == "200"
    for host, server in (("127.0.0.1", pair.a), ("::1", pair.b)):
        with socket.create_connection((host, pair.port), timeout=2) as s:
            s.sendall(b"INFO server\r\n")
            assert ("process_id:%d" % server.proc.pid).encode() in \
                s.recv(65536)
    pair.b.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("::1", pair.port), timeout=2)
    pair.a.stop()
    pair.b.start()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", pair.port), timeout=2)


# --------------------------------------------------------------------------
# the module


def test_follows_the_name_to_a_new_address(dns_server, pair, nginx):
    dns = dns_server
    dns.set("localhost", A=["127.0.0.1"])
    pair.start("A")
    n = nginx(conf(http=RESOLVER), redis_port=pair.port,
              dns_port=dns.port, workers=2)
    # B is not up yet: where getaddrinfo lists ::1 first (Debian 13) the
    # module is refused there and settles on 127.0.0.1 all the same
    wait_for(n, "A")
    all_from(n, "A")
    assert matches(n, RESOLVES) == []
    master, workers = n.pid, n.workers()

    # the name moves to ::1, then A goes away.  B starts only once every
    # worker has asked the resolver: where getaddrinfo lists ::1 too
    # (Debian 13), the module would otherwise reach B by trying the next
    # address of the configuration, with no DNS involved
    t = time.monotonic()
    dns.set("localhost", AAAA=["::1"])
    pair.a.stop()
    wait_resolved(n, dns, t, len(workers), read_from)
    pair.start("B")
    took = wait_for(n, "B", allowed=("unavailable",))
    all_from(n, "B")
    print("followed to [::1] in %.2f s" % took)
    assert dns.count("localhost", "AAAA", since=t) >= 1, \
        "the resolver was never asked for localhost"
    lines = matches(n, RESOLVES)
    assert lines, "no 'resolves to' line:\n%s" % n.error_log()[-3000:]
    for m in lines:
        assert "::1" in m.group(2) and "127.0.0.1" not in m.group(2), \
            m.group(0)
    # every worker reads from B: each resolved and said so
    assert {int(m.group(1)) for m in lines} == set(workers), lines
    assert matches(n, NOT_RESOLVED) == []
    assert n.pid == master and n.workers() == workers, "nginx was restarted"

    # and back: the name moves to 127.0.0.1 again, B goes away.  A worker
    # that resolved less than `valid` (1 s) ago gets nginx's cached answer
    # ([::1]) at its next reconnects, and follows once the cache expired
    seen = len(lines)
    dns.set("localhost", A=["127.0.0.1"])
    pair.start("A again")
    pair.b.stop()
    took = wait_for(n, "A again")
    all_from(n, "A again")
    back = matches(n, RESOLVES)[seen:]
    assert back, "no 'resolves to' line for 127.0.0.1"
    print("followed back to 127.0.0.1 in %.2f s" % took)
    for m in back:
        assert "127.0.0.1" in m.group(2) and "::1" not in m.group(2), \
            m.group(0)
    assert {int(m.group(1)) for m in back} == set(workers), back
    assert n.pid == master and n.workers() == workers, "nginx was restarted"


def test_without_resolver_nothing_changes(pair, nginx):
    gai = localhost_addresses(pair.port)
    pair.start("A")
    n = nginx(conf(), redis_port=pair.port)
    wait_for(n, "A")
    pair.start("B")
    pair.a.stop()
    if "::1" not in gai["AAAA"]:
        # localhost is 127.0.0.1 alone (Debian 12): without a resolver the
        # module knows no other address, and B on [::1] is never reached
        wait_until(lambda: who(n) == "unavailable", 5 * SLOW, 0.05,
                   "unavailable after A stopped")
        stays(n, "unavailable", 3.0)
    else:
        # getaddrinfo already lists ::1 for localhost (Debian 13): the
        # module rotates through the addresses of the configuration and
        # reaches B by itself, no DNS involved
        wait_for(n, "B")
    assert matches(n, RESOLVES) == [] and matches(n, NOT_RESOLVED) == []


@pytest.mark.parametrize("failure", ["ignore", "servfail"])
def test_resolve_failure_keeps_the_last_address(dns_server, pair, nginx,
                                                failure):
    dns = dns_server
    dns.set("localhost", AAAA=["::1"])      # never given: the DNS fails
    pair.start("A")
    n = nginx(conf(http=RESOLVER_1S), redis_port=pair.port,
              dns_port=dns.port)
    wait_for(n, "A")

    dns.mode = failure
    t = time.monotonic()
    pair.a.stop()
    wait_until(lambda: who(n) == "unavailable", 5 * SLOW, 0.05,
               "unavailable after A stopped")
    wait_until(lambda: matches(n, NOT_RESOLVED), 10 * SLOW, 0.1,
               "the 'could not resolve' warning")
    assert dns.count("localhost", since=t) >= 1
    assert who(n) == "unavailable"

    pair.start("A again")
    took = wait_for(n, "A again", allowed=("unavailable", "new"))
    print("back on the last address in %.2f s" % took)
    assert matches(n, RESOLVES) == []


def test_unchanged_answer_reconnects_quietly(dns_server, pair, nginx):
    """The DNS says what getaddrinfo said: a Redis restart on its address
    is reconnected to, the resolver asked, nothing logged about it."""
    dns = dns_server
    gai = localhost_addresses(pair.port)
    dns.set("localhost", **gai)
    pair.start("A")
    n = nginx(conf(http=RESOLVER), redis_port=pair.port, dns_port=dns.port)
    wait_for(n, "A")
    t = time.monotonic()
    pair.a.stop()
    wait_until(lambda: who(n) == "unavailable", 5 * SLOW, 0.05,
               "unavailable after A stopped")
    wait_until(lambda: dns.count("localhost", since=t) >= 1, 10 * SLOW, 0.05,
               "the module to ask the resolver for localhost")
    pair.start("A again")
    wait_for(n, "A again", allowed=("unavailable", "new"))
    assert matches(n, RESOLVES) == [] and matches(n, NOT_RESOLVED) == []


def test_credit_while_following(dns_server, pair, nginx):
    dns = dns_server
    dns.set("localhost", A=["127.0.0.1"])
    edge = edge_conf(http=RESOLVER + JOURNAL)
    assert "loyalty_redis 127.0.0.1:{redis_port};" in edge
    edge = edge.replace("loyalty_redis 127.0.0.1:{redis_port};",
                        "loyalty_redis localhost:{redis_port};")
    pair.start("A")
    n = nginx(edge, redis_port=pair.port, dns_port=dns.port)
    journal = journal_path(n)
    wait_for(n, "A", read=edge_read)

    t = time.monotonic()
    dns.set("localhost", AAAA=["::1"])
    pair.a.stop()
    # an order while the module follows: A is gone, B not up yet
    r1 = order(n, CID, "10.00", "dns-o1")
    assert r1.status == 200, r1
    wait_resolved(n, dns, t, len(n.workers()), edge_read)
    b = pair.start("B")
    wait_for(n, "B", read=edge_read)

    r2 = order(n, CID, "19.99", "dns-o2")
    assert r2.status == 200, r2
    assert r2.header("X-Loyalty-Earned") == "19", r2
    assert wait_marker(b.client, CID, "dns-o2") == "19:0"
    r3 = order(n, CID, "19.99", "dns-o2")       # the same order again
    assert r3.status == 200, r3

    # the retry queue drained, nothing moves any more
    settle(lambda: (record(b.client, CID), len(read_journal(journal))))
    entries = read_journal(journal)
    o1_applied = b.client.get(marker(CID, "dns-o1")) is not None
    o1_journaled = [e for e in entries if e["order"] == "dns-o1"]
    assert len(entries) == len(o1_journaled) <= 1, entries
    assert o1_applied != bool(o1_journaled), \
        "dns-o1 applied in B: %s, journaled: %r" % (o1_applied, entries)
    if o1_applied:
        assert did(b.client.get(marker(CID, "dns-o1"))) == "10:0"
    earned = 19 + (10 if o1_applied else 0)
    rec = record(b.client, CID)
    assert (rec["points"], rec["lifetime"], rec["orders"]) == (
        200 + earned, 200 + earned, 2 + 1 + o1_applied), rec
    assert sorted(e["order"] for e in ledger_entries(b.client, CID)) == \
        (["dns-o1"] if o1_applied else []) + ["dns-o2"]
    assert matches(n, RESOLVES), "no 'resolves to' line"
