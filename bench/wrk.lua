-- wrk script of the loyalty benchmark (bench/bench.py runs it).
--
-- BENCH_MODE=checkout (default): every request is a checkout,
--   GET /checkout?total=<1.00..149.99>&oid=<run>-<thread>-<n>
--   with "Cookie: cid=c<NNNNNN>" of a random customer, or no cookie for
--   BENCH_ANON percent of requests (anonymous).  Customers are drawn from
--   c000001 .. c<BENCH_CUSTOMERS + BENCH_UNKNOWN>: the first
--   BENCH_CUSTOMERS are seeded, the rest are new to Redis.
-- BENCH_MODE=plain: wrk's own request (the URL given on the command line).
--
-- BENCH_STOP_AFTER=N stops after N responses (make bench-rss); done()
-- prints one line "BENCH_RESULT {json}" with latency percentiles in
-- microseconds, p99.9 included.

local mode = os.getenv("BENCH_MODE") or "checkout"
local run = os.getenv("BENCH_RUN") or "run"
local customers = tonumber(os.getenv("BENCH_CUSTOMERS") or "100000")
local unknown = tonumber(os.getenv("BENCH_UNKNOWN") or "5000")
local anon = tonumber(os.getenv("BENCH_ANON") or "10")
local stop_after = tonumber(os.getenv("BENCH_STOP_AFTER") or "0")
local seed = tonumber(os.getenv("BENCH_SEED") or "1")

local threads = 0

function setup(thread)
    threads = threads + 1
    thread:set("tid", threads)
end

local random, format = math.random, string.format
local prefix
local n = 0

function init(args)
    prefix = run .. "-" .. tostring(tid or 1) .. "-"
    math.randomseed(seed * 1000 + (tid or 1))
end

if mode == "checkout" then
    local headers = {}

    function request()
        n = n + 1
        local cents = random(100, 14999)
        local path = format("/checkout?total=%d.%02d&oid=%s%d",
                            (cents - cents % 100) / 100, cents % 100,
                            prefix, n)

        if random(100) <= anon then
            headers.Cookie = nil
        else
            headers.Cookie = format("cid=c%06d",
                                    random(1, customers + unknown))
        end

        return wrk.format("GET", path, headers)
    end
end

if stop_after > 0 then
    local seen = 0

    function response(status, headers, body)
        seen = seen + 1
        if seen == stop_after then
            -- the thread stops here; wrk's main thread still sleeps for
            -- -d: bench.py sees this line and sends it SIGINT
            io.write("BENCH_STOPPED\n")
            io.stdout:flush()
            wrk.thread:stop()
        end
    end
end

function done(summary, latency, requests)
    local e = summary.errors
    io.write(format('BENCH_RESULT {"requests": %d, "duration_us": %d, '
                    .. '"connect_errors": %d, "read_errors": %d, '
                    .. '"write_errors": %d, "status_errors": %d, '
                    .. '"timeouts": %d, "p50": %.0f, "p75": %.0f, '
                    .. '"p90": %.0f, "p99": %.0f, "p999": %.0f, '
                    .. '"mean": %.1f, "max": %.0f}\n',
                    summary.requests, summary.duration, e.connect, e.read,
                    e.write, e.status, e.timeout,
                    latency:percentile(50), latency:percentile(75),
                    latency:percentile(90), latency:percentile(99),
                    latency:percentile(99.9), latency.mean, latency.max))
end
