"""Integration harness for ngx_http_loyalty_module.

Starts real redis-server and nginx processes on free 127.0.0.1 ports, one
set per test, and stops every one of them by pid in teardown.

Environment:
    NGINX_BIN        nginx binary (default /usr/sbin/nginx)
    LOYALTY_MODULE   path of the built ngx_http_loyalty_module.so; a test that
                     needs the module FAILS (never skips) when it is missing
    REDIS_BIN        redis-server binary (default /usr/bin/redis-server)
    LOYALTY_IT_KEEP  keep the temporary prefixes even when every test passed

Fixtures: redis, redis_factory, default_redis (on 127.0.0.1:6379), nginx
(a factory), silent_redis, capture_backend.  Helpers: checkout_conf(),
BACKEND, Response.
"""

import http.client
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import pytest
import redis as redis_lib


NGINX_BIN = os.environ.get("NGINX_BIN", "/usr/sbin/nginx")
LOYALTY_MODULE = os.environ.get("LOYALTY_MODULE", "")
REDIS_BIN = os.environ.get("REDIS_BIN", "/usr/bin/redis-server")

# LOYALTY_VALGRIND=1 (make test-valgrind: NGINX_BIN runs nginx under
# valgrind): the harness' own time bounds are scaled by SLOW, Redis gets a
# generous loyalty_redis_timeout where a test sets none, and tests marked
# "timing" (they assert latencies) are skipped, each with a reason
VALGRIND = bool(os.environ.get("LOYALTY_VALGRIND"))
SLOW = 10 if VALGRIND else 1

TEST_TIMEOUT = 120 * SLOW   # seconds, per test including its teardown
NGINX_QUIT_TIMEOUT = 10 * SLOW  # graceful shutdown bound before SIGTERM/SIGKILL
NGINX_START_TIMEOUT = 10 * SLOW

DAY = 86400


# --------------------------------------------------------------------------
# processes: every process the suite starts is tracked by (pid, start time)


_TRACKED = []               # [(pid, starttime, description)]


def _proc_stat(pid):
    """(state, ppid, starttime) of a live /proc entry, else None."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rest = data[data.rindex(")") + 2:].split()
    return rest[0], int(rest[1]), int(rest[19])


def _alive(pid, start):
    st = _proc_stat(pid)
    return st is not None and st[2] == start and st[0] not in ("Z", "X")


def track(pid, what):
    st = _proc_stat(pid)
    if st is not None:
        entry = (pid, st[2], what)
        if entry not in _TRACKED:
            _TRACKED.append(entry)


def children(pid):
    """Live (non-zombie) child pids of pid."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _proc_stat(int(name))
        if st and st[1] == pid and st[0] not in ("Z", "X"):
            out.append(int(name))
    return sorted(out)


def descendants(pid):
    result, todo = [], [pid]
    while todo:
        for c in children(todo.pop()):
            result.append(c)
            todo.append(c)
    return result


def _kill_tracked(pid, start, sig=signal.SIGKILL):
    if _alive(pid, start):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def wait_until(predicate, timeout, interval=0.02, message="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %.1f s waiting for %s"
                                 % (timeout, message))
        time.sleep(interval)


# --------------------------------------------------------------------------
# ports


_USED_PORTS = set()


def free_port():
    """A free 127.0.0.1 TCP port (bind to port 0), never handed out twice."""
    for _ in range(100):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        finally:
            s.close()
        if port not in _USED_PORTS:
            _USED_PORTS.add(port)
            return port
    raise RuntimeError("no free port")


def listener(backlog=128):
    """A non-blocking listening socket on a free 127.0.0.1 port:
    (port, socket)."""
    port = free_port()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(backlog)
    s.setblocking(False)
    return port, s


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------
# HTTP client: one request per connection, Connection: close, short timeout


