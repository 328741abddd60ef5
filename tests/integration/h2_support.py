"""Helpers for the HTTP/2 tests, test_http2.py.

h2_server() gives the lines that make a server of the harness speak HTTP/2
as well: cleartext with prior knowledge on {h2c_port} and TLS (ALPN h2,
a self-signed certificate made by make_cert()) on {h2s_port}.  nginx
before 1.25.1 takes the `http2` parameter of `listen`; 1.25.1 and later
deprecate it (a [warn]) for the `http2 on;` directive, which is used there
instead.  With `http2 on;` the harness' own {port} also accepts HTTP/2,
but it still serves the HTTP/1.1 requests the harness makes (nginx tells
them apart by the connection preface).

Clients:
    curl_h2()     one request with curl --http2-prior-knowledge (h2c) or
                  --http2 -k (TLS); a conftest.Response plus the HTTP
                  version curl used
    H2Client      one HTTP/2 connection driven frame by frame with
                  python3-h2: many streams at once, RST_STREAM, GOAWAY

Stand-ins:
    RedisGate     a TCP relay between nginx and a real redis-server that
                  holds the bytes of either direction until release()
    TrickleShop   a shop that confirms an order in its response headers,
                  sends part of the body and then holds the rest
"""

import os
import re
import select
import selectors
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse

import pytest

from conftest import (NGINX_BIN, SLOW, Response, http_request, listener,
                      wait_until)

try:
    import h2.config
    import h2.connection
    import h2.errors
    import h2.events
    import h2.settings
except ImportError:                     # pragma: no cover
    h2 = None


def require_h2():
    """python3-h2 is a test dependency (tools/install-deps test): its
    absence fails, never skips, the tests that need it."""
    if h2 is None:
        pytest.fail("python3-h2 is missing: run `make test` (tools/install-"
                    "deps test installs it) or apt-get install python3-h2, "
                    "and run pytest with /usr/bin/python3", pytrace=False)


# --------------------------------------------------------------------------
# nginx configuration


def nginx_version():
    """(major, minor, patch) of NGINX_BIN, from `nginx -v`."""
    p = subprocess.run([NGINX_BIN, "-v"], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=30)
    m = re.search(rb"nginx/(\d+)\.(\d+)\.(\d+)", p.stdout)
    assert m, "no version in `%s -v`: %r" % (NGINX_BIN, p.stdout)
    return tuple(int(x) for x in m.groups())


def http2_directive():
    """True when this nginx has the `http2 on;` directive (1.25.1+) and
    deprecates `listen ... http2`."""
    return nginx_version() >= (1, 25, 1)


def make_cert(directory):
    """A self-signed certificate for 127.0.0.1/localhost: (cert, key)."""
    cert = os.path.join(directory, "h2.crt")
    key = os.path.join(directory, "h2.key")
    p = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
         "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", key, "-out", cert],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, timeout=60)
    assert p.returncode == 0, "openssl req failed:\n%s" % p.stdout.decode()
    return cert, key


def h2_server(cert, key):
    """Server lines: h2c with prior knowledge on {h2c_port}, h2 over TLS on
    {h2s_port}, and /__status (stub_status) for the open connections."""
    if http2_directive():
        listen = """
    listen 127.0.0.1:{h2c_port};
    listen 127.0.0.1:{h2s_port} ssl;
    http2 on;"""
    else:
        listen = """
    listen 127.0.0.1:{h2c_port} http2;
    listen 127.0.0.1:{h2s_port} ssl http2;"""
    return listen + """
    ssl_certificate %s;
    ssl_certificate_key %s;
    location = /__status { stub_status; }
""" % (cert, key)


def active_connections(n):
    """nginx's own count of open client connections (stub_status), this
    request's included."""
    r = http_request(n.port, "/__status")
    assert r.status == 200, r
    m = re.match(r"Active connections: (\d+)", r.body)
    assert m, r.body
    return int(m.group(1))


def wait_connections_closed(n, message):
    """Until only the asking connection is open: every other one, HTTP/2
    ones included, has been closed and its requests freed."""
    seen = []

    def done():
        seen[:] = [active_connections(n)]
        return seen[0] == 1
    try:
        wait_until(done, 15 * SLOW, 0.1, message)
    except AssertionError as e:
        raise AssertionError("%s (still %s open)" % (e, seen))


# --------------------------------------------------------------------------
# curl


