-- The loyalty checkout of ngx_http_loyalty_module, written in OpenResty
-- (lua-nginx-module + lua-resty-redis) the way a competent user would:
-- the peer the module is benchmarked against (bench/README.md).
--
--   access_by_lua   strip client X-Loyalty-* headers, HMGET the customer
--                   over a pooled cosocket (set_keepalive), pick tier and
--                   offer, ngx.req.set_header the X-Loyalty-* headers
--   log_by_lua      on a 2xx response with an order total, queue a credit;
--                   a worker-wide flusher started by ngx.timer.at sends the
--                   queued credits as pipelined EVALSHAs of the module's own
--                   script (ngx_module/ngx_http_loyalty_credit.lua) on one
--                   pooled connection, so the request never waits
--
-- Same rules as the module: tier = highest min_lifetime <= lifetime; the
-- first offer whose conditions all hold; earned = floor(amount x rate x
-- multiplier) computed exactly (integer arithmetic, no binary fractions);
-- an unavailable read still credits, with multiplier 1; a credit that fails
-- is retried (5 attempts) and then written to the error log.
--
-- With batch = false every credit gets its own ngx.timer.at (the textbook
-- pattern; "lua-timer" in bench/bench.py).

local redis_ok, redis = pcall(require, "resty.redis")
if not redis_ok then
    redis = require "nginx.redis"           -- Debian's lua-nginx-redis
end

local ffi = require "ffi"
local clear_tab = require "table.clear"

local ngx = ngx
local var = ngx.var
local log = ngx.log
local WARN, ERR = ngx.WARN, ngx.ERR
local null = ngx.null
local timer_at = ngx.timer.at
local now = ngx.time
local get_headers = ngx.req.get_headers
local set_header = ngx.req.set_header
local clear_header = ngx.req.clear_header
local byte, sub, lower, find, match =
    string.byte, string.sub, string.lower, string.find, string.match
local tonumber, tostring, pairs, type = tonumber, tostring, pairs, type
local floor = math.floor


local _M = {}

local conf = {
    host = "127.0.0.1",
    port = 6379,
    timeout = 100,          -- ms, connect and each reply
    keepalive = 60000,      -- ms an idle pooled connection is kept
    pool_size = 128,        -- per worker
    prefix = "loyalty:",
    customer_var = "cookie_cid",
    earn_rate = "1",
    ledger = 100,
    expire = 0,
    tiers = {},             -- { {name, min_lifetime, "multiplier"}, ... }
    offers = {},            -- { {name=, code=, tier=, new=, inactive=, ...} }
    batch = true,
    batch_max = 256,        -- credits per pipeline
    queue_max = 16384,      -- credits waiting to be sent, per worker
    attempts = 5,
    retry_delay = 1,        -- s
}

local SLOTS = 6             -- queue: customer, order, earned, amount, ts,
                            -- attempts

local script, script_sha
local tiers                 -- sorted by min_lifetime, highest first
local offers
local queue, qn = {}, 0
local spare = {}
local flushing = false


-- "2.5" -> 25000 (scaled by 10^4), nil if not ^[0-9]{1,6}(\.[0-9]{1,4})?$

local function fixed(s)
    local i, f = match(s, "^(%d+)%.?(%d*)$")
    if not i or #i > 6 or #f > 4 or (f == "" and find(s, ".", 1, true)) then
        return nil
    end
    return tonumber(i) * 10000 + tonumber(sub(f .. "0000", 1, 4))
end


local function gcd(a, b)
    while b ~= 0 do
        a, b = b, a % b
    end
    return a
end


-- rate x multiplier as a reduced fraction num / den of 1 currency unit
-- scaled by 10^4: earned = floor(amount4 * num / den)

local function factor(rate4, mult4)
    local num, den = rate4 * mult4, 1e12
    local g = gcd(num, den)
    return num / g, den / g
end


