"""Redis Sentinel for the sentinel tests (test_sentinel.py).

SentinelGroup(tmp_root).start() runs, all as real redis-server processes
on 127.0.0.1 and under the test's temporary root:

    a master                 DataServer (a conftest.RedisServer)
    one replica              DataServer started with --replicaof the master
    three sentinels          SentinelServer: `redis-server <conf> --sentinel`

The sentinels monitor the master as NAME ("mymaster") with quorum 2,
down-after-milliseconds DOWN_AFTER_MS (2000, see there), failover-timeout
FAILOVER_TIMEOUT_MS and parallel-syncs 1; each has its own sentinel.conf
in its own directory, which it rewrites (known replicas and sentinels,
epochs).  With password=P the master and the replica have requirepass P
and masterauth P and the sentinels `sentinel auth-pass NAME P`; with
sentinel_password=SP the sentinels have requirepass SP (clients AUTH to
a sentinel with it, and the sentinels use it between themselves).
start() returns once every sentinel names the master, lists the replica
(its link to the master up) and lists the two other sentinels.

Every port is outside the kernel's ephemeral range (like the cluster
nodes', cluster_support.cluster_port): a server restarted on its port
after a kill -9 (restart_as_replica) never finds it taken by some
process's outgoing connection.  Every process is tracked with
conftest.track() (RedisServer.start does it) and stopped by pid in
stop(), bounded.

Tools for the tests:
    g.master, g.master_port()      the master as the group last saw it
    g.replicas()                   the other data servers that run
    g.addresses()                  "127.0.0.1:S1 127.0.0.1:S2 127.0.0.1:S3"
    g.loyalty_redis(...)           the arguments of a sentinel loyalty_redis
    g.reported_master(s)           the port a sentinel names, or None
    g.agreed_master()              the port every running sentinel names
    g.failover()                   SENTINEL FAILOVER, then wait for the
                                   sentinels to agree on the replica and
                                   for it to report role master: a Switch
    g.kill_master()                SIGKILL of the master's pid, then wait
                                   for the promotion: a Switch
    g.restart_as_replica(server)   start a killed server again as a
                                   replica of the current master
    g.wait_ready(), g.wait_replicated(), g.reset(), g.stop()

Without sentinels: pair(redis_factory) gives a master and its replica
(two conftest.RedisServer of the test), wait_replicated(m, r) waits for
the replica to catch up.

FakeSentinel is a scripted sentinel (on fake_redis.FakeRedis) for what
real sentinels do not do on demand: it names the master the test sets
(fake.master, a port, or None: "does not know"), confirms SUBSCRIBEs and
sends +switch-master messages when the test says (fake.switch()).
"""

import collections
import os
import random
import signal
import threading
import time

import redis as redis_lib

from cluster_support import _can_bind, _ephemeral_range
from conftest import _USED_PORTS, RedisServer, SLOW, wait_until


NAME = "mymaster"
QUORUM = 2
# down-after-milliseconds: 2000, not 1000.  A sentinel sends its first
# PING on a new link about a second after making it, so with 1000 it may
# call a just-promoted master down (+sdown ~1.05 s after +switch-master,
# seen in 2 runs of 10 of the kill-restart-failover fixture test), and
# Redis 7.0 then counts the other sentinels' votes left over from the
# previous failover towards +odown and fails over back at once.
DOWN_AFTER_MS = 2000
FAILOVER_TIMEOUT_MS = 3000
PARALLEL_SYNCS = 1
SWITCH_TIMEOUT = 30             # s, bound of failover() and kill_master()


def stable_port():
    """A free 127.0.0.1 port outside the ephemeral range, never handed
    out twice (conftest.free_port() will not hand it out either)."""
    lo, hi = _ephemeral_range()
    candidates = [p for p in range(10000, 30000) if not lo <= p <= hi]
    for _ in range(2000):
        p = random.choice(candidates)
        if p not in _USED_PORTS and _can_bind(p):
            _USED_PORTS.add(p)
            return p
    raise RuntimeError("no free port outside the ephemeral range")


def _as_dict(entry):
    """A flat [k1, v1, k2, v2...] reply (a dict with RESP3) as a dict."""
    if isinstance(entry, dict):
        return dict(entry)
    it = iter(entry)
    return dict(zip(it, it))


def _flags(entry):
    return set(str(entry.get("flags", "")).split(","))


BAD_FLAGS = {"s_down", "o_down", "disconnected", "failover_in_progress",
             "promoted"}

Switch = collections.namedtuple("Switch", "old new started reported")
Switch.__doc__ = """A change of master: the old and the new master's ports,
when the test started it (time.monotonic(): the SENTINEL FAILOVER or the
kill) and when every running sentinel named the new master and the new
master reported role master."""


