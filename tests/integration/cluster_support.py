"""A real Redis Cluster for the cluster tests (test_cluster.py, issue #14).

Cluster(tmp_root).start() runs 6 redis-server processes (3 masters, 3
replicas) on 127.0.0.1 with --cluster-enabled yes, joined by
`redis-cli --cluster create --cluster-replicas 1 --cluster-yes`, and waits
until every node reports cluster_state:ok and every node gives the same
slot map.  Each node's port P is outside the kernel's ephemeral range and
so is its cluster bus port P+10000 (Redis' default), both checked free;
neither is handed out by conftest.free_port() afterwards.

The nodes run with --cluster-node-timeout 2000 and
--cluster-require-full-coverage no (what the README recommends: a shard
that is down makes only its own slots fail), --save '' --appendonly no.
Every process is tracked by conftest.track() and killed in stop().

Tools for the tests:
    key_slot(key)                  CRC16 (XMODEM) of the hash tag, mod 16384
    c.masters()                    [(node id, port, [(first, last)...])]
    c.owner_port(slot)             port of the master serving the slot
    c.customers_covering_every_master(n)
    c.client(port), c.cluster_client()
    c.move_slot(slot, to_port)     SETSLOT IMPORTING/MIGRATING, MIGRATE,
                                   SETSLOT NODE everywhere
    c.begin_migration / migrate_keys / finish_migration
                                   the same in steps, for ASK and TRYAGAIN
    c.kill_master(port), c.wait_failover(port)
    c.reshard(n, from_port, to_port)   redis-cli --cluster reshard in the
                                   background, bounded in time
    c.reset()                      between tests on a shared cluster

FakeClusterNode is a scripted cluster node on top of fake_redis.FakeRedis:
it answers CLUSTER SLOTS from a map the test sets (or an error), ASKING,
READONLY, and redirects (MOVED/ASK/TRYAGAIN/CLUSTERDOWN) by rule.
"""

import os
import random
import re
import signal
import socket
import subprocess
import tempfile
import time

import redis as redis_lib

from conftest import (REDIS_BIN, SLOW, _USED_PORTS, _proc_stat, track,
                      wait_until)


REDIS_CLI = os.environ.get("REDIS_CLI", "/usr/bin/redis-cli")
SLOTS = 16384
NODE_TIMEOUT = 2000                 # ms, --cluster-node-timeout


# --------------------------------------------------------------------------
# slots, exactly as Redis computes them (src/cluster.c keyHashSlot)


def _crc16_table():
    table = []
    for i in range(256):
        crc = i << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
        table.append(crc)
    return table


_CRC16 = _crc16_table()


def crc16(data):
    """CRC16-CCITT, XMODEM variant (poly 0x1021, init 0, no reflection)."""
    crc = 0
    for b in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[((crc >> 8) ^ b) & 0xFF]
    return crc


def key_slot(key):
    """Redis' slot of a key: when the key has a `{` and, after it, a `}`
    with at least one byte between them, only those bytes are hashed (the
    first `{` and the first `}` after it); else the whole key."""
    if isinstance(key, str):
        key = key.encode()
    s = key.find(b"{")
    if s != -1:
        e = key.find(b"}", s + 1)
        if e != -1 and e != s + 1:
            key = key[s + 1:e]
    return crc16(key) % SLOTS


def customer_slot(cid, prefix="loyalty:"):
    return key_slot("%s{%s}" % (prefix, cid))


# --------------------------------------------------------------------------
# ports: P and P+10000 both free and outside the ephemeral range, so that
# no outgoing connection of any process takes the bus port meanwhile