class Response:
    def __init__(self, status, headers, body, elapsed):
        self.status = status
        self.headers = headers          # [(name, value)] as received
        self.body = body
        self.elapsed = elapsed          # seconds, connect to end of body

    def header(self, name):
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def header_all(self, name):
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def loyalty_response_headers(self):
        """{name: value} of the X-Loyalty-* response headers (title case);
        asserts that none is repeated."""
        out = {}
        for k, v in self.headers:
            if k.lower().startswith("x-loyalty-"):
                key = _title(k)
                assert key not in out, "response header %s repeated: %r" % (
                    key, self.headers)
                out[key] = v
        return out

    @property
    def echo(self):
        """Everything the standard backend echoed, empty values included."""
        return parse_echo(self.body)

    @property
    def loyalty(self):
        """The X-Loyalty-* request headers the standard backend received
        (an empty echo value means the header was not sent)."""
        return {k: v for k, v in self.echo.items()
                if k.startswith("X-Loyalty-") and v != ""}

    def __repr__(self):
        return "<Response %s %r %r %.3fs>" % (self.status, self.headers,
                                              self.body[:400], self.elapsed)


def _title(name):
    return "-".join(p.capitalize() for p in name.split("-"))


def http_request(port, path, headers=None, cookies=None, timeout=None,
                 method=None, body=None):
    """headers: dict or [(name, value)] sent exactly as given (any case,
    repeats allowed); cookies: dict or a raw Cookie header string; a body
    makes it a POST unless method says otherwise."""
    if timeout is None:
        timeout = 5.0 * SLOW
    t0 = time.monotonic()
    method = method or ("POST" if body is not None else "GET")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        items = headers.items() if isinstance(headers, dict) else (headers or [])
        for k, v in items:
            conn.putheader(k, v)
        if cookies is not None:
            if isinstance(cookies, dict):
                cookies = "; ".join("%s=%s" % kv for kv in cookies.items())
            conn.putheader("Cookie", cookies)
        conn.putheader("Connection", "close")
        conn.endheaders(body)
        resp = conn.getresponse()
        body = resp.read().decode("utf-8", "replace")
        return Response(resp.status, resp.getheaders(), body,
                        time.monotonic() - t0)
    finally:
        conn.close()


# --------------------------------------------------------------------------
# the standard backend: echoes the X-Loyalty-* request headers it received


ECHO_FIELDS = [
    ("X-Loyalty-Status", "$http_x_loyalty_status"),
    ("X-Loyalty-Customer", "$http_x_loyalty_customer"),
    ("X-Loyalty-Points", "$http_x_loyalty_points"),
    ("X-Loyalty-Lifetime", "$http_x_loyalty_lifetime"),
    ("X-Loyalty-Orders", "$http_x_loyalty_orders"),
    ("X-Loyalty-Tier", "$http_x_loyalty_tier"),
    ("X-Loyalty-Offer", "$http_x_loyalty_offer"),
    ("X-Loyalty-Offer-Code", "$http_x_loyalty_offer_code"),
    # never sent by the module as request headers; spoof probes
    ("X-Loyalty-Earned", "$http_x_loyalty_earned"),
    ("X-Loyalty-Anything", "$http_x_loyalty_anything"),
    # targets for proxy_set_header tests
    ("X-Var-Status", "$http_x_var_status"),
    ("X-Var-Customer", "$http_x_var_customer"),
    ("X-Var-Points", "$http_x_var_points"),
    ("X-Var-Lifetime", "$http_x_var_lifetime"),
    ("X-Var-Tier", "$http_x_var_tier"),
    ("X-Var-Orders", "$http_x_var_orders"),
    ("X-Var-Offer", "$http_x_var_offer"),
    ("X-Var-Offer-Code", "$http_x_var_offer_code"),
    ("X-Var-Earned", "$http_x_var_earned"),
    ("X-Var-Map", "$http_x_var_map"),
    ("uri", "$uri"),
]

BACKEND = """
server {
    listen 127.0.0.1:{backend_port};
    location / {
        default_type text/plain;
        add_header X-Order-Total "19.99";
        add_header X-Order-Id "order-$request_id";
        return 200 "%s";
    }
}
""" % "".join("%s=%s\\n" % f for f in ECHO_FIELDS)


def parse_echo(body):
    out = {}
    for line in body.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out[k] = v
    names = [f[0] for f in ECHO_FIELDS]
    assert list(out) == names, "not a backend echo: %r" % body[:500]
    return out