# --------------------------------------------------------------------------
# the processes


class DataServer(RedisServer):
    """A master or a replica of the group: a RedisServer with masterauth
    (the group's password) and, with replicaof=port, started as a replica
    of 127.0.0.1:port."""

    what = "redis-server (sentinel group)"

    def __init__(self, tmp_root, password=None, replicaof=None):
        super().__init__(tmp_root, password=password, port=stable_port())
        self.replicaof = replicaof

    def listen_args(self):
        # a replica's full sync at once (Redis 7 waits 5 s by default for
        # more replicas to share a diskless transfer)
        args = super().listen_args() + ["--repl-diskless-sync-delay", "0"]
        if self.password:
            args += ["--masterauth", self.password]
        if self.replicaof:
            args += ["--replicaof", "127.0.0.1", str(self.replicaof)]
        return args

    def kill(self):
        """SIGKILL (no shutdown, nothing saved); waits for the exit."""
        if not self.running:
            return
        for c in self._clients.values():
            c.close()
        self._clients = {}
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def role(self):
        """ROLE's first word ("master", "slave"), None when unreachable."""
        if not self.running:
            return None
        try:
            return str(self.client.execute_command("ROLE")[0])
        except redis_lib.exceptions.RedisError:
            return None

    def replication(self):
        return self.client.info("replication")

    def link_up(self, master_port):
        """A replica of master_port with its link up."""
        try:
            info = self.replication()
        except redis_lib.exceptions.RedisError:
            return False
        return (info.get("role") == "slave"
                and int(info.get("master_port", 0)) == master_port
                and info.get("master_link_status") == "up")


class SentinelServer(RedisServer):
    """`redis-server <dir>/sentinel.conf --sentinel --port P`, plus
    RedisServer's own arguments (bind, dir, logfile, requirepass...).  The
    configuration file is written once, by write_conf() before the first
    start: a restart finds what the sentinel rewrote into it (epochs,
    known instances)."""

    what = "redis-sentinel"

    def __init__(self, group, tmp_root, password=None):
        super().__init__(tmp_root, password=password, port=stable_port())
        self.conf = os.path.join(self.dir, "sentinel.conf")
        self.myid = "%040x" % random.getrandbits(160)

    def write_conf(self, group, peers, replicas):
        """The first configuration: the monitored master, the fast
        settings, and this sentinel's id, its peers (SentinelServer) and
        the replicas (ports) as a rewritten configuration lists them, so
        that no one waits for the hello messages (every 2 s) or the
        master's INFO (every 10 s) to learn them."""
        g = group
        lines = [
            "sentinel myid %s" % self.myid,
            "sentinel monitor %s 127.0.0.1 %d %d" % (g.name, g.master.port,
                                                     g.quorum),
            "sentinel down-after-milliseconds %s %d" % (g.name,
                                                        g.down_after_ms),
            "sentinel failover-timeout %s %d" % (g.name,
                                                 g.failover_timeout_ms),
            "sentinel parallel-syncs %s %d" % (g.name, PARALLEL_SYNCS),
        ]
        if g.password:
            lines.append("sentinel auth-pass %s %s" % (g.name, g.password))
        for port in replicas:
            lines.append("sentinel known-replica %s 127.0.0.1 %d"
                         % (g.name, port))
        for p in peers:
            if p is not self:
                lines.append("sentinel known-sentinel %s 127.0.0.1 %d %s"
                             % (g.name, p.port, p.myid))
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(self.conf, 0o644)

    def listen_args(self):
        return [self.conf, "--sentinel", "--port", str(self.port)]

    def sentinel(self, *args):
        return self.client.execute_command("SENTINEL", *args)

    def master_addr(self, name):
        """(ip, port) of get-master-addr-by-name, None for a nil reply."""
        r = self.sentinel("get-master-addr-by-name", name)
        return None if r is None else (str(r[0]), int(r[1]))

    def replicas(self, name):
        return [_as_dict(e) for e in self.sentinel("replicas", name)]

    def others(self, name):
        return [_as_dict(e) for e in self.sentinel("sentinels", name)]

    def master_info(self, name):
        return _as_dict(self.sentinel("master", name))

    def subscribed_clients(self):
        """Clients subscribed to a channel: the module's sentinel
        connections (sentinels subscribe on masters and replicas, never
        on each other)."""
        return [c for c in self.client.client_list()
                if int(c.get("sub", 0)) > 0]


# --------------------------------------------------------------------------
# the group


