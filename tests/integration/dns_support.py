"""DNS for the DNS failover tests (test_dns.py).

DnsServer is a tiny authoritative DNS server, UDP only, on 127.0.0.1 and a
free port, in a thread of the test process.  It answers A and AAAA
queries from a table the test changes at will:

    dns.set("localhost", A=["127.0.0.1"], AAAA=[])
    dns.records             {name: {"A": [...], "AAAA": [...]}}

with a TTL of dns.ttl (1 s), the way a local resolver such as dnsmasq
answers for the names it holds itself: QR and AA set, RD copied from the
query, RA set (it stands in for the resolver nginx asks), the id and the
question echoed as received.  A name without records of the type asked
gets NOERROR and no answers (NODATA), an unknown name NXDOMAIN; both carry
an SOA in the authority section whose minimum is the TTL (the negative
caching time).  Answers name their owner with a compression pointer to
the question (dns.compress = False: the name written out in full; nginx
takes both).  Other query types get NODATA for a known name, other
classes REFUSED, other opcodes NOTIMP, a query that does not parse
FORMERR (and an entry in dns.errors).

dns.mode:
    None        answer (the default)
    "ignore"    read every query and never answer (resolver timeouts)
    "servfail"  answer every query with SERVFAIL and nothing else

Every query is counted, whatever the mode: dns.count(name, qtype=None,
since=None) (since: a time.monotonic() value), dns.queries
[(monotonic time, name, type)] with type "A", "AAAA" or the number.

dns_query(port, name, qtype) is a small client for checking the server
itself: it sends one query and parses the answer (compression pointers
included).  The dns_server fixture starts a DnsServer and stops it in
teardown, failing the test on dns.errors.

IPv4 + IPv6 loopback: dual_port() is a TCP port free on both 127.0.0.1
and ::1, for a pair of Redis servers on the same port and different
addresses; V6RedisServer is a conftest.RedisServer listening on [::1]
only.
"""

import ipaddress
import random
import select
import socket
import struct
import threading
import time

import pytest
import redis as redis_lib

from conftest import RedisServer, _USED_PORTS, free_port


QTYPES = {1: "A", 28: "AAAA", 5: "CNAME", 6: "SOA", 2: "NS", 12: "PTR",
          33: "SRV", 16: "TXT", 255: "ANY"}
QTYPE_NUM = {v: k for k, v in QTYPES.items()}

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5

QR, AA, TC, RD, RA = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080

UDP_MAX = 512                   # no EDNS: the classic limit


class DnsFormatError(Exception):
    pass


def encode_name(name):
    """A name in wire format, uncompressed (the root for "" or ".")."""
    out = b""
    for label in name.rstrip(".").split(".") if name.strip(".") else []:
        raw = label.encode("ascii")
        assert 0 < len(raw) < 64, "bad label %r" % label
        out += bytes([len(raw)]) + raw
    return out + b"\0"


def read_name(buf, pos, allow_pointers=True):
    """(name, position after the name as written) of the name at pos;
    pointers are followed (bounded, never forward loops)."""
    labels, end, jumps = [], None, 0
    while True:
        if pos >= len(buf):
            raise DnsFormatError("name runs past the end of the message")
        n = buf[pos]
        if n & 0xc0 == 0xc0:
            if not allow_pointers:
                raise DnsFormatError("compression pointer in the question")
            if pos + 1 >= len(buf):
                raise DnsFormatError("truncated compression pointer")
            target = ((n & 0x3f) << 8) | buf[pos + 1]
            if end is None:
                end = pos + 2
            jumps += 1
            if jumps > 20 or target >= pos:
                raise DnsFormatError("compression pointer loop")
            pos = target
            continue
        if n & 0xc0:
            raise DnsFormatError("reserved label type 0x%02x" % n)
        if n == 0:
            pos += 1
            break
        if pos + 1 + n > len(buf):
            raise DnsFormatError("label runs past the end of the message")
        labels.append(buf[pos + 1:pos + 1 + n].decode("ascii", "replace"))
        pos += 1 + n
        if sum(len(l) + 1 for l in labels) > 255:
            raise DnsFormatError("name longer than 255 octets")
    return ".".join(labels), (end if end is not None else pos)


def _key(name):
    return name.rstrip(".").lower()