function _M.configure(c)
    for k, v in pairs(c) do
        conf[k] = v
    end

    local f = assert(io.open(conf.script_path, "rb"))
    script = f:read("*a")
    f:close()

    local rate4 = assert(fixed(conf.earn_rate), "bad earn_rate")

    tiers = {}
    for i, t in ipairs(conf.tiers) do
        local mult4 = assert(fixed(t[3] or "1"), "bad multiplier")
        local num, den = factor(rate4, mult4)
        tiers[i] = { name = t[1], min = t[2], num = num, den = den }
    end
    table.sort(tiers, function(a, b) return a.min > b.min end)

    local num, den = factor(rate4, 10000)
    _M.no_tier = { name = nil, min = 0, num = num, den = den }

    offers = {}
    for i, o in ipairs(conf.offers) do
        offers[i] = o
    end
end


-- SCRIPT LOAD once per worker; until it answers, or after a NOSCRIPT,
-- credits are sent by EVAL

local function load_script(premature)
    if premature then
        return
    end

    local red = redis:new()
    red:set_timeout(1000)

    local ok, err = red:connect(conf.host, conf.port)
    if not ok then
        log(ERR, "loyalty: SCRIPT LOAD: connect: ", err)
        timer_at(1, load_script)
        return
    end

    local sha
    sha, err = red:script("load", script)
    if not sha then
        log(ERR, "loyalty: SCRIPT LOAD: ", err)
        red:close()
        timer_at(1, load_script)
        return
    end

    script_sha = sha
    red:set_keepalive(conf.keepalive, conf.pool_size)
end


function _M.init_worker()
    timer_at(0, load_script)
end


-- read path -----------------------------------------------------------


local function strip()
    local h = get_headers(100, true)

    for k in pairs(h) do
        local c = byte(k, 1)
        if (c == 88 or c == 120) and #k >= 10
           and lower(sub(k, 1, 10)) == "x-loyalty-"
        then
            clear_header(k)
        end
    end
end


local function select_tier(lifetime)
    for i = 1, #tiers do
        local t = tiers[i]
        if lifetime >= t.min then
            return t
        end
    end
    return nil
end


local function select_offer(points, orders, last_order, tier, t)
    local tname = tier and tier.name

    for i = 1, #offers do
        local o = offers[i]

        if not ((o.new and orders ~= 0)
                or (o.tier and o.tier ~= tname)
                or (o.min_points and points < o.min_points)
                or (o.max_points and points > o.max_points)
                or (o.min_orders and orders < o.min_orders)
                or (o.max_orders and orders > o.max_orders)
                or (o.inactive and (orders == 0 or t < last_order
                                    or t - last_order < o.inactive)))
        then
            return o
        end
    end

    return nil
end


local function str(v)
    if v == null or v == nil then
        return "0"
    end
    return v
end


function _M.access()
    strip()

    local ctx = ngx.ctx
    local id = var[conf.customer_var]

    if id == nil or id == "" then
        set_header("X-Loyalty-Status", "anonymous")
        return
    end

    if #id > 128 or find(id, "[^%w._@:+-]") then
        log(WARN, "loyalty: invalid customer id")
        set_header("X-Loyalty-Status", "invalid")
        return
    end

    -- from here on an order is credited, whatever the read gives
    ctx.loyalty_id = id

    local red = redis:new()
    red:set_timeout(conf.timeout)

    local ok, err = red:connect(conf.host, conf.port)
    if not ok then
        log(WARN, "loyalty: redis connect: ", err)
        set_header("X-Loyalty-Status", "unavailable")
        return
    end

    local res
    res, err = red:hmget(conf.prefix .. "{" .. id .. "}", "points",
                         "lifetime", "orders", "first_order", "last_order")
    if not res then
        log(WARN, "loyalty: redis HMGET: ", err)
        red:close()
        set_header("X-Loyalty-Status", "unavailable")
        return
    end

    red:set_keepalive(conf.keepalive, conf.pool_size)

    local p, l, o, lo = res[1], res[2], res[3], res[5]
    local status = (p == null and l == null and o == null and res[4] == null
                    and lo == null) and "new" or "ok"

    local points = tonumber(p) or 0
    local lifetime = tonumber(l) or 0
    local orders = tonumber(o) or 0
    local last_order = tonumber(lo) or 0

    local tier = select_tier(lifetime)
    local offer = select_offer(points, orders, last_order, tier, now())

    ctx.loyalty_tier = tier

    set_header("X-Loyalty-Status", status)
    set_header("X-Loyalty-Customer", id)
    set_header("X-Loyalty-Points", str(p))
    set_header("X-Loyalty-Lifetime", str(l))
    set_header("X-Loyalty-Orders", str(o))

    if tier then
        set_header("X-Loyalty-Tier", tier.name)
    end

    if offer then
        set_header("X-Loyalty-Offer", offer.name)
        if offer.code then
            set_header("X-Loyalty-Offer-Code", offer.code)
        end
    end