class SentinelGroup:
    def __init__(self, tmp_root, name=NAME, password=None,
                 sentinel_password=None, sentinels=3, quorum=QUORUM,
                 down_after_ms=DOWN_AFTER_MS,
                 failover_timeout_ms=FAILOVER_TIMEOUT_MS):
        self.tmp_root = tmp_root
        self.name = name
        self.password = password
        self.sentinel_password = sentinel_password
        self.n_sentinels = sentinels
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.data = []                  # [DataServer]
        self.sentinels = []             # [SentinelServer]
        self.master = None              # the DataServer the group calls so

    # -- lifecycle

    def start(self):
        try:
            self.master = DataServer(self.tmp_root, self.password).start()
            replica = DataServer(self.tmp_root, self.password,
                                 replicaof=self.master.port)
            self.data = [self.master, replica]
            replica.start()
            wait_until(lambda: replica.link_up(self.master.port), 10 * SLOW,
                       0.05, "the replica's link to the master")
            self.sentinels = [SentinelServer(self, self.tmp_root,
                                             self.sentinel_password)
                              for _ in range(self.n_sentinels)]
            for s in self.sentinels:
                s.write_conf(self, self.sentinels, [replica.port])
            for s in self.sentinels:
                s.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        """Sentinels first (no failover of a master being stopped), then
        the data servers; every process by pid, each bounded (SIGTERM,
        SIGKILL after 5 s)."""
        for s in self.sentinels:
            s.stop()
        for d in self.data:
            d.stop()

    def reset(self):
        """Between tests on a shared group (one that never fails over):
        stopped sentinels started again, data flushed, everyone ready."""
        for s in self.sentinels:
            if not s.running:
                s.start()
        for d in self.data:
            assert d.running, "a data server of a shared group is down"
        self.master.client.flushall()
        self.wait_replicated()
        self.wait_ready()

    # -- views

    def running_sentinels(self):
        return [s for s in self.sentinels if s.running]

    def replicas(self):
        return [d for d in self.data if d is not self.master and d.running]

    def master_port(self):
        return self.master.port

    def server(self, port):
        for d in self.data:
            if d.port == port:
                return d
        raise KeyError(port)

    def addresses(self, sentinels=None):
        """`127.0.0.1:S1 127.0.0.1:S2 ...` of the sentinels (all by
        default, in order)."""
        sentinels = self.sentinels if sentinels is None else sentinels
        return " ".join("127.0.0.1:%d" % s.port for s in sentinels)

    def loyalty_redis(self, name=None, password=None, sentinel_password=None,
                      extra="", addresses=None):
        """The arguments of `loyalty_redis` for this group: the sentinels'
        addresses, sentinel=<name>, password= and sentinel_password= (the
        group's unless given; "" leaves one out) and extra."""
        words = [addresses or self.addresses(),
                 "sentinel=%s" % (name or self.name)]
        password = self.password if password is None else password
        if password:
            words.append("password=%s" % password)
        sp = (self.sentinel_password if sentinel_password is None
              else sentinel_password)
        if sp:
            words.append("sentinel_password=%s" % sp)
        if extra:
            words.append(extra)
        return " ".join(words)

    def seed(self, cid, **kw):
        return self.master.seed(cid, **kw)

    def reported_master(self, s):
        """The master's port as sentinel s names it (None: unreachable or
        it does not know the name)."""
        try:
            addr = s.master_addr(self.name)
        except redis_lib.exceptions.RedisError:
            return None
        return None if addr is None else addr[1]

    def agreed_master(self):
        """The port every running sentinel names, or None."""
        ports = {self.reported_master(s) for s in self.running_sentinels()}
        return ports.pop() if len(ports) == 1 else None

    # -- waits

    def _ready(self):
        running = self.running_sentinels()
        replicas = self.replicas()
        for s in running:
            try:
                if self.reported_master(s) != self.master.port:
                    return False
                if _flags(s.master_info(self.name)) != {"master"}:
                    return False
                seen = {int(r["port"]): r for r in s.replicas(self.name)}
                for d in replicas:
                    r = seen.get(d.port)
                    if r is None or _flags(r) & BAD_FLAGS or \
                            r.get("master-link-status") != "ok" or \
                            int(r.get("master-port", 0)) != self.master.port:
                        return False
                peers = {int(o["port"]) for o in s.others(self.name)
                         if not _flags(o) & BAD_FLAGS}
                if not {o.port for o in running if o is not s} <= peers:
                    return False
            except redis_lib.exceptions.RedisError:
                return False
        return True

    def wait_ready(self, timeout=20):
        """Every running sentinel names the master, sees it up, lists
        every running replica (up, its link to the master ok) and every
        other running sentinel (up)."""
        try:
            wait_until(self._ready, timeout * SLOW, 0.05, "sentinels")
        except AssertionError:
            raise AssertionError(
                "timed out after %.0f s waiting for the sentinels of %r to "
                "agree on :%d, its replicas %r and each other:\n%s"
                % (timeout * SLOW, self.name, self.master.port,
                   [d.port for d in self.replicas()], self.views()))

    def views(self):
        """What each sentinel says (for failure messages)."""
        out = []
        for s in self.sentinels:
            if not s.running:
                out.append(":%d stopped" % s.port)
                continue
            try:
                out.append(":%d master %r flags %s; replicas %r; sentinels %r"
                           % (s.port, self.reported_master(s),
                              s.master_info(self.name).get("flags"),
                              [(r.get("port"), r.get("flags"),
                                r.get("master-link-status"),
                                r.get("master-port"))
                               for r in s.replicas(self.name)],
                              [(o.get("port"), o.get("flags"))
                               for o in s.others(self.name)]))
            except redis_lib.exceptions.RedisError as e:
                out.append(":%d %r" % (s.port, e))
        return "\n".join(out)

    def wait_replicated(self, timeout=10):
        """Every running replica has caught up with the master's offset."""
        def caught_up():
            info = self.master.replication()
            off = int(info.get("master_repl_offset", 0))
            for d in self.replicas():
                rinfo = d.replication()
                if rinfo.get("master_link_status") != "up" or \
                        int(rinfo.get("slave_repl_offset", -1)) < off:
                    return False
            return True
        wait_until(caught_up, timeout * SLOW, 0.02, "replicas caught up")

    def _wait_switch(self, old, started):
        def switched():
            new = self.agreed_master()
            if new is None or new == old.port:
                return None
            if self.server(new).role() != "master":
                return None
            return new
        new = wait_until(switched, SWITCH_TIMEOUT * SLOW, 0.02,
                         "the sentinels to name a new master instead of "
                         ":%d (they say %r)" % (old.port, [
                             self.reported_master(s)
                             for s in self.running_sentinels()]))
        reported = time.monotonic()
        self.master = self.server(new)
        return Switch(old.port, new, started, reported)

    # -- failures

    def failover(self):
        """SENTINEL FAILOVER <name> on the first running sentinel (retried
        while it answers NOGOODSLAVE or INPROG), then wait until every
        running sentinel names the replica and it reports role master.
        The old master keeps running (the sentinels turn it into a
        replica later, about 10 s on)."""
        old = self.master
        s = self.running_sentinels()[0]
        deadline = time.monotonic() + 10 * SLOW
        while True:
            started = time.monotonic()
            try:
                assert s.sentinel("failover", self.name) in (True, "OK")
                break
            except redis_lib.exceptions.ResponseError as e:
                if time.monotonic() > deadline or not str(e).startswith(
                        ("NOGOODSLAVE", "INPROG")):
                    raise
                time.sleep(0.1)
        return self._wait_switch(old, started)

    def kill_master(self):
        """SIGKILL of the master's pid, then wait until the sentinels have
        promoted a replica (every running one names it, it reports role
        master)."""
        old = self.master
        started = time.monotonic()
        old.kill()
        return self._wait_switch(old, started)

    def restart_as_replica(self, server):
        """Start a stopped (killed) data server again on its port as a
        replica of the current master; wait until its link is up and every
        running sentinel lists it as a replica in good standing."""
        assert server is not self.master and not server.running
        server.replicaof = self.master.port
        server.start()
        wait_until(lambda: server.link_up(self.master.port), 15 * SLOW,
                   0.05, "the restarted :%d to replicate :%d"
                   % (server.port, self.master.port))
        self.wait_ready()


