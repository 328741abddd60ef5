"""TLS to Redis for test_tls.py: certificates made at test time with the
openssl CLI, a redis-server that also listens with TLS, and a Redis Cluster
whose clients, replication and bus all speak TLS.

Pki(dir).make() writes (EC P-256 keys, SHA-256, 30 days):

    ca.crt / ca.key            root CA ("Loyalty Test Root CA")
    int.crt / int.key          intermediate CA, signed by the root
    int2.crt / int2.key        a second intermediate, signed by int
    server.crt / server.key    signed by int: DNS:redis.test,
                               DNS:localhost, IP:127.0.0.1, serverAuth
    server-chain.crt           server.crt + int.crt
    other.crt / other.key      signed by int: DNS:other.test only
    other-chain.crt            other.crt + int.crt
    deep.crt / deep.key        signed by int2, same names as server
    deep-chain.crt             deep.crt + int2.crt + int.crt (the chain is
                               leaf, int2, int, root: two intermediates)
    leaf-chain.crt / leaf.key  server.crt alone, without the intermediate
    ca-bundle.crt              ca.crt + int.crt
    client.crt / client.key    signed by the root, clientAuth
    evil-ca.crt / evil-ca.key  an unrelated CA
    evil-client.crt / .key     a client certificate signed by evil-ca

Both CAs have basicConstraints=critical,CA:TRUE and
keyUsage=critical,keyCertSign,cRLSign; every certificate has subject and
authority key identifiers (Python 3.13 verifies with VERIFY_X509_STRICT).
Directories are 0755 and files 0644 (keys included: nginx reads them in the
master at configuration time, the workers run as nobody).

TLSRedisServer is conftest.RedisServer plus `--tls-port`: the plain port
stays for the test's own client (seed(), CLIENT KILL, INFO), `tls_port` is
what the module is pointed at.
"""

import os
import secrets
import socket
import ssl
import subprocess
import tempfile

import pytest

from conftest import RedisServer, free_port


OPENSSL = os.environ.get("OPENSSL_BIN", "/usr/bin/openssl")

_CNF = """\
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
subjectAltName = DNS:redis.test,DNS:localhost,IP:127.0.0.1,IP:::1

[v3_other]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
subjectAltName = DNS:other.test

[v3_client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
subjectAltName = DNS:nginx.test
"""


class Pki:
    def __init__(self, root):
        self.dir = root
        self.cnf = os.path.join(root, "openssl.cnf")

    def path(self, name):
        return os.path.join(self.dir, name)

    # names the tests use
    @property
    def ca(self):
        return self.path("ca.crt")

    @property
    def evil_ca(self):
        return self.path("evil-ca.crt")

    def _run(self, *args):
        p = subprocess.run([OPENSSL] + list(args), cwd=self.dir,
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=60)
        out = p.stdout.decode("utf-8", "replace")
        assert p.returncode == 0, "openssl %s failed (%d):\n%s" % (
            " ".join(args), p.returncode, out)
        return out

    def _key(self, name):
        self._run("genpkey", "-algorithm", "EC",
                  "-pkeyopt", "ec_paramgen_curve:P-256",
                  "-out", name + ".key")

    def _self_signed(self, name, cn):
        self._key(name)
        self._run("req", "-new", "-x509", "-config", self.cnf,
                  "-extensions", "v3_ca", "-key", name + ".key",
                  "-subj", "/CN=%s" % cn, "-days", "30", "-sha256",
                  "-set_serial", "0x" + secrets.token_hex(8),
                  "-out", name + ".crt")

    def _signed(self, name, cn, issuer, ext):
        self._key(name)
        self._run("req", "-new", "-config", self.cnf, "-key", name + ".key",
                  "-subj", "/CN=%s" % cn, "-out", name + ".csr")
        self._run("x509", "-req", "-in", name + ".csr",
                  "-CA", issuer + ".crt", "-CAkey", issuer + ".key",
                  "-set_serial", "0x" + secrets.token_hex(8),
                  "-days", "30", "-sha256",
                  "-extfile", self.cnf, "-extensions", ext,
                  "-out", name + ".crt")
        os.unlink(self.path(name + ".csr"))

    def _cat(self, out, *names):
        with open(self.path(out), "w") as f:
            for n in names:
                with open(self.path(n)) as g:
                    f.write(g.read())

    def make(self):
        with open(self.cnf, "w") as f:
            f.write(_CNF)
        self._self_signed("ca", "Loyalty Test Root CA")
        self._signed("int", "Loyalty Test Intermediate CA", "ca", "v3_ca")
        self._signed("int2", "Loyalty Test Intermediate CA 2", "int",
                     "v3_ca")
        self._signed("server", "redis.test", "int", "v3_server")
        self._signed("other", "other.test", "int", "v3_other")
        self._signed("deep", "redis.test", "int2", "v3_server")
        self._signed("client", "nginx.test", "ca", "v3_client")
        self._self_signed("evil-ca", "Unrelated Test CA")
        self._signed("evil-client", "nginx.test", "evil-ca", "v3_client")
        self._cat("server-chain.crt", "server.crt", "int.crt")
        self._cat("other-chain.crt", "other.crt", "int.crt")
        self._cat("deep-chain.crt", "deep.crt", "int2.crt", "int.crt")
        self._cat("int-bundle.crt", "int2.crt", "int.crt")
        # the leaf alone, without its intermediate
        self._cat("leaf-chain.crt", "server.crt")
        self._cat("leaf.key", "server.key")
        # a trust file with the root and the intermediate
        self._cat("ca-bundle.crt", "ca.crt", "int.crt")
        for name in os.listdir(self.dir):
            if name.endswith(".srl"):
                os.unlink(self.path(name))
            else:
                os.chmod(self.path(name), 0o644)
        os.chmod(self.dir, 0o755)
        return self

    def verify(self, cert, ca=None, untrusted=None, depth=None, purpose=None,
               name=None, ip=None):
        """`openssl verify`: (ok, output)."""
        args = [OPENSSL, "verify", "-CAfile", ca or self.ca]
        if untrusted:
            args += ["-untrusted", untrusted]
        if depth is not None:
            args += ["-verify_depth", str(depth)]
        if purpose:
            args += ["-purpose", purpose]
        if name:
            args += ["-verify_hostname", name]
        if ip:
            args += ["-verify_ip", ip]
        p = subprocess.run(args + [cert], cwd=self.dir,
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=30)
        return p.returncode == 0, p.stdout.decode("utf-8", "replace")


