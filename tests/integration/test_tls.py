"""TLS to Redis: `loyalty_redis <address> ... tls;` and the
loyalty_redis_ssl_* directives.  Certificates are made at test time
(tls_support.Pki); each Redis keeps its plain port for the test's own
client and the module is pointed at its TLS port.

test_fixture_* check the certificates and the TLS Redis themselves (no
module involved)."""

import json
import os
import re
import ssl
import threading
import time

import pytest

from cluster_support import cluster_edge_conf, metric, metrics
from conftest import SLOW, checkout_conf, expected, wait_until
from credit_support import order, record, replay, wait_marker
from tls_support import (SniProxy, pki, start_tls_cluster,  # noqa: F401
                         tls_ping, tls_redis, tls_redis_factory)


UNAVAILABLE = expected("unavailable")

NEW = 'loyalty_redis_tls_handshakes_total{session="new"}'
REUSED = 'loyalty_redis_tls_handshakes_total{session="reused"}'

METRICS = """
    location = /metrics { loyalty off; loyalty_status; }
"""

VERIFY_ERROR = re.compile(
    r"\[error\] .*loyalty: redis SSL certificate verify error: "
    r"\((\d+):([^)]*[A-Za-z][^)]*)\)")
HANDSHAKE_FAILED = "loyalty: redis TLS handshake failed"
CLOSED = "loyalty: redis closed the connection"
TIMED_OUT = "loyalty: redis TLS handshake timed out"


def mismatch(name):
    return re.compile(r"\[error\] .*loyalty: redis SSL certificate does not "
                      r"match \"%s\"" % re.escape(name))


def trusted(path):
    return "loyalty_redis_ssl_trusted_certificate %s;\n" % path


def loc(path, redis, lines="", customer="$cookie_cid"):
    """A reading location of its own, proxied to the echo backend."""
    return """
    location %s {
        loyalty on;
        loyalty_customer %s;
        loyalty_redis %s;
        %s
        proxy_pass http://127.0.0.1:{backend_port};
    }
""" % (path, customer, redis, lines)


def read(n, cid, path="/checkout"):
    r = n.get(path, cookies={"cid": cid})
    assert r.status == 200, r
    return r.loyalty


def lines_matching(text, pattern):
    if isinstance(pattern, str):
        return [l for l in text.splitlines() if pattern in l]
    return [l for l in text.splitlines() if pattern.search(l)]


def wait_log(n, pattern, what, timeout=5):
    return wait_until(lambda: lines_matching(n.error_log(), pattern),
                      timeout * SLOW, 0.02, what)


# --------------------------------------------------------------------------
# the fixtures themselves


def test_fixture_pki(pki):
    import os
    import stat
    assert stat.S_IMODE(os.stat(pki.dir).st_mode) == 0o755
    for name in os.listdir(pki.dir):
        assert stat.S_IMODE(os.stat(pki.path(name)).st_mode) == 0o644, name
    ok, out = pki.verify(pki.path("server.crt"), untrusted=pki.path(
        "int.crt"), purpose="sslserver", ip="127.0.0.1")
    assert ok, out
    for name in ("redis.test", "localhost"):
        ok, out = pki.verify(pki.path("server.crt"),
                             untrusted=pki.path("int.crt"), name=name)
        assert ok, out
    ok, out = pki.verify(pki.path("other.crt"), untrusted=pki.path(
        "int.crt"), ip="127.0.0.1")
    assert not ok and "error 64" in out, out
    ok, out = pki.verify(pki.path("other.crt"), untrusted=pki.path(
        "int.crt"), name="other.test")
    assert ok, out
    ok, out = pki.verify(pki.path("server.crt"), ca=pki.evil_ca,
                         untrusted=pki.path("int.crt"))
    assert not ok and "error 20" in out, out
    ok, out = pki.verify(pki.path("server.crt"))
    assert not ok and "error 20" in out, "verified without the intermediate"
    ok, out = pki.verify(pki.path("client.crt"), purpose="sslclient")
    assert ok, out
    ok, out = pki.verify(pki.path("evil-client.crt"), ca=pki.evil_ca,
                         purpose="sslclient")
    assert ok, out
    # the verify depth as OpenSSL counts it: deep needs 2, server 1
    ok, out = pki.verify(pki.path("deep.crt"),
                         untrusted=pki.path("int-bundle.crt"), depth=1)
    assert not ok and "error 22" in out, out
    ok, out = pki.verify(pki.path("deep.crt"),
                         untrusted=pki.path("int-bundle.crt"), depth=2)
    assert ok, out
    ok, out = pki.verify(pki.path("server.crt"),
                         untrusted=pki.path("int.crt"), depth=1)
    assert ok, out


