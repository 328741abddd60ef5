"""A fake Redis for hostile-reply tests (test_hostile.py).

FakeRedis listens on a free 127.0.0.1 port and speaks just enough RESP to
stand in for redis-server in front of the module: it parses the commands
the module sends (arrays of bulk strings) and answers AUTH and SELECT
(+OK), ROLE (master), SCRIPT LOAD (the SHA1), HMGET (from an in-memory table of records)
and EVALSHA/EVAL (always "applied") like Redis would, unless a test has
queued a hostile answer for the next such command.

A queued answer is a list of steps (or a callable(args) returning one), run
in order on the connection that received the command:

    b"..."              send these bytes (one write)
    ("bytewise", b, d)  send b one byte per write, sleeping d s in between
    ("sleep", d)        sleep d seconds
    ("close",)          close the connection (stop serving it)
    ("glue", b)         hold b back and send it in the same write as the
                        next answer on this connection (or after 2 s)

Every connection is served by its own thread; stop() closes the listening
socket and every connection and joins every thread (bounded).
"""

import hashlib
import select
import socket
import threading
import time

from conftest import free_port


def bulk(s):
    if s is None:
        return b"$-1\r\n"
    if isinstance(s, str):
        s = s.encode()
    return b"$%d\r\n%s\r\n" % (len(s), s)


def array(*items):
    """items are already encoded replies"""
    return b"*%d\r\n" % len(items) + b"".join(items)


def integer(n):
    return b":%d\r\n" % n


FIELDS = ("points", "lifetime", "orders", "first_order", "last_order")


class ProtocolError(Exception):
    pass


def parse_command(buf):
    """(args, rest) of the first complete command in buf, or (None, buf)."""
    if not buf:
        return None, buf
    if buf[:1] != b"*":
        raise ProtocolError("not an array: %r" % buf[:40])
    nl = buf.find(b"\r\n")
    if nl < 0:
        return None, buf
    argc = int(buf[1:nl])
    pos = nl + 2
    args = []
    for _ in range(argc):
        nl = buf.find(b"\r\n", pos)
        if nl < 0:
            return None, buf
        if buf[pos:pos + 1] != b"$":
            raise ProtocolError("not a bulk string: %r" % buf[pos:pos + 40])
        n = int(buf[pos + 1:nl])
        start = nl + 2
        if len(buf) < start + n + 2:
            return None, buf
        args.append(bytes(buf[start:start + n]))
        pos = start + n + 2
    return args, buf[pos:]