@pytest.fixture(scope="session")
def pki(tmp_root):
    d = tempfile.mkdtemp(prefix="pki-", dir=tmp_root)
    os.chmod(d, 0o755)
    return Pki(d).make()


# --------------------------------------------------------------------------
# a TLS Redis


class TLSRedisServer(RedisServer):
    """redis-server with its plain port (the test's client) and a TLS port
    (the module's).  cert: "server" (the default chain), "other" (only
    DNS:other.test) or "deep" (two intermediates); auth_clients: Redis
    requires a client certificate signed by the root CA."""

    what = "redis-server (TLS)"

    def __init__(self, tmp_root, pki, cert="server", auth_clients=False,
                 password=None, extra=()):
        super().__init__(tmp_root, password=password)
        self.pki = pki
        self.cert = cert
        self.auth_clients = auth_clients
        self.extra = list(extra)
        self.tls_port = free_port()

    def listen_args(self):
        return super().listen_args() + [
            "--tls-port", str(self.tls_port),
            "--tls-cert-file", self.pki.path("%s-chain.crt" % self.cert),
            "--tls-key-file", self.pki.path("%s.key" % self.cert),
            "--tls-ca-cert-file", self.pki.ca,
            "--tls-auth-clients", "yes" if self.auth_clients else "no"
        ] + self.extra


@pytest.fixture
def tls_redis_factory(tmp_root, pki):
    """tls_redis_factory(cert="server", auth_clients=False, password=None,
    extra=(), start=True) -> TLSRedisServer; extra: more redis-server
    arguments, such as ["--tls-protocols", "TLSv1.3"]"""
    servers = []

    def make(cert="server", auth_clients=False, password=None, extra=(),
             start=True):
        r = TLSRedisServer(tmp_root, pki, cert=cert,
                           auth_clients=auth_clients, password=password,
                           extra=extra)
        servers.append(r)
        if start:
            r.start()
        return r

    yield make
    for r in servers:
        r.stop()


@pytest.fixture
def tls_redis(tls_redis_factory):
    return tls_redis_factory()


def tls_ping(port, ca, server_hostname=None, certfile=None, keyfile=None,
             strict=True, timeout=5):
    """PING over TLS with Python's ssl (strict X.509 checks as Python 3.13
    makes by default): returns (reply bytes, negotiated protocol)."""
    ctx = ssl.create_default_context(cafile=ca)
    if strict and hasattr(ssl, "VERIFY_X509_STRICT"):
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if certfile:
        ctx.load_cert_chain(certfile, keyfile)
    if server_hostname is None:
        ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        with ctx.wrap_socket(s, server_hostname=server_hostname) as t:
            t.sendall(b"PING\r\n")
            data = b""
            while not data.endswith(b"\r\n"):
                chunk = t.recv(1024)
                if not chunk:
                    break
                data += chunk
            return data, t.version()


# --------------------------------------------------------------------------
# a Redis Cluster over TLS