def test_fixture_tls_redis(tls_redis_factory, pki):
    r = tls_redis_factory()
    assert r.client.ping()          # the plain port
    for name in ("redis.test", "localhost", "127.0.0.1"):
        reply, version = tls_ping(r.tls_port, pki.ca, server_hostname=name)
        assert reply == b"+PONG\r\n", (name, reply)
        assert version in ("TLSv1.2", "TLSv1.3"), version
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_ping(r.tls_port, pki.evil_ca, server_hostname="redis.test")
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_ping(r.tls_port, pki.ca, server_hostname="wrong.test")

    other = tls_redis_factory(cert="other")
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_ping(other.tls_port, pki.ca, server_hostname="127.0.0.1")
    assert tls_ping(other.tls_port, pki.ca,
                    server_hostname="other.test")[0] == b"+PONG\r\n"

    deep = tls_redis_factory(cert="deep")
    assert tls_ping(deep.tls_port, pki.ca,
                    server_hostname="redis.test")[0] == b"+PONG\r\n"

    leaf = tls_redis_factory(cert="leaf")
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_ping(leaf.tls_port, pki.ca, server_hostname="redis.test")
    assert tls_ping(leaf.tls_port, pki.path("ca-bundle.crt"),
                    server_hostname="redis.test")[0] == b"+PONG\r\n"

    mtls = tls_redis_factory(auth_clients=True)
    assert tls_ping(mtls.tls_port, pki.ca, server_hostname="redis.test",
                    certfile=pki.path("client.crt"),
                    keyfile=pki.path("client.key"))[0] == b"+PONG\r\n"
    # refused in the handshake (TLS 1.2) or right after it (TLS 1.3)
    for cert in (None, "evil-client"):
        kw = {}
        if cert:
            kw = dict(certfile=pki.path(cert + ".crt"),
                      keyfile=pki.path(cert + ".key"))
        try:
            reply, _ = tls_ping(mtls.tls_port, pki.ca,
                                server_hostname="redis.test", **kw)
        except (ssl.SSLError, OSError):
            reply = None
        assert reply in (None, b""), (cert, reply)

    r13 = tls_redis_factory(extra=["--tls-protocols", "TLSv1.3"])
    assert tls_ping(r13.tls_port, pki.ca)[1] == "TLSv1.3"


def test_fixture_sni_proxy(redis, pki):
    p = SniProxy(pki, redis.port)
    try:
        assert tls_ping(p.port, pki.ca, server_hostname="redis.test")[0] \
            == b"+PONG\r\n"
        assert tls_ping(p.port, pki.ca)[0] == b"+PONG\r\n"
        wait_until(lambda: p.handshakes == 2, 5, 0.02, "two handshakes")
        assert p.names == ["redis.test"]
    finally:
        p.stop()
    assert not p.errors, p.errors


# --------------------------------------------------------------------------
# reads and credits over TLS


def test_read_over_tls(tls_redis, nginx, pki):
    r = tls_redis
    n = nginx(checkout_conf(http=trusted(pki.ca) + """
        loyalty_tier gold 1000 multiplier=1.5;
        loyalty_offer vip code=VIP10 tier=gold;""",
        redis="127.0.0.1:{redis_port} tls", locations=METRICS),
        redis_port=r.tls_port, workers=1)
    r.seed("c-gold", points=250, lifetime=1500, orders=4)
    before = r.hmget_calls()
    for _ in range(2):
        assert read(n, "c-gold") == expected("ok", "c-gold", 250, 1500, 4,
                                             "gold", "vip", "VIP10")
        assert read(n, "nobody") == expected("new", "nobody")
    assert r.hmget_calls() == before + 4
    m = metrics(n.port)
    assert metric(m, NEW) >= 1 and metric(m, REUSED) == 0, m
    log = n.error_log()
    assert not VERIFY_ERROR.search(log) and HANDSHAKE_FAILED not in log, log


def test_plain_connection_to_the_tls_port_is_unavailable(tls_redis, nginx,
                                                        pki):
    """Without `tls` the module speaks RESP to the TLS port: no read can
    succeed (so an `ok` over `tls` came through TLS)."""
    n = nginx(checkout_conf(), redis_port=tls_redis.tls_port)
    tls_redis.seed("c", points=1, lifetime=1, orders=1)
    for _ in range(3):
        assert read(n, "c") == UNAVAILABLE


def test_credit_over_tls(tls_redis, nginx, pki):
    r = tls_redis
    n = nginx(cluster_edge_conf("127.0.0.1:{redis_port}", "tls",
                                http=trusted(pki.ca)),
              redis_port=r.tls_port)
    r.seed("buyer", points=5, lifetime=5, orders=1)
    resp = order(n, "buyer", "19.99", "tls-o1")
    assert resp.status == 200, resp
    assert resp.header("X-Loyalty-Status") == "ok", resp
    assert resp.header("X-Loyalty-Earned") == "19", resp
    assert wait_marker(r.client, "buyer", "tls-o1") == "19:0"
    rec = record(r.client, "buyer")
    assert (rec["points"], rec["lifetime"], rec["orders"]) == (24, 24, 2)
    # the same order again: a duplicate, not credited twice
    order(n, "buyer", "19.99", "tls-o1")
    resp = order(n, "buyer")
    assert resp.header("X-Loyalty-Points") == "24", resp
    assert record(r.client, "buyer")["points"] == 24


def test_password_and_user_over_tls(tls_redis_factory, nginx, pki):
    r = tls_redis_factory(password="s3cret")
    r.client.execute_command("ACL", "SETUSER", "nginx", "on", ">pw2", "~*",
                             "+@all")
    locations = (
        loc("/pw", "127.0.0.1:{redis_port} tls password=s3cret")
        + loc("/user", "127.0.0.1:{redis_port} tls user=nginx password=pw2")
        + loc("/wrong", "127.0.0.1:{redis_port} tls password=wrong"))
    n = nginx(checkout_conf(http=trusted(pki.ca), redis=None,
                            locations=locations), redis_port=r.tls_port)
    r.seed("c", points=3, lifetime=4, orders=1)
    for _ in range(2):
        assert read(n, "c", "/pw") == expected("ok", "c", 3, 4, 1)
        assert read(n, "c", "/user") == expected("ok", "c", 3, 4, 1)
        assert read(n, "c", "/wrong") == UNAVAILABLE
    wait_log(n, "redis refused AUTH", "the refused AUTH in the error log")


# --------------------------------------------------------------------------
# certificate verification