CHECKOUT_TEMPLATE = """
@HTTP@
server {
    listen 127.0.0.1:{port};
    @SERVER@
    location = /__harness_ready { return 204; }
    location /plain { return 200 "plain"; }
    location /checkout {
        loyalty on;
        loyalty_customer $cookie_cid;
        @REDIS@
        @LOC@
        proxy_pass http://127.0.0.1:{backend_port};
    }
    location /hcheckout {
        loyalty on;
        loyalty_customer $http_x_customer;
        @REDIS@
        @LOC@
        proxy_pass http://127.0.0.1:{backend_port};
    }
    @LOCATIONS@
}
""" + BACKEND


def checkout_conf(loc="", server="", http="", locations="",
                  redis="127.0.0.1:{redis_port}"):
    """The standard front server: /checkout (customer from cookie cid) and
    /hcheckout (customer from header X-Customer), both `loyalty on`, with
    `loyalty_redis <redis>` (none when redis is None), and proxied to the
    echo backend; plus /plain and any extra locations."""
    redis_line = "loyalty_redis %s;" % redis if redis else ""
    return (CHECKOUT_TEMPLATE.replace("@HTTP@", http)
            .replace("@REDIS@", redis_line)
            .replace("@SERVER@", server).replace("@LOC@", loc)
            .replace("@LOCATIONS@", locations))


# --------------------------------------------------------------------------
# session: temp root, per-test time bound, leftover-process check


_SESSION = {}


def pytest_report_header(config):
    lines = ["nginx: %s" % NGINX_BIN]
    if LOYALTY_MODULE and os.path.exists(LOYALTY_MODULE):
        mtime = os.path.getmtime(LOYALTY_MODULE)
        lines.append("loyalty module: %s (built %s)" % (
            LOYALTY_MODULE, time.strftime("%H:%M:%S", time.localtime(mtime))))
        src = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "..", "..", "ngx_module")
        if os.path.isdir(src):
            newer = [f for f in os.listdir(src)
                     if os.path.getmtime(os.path.join(src, f)) > mtime]
            if newer:
                lines.append("WARNING: module .so is older than %s"
                             % ", ".join(sorted(newer)))
    else:
        lines.append("loyalty module: MISSING (%r) - module tests will fail"
                     % LOYALTY_MODULE)
    return lines


@pytest.fixture(scope="session")
def tmp_root(request):
    root = tempfile.mkdtemp(prefix="loyalty-it-")
    os.chmod(root, 0o755)
    yield root
    if request.session.testsfailed or os.environ.get("LOYALTY_IT_KEEP"):
        print("\nintegration test files kept in %s" % root)
    else:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _no_process_left_running():
    me = os.getpid()
    yield
    leaked = [(pid, what) for pid, start, what in _TRACKED
              if _alive(pid, start)]
    desc = descendants(me)
    for pid, start, _ in _TRACKED:
        _kill_tracked(pid, start)
    assert not leaked and not desc, (
        "processes left running after the suite: tracked %r, children of "
        "pytest %r" % (leaked, desc))


class TimeLimitExceeded(Exception):
    pass


@pytest.fixture(autouse=True)
def _time_bound():
    def expired(signum, frame):
        raise TimeLimitExceeded("test exceeded %d s" % TEST_TIMEOUT)

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, TEST_TIMEOUT)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------
# redis


