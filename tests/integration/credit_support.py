"""Helpers for the credit (write) path tests, test_credit.py.

A stand-in shop answers every order with the order total, the order id and
the points redeemed in response headers, taken from the query string:

    /buy?total=19.99&oid=o1&redeem=5  ->  200, X-Order-Total: 19.99,
                                            X-Order-Id: o1,
                                            X-Loyalty-Redeem: 5

(an empty or missing argument gives no header), and /st<code>/ answers with
that status and the same headers.  The edge in front of it credits with

    loyalty_earn      $upstream_http_x_order_total;
    loyalty_order_id  $upstream_http_x_order_id;
    loyalty_redeem    $upstream_http_x_loyalty_redeem;
"""

import json
import os
import re
import selectors
import subprocess
import threading
import time
import urllib.parse

from conftest import SLOW, http_request, listener, wait_until


HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
REPLAY = os.path.join(REPO, "tools", "loyalty-replay")
PYTHON = "/usr/bin/python3"

MARKER_TTL = 30 * 86400
WEIRD_ORDER_ID = 'w"\\{1}:x/y?z=1&%'      # as the shop's /weird/ sends it


SHOP = """
server {
    listen 127.0.0.1:{shop_port};
    default_type text/plain;

    location / {
        add_header X-Order-Total $arg_total always;
        add_header X-Order-Id $arg_oid always;
        add_header X-Loyalty-Redeem $arg_redeem always;
        return 200 "ordered\\n";
    }
    location /st201/ {
        add_header X-Order-Total $arg_total always;
        add_header X-Order-Id $arg_oid always;
        add_header X-Loyalty-Redeem $arg_redeem always;
        return 201 "created\\n";
    }
    location /st204/ {
        add_header X-Order-Total $arg_total always;
        add_header X-Order-Id $arg_oid always;
        add_header X-Loyalty-Redeem $arg_redeem always;
        return 204;
    }
    location /st302/ {
        add_header X-Order-Total $arg_total always;
        add_header X-Order-Id $arg_oid always;
        add_header X-Loyalty-Redeem $arg_redeem always;
        return 302 /elsewhere;
    }
    location /st404/ {
        add_header X-Order-Total $arg_total always;
        add_header X-Order-Id $arg_oid always;
        add_header X-Loyalty-Redeem $arg_redeem always;
        return 404;
    }
    location /st500/ {
        add_header X-Order-Total $arg_total always;
        add_header X-Order-Id $arg_oid always;
        add_header X-Loyalty-Redeem $arg_redeem always;
        return 500;
    }
    location /st503/ {
        add_header X-Order-Total $arg_total always;
        add_header X-Order-Id $arg_oid always;
        add_header X-Loyalty-Redeem $arg_redeem always;
        return 503;
    }
    # an order id with characters JSON and Redis keys must carry as is
    location /weird/ {
        add_header X-Order-Total $arg_total always;
        add_header X-Order-Id 'w"\\\\{1}:x/y?z=1&%' always;
        return 200 "ordered\n";
    }
    # an internal redirect decided by the shop: the order is confirmed by
    # the location it redirects to
    location /accel/ {
        add_header X-Accel-Redirect /inner/buy?$args always;
        return 200 "redirecting\\n";
    }
    # a page with an SSI include of an order location of the edge: the
    # edge runs it as a subrequest
    location /ssi/ {
        default_type text/html;
        add_header X-Order-Total $arg_total always;
        add_header X-Order-Id $arg_oid always;
        return 200 'page <!--# include virtual="/buy?total=7&oid=$arg_oid-sub" --> end';
    }
}
"""

EDGE = """
@HTTP@
server {
    listen 127.0.0.1:{port};
    location = /__harness_ready { return 204; }

    loyalty_redis 127.0.0.1:{redis_port};
    loyalty_redis_timeout @TIMEOUT@ms;
    loyalty_customer $http_x_customer;
    loyalty_earn $upstream_http_x_order_total;
    loyalty_order_id $upstream_http_x_order_id;
    loyalty_redeem $upstream_http_x_loyalty_redeem;
    loyalty_response_headers on;
    @SERVER@

    location / {
        loyalty on;
        @LOC@
        proxy_pass http://127.0.0.1:{shop_port};
    }
    @LOCATIONS@
}
""" + SHOP


