#!/usr/bin/python3
"""Redis instructions per credit: what one run of the credit script costs
the Redis server, counted by valgrind --tool=callgrind, free of the noise
of a shared machine.

    bench/script_insns.py [script.lua ...]

Without arguments it counts ngx_module/ngx_http_loyalty_credit.lua.  For
each script: a private redis-server under callgrind on a free 127.0.0.1
port, 20,000 seeded customers, then BENCH_SCRIPT_CREDITS (10,000) credits
of random customers sent by EVALSHA in pipelines of 50, as the module
sends them.  The count is taken between two callgrind dumps around the
credits, twice per script.  It covers everything Redis does for a credit:
reading the command, the script, its commands, the reply.

Each script is counted twice over: with loyalty_pending off, and with
"loyalty_pending 14d", where every seeded customer has two entries of
locked points, one of them due (its release is before the credits' time,
so the credit releases it), and each credit locks its points in a third.
The last line is the ratio of the two, per script.

To compare with an earlier version of the script:

    git show <commit>:ngx_module/ngx_http_loyalty_credit.lua > /tmp/old.lua
    bench/script_insns.py /tmp/old.lua ngx_module/ngx_http_loyalty_credit.lua
"""

import glob
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import redis as redis_lib

from bench import free_port, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "ngx_module",
                      "ngx_http_loyalty_credit.lua")
CUSTOMERS = 20000
CREDITS = int(os.environ.get("BENCH_SCRIPT_CREDITS", "10000"))
PIPELINE = 50


NOW = 1700000001
LOCK = 14 * 86400


def seed(r, pending=False):
    r.flushall()
    rnd = random.Random(1)
    pipe = r.pipeline(transaction=False)
    for i in range(1, CUSTOMERS + 1):
        rec = dict(points=rnd.randint(0, 50000),
                   lifetime=rnd.randint(0, 200000),
                   orders=rnd.randint(1, 300), first_order=1600000000,
                   last_order=1700000000)
        if pending:
            # one entry due before the credits, one still locked
            rec["pending"] = "%d:%d,%d:%d" % (
                NOW - 3600, rnd.randint(1, 300), NOW + 86400 * 5,
                rnd.randint(1, 300))
        pipe.hset("loyalty:{c%06d}" % i, mapping=rec)
    pipe.execute()


def main():
    scripts = sys.argv[1:] or [SCRIPT]
    work = tempfile.mkdtemp(prefix="loyalty-script-insns-")
    port = free_port()
    proc = subprocess.Popen(
        ["timeout", "1800", "valgrind", "--tool=callgrind",
         "--callgrind-out-file=" + os.path.join(work, "callgrind.out"),
         "redis-server", "--bind", "127.0.0.1", "--port", str(port),
         "--save", "", "--appendonly", "no", "--dir", work],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        r = redis_lib.Redis(host="127.0.0.1", port=port)

        def up():
            try:
                return r.ping()
            except redis_lib.ConnectionError:
                return False

        wait_for(up, 60, "redis-server under callgrind")
        pid = r.info("server")["process_id"]

        def dump():
            """Writes the counts since the last dump; returns their sum."""
            before = set(glob.glob(os.path.join(work, "callgrind.out*")))
            subprocess.run(["callgrind_control", "-d", str(pid)],
                           stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=True)
            for _ in range(100):
                new = set(glob.glob(os.path.join(work, "callgrind.out*")))
                if new - before:
                    break
                time.sleep(0.1)
            (path,) = new - before
            with open(path) as f:
                for line in f:
                    if line.startswith("summary:"):
                        return int(line.split()[1])
            raise RuntimeError("no summary in " + path)

        print("Redis instructions per credit (%d credits, %d customers, "
              "pipelines of %d)" % (CREDITS, CUSTOMERS, PIPELINE))
        for path in scripts:
            with open(path) as f:
                sha = r.script_load(f.read())
            means = {}
            for lock in (0, LOCK):
                counts = []
                for _ in range(2):
                    seed(r, pending=lock > 0)
                    rnd = random.Random(7)
                    dump()
                    pipe = r.pipeline(transaction=False)
                    for k in range(CREDITS):
                        h = "loyalty:{c%06d}" % rnd.randint(1, CUSTOMERS)
                        pipe.evalsha(sha, 3, h, h + ":order:o%d" % k,
                                     h + ":ledger", rnd.randint(1, 300), 0,
                                     NOW, 100, 0, "o%d" % k,
                                     "%d.%02d" % (rnd.randint(1, 300),
                                                  rnd.randint(0, 99)),
                                     "", 2592000, NOW + lock if lock else 0)
                        if k % PIPELINE == PIPELINE - 1:
                            pipe.execute()
                    pipe.execute()
                    counts.append(dump() / CREDITS)
                means[lock] = sum(counts) / len(counts)
                print("%-60s %8.0f %8.0f" % (
                    "%s, loyalty_pending %s" % (
                        os.path.relpath(path), "14d" if lock else "off"),
                    counts[0], counts[1]))
            print("%-60s %8.2f" % ("  with pending / without", means[LOCK]
                                   / means[0]))
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