@pytest.mark.parametrize("case", ["unrelated-ca", "system-store",
                                  "no-intermediate"])
def test_verify_error(tls_redis_factory, nginx, pki, case):
    """The chain does not lead to a trusted CA: reads are unavailable
    (loyalty_fail pass: the request still gets 200) and the reason is
    logged."""
    if case == "unrelated-ca":
        r, http = tls_redis_factory(), trusted(pki.evil_ca)
    elif case == "system-store":        # the default: the system CA store
        r, http = tls_redis_factory(), ""
    else:                               # Redis sends its leaf alone
        r, http = tls_redis_factory(cert="leaf"), trusted(pki.ca)
    n = nginx(checkout_conf(http=http + "loyalty_response_headers on;",
                            redis="127.0.0.1:{redis_port} tls"),
              redis_port=r.tls_port)
    r.seed("c", points=1, lifetime=1, orders=1)
    before = r.hmget_calls()
    for _ in range(3):
        resp = n.get("/checkout", cookies={"cid": "c"})
        assert resp.status == 200, resp
        assert resp.loyalty == UNAVAILABLE, resp.echo
        assert resp.header("X-Loyalty-Status") == "unavailable"
    hits = wait_log(n, VERIFY_ERROR, "the verify error in the error log")
    print(hits[0])
    assert r.hmget_calls() == before, "a read reached an unverified Redis"


def test_trusted_bundle_with_the_intermediate(tls_redis_factory, nginx, pki):
    """Redis sends its leaf alone; the trusted file holds the root and the
    intermediate: verified."""
    r = tls_redis_factory(cert="leaf")
    n = nginx(checkout_conf(http=trusted(pki.path("ca-bundle.crt")),
                            redis="127.0.0.1:{redis_port} tls"),
              redis_port=r.tls_port)
    r.seed("c", points=2, lifetime=2, orders=1)
    assert read(n, "c") == expected("ok", "c", 2, 2, 1)


def test_verify_depth(tls_redis_factory, nginx, pki):
    """deep's chain is leaf, int2, int, root: it needs a depth of 2."""
    r = tls_redis_factory(cert="deep")
    redis = "127.0.0.1:{redis_port} tls"
    locations = (loc("/d1", redis, "loyalty_redis_ssl_verify_depth 1;")
                 + loc("/d2", redis, "loyalty_redis_ssl_verify_depth 2;")
                 + loc("/ddefault", redis))
    n = nginx(checkout_conf(http=trusted(pki.ca), redis=None,
                            locations=locations), redis_port=r.tls_port,
              workers=1)
    r.seed("c", points=3, lifetime=3, orders=1)
    ok = expected("ok", "c", 3, 3, 1)
    for _ in range(2):
        assert read(n, "c", "/d1") == UNAVAILABLE
        assert read(n, "c", "/d2") == ok
        assert read(n, "c", "/ddefault") == ok
    # OpenSSL stops at the depth: the chain is too long (22), or, as the
    # TLS client builds it, its issuer is beyond reach (20)
    hits = wait_log(n, VERIFY_ERROR, "the verify error of /d1")
    assert all(VERIFY_ERROR.search(h).group(1) in ("20", "22")
               for h in hits), hits


# --------------------------------------------------------------------------
# names


def test_ip_address_matched_against_ip_entries(tls_redis_factory, nginx,
                                               pki):
    good = tls_redis_factory()
    other = tls_redis_factory(cert="other")     # DNS:other.test only
    locations = (loc("/good", "127.0.0.1:%d tls" % good.tls_port)
                 + loc("/other", "127.0.0.1:%d tls" % other.tls_port))
    n = nginx(checkout_conf(http=trusted(pki.ca), redis=None,
                            locations=locations))
    for r in (good, other):
        r.seed("c", points=4, lifetime=4, orders=1)
    for _ in range(2):
        assert read(n, "c", "/good") == expected("ok", "c", 4, 4, 1)
        assert read(n, "c", "/other") == UNAVAILABLE
    wait_log(n, mismatch("127.0.0.1"), 'does not match "127.0.0.1"')
    assert not VERIFY_ERROR.search(n.error_log()), \
        "the chain of other.test is trusted: only its name is wrong"


def test_ipv6_address_over_tls(tls_redis_factory, nginx, pki):
    """A bracketed IPv6 address: connected to over TLS, without SNI, its
    certificate matched against the IP entry ::1 (the chain of "other"
    has none: unavailable, and the error names the address); and in
    plain TCP.  Regression: the name checked was "[::1]", which no
    certificate entry can match."""
    servers = []
    for cert in ("server", "other"):
        r = tls_redis_factory(cert=cert, start=False)
        r.bind = "127.0.0.1 ::1"
        r.start()
        r.seed("c6", points=6, lifetime=6, orders=1)
        servers.append(r)
    good, other = servers
    locations = (loc("/v6", "[::1]:%d tls" % good.tls_port)
                 + loc("/v6-other", "[::1]:%d tls" % other.tls_port)
                 + loc("/v6-plain", "[::1]:%d" % good.port)
                 + loc("/v6-name", "127.0.0.1:%d tls" % good.tls_port,
                       "loyalty_redis_ssl_name [::1];"))
    n = nginx(checkout_conf(http=trusted(pki.ca), redis=None,
                            locations=locations))
    for _ in range(2):
        assert read(n, "c6", "/v6") == expected("ok", "c6", 6, 6, 1)
        assert read(n, "c6", "/v6-plain") == expected("ok", "c6", 6, 6, 1)
        # and loyalty_redis_ssl_name written the same way
        assert read(n, "c6", "/v6-name") == expected("ok", "c6", 6, 6, 1)
        assert read(n, "c6", "/v6-other") == UNAVAILABLE
    wait_log(n, mismatch("::1"), 'does not match "::1"')
    assert not VERIFY_ERROR.search(n.error_log())


