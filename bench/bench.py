#!/usr/bin/python3
"""Benchmark of ngx_http_loyalty_module (make bench, make bench-rss).

    bench/bench.py bench       throughput and latency of baseline / module /
                               module-tls / lua, alternated; slow-Redis
                               isolation case
    bench/bench.py rss         worker RSS over BENCH_RSS_REQUESTS checkouts

Everything runs on 127.0.0.1 under build/bench/: a private redis-server
(no persistence; with module-tls it also listens with TLS, certificates
made with openssl under build/bench/tls/), the shop backend (an nginx
instance), one nginx instance per configuration (worker_processes 1), and
for the slow-Redis case a delaying TCP proxy (bench/slowproxy.py).  Every
process is started under timeout(1) and stopped by pid at the end.  See
bench/README.md.
"""

import glob
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time

import redis as redis_lib


HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OUT = os.path.join(REPO, "build", "bench")
RESULTS = os.environ.get("BENCH_RESULTS", os.path.join(HERE, "results.md"))

NGINX_BIN = os.environ.get("NGINX_BIN", "/usr/sbin/nginx")
MODULE = os.path.abspath(os.environ.get(
    "LOYALTY_MODULE", os.path.join(REPO, "build", "ngx_http_loyalty_module.so")))
CREDIT_SCRIPT = os.path.join(REPO, "ngx_module", "ngx_http_loyalty_credit.lua")
# another build of the module, benchmarked as configuration "module-b"
MODULE_B = os.environ.get("BENCH_MODULE_B", "")


def env_int(name, default):
    v = os.environ.get(name, "")
    return int(v) if v.strip() else default


def env_float(name, default):
    v = os.environ.get(name, "")
    return float(v) if v.strip() else default


SECONDS = env_int("BENCH_SECONDS", 10)
ROUNDS = env_int("BENCH_ROUNDS", 2)
CONNECTIONS = env_int("BENCH_CONNECTIONS", 50)
WARMUP = env_int("BENCH_WARMUP", 3)
CONFIGS = os.environ.get("BENCH_CONFIGS",
                         "baseline module module-pending module-tls "
                         "module-cluster lua module-read "
                         "module-read-pending").split()
SLOW = env_int("BENCH_SLOW", 1)
SLOW_DELAY_MS = env_float("BENCH_SLOW_DELAY_MS", 20.0)
PLAIN_CONNECTIONS = env_int("BENCH_PLAIN_CONNECTIONS", 10)
CUSTOMERS = env_int("BENCH_CUSTOMERS", 100000)
UNKNOWN = env_int("BENCH_UNKNOWN", CUSTOMERS // 20)
ANON = env_int("BENCH_ANON", 10)
RSS_REQUESTS = env_int("BENCH_RSS_REQUESTS", 1000000)
RSS_WARMUP = env_int("BENCH_RSS_WARMUP", 50000)
RSS_CONFIGS = os.environ.get("BENCH_RSS_CONFIGS", "module").split()
SEED = env_int("BENCH_SEED", 42)
PERF = os.environ.get("BENCH_PERF", "").split()   # configurations to profile
# e.g. "worker=0 redis=1 shop=1 wrk=0": CPU of each process during the runs
PIN = dict(kv.split("=", 1) for kv in os.environ.get("BENCH_PIN", "").split())
OPENSSL = os.environ.get("OPENSSL_BIN", "/usr/bin/openssl")

DAY = 86400
EARN_RATE4 = 10000                       # loyalty_earn_rate 1, scaled 10^4

# the tiers and offers of bench/conf/module.conf and lua.conf
TIERS = [("gold", 100000, 20000), ("silver", 10000, 15000),
         ("bronze", 0, 10000)]           # name, min_lifetime, multiplier4
OFFERS = [
    dict(name="welcome", new=True),
    dict(name="winback", inactive=90 * DAY),
    dict(name="gold_perk", tier="gold"),
    dict(name="vip", min_points=20000),
    dict(name="loyal", min_orders=50, max_orders=200),
]

# configuration -> (template, what it is)
KINDS = {
    "baseline": ("baseline.conf", "the same proxy, no loyalty"),
    "module": ("module.conf", "ngx_http_loyalty_module: read + credit"),
    "lua": ("lua.conf", "OpenResty: lua-resty-redis read, batched "
                        "EVALSHA credits from ngx.timer.at"),
    "lua-timer": ("lua.conf", "OpenResty, one ngx.timer.at + EVALSHA per "
                              "credit"),
    "module-b": ("module.conf", "the module built as BENCH_MODULE_B"),
    "module-tls": ("module.conf", "the module over TLS to the same "
                                  "redis-server (its TLS port)"),
    "module-cluster": ("module.conf", "the module against a local Redis "
                                      "Cluster of 3 masters"),
    "module-read": ("module.conf", "the module reading only, no credit: "
                                   "its request path alone"),
    "module-pending": ("module.conf", "the module with loyalty_pending 14d, "
                                      "half the customers with points "
                                      "locked"),
    "module-read-pending": ("module.conf", "module-read with loyalty_pending "
                                           "14d: the read path alone, half "
                                           "the customers with points "
                                           "locked"),
    "lua-read": ("lua.conf", "OpenResty reading only, no credit"),
}

# configurations that read the customer, and those that also credit
READS = ("module", "module-b", "module-tls", "module-cluster", "module-read",
         "module-pending", "module-read-pending",
         "lua", "lua-timer", "lua-read")
CREDITS = ("module", "module-b", "module-tls", "module-cluster", "lua",
           "lua-timer", "module-pending")

# module-pending: every other known customer has points locked for a week
PENDING_LOCK = 14 * 86400


def pending_of(cid, now):
    """The "pending" field a customer is seeded with under module-pending,
    and its sum; (None, 0) for one with none."""
    if int(cid[1:]) % 2:
        return None, 0
    week = now + 7 * 86400
    return "%d:%d,%d:%d" % (week, 7, week + 3600, 11), 18


def log(*args):
    print(*args, flush=True)


# ----------------------------------------------------------------------
# processes


class Procs:
    """Every process we start, under timeout(1); stopped by pid."""

    def __init__(self, limit):
        self.limit = int(limit)
        self.procs = []             # (Popen, name)

    def start(self, name, argv, **kw):
        cmd = ["timeout", "-k", "10", str(self.limit)] + argv
        p = subprocess.Popen(cmd, **kw)
        self.procs.append((p, name))
        return p

    def stop(self, p, sig=signal.SIGTERM, wait=15):
        if p.poll() is None:
            try:
                p.send_signal(sig)          # timeout(1) passes it on
            except ProcessLookupError:
                pass
            try:
                p.wait(wait)
            except subprocess.TimeoutExpired:
                # timeout(1) leads its own process group: ours only
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)

    def stop_all(self):
        # nginx first (it may still send a credit), redis last
        for p, name in reversed(self.procs):
            self.stop(p)
        self.procs = []


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise RuntimeError("timed out waiting for " + what)


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                st = f.read()
        except OSError:
            continue
        rest = st[st.rindex(")") + 2:].split()
        if int(rest[1]) == pid and rest[0] not in "ZX":
            out.append(int(d))
    return out


def proc_status(pid, fields=("VmRSS", "VmHWM")):
    res = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in fields:
                res[k] = int(v.split()[0])          # kB
    return res


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """utime + stime of a process, in seconds (0 when it is gone)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            st = f.read()
    except (OSError, TypeError):
        return 0.0
    rest = st[st.rindex(")") + 2:].split()
    return (int(rest[11]) + int(rest[12])) / float(CLK_TCK)


def mkdirs(path):
    os.makedirs(path, exist_ok=True)
    os.chmod(path, 0o755)


def machine_idle():
    """Idle seconds of all CPUs together, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")


def redis_calls(r):
    """Calls and microseconds per call of each command since the last
    CONFIG RESETSTAT (summed over the nodes of a cluster)."""
    total = {}
    for stats in (r.node_info("commandstats") if isinstance(r, Cluster)
                  else [r.info("commandstats")]):
        for name, st in stats.items():
            c, u = total.get(name.replace("cmdstat_", ""), (0, 0.0))
            total[name.replace("cmdstat_", "")] = (
                c + st["calls"], u + st["calls"] * st["usec_per_call"])
    return {n: (c, u / max(1, c)) for n, (c, u) in total.items()}


