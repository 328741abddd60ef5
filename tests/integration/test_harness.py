"""The harness itself, against stock nginx (no load_module) and redis.

These pass whether or not the module is built; they make sure a failure in
the other files is about the module, not about the fixtures."""

import time

from conftest import (BACKEND, children, port_open,
                      run_parallel, _proc_stat)


STOCK = """
server {
    listen 127.0.0.1:{port};
    location = /__harness_ready { return 204; }
    location /plain { return 200 "plain"; }
    location /front {
        proxy_set_header X-Loyalty-Status "from-front";
        proxy_pass http://127.0.0.1:{backend_port};
    }
    location /cap { proxy_pass http://127.0.0.1:{capture_port}; }
}
""" + BACKEND


def test_stock_nginx_backend_echo(nginx, capture_backend):
    n = nginx(STOCK, load_module=False, capture_port=capture_backend.port)
    r = n.get("/plain")
    assert (r.status, r.body) == (200, "plain")
    r = n.get("/front/x", headers=[("x-loyalty-anything", "spoof")])
    assert r.status == 200
    assert r.header("X-Order-Total") == "19.99"
    assert r.header("X-Order-Id").startswith("order-")
    assert r.loyalty == {"X-Loyalty-Status": "from-front",
                         "X-Loyalty-Anything": "spoof"}
    assert r.echo["uri"] == "/front/x"
    r = n.get("/cap/y", headers=[("X-LOYALTY-TIER", "gold"),
                                 ("x-loyalty-tier", "silver")])
    assert r.body == "captured\n"
    assert capture_backend.requests[-1]["path"] == "/cap/y"
    assert capture_backend.loyalty_headers() == [("X-LOYALTY-TIER", "gold"),
                                                 ("x-loyalty-tier", "silver")]


def test_stock_nginx_processes_and_reload(nginx):
    n = nginx(STOCK, load_module=False, workers=2)
    master = n.pid
    old = set(n.workers())
    assert len(old) == 2
    n.reload()
    new = set(n.workers())
    assert len(new) == 2 and not (new & old) and n.pid == master
    assert n.get("/plain").body == "plain"
    assert n.stop() is None
    assert children(master) == [] and _proc_stat(master) is None
    for pid in old | new:
        st = _proc_stat(pid)
        assert st is None or st[1] != master


def test_stock_nginx_check_config_reports_line(nginx):
    snippet = STOCK + "\nserver { listen 127.0.0.1:{port2}; keepalive_timeout abc; }\n"
    check = nginx.check_config(snippet, load_module=False)
    rc, out = check
    assert rc != 0
    assert "keepalive_timeout" in out
    assert "in %s:%d" % (check.conf, check.line_of("keepalive_timeout abc")) in out
    assert nginx.check_config(STOCK, load_module=False).rc == 0


def test_missing_module_fails_loudly(nginx, monkeypatch):
    import conftest
    import _pytest.outcomes
    monkeypatch.setattr(conftest, "LOYALTY_MODULE", "/nonexistent/x.so")
    try:
        nginx(STOCK)
    except _pytest.outcomes.Failed as e:
        assert "does not exist" in str(e)
    else:
        raise AssertionError("a missing module must fail the test")


def test_redis_fixture_seed_stop_start(redis):
    key = redis.seed("c1", points=5, lifetime=7, orders=2)
    assert key == "loyalty:{c1}"
    h = redis.client.hgetall(key)
    assert h["points"] == "5" and h["orders"] == "2"
    assert int(h["last_order"]) > int(h["first_order"]) > 0
    before = redis.hmget_calls()
    redis.client.hmget(key, "points", "lifetime")
    assert redis.hmget_calls() == before + 1
    redis.seed("c3", points=1, db=3)
    assert redis.db(3).hget("loyalty:{c3}", "points") == "1"
    assert redis.client.exists("loyalty:{c3}") == 0
    pid = redis.proc.pid
    redis.stop()
    assert not port_open(redis.port) and _proc_stat(pid) is None
    redis.start()
    assert redis.client.ping() and redis.client.dbsize() == 0


def test_redis_password(redis_factory):
    r = redis_factory(password="s3cret")
    assert r.client.ping()
    import redis as redis_lib
    bad = redis_lib.Redis(host="127.0.0.1", port=r.port, socket_timeout=2)
    try:
        bad.get("x")
    except redis_lib.exceptions.AuthenticationError:
        pass
    else:
        raise AssertionError("requirepass not in effect")
    finally:
        bad.close()


def test_silent_redis_never_answers(silent_redis):
    import socket
    s = socket.create_connection(("127.0.0.1", silent_redis.port), timeout=2)
    s.sendall(b"*1\r\n$4\r\nPING\r\n")
    s.settimeout(0.3)
    t0 = time.monotonic()
    try:
        data = s.recv(10)
    except socket.timeout:
        data = None
    s.close()
    assert data is None and time.monotonic() - t0 >= 0.25
    assert silent_redis.accepted == 1


def test_parallel_requests_to_stock_nginx(nginx):
    n = nginx(STOCK, load_module=False)
    res = run_parallel(lambda i: n.get("/front/%d" % i), range(100))
    assert [r.echo["uri"] for r in res] == ["/front/%d" % i for i in range(100)]


def test_teardown_detects_alerts(nginx):
    n = nginx(STOCK, load_module=False)
    assert n.bad_log_lines() == []
    with open(n.prefix + "/error.log", "a") as f:
        f.write("2024/01/01 00:00:00 [alert] 1#1: fake\n")
    assert len(n.bad_log_lines()) == 1
    # leave the log clean for this test's own teardown check
    with open(n.prefix + "/error.log", "w") as f:
        f.write("")


def test_allow_log_line_is_narrow(nginx):
    """allow_log_line() lets a test expect one [alert] line: that one, not
    a neighbour (another pid, another message)."""
    import os
    n = nginx(STOCK, load_module=False)
    lines = ["2026/01/01 00:00:00 [alert] 1#1: worker process %s" % tail
             for tail in ("123 exited on signal 9", "1234 exited on signal 9",
                          "123 exited on signal 9 and more")]
    with open(os.path.join(n.prefix, "error.log"), "a") as f:
        f.write("".join(line + "\n" for line in lines))
    assert n.bad_log_lines() == lines
    n.allow_log_line(r"\[alert\] \d+#\d+: worker process 123 exited on "
                     r"signal 9")
    assert n.bad_log_lines() == lines[1:]
    # the teardown checks the log too
    n.allow_log_line(r"\[alert\] \d+#\d+: worker process 123 .*")
    assert n.bad_log_lines() == lines[1:2]
    n.allow_log_line(r"\[alert\] \d+#\d+: worker process 1234 .*")
    assert n.bad_log_lines() == []