TIERS = """
    loyalty_tier silver 100;
    loyalty_tier gold 1000 multiplier=1.5;
    loyalty_tier platinum 10000 multiplier=2;
"""


def edge_conf(loc="", server="", http="", locations=""):
    # 500 ms, stretched as the harness' own bounds are under valgrind
    return (EDGE.replace("@HTTP@", http).replace("@SERVER@", server)
            .replace("@LOC@", loc).replace("@LOCATIONS@", locations)
            .replace("@TIMEOUT@", str(500 * SLOW)))


def order_path(path="/buy", total=None, oid=None, redeem=None, **extra):
    args = [(k, v) for k, v in (("total", total), ("oid", oid),
                                ("redeem", redeem)) if v is not None]
    args += list(extra.items())
    return path + ("?" + urllib.parse.urlencode(args, safe=".-,")
                   if args else "")


def order(n, cid, total=None, oid=None, redeem=None, path="/buy",
          timeout=None, **extra):
    # timeout None: the harness' 5 s, stretched by SLOW under valgrind
    headers = {"X-Customer": cid} if cid is not None else {}
    return http_request(n.port, order_path(path, total, oid, redeem, **extra),
                        headers=headers, timeout=timeout)


class HeldShop:
    """A shop that holds every order it receives until release(), then
    answers them all at once, as the stand-in shop does (200 with
    X-Order-Total and X-Order-Id from the query string), and closes the
    connection.  After release() it answers at once."""

    def __init__(self):
        self.port, self._lsock = listener(1024)
        self.held = 0
        self.answered = 0
        self._waiting = []
        self._release = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def release(self):
        self._release.set()

    def _answer(self, c, head):
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        query = urllib.parse.urlsplit(line.split(" ")[1]).query
        args = dict(urllib.parse.parse_qsl(query))
        c.setblocking(True)
        try:
            c.sendall(("HTTP/1.1 200 OK\r\nContent-Length: 8\r\n"
                       "Connection: close\r\nX-Order-Total: %s\r\n"
                       "X-Order-Id: %s\r\n\r\nordered\n"
                       % (args.get("total", ""), args.get("oid", "")))
                      .encode())
            self.answered += 1
        except OSError:
            pass                        # nginx closed the connection
        c.close()

    def _run(self):
        sel = selectors.DefaultSelector()
        sel.register(self._lsock, selectors.EVENT_READ)
        heads = {}
        try:
            while not self._stop.is_set():
                if self._release.is_set():
                    for c, head in self._waiting:
                        self._answer(c, head)
                    self._waiting = []
                for key, _ in sel.select(0.02):
                    if key.fileobj is self._lsock:
                        try:
                            c, _ = self._lsock.accept()
                        except OSError:
                            continue
                        c.setblocking(False)
                        heads[c] = b""
                        sel.register(c, selectors.EVENT_READ)
                        continue
                    c = key.fileobj
                    try:
                        data = c.recv(65536)
                    except OSError:
                        data = b""
                    heads[c] += data
                    if data and b"\r\n\r\n" not in heads[c]:
                        continue
                    sel.unregister(c)
                    head = heads.pop(c)
                    if not data:
                        c.close()
                    elif self._release.is_set():
                        self._answer(c, head)
                    else:
                        self._waiting.append((c, head))
                        self.held += 1
        finally:
            for c, _ in self._waiting:
                c.close()
            for c in heads:
                c.close()
            sel.close()

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        self._lsock.close()
        assert not self._thread.is_alive()


# --------------------------------------------------------------------------
# Redis views


def hkey(cid, prefix="loyalty:"):
    return "%s{%s}" % (prefix, cid)


def marker(cid, oid, prefix="loyalty:"):
    return "%s:order:%s" % (hkey(cid, prefix), oid)