def test_ssl_name(tls_redis_factory, nginx, pki):
    good = tls_redis_factory()
    other = tls_redis_factory(cert="other")
    g = "127.0.0.1:%d tls" % good.tls_port
    o = "127.0.0.1:%d tls" % other.tls_port
    locations = (
        loc("/redis-test", g, "loyalty_redis_ssl_name redis.test;")
        + loc("/localhost", g, "loyalty_redis_ssl_name localhost;")
        + loc("/wrong", g, "loyalty_redis_ssl_name wrong.test;")
        + loc("/other-test", o, "loyalty_redis_ssl_name other.test;")
        + loc("/other-redis-test", o, "loyalty_redis_ssl_name redis.test;"))
    n = nginx(checkout_conf(http=trusted(pki.ca), redis=None,
                            locations=locations), workers=1)
    for r in (good, other):
        r.seed("c", points=5, lifetime=5, orders=1)
    ok = expected("ok", "c", 5, 5, 1)
    for _ in range(2):
        assert read(n, "c", "/redis-test") == ok
        assert read(n, "c", "/localhost") == ok
        assert read(n, "c", "/wrong") == UNAVAILABLE
        assert read(n, "c", "/other-test") == ok
        assert read(n, "c", "/other-redis-test") == UNAVAILABLE
    wait_log(n, mismatch("wrong.test"), 'does not match "wrong.test"')
    wait_log(n, mismatch("redis.test"), 'does not match "redis.test"')
    log = n.error_log()
    assert not lines_matching(log, mismatch("127.0.0.1")), \
        "the address was checked instead of loyalty_redis_ssl_name"
    assert not VERIFY_ERROR.search(log), log


def test_host_name_address(tls_redis, nginx, pki):
    """`localhost:P`: the name checked is localhost (DNS:localhost)."""
    n = nginx(checkout_conf(http=trusted(pki.ca),
                            redis="localhost:{redis_port} tls"),
              redis_port=tls_redis.tls_port)
    tls_redis.seed("c", points=6, lifetime=6, orders=1)
    for _ in range(2):
        assert read(n, "c") == expected("ok", "c", 6, 6, 1)


@pytest.mark.parametrize("case,want", [
    # address, lines, SNI expected (None: no SNI)
    (("127.0.0.1", ""), None),
    (("127.0.0.1", "loyalty_redis_ssl_name redis.test;"), "redis.test"),
    (("127.0.0.1", "loyalty_redis_ssl_name redis.test; "
                   "loyalty_redis_ssl_server_name off;"), None),
    (("127.0.0.1", "loyalty_redis_ssl_server_name on; "
                   "loyalty_redis_ssl_name localhost;"), "localhost"),
    (("localhost", ""), "localhost"),
    (("localhost", "loyalty_redis_ssl_server_name off;"), None),
], ids=["ip", "name", "name-server-name-off", "server-name-on",
        "host", "host-server-name-off"])
def test_server_name_indication(redis, nginx, pki, case, want):
    address, lines = case
    proxy = SniProxy(pki, redis.port)
    try:
        n = nginx(checkout_conf(http=trusted(pki.ca) + lines,
                                redis="%s:%d tls" % (address, proxy.port)))
        redis.seed("c", points=7, lifetime=7, orders=1)
        assert read(n, "c") == expected("ok", "c", 7, 7, 1)
        assert proxy.handshakes >= 1
        assert proxy.names == ([want] * proxy.handshakes if want else []), \
            proxy.names
    finally:
        proxy.stop()


# --------------------------------------------------------------------------
# handshakes that fail


def test_tls_to_a_plain_port(redis, nginx, pki):
    """`tls` to Redis' plain port: the handshake fails, or, as Redis waits
    for the end of a line that the ClientHello may not have, times out;
    reads are unavailable within the timeout, never hang; the same
    address without `tls` still works."""
    locations = (loc("/tls", "127.0.0.1:{redis_port} tls")
                 + loc("/plainread", "127.0.0.1:{redis_port}"))
    n = nginx(checkout_conf(http=trusted(pki.ca), redis=None,
                            locations=locations), redis_port=redis.port,
              workers=1)
    redis.seed("c", points=8, lifetime=8, orders=1)
    for _ in range(3):
        r = n.get("/tls", cookies={"cid": "c"})
        assert r.status == 200 and r.loyalty == UNAVAILABLE, r
        # within the timeout (10s under valgrind), never hanging
        assert r.elapsed < 1.5 * SLOW, r
        assert read(n, "c", "/plainread") == expected("ok", "c", 8, 8, 1)
    hits = wait_log(n, re.compile("%s|%s" % (HANDSHAKE_FAILED, TIMED_OUT)),
                    "the failed handshake in the log")
    assert all("[error]" in h or "[warn]" in h for h in hits), hits