def tls_cluster_classes():
    """(TLSClusterNode, TLSCluster): cluster_support's classes with TLS for
    clients, replication and the cluster bus.  Every node keeps its plain
    port for the test's clients (cluster_support's views and seed() use
    it: a plain client is answered with plain ports); a TLS client of
    CLUSTER SLOTS is answered with the TLS ports.  The bus port is given
    explicitly (plain port + 10000, as cluster_support reserves it)."""
    import cluster_support as cs

    class TLSClusterNode(cs.ClusterNode):
        def __init__(self, cluster, port):
            super().__init__(cluster, port)
            self.tls_port = cs.cluster_port()

        def args(self):
            pki = self.cluster.pki
            return super().args() + [
                "--cluster-port", str(self.port + 10000),
                "--tls-port", str(self.tls_port),
                "--tls-cert-file", pki.path("server-chain.crt"),
                "--tls-key-file", pki.path("server.key"),
                "--tls-ca-cert-file", pki.ca,
                "--tls-auth-clients", "no",
                # the cluster bus always asks for a client certificate,
                # and the server's is for serverAuth only
                "--tls-client-cert-file", pki.path("client.crt"),
                "--tls-client-key-file", pki.path("client.key"),
                "--tls-replication", "yes",
                "--tls-cluster", "yes"]

    class TLSCluster(cs.Cluster):
        def __init__(self, tmp_root, pki, **kw):
            super().__init__(tmp_root, **kw)
            self.pki = pki

        def start(self):
            n = self.n_masters * (1 + self.n_replicas)
            ports = [cs.cluster_port() for _ in range(n)]
            self.nodes = [TLSClusterNode(self, p) for p in ports]
            for node in self.nodes:
                node.start()
            args = [cs.REDIS_CLI, "--cluster", "create"]
            args += ["127.0.0.1:%d" % p for p in ports]
            args += ["--cluster-replicas", str(self.n_replicas),
                     "--cluster-yes"]
            p = subprocess.run(args, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, timeout=60)
            out = p.stdout.decode("utf-8", "replace")
            assert p.returncode == 0 and "All 16384 slots covered" in out, \
                "redis-cli --cluster create failed (%d):\n%s" % (
                    p.returncode, out)
            self.create_output = out
            self.wait_consistent(30, replicas=self.n_replicas)
            return self

        def tls_port_of(self, port):
            return self.node(port).tls_port

        def tls_seeds(self):
            return " ".join("127.0.0.1:%d" % self.tls_port_of(p)
                            for p in self.master_ports())

    return TLSClusterNode, TLSCluster


def start_tls_cluster(tmp_root, pki, **kw):
    _, TLSCluster = tls_cluster_classes()
    for attempt in range(2):
        c = TLSCluster(tmp_root, pki, **kw)
        try:
            return c.start()
        except Exception:
            c.stop()
            if attempt:
                raise


# --------------------------------------------------------------------------
# a TLS front of a plain Redis that records the SNI of every ClientHello


class SniProxy:
    """Listens on a free 127.0.0.1 port with TLS (the server chain), notes
    the server name of each ClientHello, and relays the decrypted stream
    to a Redis' plain port.  handshakes: completed TLS handshakes;
    names: the server names received (a ClientHello without SNI adds
    nothing)."""

    def __init__(self, pki, backend_port):
        import threading
        from conftest import listener
        self.backend_port = backend_port
        self.port, self._lsock = listener()
        self.handshakes = 0
        self.names = []
        self.errors = []
        self._threads = []
        self._stop = threading.Event()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki.path("server-chain.crt"),
                            pki.path("server.key"))

        def sni(sslobj, name, c):
            if name is not None:
                self.names.append(name)
            return None
        ctx.sni_callback = sni
        self._ctx = ctx
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        import selectors
        import threading
        sel = selectors.DefaultSelector()
        sel.register(self._lsock, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                for _ in sel.select(0.05):
                    try:
                        c, _ = self._lsock.accept()
                    except OSError:
                        continue
                    t = threading.Thread(target=self._serve, args=(c,),
                                         daemon=True)
                    self._threads.append(t)
                    t.start()
        finally:
            sel.close()

    def _serve(self, conn):
        import select
        conn.setblocking(True)
        conn.settimeout(5)
        try:
            tls = self._ctx.wrap_socket(conn, server_side=True)
        except (OSError, ssl.SSLError) as e:
            self.errors.append("handshake: %r" % e)
            conn.close()
            return
        self.handshakes += 1
        try:
            backend = socket.create_connection(("127.0.0.1",
                                                self.backend_port), 5)
        except OSError:
            tls.close()
            return
        tls.setblocking(False)
        backend.setblocking(False)

        def to_tls(data):
            while data:
                try:
                    n = tls.send(data)
                    data = data[n:]
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    select.select([], [tls], [], 0.05)

        try:
            while not self._stop.is_set():
                if not tls.pending():
                    r, _, _ = select.select([tls, backend], [], [], 0.05)
                else:
                    r = [tls]
                if tls in r:
                    try:
                        data = tls.recv(65536)
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        data = None
                    if data == b"":
                        break
                    if data:
                        backend.setblocking(True)
                        backend.sendall(data)
                        backend.setblocking(False)
                if backend in r:
                    try:
                        data = backend.recv(65536)
                    except BlockingIOError:
                        data = None
                    if data == b"":
                        break
                    if data:
                        to_tls(data)
        except (OSError, ssl.SSLError):
            pass
        finally:
            tls.close()
            backend.close()

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        self._lsock.close()
        for t in self._threads:
            t.join(5)
        assert not self._thread.is_alive()
        assert not any(t.is_alive() for t in self._threads)
