#!/usr/bin/python3
"""A TCP proxy on 127.0.0.1 that delays every read by a fixed time, in each
direction: a slow Redis for the benchmark (bench/bench.py).

    slowproxy.py LISTEN_PORT TARGET_PORT [--delay-ms 20] [--max-seconds N]

Each chunk read from one side is written to the other side DELAY after it
was read, in order.  Chunks do not wait for each other (a delay line, not
a bandwidth limit), so pipelined commands stay pipelined and each round
trip costs 2 x DELAY plus Redis's own time.  Prints "ready" when
listening; exits by itself after --max-seconds (bounded), or on SIGTERM.
"""

import argparse
import asyncio
import signal
import sys


async def pump(reader, writer, delay):
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()

    async def deliver():
        try:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is None:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            try:
                writer.close()
            except Exception:
                pass

    task = asyncio.ensure_future(deliver())

    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            queue.put_nowait((loop.time() + delay, data))
    except (ConnectionError, OSError):
        pass
    finally:
        queue.put_nowait((loop.time() + delay, None))

    await task


async def serve(listen_port, target_port, delay, max_seconds):
    async def handle(creader, cwriter):
        try:
            sreader, swriter = await asyncio.open_connection("127.0.0.1",
                                                             target_port)
        except OSError:
            cwriter.close()
            return
        await asyncio.gather(pump(creader, swriter, delay),
                             pump(sreader, cwriter, delay))

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port,
                                        backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    print("ready", flush=True)

    try:
        await asyncio.wait_for(stop.wait(), timeout=max_seconds)
    except asyncio.TimeoutError:
        print("slowproxy: --max-seconds reached, exiting", file=sys.stderr)

    server.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("listen_port", type=int)
    ap.add_argument("target_port", type=int)
    ap.add_argument("--delay-ms", type=float, default=20.0)
    ap.add_argument("--max-seconds", type=float, default=3600.0)
    args = ap.parse_args()
    asyncio.run(serve(args.listen_port, args.target_port,
                      args.delay_ms / 1000.0, args.max_seconds))


if __name__ == "__main__":
    main()