class DnsServer:
    def __init__(self, ttl=1):
        self.ttl = ttl
        self.mode = None
        self.compress = True
        self.records = {}
        self.queries = []               # [(monotonic, name, type)]
        self.errors = []
        self.answered = 0
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.setblocking(False)
        self.port = self._sock.getsockname()[1]
        _USED_PORTS.add(self.port)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="dns :%d" % self.port)
        self._thread.start()

    # -- the table

    def set(self, name, A=(), AAAA=()):
        """Replace the records of name (each a list of address strings)."""
        for a in A:
            ipaddress.IPv4Address(a)
        for a in AAAA:
            ipaddress.IPv6Address(a)
        with self._lock:
            self.records[_key(name)] = {"A": list(A), "AAAA": list(AAAA)}

    def remove(self, name):
        """The name is unknown from now on: NXDOMAIN."""
        with self._lock:
            self.records.pop(_key(name), None)

    def count(self, name=None, qtype=None, since=None):
        with self._lock:
            return len([q for q in self.queries
                        if (name is None or q[1] == _key(name))
                        and (qtype is None or q[2] == qtype)
                        and (since is None or q[0] >= since)])

    # -- the server

    def _run(self):
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._sock], [], [], 0.05)
            except (OSError, ValueError):
                break
            if not ready:
                continue
            try:
                data, peer = self._sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                break
            try:
                reply = self.handle(data)
            except Exception as e:              # noqa: BLE001
                self.errors.append("handling %r: %r" % (data[:64], e))
                continue
            if reply is not None:
                try:
                    self._sock.sendto(reply, peer)
                    self.answered += 1
                except OSError as e:
                    self.errors.append("sendto %r: %r" % (peer, e))

    def handle(self, data):
        """The reply to one query message (bytes), or None for none."""
        if len(data) < 12:
            self.errors.append("short query %r" % data)
            return None                 # not even an id to answer to
        qid, flags, qd, an, ns, ar = struct.unpack("!6H", data[:12])
        if flags & QR:
            self.errors.append("a response sent to the server: %r" % data)
            return None
        opcode = (flags >> 11) & 0xf
        rd = flags & RD
        if opcode != 0:
            return self._header(qid, opcode, rd, NOTIMP, 0)
        if qd != 1:
            self.errors.append("query with %d questions" % qd)
            return self._header(qid, opcode, rd, FORMERR, 0)
        try:
            qname, pos = read_name(data, 12, allow_pointers=False)
            if pos + 4 > len(data):
                raise DnsFormatError("question without type and class")
        except DnsFormatError as e:
            self.errors.append("malformed query: %s: %r" % (e, data))
            return self._header(qid, opcode, rd, FORMERR, 0)
        qtype, qclass = struct.unpack("!HH", data[pos:pos + 4])
        question = data[12:pos + 4]     # echoed as received
        tname = QTYPES.get(qtype, qtype)
        key = _key(qname)

        with self._lock:
            self.queries.append((time.monotonic(), key, tname))
            mode = self.mode
            entry = self.records.get(key)
            addrs = list(entry.get(tname, ())) if entry and tname in (
                "A", "AAAA") else []
            ttl = self.ttl
            compress = self.compress

        if mode == "ignore":
            return None
        if mode == "servfail":
            return self._reply(qid, rd, SERVFAIL, question, [], [])
        assert mode is None, "unknown mode %r" % mode
        if qclass != 1:
            return self._reply(qid, rd, REFUSED, question, [], [])
        if entry is None:
            return self._reply(qid, rd, NXDOMAIN, question, [],
                               [self._soa(ttl)])

        owner = b"\xc0\x0c" if compress else encode_name(qname)
        answers = []
        for a in addrs:
            if tname == "A":
                rdata = socket.inet_pton(socket.AF_INET, a)
            else:
                rdata = socket.inet_pton(socket.AF_INET6, a)
            answers.append(owner + struct.pack("!HHIH", qtype, 1, ttl,
                                               len(rdata)) + rdata)
        if not answers:
            return self._reply(qid, rd, NOERROR, question, [],
                               [self._soa(ttl)])
        return self._reply(qid, rd, NOERROR, question, answers, [])

    @staticmethod
    def _header(qid, opcode, rd, rcode, qd, an=0, ns=0, tc=0):
        flags = QR | (opcode << 11) | AA | rd | RA | rcode | (TC if tc else 0)
        return struct.pack("!6H", qid, flags, qd, an, ns, 0)

    def _reply(self, qid, rd, rcode, question, answers, authority):
        body = question + b"".join(answers) + b"".join(authority)
        if 12 + len(body) > UDP_MAX:
            # what fits, and TC: the client is to ask again over TCP
            return self._header(qid, 0, rd, rcode, 1, tc=1) + question
        return self._header(qid, 0, rd, rcode, 1, len(answers),
                            len(authority)) + body

    @staticmethod
    def _soa(ttl):
        """An SOA of the root zone, which the server plays: the negative
        caching time (its minimum) is the TTL."""
        rdata = (encode_name("ns.test") + encode_name("hostmaster.test")
                 + struct.pack("!5I", 1, 3600, 600, 86400, ttl))
        return b"\0" + struct.pack("!HHIH", 6, 1, ttl, len(rdata)) + rdata

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        assert not self._thread.is_alive(), "DNS server thread still runs"