def ledger(cid, prefix="loyalty:"):
    return "%s:ledger" % hkey(cid, prefix)


def record(client, cid, prefix="loyalty:"):
    """The customer hash with int values ({} when absent)."""
    return {k: int(v) for k, v in client.hgetall(hkey(cid, prefix)).items()}


def did(value, amount=None):
    """"<earned>:<redeemed>" of an order's marker (None for none), having
    checked that the rest is what a credit writes: the amount (the given
    one, if any), nothing refunded, and a release time."""
    if value is None:
        return None
    f = value.split(":")
    assert len(f) == 7 and f[3:6] == ["0", "0", "0"] and f[6].isdigit() \
        and re.fullmatch(r"(\d+(\.\d*)?)?", f[2]), value
    assert amount is None or f[2] == amount, (value, amount)
    return "%s:%s" % (f[0], f[1])


def wait_marker(client, cid, oid, prefix="loyalty:", timeout=10):
    """What the order did, once credited: see did()"""
    return did(wait_until(lambda: client.get(marker(cid, oid, prefix)),
                          timeout, 0.01,
                          "the credit of order %s of %s" % (oid, cid)))


def ledger_entries(client, cid, prefix="loyalty:"):
    return [fields for _, fields in client.xrange(ledger(cid, prefix))]


# --------------------------------------------------------------------------
# journal and replay


def read_journal(path):
    """[dict] of the JSON lines of a journal (the file may not exist)."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return []
    assert text == "" or text.endswith("\n"), "journal ends mid-line: %r" % (
        text[-200:])
    return [json.loads(line) for line in text.splitlines() if line.strip()]


UNAPPLIED = re.compile(r"^\S+ \S+ \[error\] .*loyalty: unapplied credit: "
                       r"(\{.*\})(, client: .*)?$")


def error_log_credits(text):
    """[dict] of the `loyalty: unapplied credit: {json}` error log lines."""
    out = []
    for line in text.splitlines():
        if "unapplied credit" in line:
            m = UNAPPLIED.match(line)
            assert m, "unapplied credit line not at [error] or not JSON: %r" \
                % line
            out.append(json.loads(m.group(1)))
    return out


REPLAY_OUT = re.compile(r"^(\d+) applied, (\d+) already applied, "
                        r"(\d+) failed$", re.M)


def replay(*journals, redis_addr=None, extra=()):
    """Run tools/loyalty-replay; (rc, applied, already, failed, output)."""
    args = [PYTHON, REPLAY]
    if redis_addr:
        args += ["--redis", redis_addr]
    args += list(extra) + list(journals)
    p = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60)
    out = p.stdout.decode() + p.stderr.decode()
    m = REPLAY_OUT.search(p.stdout.decode())
    assert m, "loyalty-replay printed no summary (rc %d):\n%s" % (
        p.returncode, out)
    return (p.returncode, int(m.group(1)), int(m.group(2)), int(m.group(3)),
            out)


def stop_redis_keeping_data(redis):
    """Stop redis-server (SIGTERM) so that a restart on the same port finds
    the data again: the harness runs it with `--save ""`, so a save point
    is configured first and Redis writes its RDB file on shutdown."""
    redis.client.config_set("save", "3600 1")
    redis.stop()
    assert os.path.exists(os.path.join(redis.dir, "dump.rdb")), \
        "redis-server wrote no dump.rdb on shutdown"


def settle(probe, quiet=3.0, timeout=40.0, interval=0.1):
    """Poll probe() until its value has not changed for `quiet` seconds
    (longer than the module's 1 s retry interval and its at most 2 s
    reconnect back-off); bounded by timeout.  Returns the last value."""
    deadline = time.monotonic() + timeout
    last = probe()
    since = time.monotonic()
    while True:
        time.sleep(interval)
        now = time.monotonic()
        cur = probe()
        if cur != last:
            last, since = cur, now
        elif now - since >= quiet:
            return cur
        if now >= deadline:
            raise AssertionError("still changing after %.0f s: %r"
                                 % (timeout, cur))


# --------------------------------------------------------------------------
# streams of orders (test_credit.py, test_cluster.py)


def amount_of(i):
    """Order i's total: earns i % 997 points at rate 1."""
    return "%d.%02d" % (i % 997, (i * 7) % 100)