def _ephemeral_range():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = f.read().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def _can_bind(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def cluster_port():
    """A port P for a cluster node: P and its bus port P+10000 free."""
    lo, hi = _ephemeral_range()
    candidates = [p for p in range(10000, 55000)
                  if not (lo <= p <= hi) and not (lo <= p + 10000 <= hi)]
    for _ in range(2000):
        p = random.choice(candidates)
        if p in _USED_PORTS or p + 10000 in _USED_PORTS:
            continue
        if _can_bind(p) and _can_bind(p + 10000):
            _USED_PORTS.add(p)
            _USED_PORTS.add(p + 10000)
            return p
    raise RuntimeError("no free port pair P, P+10000 for a cluster node")


# --------------------------------------------------------------------------
# the cluster


class ClusterNode:
    def __init__(self, cluster, port):
        self.cluster = cluster
        self.port = port
        self.proc = None
        self.start_time = None
        self.conf = os.path.join(cluster.dir, "nodes-%d.conf" % port)
        self.logfile = os.path.join(cluster.dir, "redis-%d.log" % port)
        self.node_dir = os.path.join(cluster.dir, "node-%d" % port)
        os.makedirs(self.node_dir, exist_ok=True)
        os.chmod(self.node_dir, 0o755)
        self.node_id = None

    def args(self):
        return [REDIS_BIN, "--port", str(self.port), "--bind", "127.0.0.1",
                "--cluster-enabled", "yes",
                "--cluster-config-file", self.conf,
                "--cluster-node-timeout", str(self.cluster.node_timeout),
                "--cluster-require-full-coverage", "no",
                "--save", "", "--appendonly", "no",
                "--dir", self.node_dir, "--daemonize", "no",
                "--enable-debug-command", "local",
                "--logfile", self.logfile]

    def start(self):
        assert not self.running
        self.proc = subprocess.Popen(self.args(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        track(self.proc.pid, "redis-server cluster node :%d" % self.port)
        st = _proc_stat(self.proc.pid)
        self.start_time = st[2] if st else None

        def up():
            if self.proc.poll() is not None:
                raise AssertionError("redis-server :%d exited: %s" % (
                    self.port, self.log()[-2000:]))
            try:
                return self.client().ping()
            except redis_lib.exceptions.ConnectionError:
                return False
        wait_until(up, 10 * SLOW, 0.02,
                   "cluster node redis-server on port %d" % self.port)
        self.node_id = self.client().execute_command("CLUSTER", "MYID")
        return self

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig=signal.SIGKILL):
        if not self.running:
            return
        self.cluster.drop_clients(self.port)
        self.proc.send_signal(sig)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def client(self):
        return self.cluster.client(self.port)

    def log(self):
        try:
            with open(self.logfile, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""


def parse_cluster_slots(reply):
    """CLUSTER SLOTS -> [(first, last, master (ip, port, id),
    [replica (ip, port, id)...])]"""
    out = []
    for entry in reply:
        first, last = int(entry[0]), int(entry[1])
        nodes = [(n[0], int(n[1]), n[2] if len(n) > 2 else None)
                 for n in entry[2:]]
        out.append((first, last, nodes[0], nodes[1:]))
    return sorted(out)


def parse_cluster_nodes(text):
    """CLUSTER NODES -> [{id, addr, port, flags, master, slots,
    migrating, importing, link}]"""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        f = line.split()
        addr = f[1].split("@")[0]
        host, _, port = addr.rpartition(":")
        node = {"id": f[0], "host": host, "port": int(port) if port else 0,
                "flags": set(f[2].split(",")), "master": f[3],
                "link": f[7], "slots": [], "migrating": {}, "importing": {}}
        for s in f[8:]:
            m = re.match(r"^\[(\d+)-([<>])-(\w+)\]$", s)
            if m:
                kind = "migrating" if m.group(2) == ">" else "importing"
                node[kind][int(m.group(1))] = m.group(3)
            elif "-" in s:
                a, b = s.split("-")
                node["slots"].append((int(a), int(b)))
            else:
                node["slots"].append((int(s), int(s)))
        out.append(node)
    return out


class Reshard:
    """A `redis-cli --cluster reshard` running in the background."""

    def __init__(self, cluster, args, timeout):
        self.args = args
        self.timeout = timeout
        self.out = open(os.path.join(cluster.dir, "reshard-%d.log"
                                     % time.monotonic_ns()), "w+b")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                     stdout=self.out,
                                     stderr=subprocess.STDOUT)
        track(self.proc.pid, "redis-cli --cluster reshard")
        self.started = time.monotonic()

    def running(self):
        return self.proc.poll() is None

    def output(self):
        self.out.flush()
        self.out.seek(0)
        return self.out.read().decode("utf-8", "replace")

    def wait(self):
        """Wait for the end (bounded): (rc, output); fails on a timeout or
        a non-zero exit."""
        left = self.timeout - (time.monotonic() - self.started)
        try:
            rc = self.proc.wait(max(left, 0.1))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError("redis-cli --cluster reshard still running "
                                 "after %d s:\n%s" % (self.timeout,
                                                      self.output()[-3000:]))
        out = self.output()
        self.out.close()
        assert rc == 0, "redis-cli --cluster reshard exited %d:\n%s" % (
            rc, out[-3000:])
        return rc, out

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if not self.out.closed:
            self.out.close()


class Cluster:
    def __init__(self, tmp_root, masters=3, replicas=1,
                 node_timeout=NODE_TIMEOUT):
        self.dir = tempfile.mkdtemp(prefix="redis-cluster-", dir=tmp_root)
        os.chmod(self.dir, 0o755)      # reachable by nginx workers (nobody)
        self.n_masters = masters
        self.n_replicas = replicas
        self.node_timeout = node_timeout
        self.nodes = []                 # [ClusterNode] in creation order
        self._clients = {}
        self._cluster_client = None
        self._migrations = {}           # slot -> (source port, target port)
        self._reshards = []

    # -- lifecycle

    def start(self):
        n = self.n_masters * (1 + self.n_replicas)
        ports = [cluster_port() for _ in range(n)]
        self.nodes = [ClusterNode(self, p) for p in ports]
        for node in self.nodes:
            node.start()
        args = [REDIS_CLI, "--cluster", "create"]
        args += ["127.0.0.1:%d" % p for p in ports]
        args += ["--cluster-replicas", str(self.n_replicas), "--cluster-yes"]
        p = subprocess.run(args, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=60 * SLOW)
        out = p.stdout.decode("utf-8", "replace")
        assert p.returncode == 0 and "All 16384 slots covered" in out, \
            "redis-cli --cluster create failed (%d):\n%s" % (p.returncode,
                                                            out)
        self.create_output = out
        # redis-cli returns once the slots are assigned: the replicas may
        # not be known to every node yet
        self.wait_consistent(30, replicas=self.n_replicas)
        return self

    def stop(self):
        for r in self._reshards:
            r.kill()
        for c in self._clients.values():
            c.close()
        self._clients = {}
        if self._cluster_client is not None:
            self._cluster_client.close()
            self._cluster_client = None
        for node in self.nodes:
            node.kill()

    # -- clients

    def client(self, port):
        """A plain (non-cluster) client of one node, decoded replies."""
        if port not in self._clients:
            self._clients[port] = redis_lib.Redis(
                host="127.0.0.1", port=port, decode_responses=True,
                socket_timeout=5, socket_connect_timeout=2)
        return self._clients[port]

    def drop_clients(self, port):
        c = self._clients.pop(port, None)
        if c is not None:
            c.close()
        if self._cluster_client is not None:
            self._cluster_client.close()
            self._cluster_client = None

    def cluster_client(self):
        """A redis-py RedisCluster client (follows MOVED/ASK), for the
        checks that read many customers (check_exact and friends)."""
        if self._cluster_client is None:
            from redis.cluster import ClusterNode as PyNode, RedisCluster
            seeds = [PyNode("127.0.0.1", n.port) for n in self.live_nodes()]
            self._cluster_client = RedisCluster(
                startup_nodes=seeds, decode_responses=True,
                socket_timeout=5, socket_connect_timeout=2)
        return self._cluster_client

    def node(self, port):
        for n in self.nodes:
            if n.port == port:
                return n
        raise KeyError(port)

    def live_nodes(self):
        return [n for n in self.nodes if n.running]

    @property
    def ports(self):
        return [n.port for n in self.nodes]

    def seeds(self, ports=None):
        """`127.0.0.1:P1 127.0.0.1:P2 ...` for loyalty_redis."""
        ports = ports if ports is not None else [p for _, p, _ in
                                                 self.masters()]
        return " ".join("127.0.0.1:%d" % p for p in ports)

    # -- views

    def slots(self, port=None):
        """Parsed CLUSTER SLOTS of one node (any live node by default)."""
        if port is None:
            port = self.live_nodes()[0].port
        return parse_cluster_slots(
            self.client(port).execute_command("CLUSTER", "SLOTS"))

    def nodes_view(self, port):
        return parse_cluster_nodes(
            self.client(port).execute_command("CLUSTER", "NODES"))

    def info(self, port):
        text = self.client(port).execute_command("CLUSTER", "INFO")
        if isinstance(text, bytes):
            text = text.decode()
        out = {}
        for line in text.splitlines():
            if ":" in line:
                k, v = line.split(":", 1)
                out[k.strip()] = v.strip()
        return out

    def masters(self, port=None):
        """[(node id, port, [(first, last)...])] of the masters that serve
        slots, in the view of one node, sorted by port."""
        by = {}
        for first, last, (_, mport, mid), _ in self.slots(port):
            by.setdefault((mid, mport), []).append((first, last))
        return sorted([(mid, mport, sorted(r)) for (mid, mport), r
                       in by.items()], key=lambda m: m[1])

    def master_ports(self):
        return [p for _, p, _ in self.masters()]

    def replicas_of(self, port):
        """Ports of the replicas of the master on port (CLUSTER NODES of a
        live node)."""
        view = self.nodes_view(self.live_nodes()[0].port)
        mid = [n["id"] for n in view if n["port"] == port][0]
        return sorted(n["port"] for n in view if n["master"] == mid
                      and "fail" not in n["flags"])

    def node_id(self, port):
        return self.node(port).node_id

    def owner_port(self, slot, port=None):
        for first, last, (_, mport, _), _ in self.slots(port):
            if first <= slot <= last:
                return mport
        return None

    def owner_of(self, cid, prefix="loyalty:"):
        return self.owner_port(customer_slot(cid, prefix))

    def customers_covering_every_master(self, n_per_master, tag="cl",
                                        prefix="loyalty:"):
        """n_per_master customer ids for each master (ids tag0000,
        tag0001, ... whose `<prefix>{id}` slot it serves), in order of id;
        each master gets exactly n_per_master."""
        spans = [(first, last, mport) for first, last, (_, mport, _), _
                 in self.slots()]
        want = {mport: n_per_master for _, _, mport in spans}
        out = []
        i = 0
        while any(want.values()):
            assert i < 100000, "no customers for %r" % want
            cid = "%s%04d" % (tag, i)
            i += 1
            slot = customer_slot(cid, prefix)
            owner = [m for f, l, m in spans if f <= slot <= l][0]
            if want[owner]:
                want[owner] -= 1
                out.append(cid)
        return out

    def by_master(self, cids, prefix="loyalty:"):
        """{master port: [cid...]} in the current map."""
        out = {}
        for cid in cids:
            out.setdefault(self.owner_of(cid, prefix), []).append(cid)
        return out

    def consistent(self, require_ok=True, replicas=None):
        """The slot map (slot ranges and their master's port) that every
        live node agrees on, covering all 16384 slots, or None.  With
        replicas=n, every range must also list n replicas, each with its
        replication link up."""
        views = []
        for node in self.live_nodes():
            try:
                if require_ok and \
                        self.info(node.port)["cluster_state"] != "ok":
                    return None
                view = [(f, l, m[1]) for f, l, m, _ in self.slots(node.port)]
                nodes = self.nodes_view(node.port)
            except redis_lib.exceptions.RedisError:
                return None
            # no slot mid-migration, no node still handshaking
            if any(n["migrating"] or n["importing"] for n in nodes
                   if "myself" in n["flags"]):
                return None
            if any("handshake" in n["flags"] or "noaddr" in n["flags"]
                   for n in nodes):
                return None
            if replicas is not None:
                full = self.slots(node.port)
                if any(len(r) != replicas for _, _, _, r in full):
                    return None
                if "slave" in [n["flags"] for n in nodes
                               if "myself" in n["flags"]][0]:
                    info = node.client().info("replication")
                    if info.get("master_link_status") != "up":
                        return None
            views.append(view)
        if not views or any(v != views[0] for v in views):
            return None
        covered = sum(l - f + 1 for f, l, _ in views[0])
        if covered != SLOTS:
            return None
        return views[0]

    def wait_consistent(self, timeout=30, replicas=None):
        return wait_until(lambda: self.consistent(replicas=replicas),
                          timeout * SLOW, 0.1,
                          "every cluster node to report cluster_state:ok "
                          "and the same slot map")

    # -- data

    def seed(self, cid, points=0, lifetime=0, orders=0, prefix="loyalty:",
             port=None, **extra):
        """HSET the customer's record directly on the node that serves its
        slot (or on `port`); returns that port."""
        now = int(time.time())
        fields = dict(points=points, lifetime=lifetime, orders=orders,
                      first_order=now - 30 * 86400 if orders else 0,
                      last_order=now - 86400 if orders else 0)
        fields.update(extra)
        port = port or self.owner_of(cid, prefix)
        key = "%s{%s}" % (prefix, cid)
        c = self.client(port)
        c.delete(key)
        c.hset(key, mapping=fields)
        return port

    def flush(self):
        for _, port, _ in self.masters():
            self.client(port).flushall()

    def wait_replicated(self, timeout=10):
        """Every live replica has caught up with its master's offset."""
        def caught_up():
            for node in self.live_nodes():
                info = node.client().info("replication")
                if info.get("role") != "master":
                    continue
                off = info.get("master_repl_offset", 0)
                for k, v in info.items():
                    if k.startswith("slave") and isinstance(v, dict) and \
                            v.get("state") == "online" and \
                            int(v.get("offset", 0)) < off:
                        return False
            return True
        wait_until(caught_up, timeout * SLOW, 0.05, "replicas caught up")

    def reset(self):
        """Between tests on a shared cluster: no slot left mid-migration,
        every node agreeing on the map, no keys."""
        for r in self._reshards:
            r.kill()
        self._reshards = []
        for slot in list(self._migrations):
            self.finish_migration(slot)
        for node in self.live_nodes():
            for n in self.nodes_view(node.port):
                if "myself" in n["flags"]:
                    for slot in list(n["migrating"]) + list(n["importing"]):
                        node.client().execute_command(
                            "CLUSTER", "SETSLOT", slot, "STABLE")
        self.wait_consistent(30)
        self.flush()

    # -- moving slots by hand

    def begin_migration(self, slot, to_port):
        """IMPORTING on the target, then MIGRATING on the source (the
        order redis-cli uses).  From now on the source answers
        `-ASK <slot> <target>` for a key it no longer has, and `-TRYAGAIN`
        for a multi-key command of which only some keys are still there;
        the target answers `-MOVED` to commands without ASKING, and
        `-TRYAGAIN` after ASKING to a multi-key command with a key it does
        not have."""
        src = self.owner_port(slot)
        assert src is not None and src != to_port, (slot, src, to_port)
        assert slot not in self._migrations, slot
        dst_id, src_id = self.node_id(to_port), self.node_id(src)
        self.client(to_port).execute_command(
            "CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        self.client(src).execute_command(
            "CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        self._migrations[slot] = (src, to_port)
        return src

    def keys_in_slot(self, slot, port=None):
        port = port or self._migrations.get(slot, (self.owner_port(slot),))[0]
        keys = []
        while True:
            batch = self.client(port).execute_command(
                "CLUSTER", "GETKEYSINSLOT", slot, 1000)
            new = [k for k in batch if k not in keys]
            if not new:
                return keys
            keys += new
            if len(batch) < 1000:
                return keys

    def migrate_keys(self, slot, keys):
        """MIGRATE the given keys of a slot being migrated, in one command
        (atomically on the source)."""
        src, dst = self._migrations[slot]
        if not keys:
            return
        self.client(src).execute_command(
            "MIGRATE", "127.0.0.1", dst, "", 0, 5000, "REPLACE", "KEYS",
            *keys)

    def finish_migration(self, slot):
        """MIGRATE whatever is left, then SETSLOT NODE on the target, the
        source and every other master; waits until every node agrees."""
        src, dst = self._migrations[slot]
        while True:
            keys = self.client(src).execute_command(
                "CLUSTER", "GETKEYSINSLOT", slot, 1000)
            if not keys:
                break
            self.migrate_keys(slot, keys)
        dst_id = self.node_id(dst)
        others = [p for p in self.master_ports() if p not in (src, dst)]
        for port in [dst, src] + others:
            self.client(port).execute_command(
                "CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        del self._migrations[slot]
        self.wait_slot_owner(slot, dst)

    def move_slot(self, slot, to_port):
        """Move one slot and its keys to the master on to_port, by hand."""
        self.begin_migration(slot, to_port)
        self.finish_migration(slot)

    def wait_slot_owner(self, slot, port, timeout=15):
        def agreed():
            for node in self.live_nodes():
                try:
                    if self.owner_port(slot, node.port) != port:
                        return False
                except redis_lib.exceptions.RedisError:
                    return False
            return True
        wait_until(agreed, timeout * SLOW, 0.05,
                   "every node to map slot %d to port %d" % (slot, port))
        self.drop_cluster_client()

    def drop_cluster_client(self):
        if self._cluster_client is not None:
            self._cluster_client.close()
            self._cluster_client = None

    def other_master(self, port):
        return [p for p in self.master_ports() if p != port][0]

    # -- failures

    def kill_master(self, port):
        """SIGKILL the master on port (no shutdown, nothing saved)."""
        assert port in self.master_ports(), (port, self.masters())
        self.node(port).kill(signal.SIGKILL)
        self.drop_cluster_client()

    def kill_node(self, port):
        self.node(port).kill(signal.SIGKILL)
        self.drop_cluster_client()

    def wait_failover(self, dead_port, timeout=30):
        """After kill_master(dead_port): wait until one of its former
        replicas serves its slots in the view of every live node, every
        live node reports cluster_state:ok and gives the same map.
        Returns (new master port, seconds waited)."""
        t0 = time.monotonic()
        view = self.nodes_view(self.live_nodes()[0].port)
        dead_id = self.node_id(dead_port)
        replicas = {n["port"] for n in view if n["master"] == dead_id}

        def done():
            m = self.consistent()
            if m is None:
                return None
            owners = {p for _, _, p in m}
            if dead_port in owners:
                return None
            new = owners & replicas
            return new.pop() if new else None
        new = wait_until(done, timeout * SLOW, 0.1,
                         "a replica of :%d to take over its slots"
                         % dead_port)
        self.drop_cluster_client()
        return new, time.monotonic() - t0

    # -- resharding with redis-cli

    def reshard(self, n_slots, from_port, to_port, timeout=120):
        """Start `redis-cli --cluster reshard` of n_slots slots from the
        master on from_port to the one on to_port, in the background;
        returns a Reshard (wait() bounds it by timeout).  redis-cli refuses
        to start ("Nodes don't agree about configuration!") while the
        gossip of a previous change has not reached every node, replicas
        included: this waits for that first."""
        self.wait_consistent(30)
        args = [REDIS_CLI, "--cluster", "reshard",
                "127.0.0.1:%d" % self.master_ports()[0],
                "--cluster-from", self.node_id(from_port),
                "--cluster-to", self.node_id(to_port),
                "--cluster-slots", str(n_slots), "--cluster-yes",
                "--cluster-pipeline", "10"]
        r = Reshard(self, args, timeout * SLOW)
        self._reshards.append(r)
        return r


def start_cluster(tmp_root, **kw):
    """Start a Cluster; on a failure to start (a port taken between the
    check and the bind), stop it and try once more on other ports."""
    for attempt in range(2):
        c = Cluster(tmp_root, **kw)
        try:
            return c.start()
        except Exception:
            c.stop()
            if attempt:
                raise


# --------------------------------------------------------------------------
# the edge of credit_support with a cluster behind it


def cluster_edge_conf(seeds, flags="cluster", **kw):
    """credit_support.edge_conf() with `loyalty_redis <seeds> <flags>;`."""
    from credit_support import edge_conf
    text = edge_conf(**kw)
    old = "loyalty_redis 127.0.0.1:{redis_port};"
    assert old in text
    return text.replace(old, "loyalty_redis %s %s;" % (seeds, flags))


STATUS_LINE = re.compile(r"^([a-zA-Z_:][\w:]*(\{[^}]*\})?) (\S+)$")


def metrics(port):
    """{'name{labels}': value} of the loyalty_status page on /metrics."""
    from conftest import http_request
    r = http_request(port, "/metrics")
    assert r.status == 200, r
    out = {}
    for line in r.body.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = STATUS_LINE.match(line)
        assert m, "not a Prometheus sample line: %r" % line
        out[m.group(1)] = float(m.group(3))
    return out


def metric(m, name):
    assert name in m, "no %s on the status page: %r" % (name, sorted(m))
    return m[name]


MOVED = 'loyalty_redis_redirects_total{type="moved"}'
ASK = 'loyalty_redis_redirects_total{type="ask"}'
TRYAGAIN = 'loyalty_redis_redirects_total{type="tryagain"}'
REFRESHES = "loyalty_cluster_refreshes_total"
FAILOVERS = "loyalty_redis_failovers_total"
CONNECTIONS = "loyalty_redis_connections"


# --------------------------------------------------------------------------
# a scripted cluster node


def error(text):
    return b"-%s\r\n" % text.encode()


def slots_reply(ranges):
    """CLUSTER SLOTS reply for [(first, last, port)], as Redis 7.0 sends
    it: [first, last, [ip, port, id, []]]."""
    from fake_redis import array, bulk, integer
    entries = []
    for first, last, port in ranges:
        node_id = ("%040x" % port)
        entries.append(array(integer(first), integer(last),
                             array(bulk("127.0.0.1"), integer(port),
                                   bulk(node_id), array())))
    return array(*entries)


def make_fake_node():
    """A FakeRedis that also answers CLUSTER SLOTS (fake.slots: bytes or
    None for an error), ASKING and READONLY, and runs fake.rule(args) ->
    bytes or None for every HMGET/EVALSHA/EVAL (None: the default
    answer)."""
    from fake_redis import FakeRedis

    class FakeClusterNode(FakeRedis):
        def __init__(self):
            super().__init__()
            self.slots = None
            self.slots_error = "ERR refresh refused by the test"
            self.rule = None

        def _answer(self, args):
            name = args[0].upper()
            if name == b"CLUSTER" and len(args) > 1 and \
                    args[1].upper() == b"SLOTS":
                if self.slots is None:
                    return [error(self.slots_error)]
                return [self.slots]
            if name in (b"ASKING", b"READONLY", b"READWRITE"):
                return [b"+OK\r\n"]
            if name in (b"HMGET", b"EVALSHA", b"EVAL") and self.rule:
                r = self.rule(args)
                if r is not None:
                    return [r]
            return super()._answer(args)

    return FakeClusterNode()