class FakeRedis:
    def __init__(self):
        self.port = free_port()
        self.records = {}           # key (str) -> {field: value (str)}
        self.commands = []          # [(conn no, [arg, ...])] all received
        self.accepted = 0
        self.errors = []            # exceptions raised in server threads
        self._answers = {"HMGET": [], "EVALSHA": [], "SCRIPT": [],
                         "AUTH": [], "SELECT": [], "ROLE": [], "WAIT": [],
                         "XREVRANGE": []}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._conns = []
        self._threads = []
        self._lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind(("127.0.0.1", self.port))
        self._lsock.listen(64)
        self._lsock.settimeout(0.05)
        t = threading.Thread(target=self._accept_loop, daemon=True)
        t.start()
        self._threads.append(t)

    # -- test interface

    def seed(self, cid, prefix="loyalty:", **fields):
        self.records["%s{%s}" % (prefix, cid)] = {
            k: str(v) for k, v in fields.items()}

    def queue(self, command, *answers):
        """Queue hostile answers for the next HMGET, EVALSHA/EVAL, SCRIPT,
        AUTH, SELECT, ROLE, WAIT or XREVRANGE commands, one per command: each a list of steps,
        plain bytes, one step, or a callable(args) returning steps."""
        with self._lock:
            for a in answers:
                if isinstance(a, (bytes, tuple)):
                    a = [a]
                elif not callable(a):
                    a = list(a)
                self._answers[command].append(a)

    def pending_answers(self, command):
        with self._lock:
            return len(self._answers[command])

    def connection_commands(self, no):
        """The command names received on connection number no (from 1)."""
        with self._lock:
            return [args[0].upper().decode() for c, args in self.commands
                    if c == no]

    def calls(self, name):
        """Commands received whose first argument is name (upper case)."""
        with self._lock:
            return [args for _, args in self.commands
                    if args and args[0].upper() == name.encode()]

    def open_connections(self):
        with self._lock:
            return sum(1 for c in self._conns if c.fileno() != -1)

    def stop(self):
        self._stop.set()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(5)
        self._lsock.close()
        alive = [t for t in self._threads if t.is_alive()]
        assert not alive, "fake redis threads still running: %r" % alive

    # -- server

    def _accept_loop(self):
        while not self._stop.is_set():
            try:
                c, _ = self._lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.settimeout(5)
            with self._lock:
                self.accepted += 1
                no = self.accepted
                self._conns.append(c)
            t = threading.Thread(target=self._serve, args=(c, no),
                                 daemon=True)
            t.start()
            with self._lock:
                self._threads.append(t)

    def _serve(self, c, no):
        buf = b""
        glued = []
        glue_deadline = None
        try:
            while not self._stop.is_set():
                if glued and time.monotonic() >= glue_deadline:
                    c.sendall(b"".join(glued))
                    glued = []
                ready, _, _ = select.select([c], [], [], 0.05)
                if not ready:
                    continue
                data = c.recv(65536)
                if not data:
                    return
                buf += data
                while True:
                    args, buf = parse_command(buf)
                    if args is None:
                        break
                    with self._lock:
                        self.commands.append((no, args))
                    steps = self._answer(args)
                    for step in steps:
                        if isinstance(step, bytes):
                            c.sendall(b"".join(glued) + step)
                            glued = []
                        elif step[0] == "glue":
                            glued.append(step[1])
                            glue_deadline = time.monotonic() + 2.0
                        elif step[0] == "bytewise":
                            if glued:
                                c.sendall(b"".join(glued))
                                glued = []
                            for i in range(len(step[1])):
                                c.sendall(step[1][i:i + 1])
                                time.sleep(step[2])
                        elif step[0] == "sleep":
                            time.sleep(step[1])
                        elif step[0] == "close":
                            return
                        else:
                            raise AssertionError("bad step %r" % (step,))
        except (ConnectionError, OSError):
            return
        except Exception as e:          # reported by the tests
            self.errors.append(e)
        finally:
            c.close()

    def _answer(self, args):
        name = args[0].upper()
        if name == b"PING":
            return [b"+PONG\r\n"]
        key = {b"HMGET": "HMGET", b"EVALSHA": "EVALSHA", b"EVAL": "EVALSHA",
               b"SCRIPT": "SCRIPT", b"AUTH": "AUTH",
               b"SELECT": "SELECT", b"ROLE": "ROLE",
               b"WAIT": "WAIT", b"XREVRANGE": "XREVRANGE"}.get(name)
        if key:
            with self._lock:
                answer = (self._answers[key].pop(0) if self._answers[key]
                          else None)
            if answer is not None:
                return answer(args) if callable(answer) else answer
        return [self.default_reply(args)]

    def default_reply(self, args):
        """What a real Redis would answer (credits: always applied)."""
        name = args[0].upper()
        if name in (b"AUTH", b"SELECT"):
            return b"+OK\r\n"
        if name == b"ROLE":
            return array(bulk(b"master"), integer(0), array())
        if name == b"SCRIPT" and len(args) == 3 and args[1].upper() == b"LOAD":
            return bulk(hashlib.sha1(args[2]).hexdigest())
        if name == b"HMGET":
            rec = self.records.get(args[1].decode("utf-8", "replace"), {})
            return array(*[bulk(rec.get(f.decode())) for f in args[2:]])
        if name == b"WAIT":
            # a master without replicas
            return integer(0)
        if name in (b"EVALSHA", b"EVAL"):
            # applied: earned:redeem as asked, balance 0, no shortfall
            return array(integer(1), bulk(b"%s:%s" % (args[6], args[7])),
                         integer(0), integer(0))
        return b"-ERR unknown command '%s'\r\n" % name