def pair(redis_factory):
    """Two redis-servers of this test, the second a replica of the first
    with its link up (a full sync at once: no diskless delay)."""
    m, r = redis_factory(), redis_factory()
    for s in (m, r):
        s.client.config_set("repl-diskless-sync-delay", 0)
    r.client.replicaof("127.0.0.1", m.port)
    wait_until(lambda: r.client.info("replication").get(
        "master_link_status") == "up", 10 * SLOW, 0.05,
        "the replica's link up")
    # after a diskless sync the master streams to the replica (and counts
    # it in WAIT) only from its first REPLCONF ACK, up to a second later
    wait_until(lambda: m.client.info("replication").get(
        "slave0", {}).get("state") == "online", 10 * SLOW, 0.05,
        "the replica online in the master's view")
    return m, r


def wait_replicated(m, r):
    def caught_up():
        off = int(m.client.info("replication")["master_repl_offset"])
        return int(r.client.info("replication").get(
            "slave_repl_offset", -1)) >= off
    wait_until(caught_up, 10 * SLOW, 0.02, "the replica caught up")


def start_group(tmp_root, **kw):
    return SentinelGroup(tmp_root, **kw).start()


def sentinel_edge_conf(loyalty_redis, **kw):
    """credit_support.edge_conf() with `loyalty_redis <loyalty_redis>;`."""
    from credit_support import edge_conf
    text = edge_conf(**kw)
    old = "loyalty_redis 127.0.0.1:{redis_port};"
    assert old in text
    return text.replace(old, "loyalty_redis %s;" % loyalty_redis)