def expected_balances(orders):
    """{cid: (sum earned, count)} for [(cid, oid, total)] at rate 1."""
    out = {}
    for cid, _, total in orders:
        pts, cnt = out.get(cid, (0, 0))
        out[cid] = (pts + int(total.split(".")[0]), cnt + 1)
    return out


def check_exact(client, orders, prefix="loyalty:"):
    """Every customer's record and ledger are exactly its orders: each
    credited once, none missing."""
    want = expected_balances(orders)
    by_cid = {}
    for cid, oid, total in orders:
        by_cid.setdefault(cid, []).append((oid, total))
    for cid, (pts, cnt) in sorted(want.items()):
        rec = record(client, cid, prefix)
        assert (rec.get("points"), rec.get("lifetime"), rec.get("orders")) \
            == (pts, pts, cnt), (cid, rec, pts, cnt)
        entries = ledger_entries(client, cid, prefix)
        got = sorted((e["order"], e["amount"]) for e in entries)
        if cnt <= 100:                          # loyalty_ledger 100
            assert got == sorted(by_cid[cid]), (cid, "ledger differs")
        else:
            assert len(got) >= 100 and len(set(got)) == len(got) and \
                set(got) <= set(by_cid[cid]), (cid, "ledger differs")
        pipe = client.pipeline()
        for oid, _ in by_cid[cid]:
            pipe.get(marker(cid, oid, prefix))
        assert [did(m, total) for m, (_, total)
                in zip(pipe.execute(), by_cid[cid])] == \
            ["%d:0" % int(total.split(".")[0])
             for _, total in by_cid[cid]], cid


JOURNAL = "loyalty_journal {prefix}/loyalty.journal;"


def journal_path(n):
    return n.prefix + "/loyalty.journal"


def stream_orders(n, orders, progress, results, threads=1, pause=0.005,
                  stop=None):
    """Place the orders from `threads` threads (thread k takes every
    threads-th order, in order); progress[0] counts the answered ones.
    Once the `stop` event is set, no further order is placed (its result
    stays None)."""
    lock = threading.Lock()

    def run(k):
        for i in range(k, len(orders), threads):
            if stop is not None and stop.is_set():
                return
            cid, oid, total = orders[i]
            try:
                results[i] = order(n, cid, total, oid, timeout=10).status
            except Exception as e:              # noqa: BLE001
                results[i] = repr(e)
            with lock:
                progress[0] += 1
            time.sleep(pause)
    ts = [threading.Thread(target=run, args=(k,), daemon=True)
          for k in range(threads)]
    for t in ts:
        t.start()
    return ts


def applied_and_journaled(client, journal, customers):
    pipe = client.pipeline()
    for c in customers:
        pipe.hget(hkey(c), "orders")
    applied = sum(int(v or 0) for v in pipe.execute())
    return applied, len(read_journal(journal))


def check_covered(client, orders, journal_entries):
    """Every confirmed order is applied in Redis or in the journal, and
    every journal line is one of them, with the right points."""
    pipe = client.pipeline()
    for cid, oid, _ in orders:
        pipe.exists(marker(cid, oid))
    applied = pipe.execute()
    journaled = {(e["customer"], e["order"]): e for e in journal_entries}
    assert len(journaled) == len(journal_entries), "an order journaled twice"
    missing = [o for o, a in zip(orders, applied)
               if not a and (o[0], o[1]) not in journaled]
    assert missing == [], "confirmed orders neither applied nor journaled: "\
        "%r" % missing[:20]
    want = {(cid, oid): total for cid, oid, total in orders}
    for key, e in journaled.items():
        assert key in want, "journal line of an unknown order %r" % e
        assert e["amount"] == want[key]
        assert e["earned"] == int(want[key].split(".")[0])
        assert e["redeem"] == 0 and e["prefix"] == "loyalty:"
    return sum(applied), len(journaled)