def curl_h2(port, path, headers=(), tls=False, timeout=10):
    """One request over HTTP/2 with curl: (http_version, Response)."""
    scheme = "https" if tls else "http"
    args = ["curl", "-sS", "--max-time", str(timeout * SLOW),
            "-D", "-", "-w", "\n%{http_version}"]
    args += ["--http2", "-k"] if tls else ["--http2-prior-knowledge"]
    for k, v in headers:
        args += ["-H", "%s: %s" % (k, v)]
    args.append("%s://127.0.0.1:%d%s" % (scheme, port, path))
    t0 = time.monotonic()
    p = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=timeout * SLOW + 10)
    elapsed = time.monotonic() - t0
    out = p.stdout.decode("utf-8", "replace")
    assert p.returncode == 0, "curl failed (%d): %s\n%s" % (
        p.returncode, p.stderr.decode(), out)
    out, version = out.rsplit("\n", 1)
    head, body = out.split("\r\n\r\n", 1)
    lines = head.split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:]]
    return version, Response(status, hdrs, body, elapsed)


# --------------------------------------------------------------------------
# a python3-h2 client


class Stream:
    def __init__(self, sid, t0):
        self.sid = sid
        self.t0 = t0
        self.status = None
        self.headers = None             # [(name, value)]
        self.body = b""
        self.ended = False              # END_STREAM received
        self.reset_by_peer = None       # error code of a RST_STREAM received
        self.reset_by_us = False
        self.elapsed = None

    @property
    def answered(self):
        """Response headers received."""
        return self.headers is not None

    @property
    def done(self):
        return self.ended or self.reset_by_peer is not None or \
            self.reset_by_us

    def response(self):
        assert self.ended, "stream %d did not end: %r" % (self.sid, self)
        return Response(self.status, self.headers,
                        self.body.decode("utf-8", "replace"), self.elapsed)

    def __repr__(self):
        return "<Stream %d status=%r ended=%r reset_by_peer=%r " \
               "reset_by_us=%r body=%r>" % (
                   self.sid, self.status, self.ended, self.reset_by_peer,
                   self.reset_by_us, self.body[:200])


