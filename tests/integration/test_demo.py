"""conf/demo.conf, as `make run` uses it: it passes `nginx -t`, and its
checkout, balance and metrics locations answer as the README and the
printed curl examples say.  The fixed demo ports are replaced with free
ones, as the module path and the Redis port are by tools/run-demo.
conf/demo-cluster.conf (`make run-cluster`) is the same shop on a Redis
Cluster of 3 masters."""

import json
import os
import subprocess

from conftest import (NGINX_BIN, SLOW, _module_path, free_port,
                      http_request, track, wait_until)


HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(HERE, "..", "..", "conf", "demo.conf")
DEMO_CLUSTER = os.path.join(HERE, "..", "..", "conf", "demo-cluster.conf")


def render(prefix, redis_port, edge, shop, demo=DEMO, cluster_ports=()):
    with open(demo) as f:
        text = f.read()
    for i, port in enumerate(cluster_ports, 1):
        text = text.replace("@REDIS_PORT_%d@" % i, str(port))
    text = (text.replace("@MODULE@", _module_path())
            .replace("@REDIS_PORT@", str(redis_port))
            .replace("127.0.0.1:8080", "127.0.0.1:%d" % edge)
            .replace("127.0.0.1:8081", "127.0.0.1:%d" % shop))
    for d in ("logs", "temp"):
        os.makedirs(os.path.join(prefix, d), exist_ok=True)
        os.chmod(os.path.join(prefix, d), 0o777)
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w") as f:
        f.write(text)
    return conf