class RedisServer:
    def __init__(self, tmp_root, password=None, port=None):
        self.port = port or free_port()
        self.password = password
        self.dir = tempfile.mkdtemp(prefix="redis-", dir=tmp_root)
        os.chmod(self.dir, 0o755)       # nginx workers (nobody) use the socket
        self.unixsocket = os.path.join(self.dir, "redis.sock")
        self.proc = None
        self._clients = {}

    what = "redis-server"
    bind = "127.0.0.1"

    def listen_args(self):
        """How it listens; a subclass may listen otherwise (TLS)."""
        return ["--port", str(self.port), "--enable-debug-command", "local",
                "--unixsocket", self.unixsocket, "--unixsocketperm", "777"]

    def start(self):
        """Start (or restart, on the same port)."""
        assert self.proc is None or self.proc.poll() is not None
        args = [REDIS_BIN] + self.listen_args() + [
                "--bind", *self.bind.split(),
                "--save", "", "--appendonly", "no", "--dir", self.dir,
                "--daemonize", "no",
                "--logfile", os.path.join(self.dir, "redis.log")]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        track(self.proc.pid, "%s :%d" % (self.what, self.port))
        self._clients = {}

        def up():
            if self.proc.poll() is not None:
                raise AssertionError("redis-server exited: %s" %
                                     self.log()[-2000:])
            try:
                return self.client.ping()
            except redis_lib.exceptions.ConnectionError:
                return False
        wait_until(up, 10, message="%s on port %d" % (self.what, self.port))
        return self

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        for c in self._clients.values():
            c.close()
        self._clients = {}
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def db(self, n):
        if n not in self._clients:
            self._clients[n] = redis_lib.Redis(
                host="127.0.0.1", port=self.port, db=n,
                password=self.password, decode_responses=True,
                socket_timeout=5, socket_connect_timeout=2)
        return self._clients[n]

    @property
    def client(self):
        return self.db(0)

    def seed(self, cid, points=0, lifetime=0, orders=0, first_order=None,
             last_order=None, prefix="loyalty:", db=0, **extra):
        """HSET <prefix>{<cid>} points lifetime orders first_order
        last_order (unix seconds; by default 30 days / 1 day ago when the
        customer has orders, else 0).  A field given as None is omitted;
        values are written as given (strings allowed)."""
        now = int(time.time())
        if first_order is None:
            first_order = now - 30 * DAY if orders and orders != "0" else 0
        if last_order is None:
            last_order = now - DAY if orders and orders != "0" else 0
        fields = dict(points=points, lifetime=lifetime, orders=orders,
                      first_order=first_order, last_order=last_order)
        fields.update(extra)
        key = "%s{%s}" % (prefix, cid)
        self.db(db).delete(key)
        self.db(db).hset(key, mapping={k: v for k, v in fields.items()
                                       if v is not None})
        return key

    def hmget_calls(self):
        """HMGETs of the module's read path: Redis also counts the one
        that every run of the credit script makes."""
        stats = self.client.info("commandstats")

        def calls(name):
            return int(stats.get("cmdstat_" + name, {}).get("calls", 0))

        return calls("hmget") - calls("evalsha") - calls("eval")

    def log(self):
        try:
            with open(os.path.join(self.dir, "redis.log")) as f:
                return f.read()
        except FileNotFoundError:
            return ""


@pytest.fixture
def redis_factory(tmp_root):
    """redis_factory(password=None, start=True) -> RedisServer"""
    servers = []

    def make(password=None, start=True):
        r = RedisServer(tmp_root, password=password)
        servers.append(r)
        if start:
            r.start()
        return r

    yield make
    for r in servers:
        r.stop()


@pytest.fixture
def redis(redis_factory):
    return redis_factory()


DEFAULT_REDIS_PORT = 6379       # the module's default, 127.0.0.1:6379


@pytest.fixture
def default_redis(tmp_root):
    """A redis-server of this test on the module's default address, for
    configurations without any loyalty_redis.  Another process may hold
    the port for a while (a test of another checkout on this machine):
    the fixture waits for it, and fails when it stays taken."""
    r = RedisServer(tmp_root, port=DEFAULT_REDIS_PORT)
    deadline = time.monotonic() + 60 * SLOW
    while True:
        wait_until(lambda: not port_open(DEFAULT_REDIS_PORT),
                   max(deadline - time.monotonic(), 0.1), 0.2,
                   "127.0.0.1:%d to be free for the default-address Redis"
                   % DEFAULT_REDIS_PORT)
        try:
            r.start()
            break
        except AssertionError:
            # taken again between the check and the bind
            if time.monotonic() >= deadline:
                raise
    assert r.client.info("server")["process_id"] == r.proc.pid, \
        "another Redis answers on 127.0.0.1:%d" % DEFAULT_REDIS_PORT
    yield r
    r.stop()


# --------------------------------------------------------------------------
# a "Redis" that accepts connections and never answers