def redis_summary(res):
    """Redis CPU per checkout and the costliest commands."""
    calls = sorted(res["redis_calls"].items(),
                   key=lambda kv: -kv[1][0] * kv[1][1])[:3]
    return "%.1f us CPU/request: %s" % (
        res["cpu"]["redis"] * 1e6 / max(1, res["rps"]),
        ", ".join("%s %d x %.1f us" % (n, c, u) for n, (c, u) in calls))


def loadavg():
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


# ----------------------------------------------------------------------
# servers


PKI_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused

[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always

[v3_server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
subjectAltName = IP:127.0.0.1
"""


def make_pki(d):
    """A CA and a server certificate for IP:127.0.0.1 signed by it (EC
    P-256, SHA-256, 2 days), made with the openssl command line into d:
    ca.crt, server.crt, server.key (and the CA's key).  Files 0644: nginx
    reads ca.crt in its master, Redis its key and certificate."""
    if os.path.isdir(d):
        shutil.rmtree(d)
    mkdirs(d)
    cnf = os.path.join(d, "openssl.cnf")
    with open(cnf, "w") as f:
        f.write(PKI_CNF)

    def run(*args):
        p = subprocess.run([OPENSSL] + list(args), cwd=d,
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=60)
        if p.returncode != 0:
            raise RuntimeError("openssl %s failed (%d):\n%s"
                               % (" ".join(args), p.returncode, p.stdout))

    for name in ("ca", "server"):
        run("genpkey", "-algorithm", "EC", "-pkeyopt",
            "ec_paramgen_curve:P-256", "-out", name + ".key")
    run("req", "-new", "-x509", "-config", cnf, "-extensions", "v3_ca",
        "-key", "ca.key", "-subj", "/CN=Loyalty Bench CA", "-days", "2",
        "-sha256", "-set_serial", "0x" + os.urandom(8).hex(),
        "-out", "ca.crt")
    run("req", "-new", "-config", cnf, "-key", "server.key",
        "-subj", "/CN=127.0.0.1", "-out", "server.csr")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt",
        "-CAkey", "ca.key", "-set_serial", "0x" + os.urandom(8).hex(),
        "-days", "2", "-sha256", "-extfile", cnf, "-extensions", "v3_server",
        "-out", "server.crt")
    run("verify", "-CAfile", "ca.crt", "-verify_ip", "127.0.0.1",
        "server.crt")
    os.unlink(os.path.join(d, "server.csr"))
    for name in os.listdir(d):
        os.chmod(os.path.join(d, name), 0o644)
    return dict(ca=os.path.join(d, "ca.crt"),
                cert=os.path.join(d, "server.crt"),
                key=os.path.join(d, "server.key"))


class Redis:
    """tls: make_pki()'s files, to listen on a TLS port (tls_port) beside
    the plain one (the benchmark's own client and the other
    configurations): one redis-server for module and module-tls."""

    def __init__(self, procs, tls=None):
        self.port = free_port()
        self.tls_port = None
        d = os.path.join(OUT, "redis")
        if os.path.isdir(d):
            shutil.rmtree(d)
        mkdirs(d)
        argv = [
            "redis-server", "--bind", "127.0.0.1", "--port", str(self.port),
            "--protected-mode", "yes", "--save", "", "--appendonly", "no",
            "--dir", d, "--logfile", os.path.join(d, "redis.log"),
            "--daemonize", "no"]
        if tls:
            self.tls_port = free_port()
            while self.tls_port == self.port:
                self.tls_port = free_port()
            argv += ["--tls-port", str(self.tls_port),
                     "--tls-cert-file", tls["cert"],
                     "--tls-key-file", tls["key"],
                     "--tls-ca-cert-file", tls["ca"],
                     "--tls-auth-clients", "no"]
        self.proc = procs.start("redis", argv)
        self.r = redis_lib.Redis(host="127.0.0.1", port=self.port,
                                 decode_responses=True)

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError("redis-server exited, see %s/redis.log" % d)
            try:
                return self.r.ping()
            except redis_lib.RedisError:
                return False

        wait_for(up, 10, "redis-server")
        if self.tls_port:
            self.tls_ping(tls["ca"])

    def tls_ping(self, ca):
        """PING on the TLS port, verified against ca for IP:127.0.0.1 as
        the module verifies it (Redis listens on all its ports once the
        plain one answers)."""
        ctx = ssl.create_default_context(cafile=ca)
        with socket.create_connection(("127.0.0.1", self.tls_port),
                                      timeout=5) as s:
            with ctx.wrap_socket(s, server_hostname="127.0.0.1") as t:
                t.sendall(b"PING\r\n")
                reply = t.recv(64)
                t.unwrap()
        if not reply.startswith(b"+PONG"):
            raise RuntimeError("redis-server's TLS port answered %r to PING"
                               % reply)

    def pid(self):
        kids = children(self.proc.pid)
        return kids[0] if kids else None


def cluster_ports(n):
    """n free loopback ports whose cluster bus ports (+10000) are free."""
    out = []
    while len(out) < n:
        p = free_port()
        if p > 55535 or p in out:
            continue
        try:
            s = socket.socket()
            s.bind(("127.0.0.1", p + 10000))
            s.close()
        except OSError:
            continue
        out.append(p)
    return out


class ClusterPipeline:
    """A pipeline per master, routed by the slot of each key (CRC16 of its
    hash tag); execute() answers in the order of the commands."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.pipes = {}         # node port -> (pipeline, [command index])
        self.n = 0

    def _pipe(self, key):
        port = self.cluster.node_of(key)
        if port not in self.pipes:
            self.pipes[port] = (self.cluster.clients[port].pipeline(
                transaction=False), [])
        pipe, idx = self.pipes[port]
        idx.append(self.n)
        self.n += 1
        return pipe

    def hset(self, key, **kw):
        self._pipe(key).hset(key, **kw)

    def hmget(self, key, *fields):
        self._pipe(key).hmget(key, *fields)

    def execute(self):
        out = [None] * self.n
        for pipe, idx in self.pipes.values():
            for i, r in zip(idx, pipe.execute()):
                out[i] = r
        self.pipes = {}
        self.n = 0
        return out


class Cluster:
    """A private Redis Cluster of 3 masters, no replicas, no persistence;
    what seed() and verify() need of a redis client, over all nodes."""

    def __init__(self, procs, masters=3):
        from redis.crc import key_slot
        self.key_slot = key_slot
        self.ports = cluster_ports(masters)
        top = os.path.join(OUT, "cluster")
        if os.path.isdir(top):
            shutil.rmtree(top)
        mkdirs(top)
        self.procs = []
        self.clients = {}
        for port in self.ports:
            d = os.path.join(top, str(port))
            mkdirs(d)
            self.procs.append(procs.start("redis-%d" % port, [
                "redis-server", "--bind", "127.0.0.1", "--port", str(port),
                "--protected-mode", "yes", "--save", "", "--appendonly",
                "no", "--cluster-enabled", "yes", "--cluster-config-file",
                os.path.join(d, "nodes.conf"), "--cluster-node-timeout",
                "5000", "--dir", d, "--logfile",
                os.path.join(d, "redis.log"), "--daemonize", "no"]))
            self.clients[port] = redis_lib.Redis(
                host="127.0.0.1", port=port, decode_responses=True)

        def up():
            for p, port in zip(self.procs, self.ports):
                if p.poll() is not None:
                    raise RuntimeError("redis-server %d exited, see "
                                       "%s/%d/redis.log" % (port, top, port))
                try:
                    self.clients[port].ping()
                except redis_lib.RedisError:
                    return False
            return True

        wait_for(up, 10, "the cluster's redis-servers")
        with open(os.path.join(top, "create.log"), "w") as f:
            subprocess.run(["timeout", "-k", "5", "60",
                            "redis-cli", "--cluster", "create"]
                           + ["127.0.0.1:%d" % p for p in self.ports]
                           + ["--cluster-yes"], stdout=f,
                           stderr=subprocess.STDOUT, check=True, timeout=60)

        def ok():
            for c in self.clients.values():
                if c.cluster("info")["cluster_state"] != "ok":
                    return False
                if len(c.cluster("slots")) != masters:
                    return False
            return True

        wait_for(ok, 30, "cluster_state:ok on every node")
        self.slots = [None] * 16384
        for low, high, master, *_ in self.clients[self.ports[0]].execute_command(
                "CLUSTER", "SLOTS"):
            for s in range(low, high + 1):
                self.slots[s] = int(master[1])
        if None in self.slots:
            raise RuntimeError("the cluster does not cover every slot")

    def node_of(self, key):
        return self.slots[self.key_slot(key.encode())]

    def seeds(self):
        return " ".join("127.0.0.1:%d" % p for p in self.ports)

    def pids(self):
        out = []
        for p in self.procs:
            kids = children(p.pid)
            out.append(kids[0] if kids else None)
        return out

    def pipeline(self, transaction=False):
        return ClusterPipeline(self)

    def flushall(self):
        for c in self.clients.values():
            c.flushall()

    def config_resetstat(self):
        for c in self.clients.values():
            c.config_resetstat()

    def node_info(self, section):
        return [c.info(section) for c in self.clients.values()]

    def keys_per_node(self):
        return {p: c.dbsize() for p, c in self.clients.items()}


class Nginx:
    """One nginx instance, prefix build/bench/<name>/."""

    def __init__(self, procs, name, template, subs, port=None, under=None):
        """under: a command (valgrind) to run nginx under, as one process
        (master_process off) that is its own worker."""
        self.name = name
        self.port = port or free_port()
        self.prefix = os.path.join(OUT, name)
        if os.path.isdir(self.prefix):
            shutil.rmtree(self.prefix)
        mkdirs(self.prefix)
        mkdirs(os.path.join(self.prefix, "logs"))
        mkdirs(os.path.join(self.prefix, "temp"))

        with open(os.path.join(HERE, "conf", template)) as f:
            conf = f.read()
        subs = dict(subs, PORT=str(self.port))
        for k, v in subs.items():
            conf = conf.replace("@%s@" % k, str(v))
        left = re.findall(r"@[A-Z_]+@", conf)
        if left:
            raise RuntimeError("%s: unfilled %s" % (template, left))

        self.conf = os.path.join(self.prefix, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(conf)

        base = [NGINX_BIN, "-p", self.prefix + "/", "-c", self.conf]
        t = subprocess.run(base + ["-t", "-q"], capture_output=True,
                           text=True, timeout=60)
        if t.returncode != 0:
            raise RuntimeError("nginx -t %s:\n%s" % (self.conf, t.stderr))

        if under:
            self.proc = procs.start(name, under + base + [
                "-g", "daemon off; master_process off;"])
        else:
            self.proc = procs.start(name, base + ["-g", "daemon off;"])
        pidfile = os.path.join(self.prefix, "logs", "nginx.pid")

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError("nginx %s exited, see %s/logs/error.log"
                                   % (name, self.prefix))
            return (os.path.exists(pidfile) and os.path.getsize(pidfile) > 0
                    and listening(self.port))

        wait_for(up, 120 if under else 20, "nginx " + name)

        with open(pidfile) as f:
            self.master = int(f.read())
        if under:
            self.worker = self.master
            return
        wait_for(lambda: len(children(self.master)) >= 1, 10,
                 "worker of nginx " + name)
        self.worker = children(self.master)[0]

    def memory(self):
        return proc_status(self.worker)

    def error_lines(self, pattern=r"\[(warn|error|crit|alert|emerg)\]"):
        path = os.path.join(self.prefix, "logs", "error.log")
        out = []
        with open(path, errors="replace") as f:
            for line in f:
                if re.search(pattern, line):
                    out.append(line.rstrip())
        return out


# ----------------------------------------------------------------------
# customers


def tier_of(lifetime):
    for name, low, mult4 in TIERS:
        if lifetime >= low:
            return name, mult4
    return None, 10000


def offer_of(rec, tier, now):
    points, orders, last = rec["points"], rec["orders"], rec["last_order"]
    for o in OFFERS:
        if o.get("new") and orders != 0:
            continue
        if "tier" in o and o["tier"] != tier:
            continue
        if "min_points" in o and points < o["min_points"]:
            continue
        if "max_points" in o and points > o["max_points"]:
            continue
        if "min_orders" in o and orders < o["min_orders"]:
            continue
        if "max_orders" in o and orders > o["max_orders"]:
            continue
        if "inactive" in o and (orders == 0 or now < last
                                or now - last < o["inactive"]):
            continue
        return o["name"]
    return None


def make_customers(n, now):
    """id -> record; lifetimes stay far from tier thresholds (a run cannot
    move a customer to another tier), last orders far from the 90 days of
    the winback offer."""
    rnd = random.Random(SEED)
    out = {}
    for i in range(1, n + 1):
        cid = "c%06d" % i
        u = rnd.random()
        if u < 0.08:
            rec = dict(points=0, lifetime=0, orders=0, first_order=None,
                       last_order=0)
        else:
            band = rnd.random()
            if band < 0.60:
                lifetime = rnd.randint(1, 3000)               # bronze
            elif band < 0.90:
                lifetime = rnd.randint(10000, 50000)          # silver
            else:
                lifetime = rnd.randint(100000, 500000)        # gold
            points = rnd.randint(0, lifetime)
            orders = max(1, lifetime // rnd.randint(40, 160))
            first_age = rnd.randint(420, 1500)
            if rnd.random() < 0.7:
                last_age = rnd.randint(0, 80)                 # active
            else:
                last_age = rnd.randint(100, 400)              # lapsed
            rec = dict(points=points, lifetime=lifetime, orders=orders,
                       first_order=now - first_age * DAY - rnd.randint(0, DAY),
                       last_order=now - last_age * DAY - rnd.randint(0, DAY))
        out[cid] = rec
    return out


def seed(r, customers, pending=None):
    """pending: the time the module-pending fields are made from"""
    r.flushall()
    pipe = r.pipeline(transaction=False)
    n = 0
    for cid, rec in customers.items():
        m = {"points": rec["points"], "lifetime": rec["lifetime"],
             "orders": rec["orders"]}
        if rec["first_order"] is not None:
            m["first_order"] = rec["first_order"]
            m["last_order"] = rec["last_order"]
            if pending is not None and pending_of(cid, pending)[0]:
                m["pending"] = pending_of(cid, pending)[0]
        pipe.hset("loyalty:{%s}" % cid, mapping=m)
        n += 1
        if n % 5000 == 0:
            pipe.execute()
    pipe.execute()


# ----------------------------------------------------------------------
# wrk


WRK_LUA = os.path.join(HERE, "wrk.lua")


def wrk_start(procs, port, tag, seconds, connections, mode="checkout",
              stop_after=0, path=None, seed=None):
    url = "http://127.0.0.1:%d%s" % (port, path or "/" + mode)
    env = dict(os.environ, BENCH_MODE=mode, BENCH_RUN=tag,
               BENCH_CUSTOMERS=str(CUSTOMERS), BENCH_UNKNOWN=str(UNKNOWN),
               BENCH_ANON=str(ANON), BENCH_STOP_AFTER=str(stop_after),
               BENCH_SEED=str(seed if seed is not None
                              else abs(hash(tag)) % 100000))
    logdir = os.path.join(OUT, "wrk")
    mkdirs(logdir)
    out = open(os.path.join(logdir, tag + ".txt"), "w")
    argv = ["timeout", "-k", "5", str(seconds + 120), "wrk", "-t1",
            "-c%d" % connections, "-d%ds" % seconds, "--latency",
            "-s", WRK_LUA, url]
    p = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    procs.procs.append((p, "wrk " + tag))
    p.stop_after = stop_after
    p.outpath = out.name
    p.outfile = out
    return p


def wrk_stopped(p):
    """With BENCH_STOP_AFTER: once wrk's thread has stopped, SIGINT ends
    wrk's wait for the duration (it then reports as usual)."""
    if p.poll() is None and not getattr(p, "interrupted", False):
        with open(p.outpath) as f:
            if "BENCH_STOPPED" in f.read():
                p.send_signal(signal.SIGINT)        # timeout(1) passes it on
                p.interrupted = True


def wrk_wait(p):
    while p.poll() is None:
        if p.stop_after:
            wrk_stopped(p)
        time.sleep(0.2)
    p.outfile.close()
    with open(p.outpath) as f:
        text = f.read()
    m = re.search(r"^BENCH_RESULT (\{.*\})$", text, re.M)
    if p.returncode != 0 or not m:
        raise RuntimeError("wrk failed (%s), see %s:\n%s"
                           % (p.returncode, p.outpath, text[-2000:]))
    res = json.loads(m.group(1))
    res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
    res["errors"] = (res["connect_errors"] + res["read_errors"]
                     + res["write_errors"] + res["status_errors"]
                     + res["timeouts"])
    return res


def perf_start(procs, server, tag, seconds):
    """perf record -g of the worker for the run (BENCH_PERF)."""
    d = os.path.join(OUT, "perf")
    mkdirs(d)
    data = os.path.join(d, tag + ".data")
    p = procs.start("perf", ["perf", "record", "-q", "-g", "-F", "2000",
                             "-p", str(server.worker), "-o", data, "--",
                             "sleep", str(max(1, seconds - 1))],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    p.data = data
    return p


def perf_report(p, result):
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        return
    txt = p.data[:-len(".data")] + ".txt"
    with open(txt, "w") as f:
        subprocess.run(["perf", "report", "-i", p.data, "--stdio",
                        "--no-children", "--percent-limit", "0.7",
                        "-g", "none", "--sort", "dso,symbol"],
                       stdout=f, stderr=subprocess.DEVNULL, timeout=300)
    result["perf"] = txt
    log("profile of the worker: %s" % os.path.relpath(txt, REPO))


# ----------------------------------------------------------------------
# orders and balances


class OrderLog:
    def __init__(self, path):
        self.path = path
        self.offset = 0

    def mark(self):
        self.offset = os.path.getsize(self.path) \
            if os.path.exists(self.path) else 0

    def read(self, tag):
        """Orders logged since mark() whose id starts with tag; waits for
        the buffered log to be flushed."""
        prev = -1
        for _ in range(50):
            size = os.path.getsize(self.path) \
                if os.path.exists(self.path) else 0
            if size == prev:
                break
            prev = size
            time.sleep(0.4)
        out = []
        with open(self.path, errors="replace") as f:
            f.seek(self.offset)
            for line in f:
                p = line.split()
                if len(p) != 8 or not p[2].startswith(tag + "-"):
                    continue
                out.append(dict(cid=p[0], total=p[1], oid=p[2],
                                status=int(p[3]), lstatus=p[4], ltier=p[5],
                                loffer=p[6], lpoints=p[7]))
        return out


def earned_of(total, mult4):
    i, _, f = total.partition(".")
    a4 = int(i) * 10000 + int((f + "0000")[:4])
    return a4 * EARN_RATE4 * mult4 // 10 ** 12


def verify(r, customers, orders, kind, started, timeout=30, pending=None):
    """Checks the headers the shop received and, once the credits have
    landed, every ordering customer's balance (plus a sample of the
    others) against the seeded record + the orders the shop confirmed."""
    reads = kind in READS
    credit = kind in CREDITS
    res = dict(orders=len(orders), identified=0, anonymous=0,
               header_mismatch=0, unavailable=0, examples=[])
    expect = {}

    def bad(what):
        if len(res["examples"]) < 8:
            res["examples"].append(what)

    # the headers of a customer's first order in the run (lowest order
    # number: wrk numbers requests as it sends them) reflect the seeded
    # record exactly; later ones may see earlier credits of the run, so
    # only their tier (constant: no run crosses a threshold) is checked
    first = {}
    for o in orders:
        if o["cid"] != "-":
            n = int(o["oid"].rsplit("-", 1)[1])
            if n < first.get(o["cid"], (1 << 62)):
                first[o["cid"]] = n

    for o in orders:
        if o["cid"] == "-":
            res["anonymous"] += 1
            if o["lstatus"] != ("anonymous" if reads else "-"):
                res["header_mismatch"] += 1
                bad("anonymous order %s: X-Loyalty-Status %s"
                    % (o["oid"], o["lstatus"]))
            continue

        cid = o["cid"].split("=")[-1]
        res["identified"] += 1
        rec = customers.get(cid)
        known = rec is not None
        if rec is None:
            rec = dict(points=0, lifetime=0, orders=0, last_order=0)
        tier, mult4 = tier_of(rec["lifetime"])

        if reads:
            if o["lstatus"] == "unavailable":
                res["unavailable"] += 1
                mult4 = 10000
            else:
                if first[o["cid"]] == int(o["oid"].rsplit("-", 1)[1]):
                    offer = offer_of(rec, tier, int(time.time()))
                    got = (o["lstatus"], o["ltier"], o["loffer"],
                           o["lpoints"])
                    want = ("ok" if known else "new", tier or "-",
                            offer or "-", str(rec["points"]))
                else:
                    got = (o["lstatus"] in ("ok", "new"), o["ltier"])
                    want = (True, tier or "-")
                if got != want:
                    res["header_mismatch"] += 1
                    bad("order %s customer %s: headers %s, expected %s"
                        % (o["oid"], cid, got, want))
        elif o["lstatus"] != "-":
            res["header_mismatch"] += 1
            bad("%s order %s has X-Loyalty-Status" % (kind, o["oid"]))

        if not 200 <= o["status"] < 300:
            continue
        e = expect.setdefault(cid, locked_of(cid, rec, pending))
        if credit:
            earned = earned_of(o["total"], mult4)
            if pending is None:
                e[0] += earned
                e[1] += earned
            else:
                e[3] += earned          # locked, not redeemable yet
            e[2] += 1

    # untouched customers must stay as seeded
    rnd = random.Random(started)
    ids = list(customers)
    for cid in rnd.sample(ids, min(2000, len(ids))):
        if cid not in expect:
            rec = customers[cid]
            expect[cid] = locked_of(cid, rec, pending)

    keys = sorted(expect)
    deadline = time.monotonic() + timeout
    while True:
        wrong = []
        pipe = r.pipeline(transaction=False)
        for i in range(0, len(keys), 5000):
            for cid in keys[i:i + 5000]:
                pipe.hmget("loyalty:{%s}" % cid, "points", "lifetime",
                           "orders", "pending")
            for cid, got in zip(keys[i:i + 5000], pipe.execute()):
                got = [int(x) if x is not None else 0 for x in got[:3]] + [
                    sum(int(e.split(":")[1]) for e in got[3].split(","))
                    if got[3] else 0]
                if got != expect[cid]:
                    wrong.append((cid, got, expect[cid]))
        if not wrong or time.monotonic() > deadline:
            break
        time.sleep(1)

    res["customers_checked"] = len(keys)
    res["balance_mismatch"] = len(wrong)
    for cid, got, want in wrong[:5]:
        bad("customer %s: points/lifetime/orders/pending %s, expected %s"
            % (cid, got, want))
    res["ok"] = (not wrong and res["header_mismatch"] == 0
                 and res["identified"] > 0)
    return res


def locked_of(cid, rec, pending):
    """[points, lifetime, orders, pending] as seeded"""
    locked = pending_of(cid, pending)[1] \
        if pending is not None and rec.get("first_order") is not None else 0
    return [rec["points"], rec["lifetime"], rec["orders"], locked]


def vsummary(v):
    s = ("%d orders (%d identified, %d anonymous), %d customers checked: "
         % (v["orders"], v["identified"], v["anonymous"],
            v["customers_checked"]))
    if v["ok"]:
        s += "balances exact"
    else:
        s += "%d balance and %d header mismatches" % (
            v["balance_mismatch"], v["header_mismatch"])
    if v["unavailable"]:
        s += ", %d reads unavailable (credited at multiplier 1)" % (
            v["unavailable"])
    return s


# ----------------------------------------------------------------------
# the run


class Bench:
    def __init__(self, limit):
        self.procs = Procs(limit)
        self.servers = {}
        self.now = int(time.time())

    def start_common(self, configs=None):
        """configs: those that will run (CONFIGS unless given): the Redis
        Cluster and Redis' TLS port are started only for theirs."""
        configs = CONFIGS if configs is None else configs
        if not os.path.exists(MODULE):
            raise RuntimeError("no %s: make build" % MODULE)
        mkdirs(os.path.join(REPO, "build"))
        mkdirs(OUT)
        self.luadir = os.path.join(OUT, "lua-src")
        mkdirs(self.luadir)
        for src in (os.path.join(HERE, "lua", "loyalty_bench.lua"),
                    CREDIT_SCRIPT):
            dst = os.path.join(self.luadir, os.path.basename(src))
            shutil.copyfile(src, dst)
            os.chmod(dst, 0o644)

        self.pki = None
        if "module-tls" in configs:
            self.pki = make_pki(os.path.join(OUT, "tls"))
            log("CA and server certificate (IP:127.0.0.1) in %s"
                % os.path.relpath(os.path.dirname(self.pki["ca"]), REPO))
        self.redis = Redis(self.procs, tls=self.pki)
        log("redis-server on 127.0.0.1:%d%s" % (
            self.redis.port, ", TLS on 127.0.0.1:%d" % self.redis.tls_port
            if self.redis.tls_port else ""))
        self.customers = make_customers(CUSTOMERS, self.now)
        t = time.monotonic()
        seed(self.redis.r, self.customers)
        log("seeded %d customers in %.1f s" % (CUSTOMERS,
                                                time.monotonic() - t))
        self.cluster = None
        if "module-cluster" in configs:
            self.cluster = Cluster(self.procs)
            t = time.monotonic()
            seed(self.cluster, self.customers)
            log("redis cluster of 3 masters on %s; seeded %d customers in "
                "%.1f s (keys per node: %s)" % (
                    self.cluster.seeds(), CUSTOMERS, time.monotonic() - t,
                    ", ".join("%d: %d" % kv for kv in
                              self.cluster.keys_per_node().items())))
        port = free_port()
        self.shop = Nginx(self.procs, "shop", "shop.conf",
                          {"SHOP_PORT": port}, port=port)
        self.orders = OrderLog(os.path.join(self.shop.prefix, "logs",
                                            "orders.log"))

    def edge(self, name, kind, redis_port=None, timeout="100ms", under=None):
        template = KINDS[kind][0]
        if kind == "module-tls" and not self.redis.tls_port:
            raise RuntimeError("module-tls: Redis has no TLS port")
        subs = {
            "SHOP_PORT": self.shop.port,
            "MODULE": os.path.abspath(MODULE_B) if kind == "module-b"
                      else MODULE,
            "REDIS": self.cluster.seeds() + " cluster"
                     if kind == "module-cluster"
                     else "127.0.0.1:%d tls" % self.redis.tls_port
                     if kind == "module-tls"
                     else "127.0.0.1:%d" % (redis_port or self.redis.port),
            # verification on (the default), against the bench's own CA
            "REDIS_EXTRA": "loyalty_redis_ssl_trusted_certificate  %s;"
                           % self.pki["ca"] if kind == "module-tls" else "",
            "REDIS_PORT": redis_port or self.redis.port,
            "REDIS_TIMEOUT": timeout,
            "REDIS_TIMEOUT_MS": int(timeout.replace("ms", ""))
            if timeout.endswith("ms") else int(timeout.rstrip("s")) * 1000,
            "LUA_DIR": self.luadir,
            "LUA_BATCH": "false" if kind == "lua-timer" else "true",
            "EARN": '""' if kind in ("module-read", "module-read-pending")
                    else "$upstream_http_x_order_total",
            "PENDING": "loyalty_pending %ds;" % PENDING_LOCK
                       if kind in ("module-pending", "module-read-pending")
                       else "",
            "LUA_LOG": "-- reads only: no credit" if kind == "lua-read"
                       else "loyalty.log()",
        }
        n = Nginx(self.procs, name, template, subs, under=under)
        n.store = self.cluster if kind == "module-cluster" else self.redis.r
        self.servers[name] = n
        log("nginx %-12s on 127.0.0.1:%d (worker %d)"
            % (name, n.port, n.worker))
        return n

    def checkout_run(self, server, kind, tag, seconds, plain=None,
                     profile=False):
        """Reseed, run wrk on /checkout (and /plain at the same time when
        plain is a server), verify.  Returns (checkout, plain, verify)."""
        store = server.store
        pending = self.now if kind in ("module-pending",
                                       "module-read-pending") else None
        seed(store, self.customers, pending)
        self.orders.mark()
        started = time.time()
        la = loadavg()
        pids = dict(worker=server.worker, shop=self.shop.worker)
        if isinstance(store, Cluster):
            # the CPU of every node, summed as "redis"
            for i, pid in enumerate(store.pids()):
                pids["redis-node%d" % i] = pid
        else:
            pids["redis"] = self.redis.pid()
        cpu0 = {k: cpu_seconds(v) for k, v in pids.items()}
        store.config_resetstat()
        idle0 = machine_idle()
        t0 = time.monotonic()
        pc = wrk_start(self.procs, server.port, tag, seconds, CONNECTIONS)
        if PIN:
            wait_for(lambda: children(pc.pid), 5, "wrk")
            wrk = children(pc.pid)
            for k, pid in list(pids.items()) + [("wrk", w) for w in wrk]:
                k = "redis" if k.startswith("redis") else k
                if k in PIN:
                    for tid in os.listdir("/proc/%d/task" % pid):
                        os.sched_setaffinity(int(tid), {
                            int(c) for c in PIN[k].split(",")})
        pp = None
        if plain is not None:
            pp = wrk_start(self.procs, plain.port, tag + "-plain", seconds,
                           PLAIN_CONNECTIONS, mode="plain")
        perf = None
        if profile:
            perf = perf_start(self.procs, server, tag, seconds)
        c = wrk_wait(pc)
        p = wrk_wait(pp) if pp else None
        wall = time.monotonic() - t0
        c["cpu"] = {k: (cpu_seconds(v) - cpu0[k]) / wall
                    for k, v in pids.items()}
        if "redis" not in c["cpu"]:
            c["cpu"]["redis"] = sum(v for k, v in c["cpu"].items()
                                    if k.startswith("redis-node"))
        c["idle"] = (machine_idle() - idle0) / wall
        c["redis_calls"] = redis_calls(store)
        c["redis_us"] = c["cpu"]["redis"] * 1e6 / max(1, c["rps"])
        time.sleep(0.5)                 # credits still on their way
        if perf:
            perf_report(perf, c)
        served = c["requests"] + (p["requests"] if p else 0)
        c["worker_us"] = (cpu_seconds(server.worker) - cpu0["worker"]) \
            * 1e6 / max(1, served)
        c["loadavg"] = la
        c["rss_kb"] = server.memory()["VmRSS"]
        v = verify(store, self.customers, self.orders.read(tag), kind,
                   started, pending=pending)
        return c, p, v

    def stop(self):
        self.procs.stop_all()


def ms(us):
    return "%.2f" % (us / 1000.0)


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def rotate(xs, k):
    k %= len(xs)
    return xs[k:] + xs[:k]


def bench_main():
    est = (len(CONFIGS) * (ROUNDS + 1) * (SECONDS + 40)
           + (4 * ROUNDS * (SECONDS + 40) if SLOW else 0) + 600)
    signal.alarm(est * 2)
    b = Bench(est * 2 + 60)
    runs = {c: [] for c in CONFIGS}
    slow_modes = ["fast", "slow"]
    if "module-b" in CONFIGS:
        slow_modes += ["fast-b", "slow-b"]
    slow_runs = {m: [] for m in slow_modes}
    failures = []
    try:
        b.start_common()
        for c in CONFIGS:
            if c not in KINDS:
                raise RuntimeError("unknown configuration %s" % c)
            if c == "module-b" and not os.path.exists(MODULE_B):
                raise RuntimeError("module-b: set BENCH_MODULE_B to a .so")
            b.edge(c, c)

        if SLOW:
            proxy_port = free_port()
            proxy = b.procs.start("slowproxy", [
                sys.executable, os.path.join(HERE, "slowproxy.py"),
                str(proxy_port), str(b.redis.port),
                "--delay-ms", str(SLOW_DELAY_MS),
                "--max-seconds", str(b.procs.limit)],
                stdout=subprocess.PIPE, text=True)
            if proxy.stdout.readline().strip() != "ready":
                raise RuntimeError("slowproxy did not start")
            log("slowproxy on 127.0.0.1:%d (+%g ms per read each way)"
                % (proxy_port, SLOW_DELAY_MS))
            if "module" not in b.servers:
                b.edge("module", "module")
            b.edge("module-slow", "module", redis_port=proxy_port,
                   timeout="1s")
            if "module-b" in CONFIGS:
                b.edge("module-b-slow", "module-b", redis_port=proxy_port,
                       timeout="1s")

        # warm-up: pools, JIT, page cache
        for c in CONFIGS:
            if WARMUP > 0:
                s = b.servers[c]
                seed(s.store, b.customers)
                wrk_wait(wrk_start(b.procs, s.port, "warm-" + c, WARMUP,
                                   CONNECTIONS))
        log("warm-up done (%d s each)" % WARMUP)

        stamp = time.strftime("%H%M%S")
        for rnd in range(ROUNDS):
            for c in rotate(CONFIGS, rnd):
                tag = "%s-r%d-%s" % (stamp, rnd + 1, c)
                res, _, v = b.checkout_run(b.servers[c], c, tag, SECONDS,
                                           profile=(rnd == 0 and c in PERF))
                res["verify"] = v
                runs[c].append(res)
                if not v["ok"]:
                    failures.append((tag, v))
                log("round %d %-10s %8.0f req/s  p50 %s  p99 %s  p99.9 %s ms"
                    "  errors %d  load %s | %s"
                    % (rnd + 1, c, res["rps"], ms(res["p50"]),
                       ms(res["p99"]), ms(res["p999"]), res["errors"],
                       res["loadavg"], vsummary(v)))
                log("        idle %.0f%% of %d CPUs; redis %s"
                    % (100 * res["idle"] / os.cpu_count(), os.cpu_count(),
                       redis_summary(res)))

        if SLOW:
            for rnd in range(ROUNDS):
                for mode in rotate(slow_modes, rnd):
                    s = b.servers[{"fast": "module", "slow": "module-slow",
                                   "fast-b": "module-b",
                                   "slow-b": "module-b-slow"}[mode]]
                    tag = "%s-s%d-%s" % (stamp, rnd + 1, mode)
                    c, p, v = b.checkout_run(s, "module", tag, SECONDS,
                                             plain=s)
                    slow_runs[mode].append(dict(checkout=c, plain=p,
                                                verify=v))
                    if not v["ok"]:
                        failures.append((tag, v))
                    log("slow-redis round %d %-6s plain %8.0f req/s p99 %s "
                        "ms | checkout %6.0f req/s p99 %s ms | %s"
                        % (rnd + 1, mode, p["rps"], ms(p["p99"]), c["rps"],
                           ms(c["p99"]), vsummary(v)))

        memory = {name: s.memory() for name, s in b.servers.items()}
        errors = {name: s.error_lines() for name, s in b.servers.items()}
        status = {}
        for name in ("module", "module-tls", "module-cluster"):
            if name in b.servers and name in CONFIGS:
                status[name] = loyalty_status(b.servers[name])
        redis_pid = b.redis.pid()
    finally:
        b.stop()
        signal.alarm(0)

    report = bench_report(runs, slow_runs, memory, errors, failures,
                          status)
    print()
    print(report)
    save_section(os.environ.get("BENCH_SECTION", "bench"), report)
    log("saved to %s" % os.path.relpath(RESULTS, REPO))
    return 1 if failures else 0


def ratio_median(runs, a, b, key):
    n = min(len(runs[a]), len(runs[b]))
    return med([runs[a][i][key] / runs[b][i][key] for i in range(n)])


def target(ok):
    return "**met**" if ok else "**NOT met**"


def environment():
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short",
                               "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except Exception:
        head, dirty = "?", ""
    nginx = subprocess.run([NGINX_BIN, "-v"], capture_output=True,
                           text=True).stderr.strip().split("/")[-1]
    return ("%s, commit %s%s, nginx %s, %d CPUs, load %s"
            % (time.strftime("%Y-%m-%d %H:%M %Z"), head,
               " (+ local changes)" if dirty else "", nginx,
               os.cpu_count(), loadavg()))


STATUS_KEEP = re.compile(r"^loyalty_(redis_redirects_total|"
                         r"cluster_refreshes_total|redis_failovers_total|"
                         r"redis_tls_handshakes_total|"
                         r"credits_total|redis_connections|requests_total)")


def loyalty_status(server):
    """The lines of the edge's loyalty_status that tell about Redis."""
    try:
        s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        s.sendall(b"GET /loyalty-status HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        s.close()
    except OSError as e:
        return ["(loyalty_status: %s)" % e]
    body = data.decode(errors="replace").partition("\r\n\r\n")[2]
    return [l for l in body.splitlines()
            if STATUS_KEEP.match(l) and not l.endswith(" 0")]


def bench_report(runs, slow_runs, memory, errors, failures, status=None):
    L = []
    L.append("## make %s\n" % os.environ.get("BENCH_SECTION", "bench"))
    L.append("%s.  wrk: 1 thread, %d connections, %d s per run, %d rounds "
             "(configurations alternated), %d customers seeded + %d new, "
             "%d%% anonymous; medians of the runs.\n"
             % (environment(), CONNECTIONS, SECONDS, ROUNDS, CUSTOMERS,
                UNKNOWN, ANON))
    L.append("| configuration | requests/s | p50 ms | p99 ms | p99.9 ms "
             "| errors | worker peak RSS (VmHWM) | worker CPU µs/request "
             "| CPU % worker / shop / redis | balances |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for c, rs in runs.items():
        if not rs:
            continue
        mem = memory.get(c, {})
        vok = all(r["verify"]["ok"] for r in rs)
        L.append("| %s | %.0f | %s | %s | %s | %d | %.1f MiB | %.1f "
                 "| %.0f / %.0f / %.0f | %s |" % (
            c, med([r["rps"] for r in rs]), ms(med([r["p50"] for r in rs])),
            ms(med([r["p99"] for r in rs])), ms(med([r["p999"] for r in rs])),
            sum(r["errors"] for r in rs), mem.get("VmHWM", 0) / 1024.0,
            med([r["worker_us"] for r in rs]),
            100 * med([r["cpu"]["worker"] for r in rs]),
            100 * med([r["cpu"]["shop"] for r in rs]),
            100 * med([r["cpu"]["redis"] for r in rs]),
            ("exact" if c in CREDITS else "unchanged") if vok
            else "**MISMATCH**"))
    L.append("")

    have = lambda *cs: all(runs.get(c) for c in cs)
    if have("module", "baseline"):
        thr = ratio_median(runs, "module", "baseline", "rps")
        p99 = ratio_median(runs, "module", "baseline", "p99")
        L.append("- module / baseline throughput: **%.2f** (target >= 0.75:"
                 " %s)" % (thr, target(thr >= 0.75)))
        L.append("- module / baseline p99: **%.2f** (target <= 1.5: %s)"
                 % (p99, target(p99 <= 1.5)))
        L.append("- worker CPU per request, module / baseline: %.2f "
                 "(the throughput ratio if the worker had a CPU of its "
                 "own: %.2f)" % (
                     ratio_median(runs, "module", "baseline", "worker_us"),
                     1 / ratio_median(runs, "module", "baseline",
                                      "worker_us")))
    if have("module", "lua"):
        thr = ratio_median(runs, "module", "lua", "rps")
        p99 = ratio_median(runs, "module", "lua", "p99")
        L.append("- module / lua throughput: **%.2f** (target >= 2.5: %s);"
                 " module / lua p99: %.2f" % (thr, target(thr >= 2.5), p99))
        L.append("- worker CPU per request, lua / module: %.2f" % (
            ratio_median(runs, "lua", "module", "worker_us")))
    if have("module-read", "baseline"):
        L.append("- the request path alone (no credits, so no credit "
                 "script in Redis), module-read / baseline: throughput "
                 "%.2f, p99 %.2f, worker CPU per request %.2f" % (
                     ratio_median(runs, "module-read", "baseline", "rps"),
                     ratio_median(runs, "module-read", "baseline", "p99"),
                     ratio_median(runs, "module-read", "baseline",
                                  "worker_us")))
    if have("module-read", "lua-read"):
        L.append("- module-read / lua-read throughput: %.2f, p99: %.2f"
                 % (ratio_median(runs, "module-read", "lua-read", "rps"),
                    ratio_median(runs, "module-read", "lua-read", "p99")))
    if have("module", "lua-timer"):
        L.append("- module / lua-timer throughput: %.2f" % ratio_median(
            runs, "module", "lua-timer", "rps"))
    if have("module-b", "module"):
        L.append("- module-b (%s) / module: throughput %.2f, p99 %.2f, "
                 "worker CPU per request %.2f" % (
                     MODULE_B, ratio_median(runs, "module-b", "module", "rps"),
                     ratio_median(runs, "module-b", "module", "p99"),
                     ratio_median(runs, "module-b", "module", "worker_us")))
    if have("module-read-pending", "module-read"):
        thr = ratio_median(runs, "module-read-pending", "module-read", "rps")
        L.append("- the read path with loyalty_pending 14d (every other "
                 "customer with two locked entries), module-read-pending / "
                 "module-read: throughput **%.2f** (target >= 0.95: %s), p99 "
                 "%.2f, worker CPU per request %.2f" % (
                     thr, target(thr >= 0.95),
                     ratio_median(runs, "module-read-pending", "module-read",
                                  "p99"),
                     ratio_median(runs, "module-read-pending", "module-read",
                                  "worker_us")))
    if have("module-pending", "module"):
        thr = ratio_median(runs, "module-pending", "module", "rps")
        L.append("- checkouts that credit too, module-pending / module "
                 "(every credit locks its points, so the lists grow during "
                 "the run; Redis-bound here): throughput **%.2f**, p99 %.2f, "
                 "worker CPU per request %.2f, Redis CPU per request %.2f"
                 % (thr,
                     ratio_median(runs, "module-pending", "module", "p99"),
                     ratio_median(runs, "module-pending", "module",
                                  "worker_us"),
                     ratio_median(runs, "module-pending", "module",
                                  "redis_us")))
    if have("module-tls", "module"):
        thr = ratio_median(runs, "module-tls", "module", "rps")
        L.append("- module-tls / module: throughput **%.2f** (target >= "
                 "0.85: %s), p99 %.2f, worker CPU per request %.1f / "
                 "%.1f us = **%.2f**, Redis CPU per request %.1f / %.1f us "
                 "= %.2f (the same redis-server: TLS port / plain port)" % (
                     thr, target(thr >= 0.85),
                     ratio_median(runs, "module-tls", "module", "p99"),
                     med([r["worker_us"] for r in runs["module-tls"]]),
                     med([r["worker_us"] for r in runs["module"]]),
                     ratio_median(runs, "module-tls", "module", "worker_us"),
                     med([r["redis_us"] for r in runs["module-tls"]]),
                     med([r["redis_us"] for r in runs["module"]]),
                     ratio_median(runs, "module-tls", "module", "redis_us")))
    if have("module-cluster", "module"):
        thr = ratio_median(runs, "module-cluster", "module", "rps")
        cpu = ratio_median(runs, "module-cluster", "module", "worker_us")
        L.append("- module-cluster / module: throughput **%.2f**, p99 %.2f, "
                 "worker CPU per request **%.2f** (target throughput >= 0.9"
                 " and worker CPU per request <= 1.1: %s)" % (
                     thr, ratio_median(runs, "module-cluster", "module",
                                       "p99"), cpu,
                     target(thr >= 0.9 and cpu <= 1.1)))
        L.append("- Redis CPU per request (all nodes): module %.1f us "
                 "(1 redis-server), module-cluster %.1f us (3 masters), "
                 "module-cluster / module %.2f" % (
                     med([r["redis_us"] for r in runs["module"]]),
                     med([r["redis_us"] for r in runs["module-cluster"]]),
                     ratio_median(runs, "module-cluster", "module",
                                  "redis_us")))
    if have("lua", "baseline"):
        L.append("- lua / baseline throughput: %.2f, p99: %.2f" % (
            ratio_median(runs, "lua", "baseline", "rps"),
            ratio_median(runs, "lua", "baseline", "p99")))
    L.append("")

    if slow_runs["fast"] and slow_runs["slow"]:
        L.append("### Slow Redis (+%g ms per read each way), /plain on the "
                 "same worker while checkouts wait\n" % SLOW_DELAY_MS)
        L.append("Two wrk at once on the module's worker: /checkout (%d "
                 "connections) and /plain (`return 200`, %d connections)."
                 "\n" % (CONNECTIONS, PLAIN_CONNECTIONS))
        L.append("| Redis | /plain req/s | /plain p50 ms | /plain p99 ms | "
                 "/plain p99.9 ms | /checkout req/s | /checkout p99 ms "
                 "| balances |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---|")
        for mode in slow_runs:
            rs = slow_runs[mode]
            L.append("| %s | %.0f | %s | %s | %s | %.0f | %s | %s |" % (
                mode, med([r["plain"]["rps"] for r in rs]),
                ms(med([r["plain"]["p50"] for r in rs])),
                ms(med([r["plain"]["p99"] for r in rs])),
                ms(med([r["plain"]["p999"] for r in rs])),
                med([r["checkout"]["rps"] for r in rs]),
                ms(med([r["checkout"]["p99"] for r in rs])),
                "exact" if all(r["verify"]["ok"] for r in rs)
                else "**MISMATCH**"))
        n = min(len(slow_runs["fast"]), len(slow_runs["slow"]))
        delta = med([slow_runs["slow"][i]["plain"]["p99"]
                     - slow_runs["fast"][i]["plain"]["p99"]
                     for i in range(n)]) / 1000.0
        L.append("")
        L.append("- /plain p99 with slow Redis minus with fast Redis: "
                 "**%+.2f ms** (target <= 2 ms: %s)"
                 % (delta, target(delta <= 2.0)))
        if slow_runs.get("slow-b"):
            n = min(len(slow_runs["fast-b"]), len(slow_runs["slow-b"]))
            L.append("- module-b: /plain p99 slow minus fast: %+.2f ms" % (
                med([slow_runs["slow-b"][i]["plain"]["p99"]
                     - slow_runs["fast-b"][i]["plain"]["p99"]
                     for i in range(n)]) / 1000.0))
        L.append("")

    L.append("### Runs\n")
    L.append("| run | requests/s | p50 | p75 | p90 | p99 | p99.9 ms | "
             "errors | worker CPU µs/req | CPU % worker / shop / redis "
             "| load before | worker RSS after | check |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:"
             "|---|")

    def row(name, x, v):
        cpu = x.get("cpu")
        return ("| %s | %.0f | %s | %s | %s | %s | %s | %d | %s | %s | %s "
                "| %s | %s |" % (
                    name, x["rps"], ms(x["p50"]), ms(x["p75"]), ms(x["p90"]),
                    ms(x["p99"]), ms(x["p999"]), x["errors"],
                    "%.1f" % x["worker_us"] if "worker_us" in x else "",
                    "%.0f / %.0f / %.0f" % (100 * cpu["worker"],
                                            100 * cpu["shop"],
                                            100 * cpu["redis"])
                    if cpu else "",
                    x.get("loadavg", ""),
                    "%.1f MiB" % (x["rss_kb"] / 1024.0)
                    if "rss_kb" in x else "",
                    vsummary(v) if v else ""))

    for c, rs in runs.items():
        for i, r in enumerate(rs):
            L.append(row("%s #%d" % (c, i + 1), r, r["verify"]))
    for mode in slow_runs:
        for i, r in enumerate(slow_runs[mode]):
            L.append(row("%s-redis #%d /checkout" % (mode, i + 1),
                         r["checkout"], r["verify"]))
            L.append(row("%s-redis #%d /plain" % (mode, i + 1),
                         r["plain"], None))
    L.append("")

    for tag, v in failures:
        L.append("**Check failed** in run %s: %s" % (tag, vsummary(v)))
        for e in v["examples"]:
            L.append("    " + e)
        L.append("")

    if status:
        L.append("### loyalty_status at the end (non-zero Redis and "
                 "credit counters)\n")
        for name, lines in status.items():
            L.append("- %s: %s" % (name, ", ".join(
                "`%s`" % l for l in lines) or "none"))
        L.append("")

    noisy = {k: v for k, v in errors.items() if v}
    if noisy:
        L.append("### Warnings in the error logs\n")
        for name, lines in noisy.items():
            L.append("- %s: %d lines, e.g. `%s`"
                     % (name, len(lines), lines[0][:300]))
        L.append("")
    return "\n".join(L)


# ----------------------------------------------------------------------
# rss


def rss_main():
    per = RSS_REQUESTS / 300.0 + RSS_WARMUP / 300.0 + 120
    est = int(600 + len(RSS_CONFIGS) * per)
    signal.alarm(est * 2)
    b = Bench(est * 2 + 60)
    rows = []
    failures = []
    try:
        b.start_common(RSS_CONFIGS)
        for c in RSS_CONFIGS:
            s = b.edge("rss-" + c, c)
            seed(s.store, b.customers)
            wrk_wait(wrk_start(b.procs, s.port, "rss-warm-" + c, 600,
                               CONNECTIONS, stop_after=RSS_WARMUP))
            time.sleep(2)
            seed(s.store, b.customers)        # the warm-up's credits out
            before = s.memory()
            log("%s: after %d warm-up checkouts worker VmRSS %d kB"
                % (c, RSS_WARMUP, before["VmRSS"]))

            b.orders.mark()
            tag = "rss-%s-%s" % (c, time.strftime("%H%M%S"))
            samples = []
            started = time.time()
            p = wrk_start(b.procs, s.port, tag, int(per) + 60, CONNECTIONS,
                          stop_after=RSS_REQUESTS)
            last = 0
            t0 = time.monotonic()
            nerr = len(s.error_lines())
            while p.poll() is None:
                wrk_stopped(p)
                time.sleep(0.2)
                if time.monotonic() - last >= 2:
                    samples.append((time.monotonic() - t0,
                                    s.memory()["VmRSS"]))
                    last = time.monotonic()
            res = wrk_wait(p)
            time.sleep(2)
            after = s.memory()
            v = verify(s.store, b.customers, b.orders.read(tag), c,
                       started, timeout=60)
            if not v["ok"]:
                failures.append((tag, v))
            rows.append(dict(config=c, requests=res["requests"],
                             rps=res["rps"], before=before, after=after,
                             peak=max([m for _, m in samples]
                                      + [after["VmRSS"]]),
                             samples=samples, errors=res["errors"],
                             verify=v, warnings=s.error_lines()[nerr:]))
            log("%s: %d checkouts at %.0f req/s, worker VmRSS %d -> %d kB "
                "(%+d kB), VmHWM %d kB | %s"
                % (c, res["requests"], res["rps"], before["VmRSS"],
                   after["VmRSS"], after["VmRSS"] - before["VmRSS"],
                   after["VmHWM"], vsummary(v)))
    finally:
        b.stop()
        signal.alarm(0)

    L = ["## make bench-rss\n"]
    L.append("%s.  Worker VmRSS after %d warm-up checkouts (before) and "
             "after BENCH_RSS_REQUESTS=%d more (wrk: 1 thread, %d "
             "connections).\n" % (environment(), RSS_WARMUP, RSS_REQUESTS,
                                 CONNECTIONS))
    L.append("| configuration | checkouts | requests/s | VmRSS before | "
             "VmRSS after | growth | highest VmRSS sampled | VmHWM | "
             "balances | target < 1 MiB |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        growth = r["after"]["VmRSS"] - r["before"]["VmRSS"]
        L.append("| %s | %d | %.0f | %d kB | %d kB | %+d kB | %d kB | %d kB "
                 "| %s | %s |" % (
                     r["config"], r["requests"], r["rps"],
                     r["before"]["VmRSS"], r["after"]["VmRSS"], growth,
                     r["peak"], r["after"]["VmHWM"],
                     "exact" if r["verify"]["ok"] else "**MISMATCH**",
                     target(growth < 1024)))
    L.append("")
    for r in rows:
        L.append("- %s: %s" % (r["config"], vsummary(r["verify"])))
        step = max(1, len(r["samples"]) // 12)
        L.append("- %s: worker VmRSS during the run (s: kB): %s" % (
            r["config"], ", ".join("%.0f: %d" % (t, m)
                                   for t, m in r["samples"][::step])))
        if r["warnings"]:
            L.append("- %s: %d warnings in the error log during the run, "
                     "e.g.:" % (r["config"], len(r["warnings"])))
            for w in r["warnings"][:4]:
                L.append("    " + w[:300])
    for tag, v in failures:
        L.append("")
        L.append("**Check failed** in run %s:" % tag)
        for e in v["examples"]:
            L.append("    " + e)
    L.append("")
    report = "\n".join(L)
    print()
    print(report)
    save_section("bench-rss", report)
    log("saved to %s" % os.path.relpath(RESULTS, REPO))
    return 1 if failures else 0


# ----------------------------------------------------------------------
# results.md: one section per target, the other kept


HEADER = """# Benchmark results

The last results of `make bench`, `make bench-rss`, `make bench-counters`
and `make bench-insns` (bench/README.md explains the configurations and how
to read the tables).  Each target rewrites its own section.  Numbers come from a shared, noisy 2-CPU machine:
compare the ratios measured within one run, not absolute numbers across
runs.
"""


def save_section(name, text):
    begin, end = "<!-- BEGIN %s -->" % name, "<!-- END %s -->" % name
    old = ""
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            old = f.read()
    block = "%s\n%s\n%s" % (begin, text.rstrip() + "\n", end)
    if begin in old and end in old:
        new = (old[:old.index(begin)] + block
               + old[old.index(end) + len(end):])
    else:
        if not old:
            old = HEADER
        new = old.rstrip() + "\n\n" + block + "\n"
    with open(RESULTS, "w") as f:
        f.write(new)


# ----------------------------------------------------------------------
# make bench-insns


INSNS_REQUESTS = env_int("BENCH_INSNS_REQUESTS", 2000)


def insns_main():
    """Instructions per checkout, counted by callgrind in a single nginx
    process, one configuration after the other: deterministic where the
    timings of make bench are noisy (user-space instructions only: the
    kernel's work for the sockets is not counted)."""
    configs = os.environ.get(
        "BENCH_INSNS_CONFIGS",
        "baseline module" + (" module-b" if MODULE_B else "")).split()
    out = os.path.join(OUT, "callgrind")
    if os.path.isdir(out):
        shutil.rmtree(out)
    mkdirs(out)
    b = Bench(1800)
    rows = {}
    try:
        b.start_common(configs)
        for c in configs:
            prefix = os.path.join(out, c)
            s = b.edge(c, c, timeout="2s", under=[
                "valgrind", "--tool=callgrind", "--instr-atstart=no",
                "--callgrind-out-file=%s.%%p" % prefix])
            # warm up uninstrumented: connections, script, pools
            wrk_wait(wrk_start(b.procs, s.port, c + "-warm", 600, 1,
                               stop_after=200))
            subprocess.run(["callgrind_control", "-i", "on", str(s.worker)],
                           check=True, capture_output=True, timeout=60)
            seed(s.store, b.customers)
            # the same customers and orders for every configuration
            res = wrk_wait(wrk_start(b.procs, s.port, c + "-count", 600, 1,
                                     stop_after=INSNS_REQUESTS, seed=1))
            time.sleep(1)               # the last credit
            subprocess.run(["callgrind_control", "-d", str(s.worker)],
                           check=True, capture_output=True, timeout=60)
            total = 0
            for path in glob.glob(prefix + ".*"):
                with open(path) as f:
                    m = re.search(r"^(?:summary|totals): (\d+)", f.read(),
                                  re.M)
                if m:
                    total = max(total, int(m.group(1)))
            rows[c] = (res["requests"], total)
            log("%-10s %d checkouts, %d instructions, %.0f per checkout"
                % (c, res["requests"], total, total / res["requests"]))
            b.procs.stop(s.proc)
    finally:
        b.stop()

    per = {c: t / n for c, (n, t) in rows.items()}
    L = ["## make bench-insns", "",
         "%s, user-space instructions per checkout of the single nginx "
         "process under callgrind, %d checkouts each (wrk, 1 connection, "
         "the workload of make bench), after 200 uninstrumented."
         % (environment(), INSNS_REQUESTS), "",
         "| configuration | checkouts | instructions | per checkout |",
         "|---|---:|---:|---:|"]
    for c, (n, t) in rows.items():
        L.append("| %s | %d | %d | %.0f |" % (c, n, t, per[c]))
    L.append("")
    if "baseline" in per and "module" in per:
        L.append("- module - baseline: %+.0f instructions per checkout "
                 "(module / baseline %.2f)"
                 % (per["module"] - per["baseline"],
                    per["module"] / per["baseline"]))
    if "module-b" in per and "module" in per:
        L.append("- module - module-b (%s): %+.0f instructions per checkout, "
                 "%.2f%% of the module's"
                 % (os.path.basename(MODULE_B),
                    per["module"] - per["module-b"],
                    100 * (per["module"] - per["module-b"]) / per["module"]))
    text = "\n".join(L) + "\n"
    print()
    print(text)
    save_section("bench-insns", text)
    return 0


def main():
    what = sys.argv[1] if len(sys.argv) > 1 else "bench"

    def on_signal(signum, frame):
        raise KeyboardInterrupt("signal %d" % signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_signal)

    if what == "bench":
        return bench_main()
    if what == "rss":
        return rss_main()
    if what == "insns":
        return insns_main()
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