def start_nginx(base, edge, what):
    """nginx in the foreground, as tools/run-demo runs it, once it serves"""
    p = subprocess.Popen(base + ["-g", "daemon off;"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    track(p.pid, what)

    def up():
        try:
            return http_request(edge, "/", timeout=2).status == 200
        except OSError:
            return False
    try:
        wait_until(up, 20, message="the " + what)
    except BaseException:
        p.terminate()
        p.wait(15)
        raise
    return p


def test_demo_conf(redis, tmp_root):
    prefix = os.path.join(tmp_root, "demo")
    os.makedirs(prefix)
    os.chmod(prefix, 0o755)
    edge, shop = free_port(), free_port()
    conf = render(prefix, redis.port, edge, shop)
    base = [NGINX_BIN, "-p", prefix + "/", "-c", conf]

    t = subprocess.run(base + ["-t"], capture_output=True, text=True,
                       timeout=30)
    assert t.returncode == 0, t.stderr

    redis.seed("alice", points=120, lifetime=6000, orders=9,
               first_order=1700000000, last_order=1790000000)
    p = start_nginx(base, edge, "demo nginx")
    try:

        r = http_request(edge, "/")
        assert "/api/loyalty" in r.body and "/metrics" in r.body, r.body

        r = http_request(edge, "/checkout", cookies={"cid": "alice"})
        assert r.status == 200, r
        assert r.header("X-Loyalty-Tier") == "gold"
        assert r.header("X-Loyalty-Offer-Code") == "FREESHIP"

        r = http_request(edge, "/api/loyalty", cookies={"cid": "alice"})
        assert r.status == 200, r
        b = json.loads(r.body)
        assert (b["status"], b["tier"], b["offer_code"]) == (
            "ok", "gold", "FREESHIP")
        assert b["points"] >= 120
        assert r.header("Cache-Control") == "no-store"

        assert http_request(edge, "/api/loyalty").status == 401

        # the checkout's credit, in the ledger the shop's API shows
        wait_until(lambda: json.loads(http_request(
            edge, "/loyalty-api/ledger?customer=alice").body)["entries"],
            5 * SLOW, 0.05, "alice's ledger entry")
        r = http_request(edge, "/loyalty-api/ledger?customer=alice")
        entry = json.loads(r.body)["entries"][0]
        # gold earns twice: 59.90 x 2, rounded down
        assert (entry["amount"], entry["earned"]) == ("59.90", 119), entry

        # the refund that make run prints: an order numbered A-1001,
        # refunded in part and then in full, as a form
        r = http_request(edge, "/checkout?order=A-1001",
                         cookies={"cid": "alice"})
        assert r.status == 200 and "order A-1001" in r.body, r
        wait_until(lambda: redis.client.exists("loyalty:{alice}:order:A-1001"),
                   5 * SLOW, 0.05, "the credit of A-1001")
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        r = http_request(edge, "/loyalty-api/refund", headers=form,
                         body=b"customer=alice&order=A-1001&refunded=20")
        doc = json.loads(r.body)
        # floor(119 * 20 / 59.90) = 39
        assert (r.status, doc["status"], doc["reversed"]) == \
            (200, "applied", 39), doc
        r = http_request(edge, "/loyalty-api/refund", headers=form,
                         body=b"customer=alice&order=A-1001&refunded=all")
        assert json.loads(r.body)["reversed"] == 80, r.body
        r = http_request(edge, "/loyalty-api/adjust", headers=form,
                         body=b"customer=alice&points=50&id=cs-1&reason=sorry")
        assert json.loads(r.body)["status"] == "applied", r.body

        r = http_request(edge, "/metrics")
        assert r.status == 200, r
        text = r.body
        assert 'loyalty_requests_total{status="ok"} 3' in text, text
        assert ('loyalty_api_requests_total{op="refund",status="applied"} 2'
                in text), text
        assert 'loyalty_offers_shown_total{offer="gold_perk"} 2' in text
    finally:
        p.terminate()
        p.wait(15)


def directives(path):
    """The configuration without comments, one directive per item."""
    with open(path) as f:
        text = "".join(l.split("#")[0] for l in f)
    return [" ".join(d.split()) for d in text.split(";")]


def test_demo_cluster_conf_is_the_demo_conf():
    """conf/demo-cluster.conf differs from conf/demo.conf only in its
    loyalty_redis: the two demos cannot drift apart."""
    single, cluster = directives(DEMO), directives(DEMO_CLUSTER)
    diff = [(a, b) for a, b in zip(single, cluster) if a != b]
    assert len(single) == len(cluster) and diff == [(
        "loyalty_redis 127.0.0.1:@REDIS_PORT@",
        "loyalty_redis 127.0.0.1:@REDIS_PORT_1@ 127.0.0.1:@REDIS_PORT_2@ "
        "127.0.0.1:@REDIS_PORT_3@ cluster")], diff


def test_demo_cluster_conf(tmp_root):
    """The cluster demo on a real 3-master cluster: alice (seeded on the
    master of her slot) checks out as gold, the credit lands there."""
    from test_replay_cluster import run_cluster

    cluster = run_cluster(tmp_root)
    p = None
    try:
        prefix = os.path.join(tmp_root, "demo-cluster")
        os.makedirs(prefix)
        os.chmod(prefix, 0o755)
        edge, shop = free_port(), free_port()
        conf = render(prefix, 0, edge, shop, DEMO_CLUSTER, cluster.ports)
        base = [NGINX_BIN, "-p", prefix + "/", "-c", conf]

        t = subprocess.run(base + ["-t"], capture_output=True, text=True,
                           timeout=30)
        assert t.returncode == 0, t.stderr

        key = "loyalty:{alice}"
        owner = cluster.node(cluster.owner(key))
        owner.hset(key, mapping={"points": 120, "lifetime": 6000,
                                 "orders": 9, "first_order": 1700000000,
                                 "last_order": 1790000000})
        p = start_nginx(base, edge, "demo-cluster nginx")

        r = http_request(edge, "/checkout", cookies={"cid": "alice"})
        assert r.status == 200, r
        assert r.header("X-Loyalty-Status") == "ok", r
        assert r.header("X-Loyalty-Tier") == "gold"
        assert r.header("X-Loyalty-Offer-Code") == "FREESHIP"

        # 59.90 at gold's multiplier 2: 119 points, on alice's master
        wait_until(lambda: owner.hget(key, "orders") == "10", 10,
                   message="the credit of alice's checkout")
        assert owner.hget(key, "points") == "239"

        r = http_request(edge, "/checkout", cookies={"cid": "newbie"})
        assert r.header("X-Loyalty-Status") == "new", r
        assert r.header("X-Loyalty-Offer-Code") == "WELCOME10"
    finally:
        if p is not None:
            p.terminate()
            p.wait(15)
        cluster.stop()