@pytest.fixture
def dns_server():
    d = DnsServer()
    yield d
    d.stop()
    assert not d.errors, d.errors


# --------------------------------------------------------------------------
# a client, to check the server


class DnsAnswer:
    def __init__(self, qid, flags, question, answers, authority):
        self.id = qid
        self.flags = flags
        self.rcode = flags & 0xf
        self.question = question        # (name, type, class)
        self.answers = answers          # [(name, type, class, ttl, value)]
        self.authority = authority

    @property
    def addresses(self):
        return [a[4] for a in self.answers if a[1] in (1, 28)]

    def __repr__(self):
        return "<DnsAnswer id=%d flags=%04x %r %r %r>" % (
            self.id, self.flags, self.question, self.answers, self.authority)


def parse_message(buf):
    qid, flags, qd, an, ns, ar = struct.unpack("!6H", buf[:12])
    pos = 12
    question = None
    for _ in range(qd):
        name, pos = read_name(buf, pos)
        qtype, qclass = struct.unpack("!HH", buf[pos:pos + 4])
        pos += 4
        question = (name, qtype, qclass)
    sections = []
    for count in (an, ns):
        rrs = []
        for _ in range(count):
            name, pos = read_name(buf, pos)
            rtype, rclass, ttl, rdlen = struct.unpack("!HHIH",
                                                      buf[pos:pos + 10])
            pos += 10
            rdata = buf[pos:pos + rdlen]
            if len(rdata) != rdlen:
                raise DnsFormatError("truncated rdata")
            pos += rdlen
            if rtype == 1 and rdlen == 4:
                value = socket.inet_ntop(socket.AF_INET, rdata)
            elif rtype == 28 and rdlen == 16:
                value = socket.inet_ntop(socket.AF_INET6, rdata)
            else:
                value = rdata
            rrs.append((name, rtype, rclass, ttl, value))
        sections.append(rrs)
    return DnsAnswer(qid, flags, question, sections[0], sections[1])


def build_query(name, qtype, qid=None, rd=True, qclass=1):
    if isinstance(qtype, str):
        qtype = QTYPE_NUM[qtype]
    qid = random.randrange(1, 65536) if qid is None else qid
    return qid, (struct.pack("!6H", qid, RD if rd else 0, 1, 0, 0, 0)
                 + encode_name(name) + struct.pack("!HH", qtype, qclass))


def dns_query(port, name, qtype, timeout=2.0, raw=None, **kw):
    """Send one query (or raw bytes) to 127.0.0.1:port over UDP: the
    parsed answer, or None when none came within timeout."""
    qid, msg = build_query(name, qtype, **kw) if raw is None else (None, raw)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.settimeout(timeout)
        s.sendto(msg, ("127.0.0.1", port))
        try:
            data, _ = s.recvfrom(65535)
        except socket.timeout:
            return None
    finally:
        s.close()
    reply = parse_message(data)
    assert qid is None or reply.id == qid, (qid, reply)
    return reply


# --------------------------------------------------------------------------
# Redis on [::1]


def bindable(family, host, port):
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def dual_port():
    """A TCP port free on 127.0.0.1 (conftest.free_port()) and on ::1."""
    for _ in range(50):
        port = free_port()
        if bindable(socket.AF_INET6, "::1", port):
            return port
    raise RuntimeError("no port free on both 127.0.0.1 and ::1")


class V6RedisServer(RedisServer):
    """A RedisServer on [::1]:port only: nothing on 127.0.0.1.  The
    test's client (and the ready check) connects to [::1]:port."""

    what = "redis-server [::1]"
    bind = "::1"

    def db(self, n):
        if n not in self._clients:
            self._clients[n] = redis_lib.Redis(
                host="::1", port=self.port, db=n, password=self.password,
                decode_responses=True, socket_timeout=5,
                socket_connect_timeout=2)
        return self._clients[n]
