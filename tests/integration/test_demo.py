"""conf/demo.conf, as `make run` uses it: it passes `nginx -t`, and its
checkout, balance and metrics locations answer as the README and the
printed curl examples say.  The fixed demo ports are replaced with free
ones, as the module path and the Redis port are by tools/run-demo."""

import json
import os
import subprocess

from conftest import (NGINX_BIN, _module_path, free_port, http_request,
                      track, wait_until)


HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(HERE, "..", "..", "conf", "demo.conf")


def render(prefix, redis_port, edge, shop):
    with open(DEMO) as f:
        text = f.read()
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
    p = subprocess.Popen(base + ["-g", "daemon off;"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    track(p.pid, "demo nginx")
    try:
        def up():
            try:
                return http_request(edge, "/", timeout=2).status == 200
            except OSError:
                return False
        wait_until(up, 20, message="the demo nginx")

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

        r = http_request(edge, "/metrics")
        assert r.status == 200, r
        text = r.body
        assert 'loyalty_requests_total{status="ok"} 2' in text, text
        assert 'loyalty_offers_shown_total{offer="gold_perk"} 1' in text
    finally:
        p.terminate()
        p.wait(15)