def test_mutual_tls(tls_redis_factory, nginx, pki):
    r = tls_redis_factory(auth_clients=True)
    redis = "127.0.0.1:{redis_port} tls"
    cert = ("loyalty_redis_ssl_certificate %s; "
            "loyalty_redis_ssl_certificate_key %s;")
    locations = (
        loc("/cert", redis, cert % (pki.path("client.crt"),
                                    pki.path("client.key")))
        + loc("/nocert", redis)
        + loc("/evilcert", redis, cert % (pki.path("evil-client.crt"),
                                          pki.path("evil-client.key"))))
    n = nginx(checkout_conf(http=trusted(pki.ca), redis=None,
                            locations=locations), redis_port=r.tls_port,
              workers=1)
    r.seed("c", points=9, lifetime=9, orders=1)
    for _ in range(2):
        assert read(n, "c", "/cert") == expected("ok", "c", 9, 9, 1)
        assert read(n, "c", "/nocert") == UNAVAILABLE
        assert read(n, "c", "/evilcert") == UNAVAILABLE
    # TLS 1.2: refused in the handshake; TLS 1.3: the refusal comes after
    # the client's side of the handshake, on the first read
    wait_log(n, re.compile(r"\[error\] .*%s|%s" % (HANDSHAKE_FAILED, CLOSED)),
             "the refused handshake in the log")


@pytest.mark.parametrize("redis_protocols", ["TLSv1.2", "TLSv1.3"])
def test_protocols(tls_redis_factory, nginx, pki, redis_protocols):
    r = tls_redis_factory(extra=["--tls-protocols", redis_protocols])
    redis = "127.0.0.1:{redis_port} tls"
    locations = (loc("/p12", redis, "loyalty_redis_ssl_protocols TLSv1.2;")
                 + loc("/p13", redis, "loyalty_redis_ssl_protocols TLSv1.3;")
                 + loc("/pboth", redis))
    n = nginx(checkout_conf(http=trusted(pki.ca), redis=None,
                            locations=locations), redis_port=r.tls_port,
              workers=1)
    r.seed("c", points=1, lifetime=2, orders=1)
    ok = expected("ok", "c", 1, 2, 1)
    good, bad = ("/p12", "/p13") if redis_protocols == "TLSv1.2" else (
        "/p13", "/p12")
    for _ in range(2):
        assert read(n, "c", good) == ok
        assert read(n, "c", "/pboth") == ok
        assert read(n, "c", bad) == UNAVAILABLE
    wait_log(n, HANDSHAKE_FAILED, "the failed handshake of %s" % bad)


@pytest.mark.timing
def test_handshake_timeout(silent_redis, nginx, pki):
    n = nginx(checkout_conf(http=trusted(pki.ca) +
                            "loyalty_redis_timeout 200ms;",
                            redis="127.0.0.1:{redis_port} tls"),
              redis_port=silent_redis.port)
    r = n.get("/checkout", cookies={"cid": "c1"})
    assert r.status == 200 and r.loyalty == UNAVAILABLE, r
    assert 0.15 <= r.elapsed < 1.5, r.elapsed
    assert silent_redis.accepted >= 1 and silent_redis.received > 0, \
        "no ClientHello was sent"
    hits = wait_log(n, TIMED_OUT, "the handshake timeout in the log")
    assert all("[warn]" in h for h in hits), hits
    follow = [n.get("/checkout", cookies={"cid": "c%d" % i})
              for i in range(3)]
    for f in follow:
        assert f.status == 200 and f.loyalty == UNAVAILABLE
        assert f.elapsed < 1.5, f


