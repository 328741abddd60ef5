"""tools/loyalty-replay into a real Redis Cluster: 3 masters (no replicas)
on free loopback ports, started and stopped by this file.  Journal lines
are written by hand in the module's format (ngx_http_loyalty_journal.c)
with "cluster": true and the seeds as written in loyalty_redis; every
credit must land on the master that owns its customer's slot, once.

MOVED is made deterministic by a fake seed whose CLUSTER SLOTS names one
master for every slot; ASK and TRYAGAIN by a slot migration made by hand
(CLUSTER SETSLOT ... MIGRATING/IMPORTING, MIGRATE)."""

import json
import os
import signal
import socketserver
import subprocess
import tempfile
import threading
import time

import pytest
import redis as redis_lib

from conftest import (REDIS_BIN, SLOW, free_port, track,
                      wait_until)
from cluster_support import cluster_port
from credit_support import did, replay

REDIS_CLI = os.environ.get("REDIS_CLI", "/usr/bin/redis-cli")


# --------------------------------------------------------------------------
# a 3-master cluster; run_cluster() is shared with the demo test


class Cluster:
    """what = "cluster" or the subclass' kind, for names and messages; a
    subclass may change how a node listens and how it is reached"""

    what = "cluster"

    def __init__(self, root, masters=3):
        self.dir = tempfile.mkdtemp(prefix=self.what.replace(" ", "-") + "-",
                                    dir=root)
        self.ports = [cluster_port() for _ in range(masters)]
        self.procs = []

    def listen_args(self, port):
        return ["--port", str(port)]

    def cli_args(self):
        return []

    def client_args(self):
        return {}

    def start(self):
        for port in self.ports:
            d = os.path.join(self.dir, str(port))
            os.makedirs(d)
            p = subprocess.Popen(
                [REDIS_BIN] + self.listen_args(port) + [
                 "--bind", "127.0.0.1",
                 "--cluster-enabled", "yes",
                 "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", "5000",
                 "--dir", d, "--save", "", "--appendonly", "no",
                 "--daemonize", "no", "--logfile", "redis.log"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
            self.procs.append(p)
            track(p.pid, "%s redis-server :%d" % (self.what, port))
        for port in self.ports:
            wait_until(lambda: self._ping(port), 10 * SLOW,
                       message="redis-server on port %d" % port)
        r = subprocess.run(
            [REDIS_CLI] + self.cli_args() + ["--cluster", "create"]
            + ["127.0.0.1:%d" % p for p in self.ports] + ["--cluster-yes"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=60 * SLOW)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_until(self.ok, 30 * SLOW, 0.05, "cluster_state:ok on every node")
        return self

    def _ping(self, port):
        for p in self.procs:
            assert p.poll() is None, "a cluster redis-server exited"
        try:
            return self.node(port).ping()
        except redis_lib.ConnectionError:
            return False

    def ok(self):
        return all(self.node(p).cluster("info")["cluster_state"] == "ok"
                   and self.node(p).execute_command("CLUSTER SLOTS")
                   and len(self.node(p).execute_command("CLUSTER SLOTS"))
                   == len(self.ports) for p in self.ports)

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def node(self, port):
        return redis_lib.Redis(host="127.0.0.1", port=port,
                               decode_responses=True, socket_timeout=5,
                               socket_connect_timeout=2,
                               **self.client_args())

    def node_id(self, port):
        return self.node(port).execute_command("CLUSTER MYID")

    def slot(self, key):
        return int(self.node(self.ports[0]).execute_command(
            "CLUSTER KEYSLOT", key))

    def owner(self, key):
        """The port of the master that serves key's slot, by CLUSTER SLOTS
        of the first node."""
        slot = self.slot(key)
        for first, last, master, *_ in self.node(self.ports[0]).\
                execute_command("CLUSTER SLOTS"):
            if first <= slot <= last:
                return int(master[1])
        raise AssertionError("slot %d is not served" % slot)

    def customers(self, n, stem):
        """n customers per master: {port: [ids]}"""
        out = {p: [] for p in self.ports}
        i = 0
        while min(len(v) for v in out.values()) < n:
            cid = "%s%03d" % (stem, i)
            i += 1
            owned = out[self.owner("loyalty:{%s}" % cid)]
            if len(owned) < n:
                owned.append(cid)
        return out


def run_cluster(root):
    """A started 3-master cluster; the caller stops it."""
    c = Cluster(root)
    try:
        return c.start()
    except BaseException:
        c.stop()
        raise


@pytest.fixture(scope="module")
def cluster(tmp_root):
    c = run_cluster(tmp_root)
    yield c
    c.stop()


# --------------------------------------------------------------------------
# journal lines as the module writes them


def line(seeds, cid, oid, amount, earned, redeem=0, ts=None, prefix="loyalty:",
         cluster=True, db=0, **extra):
    entry = {"ts": ts or int(time.time()), "redis": seeds, "db": db,
             "prefix": prefix, "customer": cid, "order": oid,
             "amount": amount, "earned": earned, "redeem": redeem,
             "ledger": 100, "expire": 0, "reason": "retries exhausted"}
    entry.update(extra)
    if cluster:
        entry["cluster"] = True
    return json.dumps(entry, separators=(",", ":"))


def write_journal(tmp_root, name, lines):
    path = os.path.join(tmp_root, name)
    with open(path, "w") as f:
        f.write("".join(l + "\n" for l in lines))
    return path


def seeds_of(cluster, n=2):
    """The seeds as written in loyalty_redis, space-separated."""
    return " ".join("127.0.0.1:%d" % p for p in cluster.ports[:n])


def errors(cluster, word, ports=None):
    """How many error replies starting with word (MOVED, ASK, TRYAGAIN)
    the nodes have sent (INFO errorstats)."""
    total = 0
    for port in ports or cluster.ports:
        value = cluster.node(port).info("errorstats").get("errorstat_" + word)
        if isinstance(value, dict):         # {"count": 4}, as redis-py parses
            total += int(value.get("count", 0))
        elif value:                         # "count=4", unparsed
            total += int(str(value).split("=")[1].split(",")[0])
    return total


def check_applied(cluster, cid, orders, points, lifetime, count=None):
    """The record, markers and ledger of cid on its master (count: its
    orders, by default those given), and nowhere else."""
    key = "loyalty:{%s}" % cid
    port = cluster.owner(key)
    c = cluster.node(port)
    rec = c.hgetall(key)
    assert (int(rec["points"]), int(rec["lifetime"]),
            int(rec["orders"])) == (points, lifetime,
                                    len(orders) if count is None else count), \
        rec
    for oid, earned, redeemed in orders:
        assert did(c.get("%s:order:%s" % (key, oid))) == "%d:%d" % (
            earned, redeemed), (cid, oid)
    entries = [f for _, f in c.xrange(key + ":ledger")]
    assert [(e["order"], int(e["earned"]), int(e["redeemed"]))
            for e in entries] == orders, entries
    for other in cluster.ports:
        if other != port:
            assert cluster.node(other).execute_command(
                "CLUSTER COUNTKEYSINSLOT", cluster.slot(key)) == 0


# --------------------------------------------------------------------------
# tests


def test_replay_into_cluster(cluster, tmp_root, redis):
    """Customers on every master, two orders each (one redeeming, one
    seeded customer): every credit lands on its slot's master; a second
    replay finds them all applied.  A single-server line in the same
    journal is replayed as before."""
    seeds = seeds_of(cluster)
    owned = cluster.customers(2, "rc")
    lines, expect = [], {}
    for port, cids in owned.items():
        for cid in cids:
            lines.append(line(seeds, cid, cid + "-1", "19.99", 19))
            lines.append(line(seeds, cid, cid + "-2", "5.00", 5, redeem=3))
            expect[cid] = ([(cid + "-1", 19, 0), (cid + "-2", 5, 3)], 21, 24,
                           2)
    # a known customer on the first master: the seeded balance is kept
    seeded = owned[cluster.ports[0]][0]
    cluster.node(cluster.ports[0]).hset("loyalty:{%s}" % seeded, mapping={
        "points": 100, "lifetime": 500, "orders": 4,
        "first_order": 1700000000, "last_order": 1700000000})
    expect[seeded] = (expect[seeded][0], 121, 524, 6)
    # a single Redis, no "cluster" key: unchanged behaviour
    lines.append(line("127.0.0.1:%d" % redis.port, "solo", "solo-1", "7.00",
                      7, cluster=False))
    journal = write_journal(tmp_root, "cluster.journal", lines)

    rc, applied, already, failed, out = replay(journal)
    assert (rc, applied, already, failed) == (0, len(lines), 0, 0), out
    assert "Traceback" not in out, out
    for cid, want in expect.items():
        check_applied(cluster, cid, *want)
    assert redis.client.hget("loyalty:{solo}", "points") == "7"

    rc, applied, already, failed, out = replay(journal, extra=["-v"])
    assert (rc, applied, already, failed) == (0, 0, len(lines), 0), out
    assert out.count(": duplicate order ") == len(lines), out
    for cid, want in expect.items():
        check_applied(cluster, cid, *want)


def test_replay_cluster_wait(cluster, tmp_root):
    """A line journaled under loyalty_credit_wait ("wait", "wait_ms") is
    confirmed by WAIT on the master that ran its script: these masters
    have no replica, so it runs there, is reported unconfirmed and
    fails; the next replay finds it applied (and unconfirmed again);
    with --wait 0 it is taken as applied before."""
    seeds = seeds_of(cluster)
    owned = cluster.customers(1, "rw")
    cids = [cids[0] for cids in owned.values()]
    journal = write_journal(tmp_root, "wait.journal", [
        line(seeds, cid, cid + "-1", "8.00", 8, wait=1, wait_ms=100)
        for cid in cids])

    def waits():
        return sum(int(cluster.node(p).info("commandstats").get(
            "cmdstat_wait", {}).get("calls", 0)) for p in cluster.ports)

    before = waits()
    rc, applied, already, failed, out = replay(journal)
    assert (rc, applied, already, failed) == (1, 0, 0, len(cids)), out
    assert out.count("unconfirmed: applied order ") == len(cids), out
    assert "reached 0 of 1 replicas within 100 ms" in out, out
    assert waits() == before + len(cids)
    for cid in cids:
        check_applied(cluster, cid, [(cid + "-1", 8, 0)], 8, 8)

    rc, applied, already, failed, out = replay(journal)
    assert (rc, failed) == (1, len(cids)), out
    assert out.count("unconfirmed: already applied order ") == len(cids), out

    rc, applied, already, failed, out = replay(journal,
                                               extra=["--wait", "0"])
    assert (rc, applied, already, failed) == (0, 0, len(cids), 0), out
    assert waits() == before + 2 * len(cids)
    for cid in cids:
        check_applied(cluster, cid, [(cid + "-1", 8, 0)], 8, 8)


def test_replay_cluster_option(cluster, tmp_root):
    """--redis <seeds, comma-separated> --cluster replays lines that were
    written for another address (a cluster moved to new hosts)."""
    owned = cluster.customers(1, "opt")
    lines = [line("10.255.255.1:7000 10.255.255.2:7000", cids[0],
                  "opt-1", "3.00", 3) for cids in owned.values()]
    # one of them journaled before the move to the cluster
    lines.append(line("10.255.255.3:6379", "optsolo", "opt-1", "4.00", 4,
                      cluster=False))
    journal = write_journal(tmp_root, "option.journal", lines)
    seeds = ",".join("127.0.0.1:%d" % p for p in cluster.ports[1:])

    rc, applied, already, failed, out = replay(
        journal, redis_addr=seeds, extra=["--cluster"])
    assert (rc, applied, already, failed) == (0, len(lines), 0, 0), out
    for cids in owned.values():
        check_applied(cluster, cids[0], [("opt-1", 3, 0)], 3, 3)
    check_applied(cluster, "optsolo", [("opt-1", 4, 0)], 4, 4)

    rc, applied, already, failed, out = replay(
        journal, redis_addr=seeds, extra=["--cluster"])
    assert (rc, applied, already, failed) == (0, 0, len(lines), 0), out

    # usage errors: --cluster without seeds, a db other than 0
    for extra in (["--cluster"], ["--cluster", "--redis", seeds, "--db", "1"]):
        p = subprocess.run(["/usr/bin/python3", REPLAY] + extra + [journal],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 2, (extra, p.stdout, p.stderr)


REPLAY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                      "tools", "loyalty-replay")


def test_unreachable_cluster(cluster, tmp_root):
    """A line whose seeds all refuse: exit 1, the line reported with its
    file and number; the other lines are applied all the same.  A line
    for a cluster with a db other than 0 is a bad line."""
    dead = " ".join("127.0.0.1:%d" % free_port() for _ in range(2))
    cid = cluster.customers(1, "ur")[cluster.ports[2]][0]
    lines = [line(dead, "urdead", "ur-1", "1.00", 1),
             line(seeds_of(cluster), cid, "ur-1", "2.00", 2),
             line(seeds_of(cluster), "urdb", "ur-1", "2.00", 2, db=3)]
    journal = write_journal(tmp_root, "dead.journal", lines)

    t0 = time.monotonic()
    rc, applied, already, failed, out = replay(journal)
    assert (rc, applied, already, failed) == (1, 1, 0, 2), out
    assert time.monotonic() - t0 < 20, "an unreachable cluster took long"
    assert "%s:1: redis: cluster %s" % (journal, dead) in out, out
    assert "%s:3: bad line: db 3" % journal in out, out
    assert "Traceback" not in out, out
    check_applied(cluster, cid, [("ur-1", 2, 0)], 2, 2)


class StaleSeed:
    """A seed that answers CLUSTER SLOTS with one master for every slot (a
    map from before a reshard) and closes the connection on anything
    else."""

    def __init__(self, master_port):
        reply = (b"*1\r\n*3\r\n:0\r\n:16383\r\n*2\r\n$9\r\n127.0.0.1\r\n"
                 b":%d\r\n" % master_port)
        seed = self
        self.asked = 0

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                data = b""
                while b"SLOTS" not in data.upper():
                    chunk = self.request.recv(4096)
                    if not chunk:
                        return
                    if b"SLOTS" not in chunk.upper():
                        # redis-py 5 and later open with CLIENT SETINFO
                        self.wfile.write(b"+OK\r\n")
                    data += chunk
                seed.asked += 1
                self.wfile.write(reply)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0),
                                                      Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def test_replay_follows_moved(cluster, tmp_root):
    """The slot map says the first master serves every slot: the credits
    of customers on the other masters are answered MOVED and follow it."""
    seed = StaleSeed(cluster.ports[0])
    try:
        owned = cluster.customers(2, "mv")
        lines = [line("127.0.0.1:%d" % seed.port, cid, "mv-1", "8.00", 8)
                 for cids in owned.values() for cid in cids]
        journal = write_journal(tmp_root, "moved.journal", lines)
        moved = errors(cluster, "MOVED", [cluster.ports[0]])

        rc, applied, already, failed, out = replay(journal)
        assert (rc, applied, already, failed) == (0, len(lines), 0, 0), out
        assert seed.asked >= 1
        for cids in owned.values():
            for cid in cids:
                check_applied(cluster, cid, [("mv-1", 8, 0)], 8, 8)
        # one per customer of the other masters: the map is patched, not
        # fetched again from the stale seed
        assert errors(cluster, "MOVED", [cluster.ports[0]]) - moved == 4

        rc, applied, already, failed, out = replay(journal)
        assert (rc, applied, already, failed) == (0, 0, len(lines), 0), out
    finally:
        seed.stop()


def test_replay_during_migration(cluster, tmp_root):
    """A slot migrating by hand from its master to another.  A credit whose
    keys have all moved is answered ASK by the source and found applied on
    the target after ASKING; a new credit of a customer whose record is
    still on the source is answered TRYAGAIN (its marker does not exist
    there) and applied once the migration is finished."""
    src = cluster.ports[0]
    dst = cluster.ports[1]
    a, b = cluster.customers(2, "mig")[src]
    seeds = seeds_of(cluster, 3)

    first = write_journal(tmp_root, "mig1.journal", [
        line(seeds, a, "mig-1", "10.00", 10),
        line(seeds, b, "mig-1", "10.00", 10)])
    rc, applied, _, failed, out = replay(first)
    assert (rc, applied, failed) == (0, 2, 0), out

    S, D = cluster.node(src), cluster.node(dst)
    slot_a = cluster.slot("loyalty:{%s}" % a)
    slot_b = cluster.slot("loyalty:{%s}" % b)
    assert slot_a != slot_b
    for slot in (slot_a, slot_b):
        D.execute_command("CLUSTER SETSLOT", slot, "IMPORTING",
                          cluster.node_id(src))
        S.execute_command("CLUSTER SETSLOT", slot, "MIGRATING",
                          cluster.node_id(dst))

    def migrate(slot):
        keys = S.execute_command("CLUSTER GETKEYSINSLOT", slot, 100)
        if keys:
            S.execute_command("MIGRATE", "127.0.0.1", dst, "", 0, 5000,
                              "KEYS", *keys)
        return keys

    def finish(slot):
        migrate(slot)
        # the target first, as redis-cli --cluster reshard does
        for port in [dst] + [p for p in cluster.ports if p != dst]:
            cluster.node(port).execute_command(
                "CLUSTER SETSLOT", slot, "NODE", cluster.node_id(dst))

    try:
        # every key of a's slot on the target, the slot still migrating
        assert len(migrate(slot_a)) == 3
        asks = errors(cluster, "ASK", [src])
        rc, applied, already, failed, out = replay(first, extra=["-v"])
        # a: ASK, then found applied on the target; b: still on the source
        assert (rc, applied, already, failed) == (0, 0, 2, 0), out
        assert errors(cluster, "ASK", [src]) - asks == 1
        assert D.execute_command("CLUSTER COUNTKEYSINSLOT", slot_a) == 3

        # b's record on the source, a new order: TRYAGAIN until the slot
        # has moved
        second = write_journal(tmp_root, "mig2.journal", [
            line(seeds, b, "mig-2", "5.00", 5)])

        def migrate_later():
            time.sleep(1.0)
            finish(slot_b)

        tryagain = errors(cluster, "TRYAGAIN")
        t = threading.Thread(target=migrate_later)
        t.start()
        try:
            rc, applied, already, failed, out = replay(second)
        finally:
            t.join(10)
        assert (rc, applied, already, failed) == (0, 1, 0, 0), out
        assert errors(cluster, "TRYAGAIN") > tryagain
    finally:
        finish(slot_a)
        finish(slot_b)

    wait_until(lambda: cluster.owner("loyalty:{%s}" % b) == dst, 10,
               message="the new owner of the migrated slot")
    check_applied(cluster, a, [("mig-1", 10, 0)], 10, 10)
    check_applied(cluster, b, [("mig-1", 10, 0), ("mig-2", 5, 0)], 15, 15)


def test_module_journal_into_cluster(tmp_root, nginx):
    """Lines the module itself journals for a cluster: nginx configured
    with three seeds and "cluster", the cluster not yet started, orders of
    customers on every master are journaled when nginx stops; replay
    applies them on their masters once the cluster is up, then finds them
    applied."""
    from credit_support import edge_conf, order, read_journal

    c = Cluster(tmp_root)
    seeds = " ".join("127.0.0.1:%d" % p for p in c.ports)
    conf = edge_conf(http="loyalty_journal {prefix}/loyalty.journal;") \
        .replace("loyalty_redis 127.0.0.1:{redis_port};",
                 "loyalty_redis %s cluster;" % seeds)
    assert " cluster;" in conf
    # redis-cli --cluster create gives 3 masters thirds of the slots
    cids, i = {}, 0
    while len(cids) < 3:
        cid = "mj%03d" % i
        i += 1
        cids.setdefault(key_slot("loyalty:{%s}" % cid) * 3 // 16384, cid)
    try:
        n = nginx(conf)
        for k, cid in enumerate(cids.values()):
            r = order(n, cid, "12.50", "mj-%d" % k)
            assert r.status == 200, r
            assert r.header("X-Loyalty-Status") == "unavailable", r
        assert n.stop() is None
        entries = read_journal(n.prefix + "/loyalty.journal")
        assert len(entries) == 3, entries
        for e in entries:
            assert (e.get("cluster"), e["redis"], e["db"]) == (
                True, seeds, 0), e

        c.start()
        assert {c.owner("loyalty:{%s}" % cid) for cid in cids.values()} \
            == set(c.ports)
        journal = n.prefix + "/loyalty.journal"
        rc, applied, already, failed, out = replay(journal)
        assert (rc, applied, already, failed) == (0, 3, 0, 0), out
        for k, cid in enumerate(cids.values()):
            check_applied(c, cid, [("mj-%d" % k, 12, 0)], 12, 12)
        rc, applied, already, failed, out = replay(journal)
        assert (rc, applied, already, failed) == (0, 0, 3, 0), out
    finally:
        c.stop()


def key_slot(key):
    """CRC16/XMODEM of the hash tag, mod 16384 (redis-py's own)."""
    from redis.crc import key_slot as slot
    return slot(key.encode())