# --------------------------------------------------------------------------
# a scripted sentinel


class _LockedSocket:
    """A socket whose sendall() is serialized: the serving thread answers
    commands while the test thread pushes messages."""

    def __init__(self, sock):
        self._sock = sock
        self.lock = threading.Lock()

    def sendall(self, data):
        with self.lock:
            self._sock.sendall(data)

    def __getattr__(self, name):
        return getattr(self._sock, name)


def make_fake_sentinel(name=NAME, master=None):
    """A FakeSentinel naming 127.0.0.1:<master> as the master of name."""
    from fake_redis import FakeRedis, array, bulk, integer

    class FakeSentinel(FakeRedis):
        """Answers what the module asks a sentinel, as Redis 7 does:
        SENTINEL get-master-addr-by-name (from self.master, nil when None
        or another name), SUBSCRIBE (then only PING and SUBSCRIBE), ROLE,
        AUTH, CLIENT, PING; anything else is an unknown command, as
        SELECT or HMGET are to a real sentinel.  With silent set, PINGs
        get no answer, as from a sentinel cut off by a partition."""

        def __init__(self):
            super().__init__()
            self.name = name
            self.master = master
            self.silent = False         # PINGs unanswered: cut off
            self._local = threading.local()
            self._subscribed = {}       # connection no -> _LockedSocket

        def _serve(self, c, no):
            c = _LockedSocket(c)
            self._local.conn = (c, no)
            try:
                super()._serve(c, no)
            finally:
                with self._lock:
                    self._subscribed.pop(no, None)

        def _answer(self, args):
            c, no = self._local.conn
            cmd = args[0].upper()
            with self._lock:
                subscribed = no in self._subscribed
            if cmd == b"SUBSCRIBE":
                with self._lock:
                    self._subscribed[no] = c
                return [array(bulk("subscribe"), bulk(ch),
                              integer(i + 1))
                        for i, ch in enumerate(args[1:])]
            if cmd == b"PING":
                if self.silent:
                    return []
                return [array(bulk("pong"), bulk("")) if subscribed
                        else b"+PONG\r\n"]
            if subscribed:
                return [b"-ERR Can't execute '%s': only (P|S)SUBSCRIBE / "
                        b"(P|S)UNSUBSCRIBE / PING / QUIT / RESET are "
                        b"allowed in this context\r\n" % args[0].lower()]
            if cmd == b"SENTINEL" and len(args) == 3 and \
                    args[1].lower() == b"get-master-addr-by-name":
                if args[2].decode() != self.name or self.master is None:
                    return [b"*-1\r\n"]
                return [array(bulk("127.0.0.1"), bulk(str(self.master)))]
            if cmd == b"ROLE":
                return [array(bulk("sentinel"), array(bulk(self.name)))]
            if cmd in (b"AUTH", b"CLIENT"):
                return [b"+OK\r\n"]
            return [b"-ERR unknown command '%s', with args beginning "
                    b"with: \r\n" % args[0]]

        # -- test interface

        def asked(self):
            """The get-master-addr-by-name questions received."""
            return [a for a in self.calls("SENTINEL")
                    if len(a) > 1 and a[1].lower() ==
                    b"get-master-addr-by-name"]

        def subscriptions(self):
            """Connections subscribed now."""
            with self._lock:
                return len(self._subscribed)

        def switch(self, old_port, new_port, name=None):
            """Send `+switch-master <name> 127.0.0.1 <old> 127.0.0.1
            <new>` to every subscribed connection, as a sentinel does at
            the end of a failover; returns how many got it."""
            text = "%s 127.0.0.1 %d 127.0.0.1 %d" % (name or self.name,
                                                     old_port, new_port)
            msg = array(bulk("message"), bulk("+switch-master"), bulk(text))
            with self._lock:
                conns = list(self._subscribed.values())
            sent = 0
            for c in conns:
                try:
                    c.sendall(msg)
                    sent += 1
                except OSError:
                    pass
            return sent

    return FakeSentinel()