class H2Client:
    """One HTTP/2 connection to 127.0.0.1:port, cleartext with prior
    knowledge or TLS with ALPN h2.  request() opens a stream and returns
    its id; pump()/wait() read frames and fill self.streams."""

    def __init__(self, port, tls=False, timeout=10):
        require_h2()
        self.port = port
        self.tls = tls
        sock = socket.create_connection(("127.0.0.1", port),
                                        timeout=timeout * SLOW)
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.set_alpn_protocols(["h2"])
            sock = ctx.wrap_socket(sock, server_hostname="localhost")
            assert sock.selected_alpn_protocol() == "h2", \
                "TLS listener negotiated %r, not h2" % (
                    sock.selected_alpn_protocol(),)
        self.sock = sock
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        # large windows: the test never has to hand out credit, also for
        # the data of streams it has reset (h2 ignores those frames)
        self.conn.update_settings({
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2 ** 30})
        self.conn.increment_flow_control_window(2 ** 30)
        self.streams = {}
        self.terminated = None          # ConnectionTerminated event
        self.closed = False             # the peer closed the socket
        self.remote_settings_seen = False
        self._flush()

    def _flush(self):
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, path, headers=(), method="GET"):
        sid = self.conn.get_next_available_stream_id()
        scheme = "https" if self.tls else "http"
        self.conn.send_headers(sid, [
            (":method", method), (":scheme", scheme),
            (":authority", "127.0.0.1:%d" % self.port),
            (":path", path)] + list(headers), end_stream=True)
        self.streams[sid] = Stream(sid, time.monotonic())
        self._flush()
        return sid

    def reset(self, sid, code=None):
        """RST_STREAM (CANCEL by default) for a stream of ours."""
        if code is None:
            code = h2.errors.ErrorCodes.CANCEL
        self.conn.reset_stream(sid, code)
        self.streams[sid].reset_by_us = True
        self._flush()

    def goaway(self):
        self.conn.close_connection()
        self._flush()

    def pump(self, timeout):
        """Read and handle what arrives within timeout (one read)."""
        if self.closed:
            time.sleep(timeout)
            return
        if not (self.tls and self.sock.pending()):
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                return
        try:
            data = self.sock.recv(65536)
        except (ssl.SSLWantReadError, BlockingIOError):
            return
        if not data:
            self.closed = True
            return
        for ev in self.conn.receive_data(data):
            self._event(ev)
        self._flush()

    def _event(self, ev):
        s = self.streams.get(getattr(ev, "stream_id", None))
        now = time.monotonic()
        if isinstance(ev, h2.events.ResponseReceived):
            s.headers = [(k, v) for k, v in ev.headers if k != ":status"]
            s.status = int(dict(ev.headers)[":status"])
        elif isinstance(ev, h2.events.DataReceived):
            s.body += ev.data
        elif isinstance(ev, h2.events.StreamEnded):
            s.ended = True
            s.elapsed = now - s.t0
        elif isinstance(ev, h2.events.StreamReset):
            if s is not None and not s.reset_by_us:
                s.reset_by_peer = ev.error_code
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.terminated = ev
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            self.remote_settings_seen = True

    def wait(self, sids, timeout=10, what="done"):
        """Until every stream of sids is done (or, with what="answered",
        has its response headers); returns the streams."""
        sids = list(sids)
        deadline = time.monotonic() + timeout * SLOW
        while not all(getattr(self.streams[s], what) for s in sids):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    "timed out after %.0f s waiting for streams to be %s: "
                    "%r" % (timeout * SLOW, what,
                            [self.streams[s] for s in sids
                             if not getattr(self.streams[s], what)][:10]))
            if self.closed or self.terminated:
                raise AssertionError("connection closed (%r) while waiting "
                                     "for streams: %r" % (
                                         self.terminated,
                                         [self.streams[s] for s in sids
                                          if not getattr(self.streams[s],
                                                         what)][:10]))
            self.pump(min(left, 0.1))
        return [self.streams[s] for s in sids]

    def idle(self, seconds):
        """Keep reading for a while (frames that may still come)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.closed:
            self.pump(min(0.05, max(0, deadline - time.monotonic())))

    def get(self, path, headers=(), timeout=10):
        """One request on this connection, waited for: a Response."""
        sid = self.request(path, headers)
        [s] = self.wait([sid], timeout)
        return s.response()

    def close(self, rst=False):
        """Close the TCP connection (with rst=True: an RST, SO_LINGER 0)."""
        if rst:
            import struct
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                 struct.pack("ii", 1, 0))
        try:
            self.sock.close()
        finally:
            self.closed = True


# --------------------------------------------------------------------------
# a relay between nginx and redis-server that can hold traffic


class _Pair:
    def __init__(self, client, server):
        self.client = client            # from nginx
        self.server = server            # to redis-server
        self.up = bytearray()           # nginx -> redis, not yet sent
        self.down = bytearray()         # redis -> nginx, not yet sent
        self.client_eof = False
        self.server_eof = False
        self.half_closed = False
        self.closed = False


class RedisGate:
    """Listens on a free 127.0.0.1 port; every connection is relayed to
    redis-server on redis_port.  hold(up=, down=) keeps the bytes of
    nginx -> Redis (up: Redis does not see the commands) and/or Redis ->
    nginx (down: Redis has run the commands, nginx does not see the
    replies) until release().  When nginx closes a connection, what it
    sent still reaches Redis (on release, if held: a slow network, not a
    lossy one), then Redis gets the FIN; replies nobody can read any more
    are dropped."""

    def __init__(self, redis_port):
        self.redis_port = redis_port
        self.port, self._lsock = listener()
        self.accepted = 0
        self._hold_up = False
        self._hold_down = False
        self._pairs = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def hold(self, up=False, down=True):
        with self._lock:
            self._hold_up, self._hold_down = up, down

    def release(self):
        with self._lock:
            self._hold_up = self._hold_down = False

    def held(self):
        """(up, down): the bytes held in each direction, all connections."""
        with self._lock:
            return (b"".join(bytes(p.up) for p in self._pairs),
                    b"".join(bytes(p.down) for p in self._pairs))

    def held_commands(self, name):
        """How many commands named name (case-insensitive) are held on the
        way to Redis."""
        up, _ = self.held()
        return len(re.findall(rb"\*\d+\r\n\$%d\r\n%s\r\n" % (
            len(name), re.escape(name.encode())), up, re.I))

    def open_pairs(self):
        with self._lock:
            return len([p for p in self._pairs if not p.closed])

    def closed_by_nginx(self):
        """How many of the relayed connections nginx has closed."""
        with self._lock:
            return len([p for p in self._pairs if p.client_eof])

    def _run(self):
        sel = selectors.DefaultSelector()
        sel.register(self._lsock, selectors.EVENT_READ, None)
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(0.01):
                    if key.data is None:
                        self._accept(sel)
                        continue
                    pair, side = key.data
                    try:
                        data = key.fileobj.recv(65536)
                    except OSError:
                        data = b""
                    with self._lock:
                        if data:
                            (pair.up if side == "client" else
                             pair.down).extend(data)
                        else:
                            sel.unregister(key.fileobj)
                            if side == "client":
                                pair.client_eof = True
                            else:
                                pair.server_eof = True
                self._flush(sel)
        finally:
            with self._lock:
                for p in self._pairs:
                    self._close(sel, p)
            sel.close()

    def _accept(self, sel):
        try:
            c, _ = self._lsock.accept()
        except OSError:
            return
        try:
            s = socket.create_connection(("127.0.0.1", self.redis_port),
                                         timeout=2)
        except OSError:
            c.close()
            return
        for sock in (c, s):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(5)
        pair = _Pair(c, s)
        with self._lock:
            self._pairs.append(pair)
            self.accepted += 1
        sel.register(c, selectors.EVENT_READ, (pair, "client"))
        sel.register(s, selectors.EVENT_READ, (pair, "server"))

    def _send(self, sock, buf):
        try:
            sock.sendall(bytes(buf))
        except OSError:
            pass
        del buf[:]

    def _close(self, sel, p):
        if p.closed:
            return
        p.closed = True
        for sock in (p.client, p.server):
            try:
                sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()

    def _flush(self, sel):
        with self._lock:
            for p in self._pairs:
                if p.closed:
                    continue
                if p.up and not self._hold_up and not p.server_eof:
                    self._send(p.server, p.up)
                if p.down and not self._hold_down:
                    if p.client_eof:
                        del p.down[:]           # nobody to read it
                    else:
                        self._send(p.client, p.down)
                if p.client_eof and not p.up and not p.half_closed:
                    # what nginx sent has reached Redis: pass the FIN on,
                    # Redis runs the commands it has and closes
                    p.half_closed = True
                    try:
                        p.server.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                if p.server_eof and not p.down:
                    self._close(sel, p)

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        self._lsock.close()
        assert not self._thread.is_alive()


# --------------------------------------------------------------------------
# a shop that confirms orders and then holds the rest of the body


class TrickleShop:
    """Holds every request it receives until release() (afterwards it
    answers at once), then answers it with 200, X-Order-Total and
    X-Order-Id from the query string (total=, oid=), Content-Length:
    100000 and the first 100 bytes of the body; the rest never comes.  The
    order is confirmed (the edge sees the response headers) while the
    response is still being sent."""

    def __init__(self):
        self.port, self._lsock = listener(256)
        self.received = 0
        self.answered = 0
        self.closed_by_peer = 0
        self._release = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def release(self):
        self._release.set()

    def _answer(self, c, head):
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        args = dict(urllib.parse.parse_qsl(
            urllib.parse.urlsplit(line.split(" ")[1]).query))
        try:
            c.sendall(("HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n"
                       "Content-Type: text/plain\r\n"
                       "X-Order-Total: %s\r\nX-Order-Id: %s\r\n\r\n"
                       % (args.get("total", ""), args.get("oid", "")))
                      .encode() + b"x" * 100)
            self.answered += 1
        except OSError:
            pass

    def _run(self):
        sel = selectors.DefaultSelector()
        sel.register(self._lsock, selectors.EVENT_READ)
        heads = {}
        waiting = []
        try:
            while not self._stop.is_set():
                if self._release.is_set():
                    for c in waiting:
                        self._answer(c, heads[c])
                        heads[c] = None
                    waiting = []
                for key, _ in sel.select(0.02):
                    if key.fileobj is self._lsock:
                        try:
                            c, _ = self._lsock.accept()
                        except OSError:
                            continue
                        c.settimeout(5)
                        heads[c] = b""
                        sel.register(c, selectors.EVENT_READ)
                        continue
                    c = key.fileobj
                    try:
                        data = c.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(c)
                        heads.pop(c)
                        if c in waiting:
                            waiting.remove(c)
                        c.close()
                        self.closed_by_peer += 1
                        continue
                    if heads[c] is None or c in waiting:
                        continue        # a full head; ignore what follows
                    heads[c] += data
                    if b"\r\n\r\n" not in heads[c]:
                        continue
                    self.received += 1
                    if self._release.is_set():
                        self._answer(c, heads[c])
                        heads[c] = None
                    else:
                        waiting.append(c)
        finally:
            for c in heads:
                c.close()
            sel.close()

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        self._lsock.close()
        assert not self._thread.is_alive()