class SilentServer:
    def __init__(self):
        self.port, self._lsock = listener()
        self.accepted = 0
        self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        sel = selectors.DefaultSelector()
        sel.register(self._lsock, selectors.EVENT_READ)
        conns = []
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(0.05):
                    if key.fileobj is self._lsock:
                        try:
                            c, _ = self._lsock.accept()
                        except OSError:
                            continue
                        c.setblocking(False)
                        conns.append(c)
                        self.accepted += 1
                        sel.register(c, selectors.EVENT_READ)
                    else:
                        try:
                            data = key.fileobj.recv(65536)
                        except OSError:
                            data = b""
                        if data:
                            self.received += len(data)
                        else:
                            sel.unregister(key.fileobj)
                            key.fileobj.close()
                            conns.remove(key.fileobj)
        finally:
            for c in conns:
                c.close()
            sel.close()

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        self._lsock.close()
        assert not self._thread.is_alive()


@pytest.fixture
def silent_redis():
    s = SilentServer()
    yield s
    s.stop()


# --------------------------------------------------------------------------
# a Python backend that records every request's raw header list


class CaptureBackend:
    def __init__(self):
        import http.server
        backend = self
        self.requests = []
        self._lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self):
                length = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(length) if length else b""
                with backend._lock:
                    backend.requests.append(
                        {"path": self.path, "method": self.command,
                         "headers": self.headers.items(), "body": data})
                body = b"captured\n"
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Order-Total", "19.99")
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                      Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        _USED_PORTS.add(self.port)
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def loyalty_headers(self, i=-1):
        """[(name, value)] of the X-Loyalty-* headers of request i, in order,
        repeats included."""
        return [(k, v) for k, v in self.requests[i]["headers"]
                if k.lower().startswith("x-loyalty-")]

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


@pytest.fixture
def capture_backend():
    b = CaptureBackend()
    yield b
    b.stop()


# --------------------------------------------------------------------------
# nginx


CONF_TEMPLATE = """\
{load_module}worker_processes {workers};
error_log {prefix}/error.log info;
pid {prefix}/nginx.pid;
{main}
events {{ worker_connections 1024; }}

http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/client_body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
{snippet}
}}
"""

BAD_LOG_LINE = re.compile(r"\[(alert|crit|emerg)\]|http request count is zero")


def _module_path():
    if not LOYALTY_MODULE:
        pytest.fail("LOYALTY_MODULE is not set: point it at the built "
                    "ngx_http_loyalty_module.so", pytrace=False)
    if not os.path.isfile(LOYALTY_MODULE):
        pytest.fail("loyalty module %s does not exist (run `make build`)"
                    % LOYALTY_MODULE, pytrace=False)
    return os.path.abspath(LOYALTY_MODULE)


class ConfigCheck:
    """Result of `nginx -t`; unpacks as (rc, output)."""

    def __init__(self, rc, output, conf):
        self.rc, self.output, self.conf = rc, output, conf

    def __iter__(self):
        return iter((self.rc, self.output))

    def line_of(self, text):
        with open(self.conf) as f:
            lines = f.read().split("\n")
        hits = [i + 1 for i, line in enumerate(lines) if text in line]
        assert len(hits) == 1, "%r on lines %r of %s" % (text, hits, self.conf)
        return hits[0]