end


-- credits ---------------------------------------------------------------


-- ^[0-9]{1,12}(\.[0-9]{1,4})?$ x num / den, floored, exactly

local function earned_points(amount, tier)
    local i, f = match(amount, "^(%d+)%.?(%d*)$")

    if not i or #i > 12 or #f > 4
       or (f == "" and byte(amount, #amount) == 46)
    then
        return nil
    end

    local t = tier or _M.no_tier
    local ip = tonumber(i)
    local fp = f == "" and 0 or tonumber(sub(f .. "000", 1, 4))
    local a4 = ip * 10000 + fp

    local x = a4 * t.num
    if x < 9007199254740992 then                    -- 2^53: exact
        local r = x % t.den
        return (x - r) / t.den
    end

    -- large amounts: 64-bit integers
    local v = (ffi.new("uint64_t", ip) * 10000 + fp) * t.num / t.den
    return tonumber(v)
end


local flush

local function schedule(delay)
    local ok, err = timer_at(delay, flush)
    if not ok then
        log(ERR, "loyalty: cannot start the credit flusher: ", err)
        flushing = false
        return
    end
    flushing = true
end


local function drop(b, i, why)
    log(ERR, "loyalty: credit not applied (", why, "): {\"customer\":\"",
        b[i], "\",\"order\":\"", b[i + 1], "\",\"earned\":", b[i + 2],
        ",\"amount\":\"", b[i + 3], "\",\"ts\":", b[i + 4], "}")
end


local function requeue(b, i, why)
    local attempts = b[i + 5] + 1

    if attempts >= conf.attempts or qn >= conf.queue_max * SLOTS then
        drop(b, i, why)
        return
    end

    queue[qn + 1], queue[qn + 2], queue[qn + 3] = b[i], b[i + 1], b[i + 2]
    queue[qn + 4], queue[qn + 5], queue[qn + 6] = b[i + 3], b[i + 4], attempts
    qn = qn + SLOTS
end


local function send(red, b, i)
    local key = conf.prefix .. "{" .. b[i] .. "}"

    if script_sha then
        red:evalsha(script_sha, 3, key, key .. ":order:" .. b[i + 1],
                    key .. ":ledger", b[i + 2], "0", b[i + 4], conf.ledger,
                    conf.expire, b[i + 1], b[i + 3])
    else
        red:eval(script, 3, key, key .. ":order:" .. b[i + 1],
                 key .. ":ledger", b[i + 2], "0", b[i + 4], conf.ledger,
                 conf.expire, b[i + 1], b[i + 3])
    end
end


-- sends what is queued, batch_max credits per pipeline, until the queue
-- is empty; runs in a timer, one at a time per worker

flush = function(premature)
    while qn > 0 do
        local b, n = queue, qn
        local take = n
        if take > conf.batch_max * SLOTS then
            take = conf.batch_max * SLOTS
        end

        -- the batch leaves the queue; what arrives meanwhile is appended
        -- to a fresh one
        if take == n then
            queue, spare, qn = spare, b, 0
        else
            b = {}
            for j = 1, take do
                b[j] = queue[j]
            end
            local rest = {}
            for j = take + 1, n do
                rest[j - take] = queue[j]
            end
            queue, qn = rest, n - take
        end

        local red = redis:new()
        red:set_timeout(conf.timeout)

        local ok, err = red:connect(conf.host, conf.port)
        if not ok then
            for i = 1, take, SLOTS do
                requeue(b, i, "connect: " .. tostring(err))
            end
            if b == spare then clear_tab(spare) end
            if premature then
                return
            end
            return schedule(conf.retry_delay)
        end

        red:init_pipeline(take / SLOTS)
        for i = 1, take, SLOTS do
            send(red, b, i)
        end

        local results
        results, err = red:commit_pipeline()

        if not results then
            red:close()
            for i = 1, take, SLOTS do
                requeue(b, i, tostring(err))
            end
            if b == spare then clear_tab(spare) end
            if premature then
                return
            end
            return schedule(conf.retry_delay)
        end

        red:set_keepalive(conf.keepalive, conf.pool_size)

        local k = 0
        for i = 1, take, SLOTS do
            k = k + 1
            local r = results[k]

            if type(r) == "table" and r[1] == false then
                if find(r[2], "NOSCRIPT", 1, true) then
                    script_sha = nil        -- EVAL until loaded again
                    timer_at(0, load_script)
                    queue[qn + 1], queue[qn + 2] = b[i], b[i + 1]
                    queue[qn + 3], queue[qn + 4] = b[i + 2], b[i + 3]
                    queue[qn + 5], queue[qn + 6] = b[i + 4], b[i + 5]
                    qn = qn + SLOTS
                else
                    log(WARN, "loyalty: credit of order ", b[i + 1],
                        " failed: ", r[2])
                    requeue(b, i, r[2])
                end
            end
        end

        if b == spare then clear_tab(spare) end
    end

    flushing = false
end


local function flush_one(premature, id, order, earned, amount, ts)
    local b = { id, order, earned, amount, ts, 0 }
    local red = redis:new()
    red:set_timeout(conf.timeout)

    local ok, err = red:connect(conf.host, conf.port)
    if not ok then
        drop(b, 1, "connect: " .. tostring(err))
        return
    end

    local key = conf.prefix .. "{" .. id .. "}"
    local res
    if script_sha then
        res, err = red:evalsha(script_sha, 3, key, key .. ":order:" .. order,
                               key .. ":ledger", earned, "0", ts, conf.ledger,
                               conf.expire, order, amount)
    end

    if not script_sha or (not res and err and find(err, "NOSCRIPT", 1, true))
    then
        res, err = red:eval(script, 3, key, key .. ":order:" .. order,
                            key .. ":ledger", earned, "0", ts, conf.ledger,
                            conf.expire, order, amount)
    end

    if not res then
        red:close()
        drop(b, 1, tostring(err))
        return
    end

    red:set_keepalive(conf.keepalive, conf.pool_size)
end


function _M.log()
    local ctx = ngx.ctx
    local id = ctx.loyalty_id

    if not id then
        return
    end

    local status = ngx.status
    if status < 200 or status > 299 then
        return
    end

    local amount = var.upstream_http_x_order_total
    if amount == nil or amount == "" then
        return
    end

    local earned = earned_points(amount, ctx.loyalty_tier)
    if not earned then
        log(WARN, "loyalty: invalid amount \"", amount, "\", nothing credited")
        return
    end

    local order = var.upstream_http_x_order_id
    if order == nil or order == "" then
        order = var.request_id
    end

    if #order > 128 or find(order, "[%z\1-\32\127-\255]") then
        log(WARN, "loyalty: invalid order id, nothing credited")
        return
    end

    earned = tostring(earned)

    if not conf.batch then
        local ok, err = timer_at(0, flush_one, id, order, earned, amount,
                                 now())
        if not ok then
            log(ERR, "loyalty: credit not applied (", err, "): customer ",
                id, " order ", order)
        end
        return
    end

    if qn >= conf.queue_max * SLOTS then
        drop({ id, order, earned, amount, now() }, 1, "queue full")
        return
    end

    queue[qn + 1], queue[qn + 2], queue[qn + 3] = id, order, earned
    queue[qn + 4], queue[qn + 5], queue[qn + 6] = amount, now(), 0
    qn = qn + SLOTS

    if not flushing then
        schedule(0)
    end
end


return _M