@pytest.mark.timing
def test_other_locations_fast_while_handshake_hangs(silent_redis, nginx,
                                                    pki):
    n = nginx(checkout_conf(http=trusted(pki.ca) +
                            "loyalty_redis_timeout 1s;",
                            redis="127.0.0.1:{redis_port} tls"),
              redis_port=silent_redis.port, workers=1)
    done = []
    lock = threading.Lock()

    def checkout(i):
        r = n.get("/checkout", cookies={"cid": "w%d" % i}, timeout=10)
        with lock:
            done.append((time.monotonic(), r))

    t0 = time.monotonic()
    threads = [threading.Thread(target=checkout, args=(i,), daemon=True)
               for i in range(10)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    plain = [n.get("/plain", timeout=2) for _ in range(10)]
    plain_end = time.monotonic()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    for r in plain:
        assert (r.status, r.body) == (200, "plain")
        assert r.elapsed < 0.3, [p.elapsed for p in plain]
    assert len(done) == 10
    assert min(end for end, _ in done) > plain_end, \
        "the /checkout requests were not waiting while /plain was served"
    for end, r in done:
        assert r.status == 200 and r.loyalty == UNAVAILABLE, r
        assert 0.8 <= end - t0 < 3.0, end - t0
    wait_log(n, TIMED_OUT, "the handshake timeout in the log")


# --------------------------------------------------------------------------
# loyalty_redis_ssl_verify off


def test_verify_off(tls_redis_factory, nginx, pki):
    good = tls_redis_factory()
    other = tls_redis_factory(cert="other")
    g = "127.0.0.1:%d tls" % good.tls_port
    locations = (
        loc("/evil", g, trusted(pki.evil_ca) + "loyalty_redis_ssl_verify off;")
        + loc("/store", g, "loyalty_redis_ssl_verify off;")
        + loc("/wrongname", g, trusted(pki.ca) +
              "loyalty_redis_ssl_verify off; "
              "loyalty_redis_ssl_name wrong.test;")
        + loc("/other", "127.0.0.1:%d tls" % other.tls_port,
              trusted(pki.ca) + "loyalty_redis_ssl_verify off;")
        # control: verification on, same Redis
        + loc("/on", g, trusted(pki.evil_ca)))
    conf = checkout_conf(redis=None, locations=locations)
    n = nginx(conf, start=False)
    rc, out = n.test_conf()
    assert rc == 0, out
    assert lines_matching(out, re.compile(
        r"\[warn\] .*\"loyalty_redis_ssl_verify off\"")), out
    n.start()
    started = n.stdout_text() + n.error_log()
    assert lines_matching(started, re.compile(
        r"\[warn\] .*\"loyalty_redis_ssl_verify off\"")), started
    for r in (good, other):
        r.seed("c", points=2, lifetime=3, orders=1)
    ok = expected("ok", "c", 2, 3, 1)
    for _ in range(2):
        for path in ("/evil", "/store", "/wrongname", "/other"):
            assert read(n, "c", path) == ok, path
        assert read(n, "c", "/on") == UNAVAILABLE
    log = n.error_log()
    assert len(lines_matching(log, VERIFY_ERROR)) >= 1      # /on
    assert not lines_matching(log, mismatch("wrong.test")), log
    assert not lines_matching(log, mismatch("127.0.0.1")), log


# --------------------------------------------------------------------------
# inheritance


@pytest.mark.parametrize("level", ["http", "server", "location"])
def test_directives_inherited(tls_redis, nginx, pki, level):
    lines = trusted(pki.ca) + ("loyalty_redis_ssl_name redis.test; "
                               "loyalty_redis_ssl_verify_depth 2; "
                               "loyalty_redis_ssl_protocols TLSv1.2 TLSv1.3;")
    kw = {level if level != "location" else "loc": lines}
    n = nginx(checkout_conf(redis="127.0.0.1:{redis_port} tls", **kw),
              redis_port=tls_redis.tls_port)
    tls_redis.seed("c", points=3, lifetime=3, orders=1)
    for _ in range(2):
        assert read(n, "c") == expected("ok", "c", 3, 3, 1)
        r = n.get("/hcheckout", headers={"X-Customer": "c"})
        assert r.loyalty == expected("ok", "c", 3, 3, 1)


@pytest.mark.parametrize("first", ["good", "evil"])
def test_sibling_override(tls_redis, nginx, pki, first):
    """Two locations name the same address with different trusted CAs:
    each gets its own verification (one connection per TLS settings)."""
    redis = "127.0.0.1:{redis_port} tls"
    locations = (loc("/good", redis)
                 + loc("/evil", redis, trusted(pki.evil_ca)))
    n = nginx(checkout_conf(http=trusted(pki.ca), redis=None,
                            locations=locations),
              redis_port=tls_redis.tls_port, workers=1)
    tls_redis.seed("c", points=4, lifetime=5, orders=1)
    ok = expected("ok", "c", 4, 5, 1)
    order_ = ["/good", "/evil"] if first == "good" else ["/evil", "/good"]
    for _ in range(3):
        for path in order_:
            assert read(n, "c", path) == (ok if path == "/good"
                                          else UNAVAILABLE), path
    wait_log(n, VERIFY_ERROR, "the verify error of /evil")


def test_reload_changes_the_trusted_certificate(tls_redis, nginx, pki):
    conf = checkout_conf(http=trusted(pki.ca),
                         redis="127.0.0.1:{redis_port} tls")
    n = nginx(conf, redis_port=tls_redis.tls_port)
    tls_redis.seed("c", points=1, lifetime=1, orders=1)
    ok = expected("ok", "c", 1, 1, 1)
    assert read(n, "c") == ok
    n.reload(checkout_conf(http=trusted(pki.evil_ca),
                           redis="127.0.0.1:{redis_port} tls"))
    for _ in range(2):
        assert read(n, "c") == UNAVAILABLE
    wait_log(n, VERIFY_ERROR, "the verify error after the reload")
    n.reload(conf)
    wait_until(lambda: read(n, "c") == ok, 5 * SLOW, 0.05,
               "ok again after reloading the right CA")


# --------------------------------------------------------------------------
# reconnects, session reuse, metrics


def test_session_reused_after_the_connection_is_killed(tls_redis, nginx,
                                                      pki):
    r = tls_redis
    n = nginx(checkout_conf(http=trusted(pki.ca),
                            redis="127.0.0.1:{redis_port} tls",
                            locations=METRICS),
              redis_port=r.tls_port, workers=1)
    r.seed("c", points=1, lifetime=2, orders=1)
    ok = expected("ok", "c", 1, 2, 1)
    assert read(n, "c") == ok
    m0 = metrics(n.port)
    assert metric(m0, NEW) >= 1 and metric(m0, REUSED) == 0, m0
    for round_ in range(2):
        killed = r.client.execute_command("CLIENT", "KILL", "TYPE", "normal")
        assert killed >= 1, "the module had no connection to kill"

        def back():
            got = read(n, "c")
            assert got in (ok, UNAVAILABLE), got
            return got == ok
        wait_until(back, 5 * SLOW, 0.05, "ok after CLIENT KILL")
        m = metrics(n.port)
        print("after kill %d: new %d reused %d" % (round_, metric(m, NEW),
                                                   metric(m, REUSED)))
        assert metric(m, REUSED) >= round_ + 1, m
        assert metric(m, NEW) == metric(m0, NEW), \
            "a full handshake where the session could be resumed"


def test_redis_restart_over_tls(tls_redis, nginx, pki):
    r = tls_redis
    n = nginx(checkout_conf(http=trusted(pki.ca),
                            redis="127.0.0.1:{redis_port} tls",
                            locations=METRICS),
              redis_port=r.tls_port, workers=1)
    r.seed("c", points=5, lifetime=5, orders=1)
    assert read(n, "c") == expected("ok", "c", 5, 5, 1)
    new0 = metric(metrics(n.port), NEW)
    r.stop()
    wait_until(lambda: read(n, "c") == UNAVAILABLE, 5 * SLOW, 0.05,
               "unavailable after the Redis stop")
    r.start()
    r.seed("c", points=6, lifetime=6, orders=2)
    want = expected("ok", "c", 6, 6, 2)
    t0 = time.monotonic()

    def back():
        got = read(n, "c")
        assert got in (want, UNAVAILABLE), got
        return got == want
    wait_until(back, 5 * SLOW, 0.02, "ok again over TLS after the restart")
    print("recovered in %.2f s" % (time.monotonic() - t0))
    m = metrics(n.port)
    # a restarted Redis knows no session: a full handshake
    assert metric(m, NEW) >= new0 + 1, m


# --------------------------------------------------------------------------
# nginx -t


def check(nginx, pki, lines, http="", redis="127.0.0.1:{redis_port} tls"):
    """nginx -t of a location /t with `loyalty_redis <redis>;` and lines
    (the other locations use the default address)."""
    return nginx.check_config(checkout_conf(
        http=http, redis=None, locations=loc("/t", redis, lines)),
        redis_port=6379)


def assert_accepted(nginx, pki, lines, redis="127.0.0.1:{redis_port} tls"):
    """The control of a rejection: the same configuration with valid
    lines passes nginx -t."""
    rc, out = check(nginx, pki, lines, redis=redis)
    assert rc == 0, "the valid control configuration failed:\n%s" % out


def assert_rejected(c, directive, line_text=None, also=()):
    """nginx -t fails; a line of its output names the directive (and, when
    line_text is given, the file and line of that text) and every string
    of also."""
    rc, out = c
    assert rc != 0, "nginx -t accepted:\n%s" % out
    named = re.compile(r"\b%s\b" % re.escape(directive))
    hits = [l for l in out.splitlines() if named.search(l)]
    if line_text is not None:
        hits = [l for l in hits if ":%d" % c.line_of(line_text) in l]
    hits = [l for l in hits if all(a in l for a in also)]
    assert hits, ("no line of the nginx -t output names %r%s%s:\n%s" % (
        directive, " at the line of %r" % line_text if line_text else "",
        " and %r" % (also,) if also else "", out))
    return hits


BAD = [
    # id, lines, directive named, text of the offending line
    ("depth-0", "loyalty_redis_ssl_verify_depth 0;",
     "loyalty_redis_ssl_verify_depth", True),
    ("depth-abc", "loyalty_redis_ssl_verify_depth abc;",
     "loyalty_redis_ssl_verify_depth", True),
    ("depth-negative", "loyalty_redis_ssl_verify_depth -1;",
     "loyalty_redis_ssl_verify_depth", True),
    ("protocols-tlsv9", "loyalty_redis_ssl_protocols TLSv9;",
     "loyalty_redis_ssl_protocols", True),
    ("verify-maybe", "loyalty_redis_ssl_verify maybe;",
     "loyalty_redis_ssl_verify", True),
    ("server-name-maybe", "loyalty_redis_ssl_server_name maybe;",
     "loyalty_redis_ssl_server_name", True),
    ("name-no-args", "loyalty_redis_ssl_name;", "loyalty_redis_ssl_name",
     True),
]


@pytest.mark.parametrize("lines,directive,at_line", [c[1:] for c in BAD],
                         ids=[c[0] for c in BAD])
def test_rejects_bad_arguments(nginx, pki, lines, directive, at_line):
    assert_accepted(nginx, pki, trusted(pki.ca))
    assert_rejected(check(nginx, pki, trusted(pki.ca) + lines), directive,
                    lines if at_line else None)


def test_rejects_missing_trusted_certificate(nginx, pki, tmp_path):
    missing = str(tmp_path / "no-such-ca.crt")
    assert_accepted(nginx, pki, trusted(pki.ca))
    assert_rejected(check(nginx, pki, trusted(missing)),
                    "loyalty_redis_ssl_trusted_certificate", also=[missing])


def test_rejects_missing_certificate(nginx, pki, tmp_path):
    missing = str(tmp_path / "no-such-client.crt")
    cert = (trusted(pki.ca) + "loyalty_redis_ssl_certificate %s; "
            "loyalty_redis_ssl_certificate_key %s;")
    assert_accepted(nginx, pki, cert % (pki.path("client.crt"),
                                        pki.path("client.key")))
    lines = cert % (missing, pki.path("client.key"))
    assert_rejected(check(nginx, pki, lines),
                    "loyalty_redis_ssl_certificate", also=[missing])


def test_rejects_missing_certificate_key(nginx, pki, tmp_path):
    missing = str(tmp_path / "no-such-client.key")
    lines = (trusted(pki.ca) + "loyalty_redis_ssl_certificate %s; "
             "loyalty_redis_ssl_certificate_key %s;"
             % (pki.path("client.crt"), missing))
    assert_rejected(check(nginx, pki, lines),
                    "loyalty_redis_ssl_certificate_key", also=[missing])


def test_rejects_certificate_without_key(nginx, pki):
    assert_accepted(nginx, pki, trusted(pki.ca) + (
        "loyalty_redis_ssl_certificate %s; "
        "loyalty_redis_ssl_certificate_key %s;" % (
            pki.path("client.crt"), pki.path("client.key"))))
    lines = (trusted(pki.ca) + "loyalty_redis_ssl_certificate %s;"
             % pki.path("client.crt"))
    assert_rejected(check(nginx, pki, lines),
                    "loyalty_redis_ssl_certificate_key")


def test_rejects_tls_with_unix_socket(nginx, pki):
    assert_accepted(nginx, pki, trusted(pki.ca))
    assert_accepted(nginx, pki, "", redis="unix:/tmp/loyalty-it-redis.sock")
    c = check(nginx, pki, trusted(pki.ca),
              redis="unix:/tmp/loyalty-it-redis.sock tls")
    hits = assert_rejected(c, "loyalty_redis", "loyalty_redis unix:")
    assert any(re.search(r"\btls\b", h) for h in hits), hits


GOOD = [
    ("every-directive", "", trusted("{ca}") + """
        loyalty_redis_ssl_verify on;
        loyalty_redis_ssl_verify_depth 3;
        loyalty_redis_ssl_name redis.test;
        loyalty_redis_ssl_server_name off;
        loyalty_redis_ssl_certificate {crt};
        loyalty_redis_ssl_certificate_key {key};
        loyalty_redis_ssl_protocols TLSv1.2 TLSv1.3;"""),
    ("one-protocol", "", "loyalty_redis_ssl_protocols TLSv1.3;"),
    ("tls-password-user", "127.0.0.1:6380 tls user=u password=p db=1",
     trusted("{ca}")),
    ("tls-cluster", "127.0.0.1:7000 127.0.0.1:7001 127.0.0.1:7002 "
     "cluster tls", trusted("{ca}")),
    ("tls-localhost", "localhost:6380 tls", trusted("{ca}")),
    ("ssl-directives-without-tls", "127.0.0.1:6380", trusted("{ca}") +
     "loyalty_redis_ssl_name redis.test;"),
]


@pytest.mark.parametrize("level", ["http", "server", "location"])
@pytest.mark.parametrize("redis,lines", [c[1:] for c in GOOD],
                         ids=[c[0] for c in GOOD])
def test_accepts_valid_configurations(nginx, pki, level, redis, lines):
    lines = (lines.replace("{ca}", pki.ca)
             .replace("{crt}", pki.path("client.crt"))
             .replace("{key}", pki.path("client.key")))
    kw = {level if level != "location" else "loc": lines}
    rc, out = nginx.check_config(checkout_conf(
        redis=redis or "127.0.0.1:6380 tls", **kw))
    assert rc == 0, out


# --------------------------------------------------------------------------
# a Redis Cluster over TLS


def test_cluster_over_tls(tmp_root, pki, nginx):
    c = start_tls_cluster(tmp_root, pki)
    try:
        # the nodes answer a TLS client with their TLS ports
        plain = c.master_ports()
        tls_ports = sorted(c.tls_port_of(p) for p in plain)
        import redis as redis_lib
        t = redis_lib.Redis(host="127.0.0.1", port=tls_ports[0], ssl=True,
                            ssl_ca_certs=pki.ca, ssl_cert_reqs="required",
                            socket_timeout=5)
        try:
            slots = t.execute_command("CLUSTER", "SLOTS")
        finally:
            t.close()
        if isinstance(slots, dict):         # redis-py's parsed form
            announced = sorted({v["primary"][1] for v in slots.values()})
        else:
            announced = sorted({int(e[2][1]) for e in slots})
        assert announced == tls_ports, (announced, tls_ports, plain)

        n = nginx(cluster_edge_conf(c.tls_seeds(), "cluster tls",
                                    http=trusted(pki.ca),
                                    locations=METRICS), workers=1)
        cids = c.customers_covering_every_master(2, tag="tls")
        for i, cid in enumerate(cids):
            c.seed(cid, points=10 + i, lifetime=20 + i, orders=1)
        for _ in range(2):
            for i, cid in enumerate(cids):
                r = order(n, cid)
                assert r.status == 200, r
                assert (r.header("X-Loyalty-Status"),
                        r.header("X-Loyalty-Points")) == (
                    "ok", str(10 + i)), (cid, c.owner_of(cid), r)
        # a credit on every master
        for i, cid in enumerate(cids[::2]):
            assert order(n, cid, "3", "tls-cl-%d" % i).header(
                "X-Loyalty-Earned") == "3"
            assert wait_marker(c.client(c.owner_of(cid)), cid,
                               "tls-cl-%d" % i) == "3:0"
        m = metrics(n.port)
        assert metric(m, NEW) + metric(m, REUSED) >= 3, m
        log = n.error_log()
        assert not VERIFY_ERROR.search(log) and HANDSHAKE_FAILED not in log
    finally:
        c.stop()


def test_replay_over_tls(tls_redis, tmp_root, pki):
    """tools/loyalty-replay speaks TLS to a line marked "tls", verified
    against --tls-ca: an untrusted certificate fails the line and loses
    nothing, the trusted one applies it once."""
    r = tls_redis
    entry = {"ts": int(time.time()), "redis": "127.0.0.1:%d" % r.tls_port,
             "tls": True, "db": 0, "prefix": "loyalty:", "customer": "t1",
             "order": "o1", "amount": "9", "earned": 9, "redeem": 0,
             "ledger": 100, "expire": 0, "reason": "retries exhausted"}
    path = os.path.join(tmp_root, "tls.journal")
    with open(path, "w") as f:
        f.write(json.dumps(entry, separators=(",", ":")) + "\n")
    rc, applied, already, failed, out = replay(path)
    assert (rc, applied, already, failed) == (1, 0, 0, 1), out
    assert "certificate verify failed" in out, out
    assert record(r.client, "t1") == {}
    rc, applied, already, failed, out = replay(
        path, extra=["--tls-ca", pki.ca])
    assert (rc, applied, already, failed) == (0, 1, 0, 0), out
    assert record(r.client, "t1")["points"] == 9
    rc, applied, already, failed, out = replay(
        path, extra=["--tls-ca", pki.ca])
    assert (rc, applied, already, failed) == (0, 0, 1, 0), out