class Nginx:
    def __init__(self, factory, snippet, workers, load_module, main, ports):
        self.factory = factory
        self.workers_n = workers
        self.load_module = load_module
        self.main = main
        self.prefix = factory.new_prefix()
        self.conf = os.path.join(self.prefix, "nginx.conf")
        self.ports = ports
        self.port = ports["port"]
        self.backend_port = ports.get("backend_port")
        self.proc = None
        self.seen_workers = set()       # (pid, start)
        self.allowed = []               # see allow_log_line()
        self.write_conf(snippet)

    # -- configuration

    def write_conf(self, snippet):
        text = self.factory.render(snippet, self.prefix, self.ports,
                                   self.workers_n, self.load_module, self.main)
        with open(self.conf, "w") as f:
            f.write(text)

    def test_conf(self):
        return self.factory.run_t(self.prefix, self.conf)

    # -- process

    def start(self):
        rc, out = self.test_conf()
        assert rc == 0, "nginx -t failed:\n%s" % out
        self.stdout = open(os.path.join(self.prefix, "stdout.log"), "wb")
        self.proc = subprocess.Popen(
            [NGINX_BIN, "-p", self.prefix, "-c", self.conf,
             "-g", "daemon off;"],
            stdin=subprocess.DEVNULL, stdout=self.stdout,
            stderr=subprocess.STDOUT)
        track(self.proc.pid, "nginx master %s" % self.prefix)
        wait_until(self._ready, NGINX_START_TIMEOUT, 0.02,
                   "nginx to answer on port %d"
                   % self.port)
        wait_until(lambda: len(self.workers()) == self.workers_n,
                   NGINX_START_TIMEOUT, 0.02,
                   "%d nginx workers" % self.workers_n)
        return self

    def _ready(self):
        if self.proc.poll() is not None:
            raise AssertionError("nginx exited with %s:\n%s\n%s" % (
                self.proc.returncode, self.stdout_text(), self.error_log()))
        try:
            http_request(self.port, "/__harness_ready", timeout=2)
            return True
        except (OSError, http.client.HTTPException):
            return False

    @property
    def pid(self):
        return self.proc.pid

    def workers(self):
        pids = children(self.proc.pid)
        for pid in pids:
            st = _proc_stat(pid)
            if st:
                self.seen_workers.add((pid, st[2]))
                track(pid, "nginx worker of %d" % self.proc.pid)
        return pids

    def reload(self, snippet=None):
        """Optionally rewrite the configuration, then SIGHUP and wait until
        a fresh set of workers runs and every old worker has exited."""
        if snippet is not None:
            self.write_conf(snippet)
        rc, out = self.test_conf()
        assert rc == 0, "nginx -t failed:\n%s" % out
        old = set(self.workers())
        self.proc.send_signal(signal.SIGHUP)

        def done():
            now = set(self.workers())
            return (len(now) == self.workers_n and not (now & old))
        wait_until(done, NGINX_START_TIMEOUT, 0.02,
                   "nginx reload (old workers %r)" % old)
        wait_until(self._ready, NGINX_START_TIMEOUT, 0.02, "nginx after reload")

    def stop(self):
        """SIGQUIT, then SIGTERM/SIGKILL after a bound; returns a problem
        description or None."""
        if self.proc is None or self.proc.returncode is not None:
            return None
        problem = None
        self.workers()
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(NGINX_QUIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            problem = ("nginx did not exit within %d s of SIGQUIT (workers %r)"
                       % (NGINX_QUIT_TIMEOUT, self.workers()))
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid, start in self.seen_workers:
            if _alive(pid, start):
                problem = problem or "nginx worker %d outlived its master" % pid
                _kill_tracked(pid, start)
        self.stdout.close()
        return problem

    # -- inspection

    def error_log(self):
        try:
            with open(os.path.join(self.prefix, "error.log"),
                      errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stdout_text(self):
        with open(os.path.join(self.prefix, "stdout.log"),
                  errors="replace") as f:
            return f.read()

    def allow_log_line(self, pattern):
        """An [alert] or [crit] line that the test causes on purpose (the
        master's report of a worker the test killed): pattern is a regular
        expression that must match the line from its level on, as in
        r"\\[alert\\] \\d+#\\d+: worker process 123 exited on signal 9".
        Any other such line still fails the test."""
        self.allowed.append(re.compile(pattern + "$"))

    def bad_log_lines(self):
        return [line for line in self.error_log().splitlines()
                if BAD_LOG_LINE.search(line)
                and not any(p.match(line.split(" ", 2)[-1])
                            for p in self.allowed)]

    def read_file(self, name):
        with open(os.path.join(self.prefix, name), errors="replace") as f:
            return f.read()

    # -- requests

    def get(self, path, headers=None, cookies=None, timeout=None, port=None):
        return http_request(port or self.port, path, headers=headers,
                            cookies=cookies, timeout=timeout)

    def post(self, path, body, headers=None, cookies=None, timeout=None,
             port=None):
        return http_request(port or self.port, path, headers=headers,
                            cookies=cookies, timeout=timeout, body=body)


class NginxFactory:
    """nginx(snippet, workers=1, load_module=True, main="", **ports)

    snippet is the body of `http {}`; the placeholders {port},
    {backend_port} and any other {..._port} / {port...} get free ports
    unless given; {redis_port} must be given when used; {prefix} is the
    instance's prefix directory."""

    def __init__(self, tmp_root):
        self.tmp_root = tmp_root
        self.instances = []

    def new_prefix(self):
        prefix = tempfile.mkdtemp(prefix="nginx-", dir=self.tmp_root)
        os.chmod(prefix, 0o755)
        os.mkdir(os.path.join(prefix, "logs"))
        os.mkdir(os.path.join(prefix, "html"))
        os.chmod(os.path.join(prefix, "html"), 0o755)
        tmp = os.path.join(prefix, "tmp")
        os.mkdir(tmp)
        os.chmod(tmp, 0o777)
        for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            os.mkdir(os.path.join(tmp, d))
            os.chmod(os.path.join(tmp, d), 0o777)
        return prefix

    @staticmethod
    def ports_for(snippet, given):
        ports = {}
        for name in set(re.findall(r"\{(\w+)\}", snippet)) | {"port"}:
            if name in given:
                ports[name] = int(given[name])
            elif name == "prefix":
                continue
            elif name == "redis_port":
                raise AssertionError("snippet uses {redis_port}: pass "
                                     "redis_port=")
            elif "port" in name:
                ports[name] = free_port()
        for name, value in given.items():
            ports.setdefault(name, value)
        return ports

    def render(self, snippet, prefix, ports, workers, load_module, main):
        text = snippet.replace("{prefix}", prefix)
        for name, value in ports.items():
            text = text.replace("{%s}" % name, str(value))
        left = re.findall(r"\{\w*port\w*\}", text)
        assert not left, "unsubstituted placeholders %r" % left
        lm = ('load_module %s;\n' % _module_path()) if load_module else ""
        if VALGRIND and load_module and "loyalty_redis_timeout" not in text:
            text = "loyalty_redis_timeout %ds;\n" % SLOW + text
        return CONF_TEMPLATE.format(load_module=lm, workers=workers,
                                    prefix=prefix, main=main, snippet=text)

    def run_t(self, prefix, conf):
        p = subprocess.run([NGINX_BIN, "-t", "-p", prefix, "-c", conf],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=30 * SLOW)
        return p.returncode, p.stdout.decode("utf-8", "replace")

    def __call__(self, snippet, workers=1, load_module=True, main="",
                 start=True, **ports):
        inst = Nginx(self, snippet, workers, load_module, main,
                     self.ports_for(snippet, ports))
        self.instances.append(inst)
        if start:
            inst.start()
        return inst

    def check_config(self, snippet, workers=1, load_module=True, main="",
                     **ports):
        """Write the configuration to a fresh prefix and run `nginx -t`:
        ConfigCheck(rc, output, conf) (unpacks as (rc, output))."""
        prefix = self.new_prefix()
        conf = os.path.join(prefix, "nginx.conf")
        ports = self.ports_for(snippet, dict(ports, redis_port=ports.get(
            "redis_port", 6379)))
        with open(conf, "w") as f:
            f.write(self.render(snippet, prefix, ports, workers, load_module,
                                main))
        rc, out = self.run_t(prefix, conf)
        return ConfigCheck(rc, out, conf)

    def teardown(self):
        problems = []
        for inst in reversed(self.instances):
            p = inst.stop()
            if p:
                problems.append(p)
        for inst in self.instances:
            if inst.proc is None:
                continue
            bad = inst.bad_log_lines()
            if bad:
                problems.append("error log %s/error.log has:\n%s" % (
                    inst.prefix, "\n".join(bad[:30])))
        return problems


@pytest.fixture
def nginx(tmp_root):
    factory = NginxFactory(tmp_root)
    yield factory
    problems = factory.teardown()
    assert not problems, "\n".join(problems)


@pytest.fixture
def fake_redis():
    """A scripted Redis (fake_redis.py); fails the test on its errors."""
    from fake_redis import FakeRedis
    f = FakeRedis()
    yield f
    f.stop()
    assert not f.errors, f.errors


# --------------------------------------------------------------------------
# small helpers shared by the test files


def check_location(nginx, lines, http=""):
    """`nginx -t` of a location with `loyalty on` and the given lines (and
    http-level lines): a ConfigCheck."""
    conf = http + """
    server {
        listen 127.0.0.1:{port};
        location / {
            loyalty on;
            loyalty_customer $cookie_cid;
            %s
            return 204;
        }
    }
""" % lines
    return nginx.check_config(conf)


class Paused:
    """The replica stopped (SIGSTOP) for the with block: its master keeps
    the link, and no acknowledgement comes."""

    def __init__(self, server):
        self.server = server        # a RedisServer, a cluster node

    def __enter__(self):
        os.kill(self.server.proc.pid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc):
        os.kill(self.server.proc.pid, signal.SIGCONT)


def run_parallel(fn, args, threads=20, timeout=30):
    """[fn(a) for a in args] on a thread pool; results in order."""
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(threads) as ex:
        futs = [ex.submit(fn, a) for a in args]
        return [f.result(timeout=timeout) for f in futs]


LOG_LEVEL = re.compile(r"^\S+ \S+ \[(\w+)\]")


def log_lines(text, level):
    return [line for line in text.splitlines()
            if LOG_LEVEL.match(line) and LOG_LEVEL.match(line).group(1) == level]


# --------------------------------------------------------------------------
# shared test data


TIERS = """
        loyalty_tier gold 1000 multiplier=1.5;
        loyalty_tier silver 100;
        loyalty_tier platinum 10000 multiplier=2;
"""

LOYALTY_HEADERS = ["X-Loyalty-Status", "X-Loyalty-Customer",
                   "X-Loyalty-Points", "X-Loyalty-Lifetime",
                   "X-Loyalty-Orders", "X-Loyalty-Tier", "X-Loyalty-Offer",
                   "X-Loyalty-Offer-Code"]


def expected(status, cid=None, points=0, lifetime=0, orders=0, tier=None,
             offer=None, code=None):
    """The X-Loyalty-* request headers the backend must receive."""
    d = {"X-Loyalty-Status": status}
    if status in ("ok", "new"):
        d.update({"X-Loyalty-Customer": cid,
                  "X-Loyalty-Points": str(points),
                  "X-Loyalty-Lifetime": str(lifetime),
                  "X-Loyalty-Orders": str(orders)})
        if tier:
            d["X-Loyalty-Tier"] = tier
        if offer:
            d["X-Loyalty-Offer"] = offer
        if code:
            d["X-Loyalty-Offer-Code"] = code
    return d


def twice(fn):
    """Run fn() twice; both results must be equal; return the first."""
    a = fn()
    b = fn()
    assert a == b, "second identical request differs:\n%r\n%r" % (a, b)
    return a


# spoofed request headers (any case, repeated) and look-alikes to keep
SPOOF = [("x-loyalty-points", "999999"), ("X-LOYALTY-TIER", "gold"),
         ("X-Loyalty-Anything", "x"), ("X-Loyalty-Status", "ok"),
         ("X-Loyalty-Customer", "admin"), ("x-LoYaLtY-oFfEr-CoDe", "FREE"),
         ("X-Loyalty-Offer", "free"), ("X-Loyalty-Lifetime", "1"),
         ("X-Loyalty-Orders", "7"), ("X-Loyalty-Earned", "5"),
         ("x-loyalty-points", "888888"), ("X-Loyalty-", "bare-prefix")]
KEEP = [("X-Loyalty", "kept"), ("X-Loyaltyish", "kept-too"),
        ("X-Other", "kept-3")]


# --------------------------------------------------------------------------
# valgrind mode: tests marked "timing" are skipped, loudly


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "timing: asserts latencies or deadlines; skipped under "
        "valgrind (LOYALTY_VALGRIND=1)")


def pytest_collection_modifyitems(config, items):
    if not VALGRIND:
        return
    skip = pytest.mark.skip(reason="timing-sensitive, skipped under valgrind "
                                   "(LOYALTY_VALGRIND=1)")
    for item in items:
        if "timing" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    if VALGRIND:
        n = len([r for r in terminalreporter.stats.get("skipped", [])
                 if "valgrind" in str(r.longrepr)])
        terminalreporter.write_line(
            "LOYALTY_VALGRIND: %d timing-sensitive tests skipped, harness "
            "time bounds x%d" % (n, SLOW), yellow=True, bold=True)
