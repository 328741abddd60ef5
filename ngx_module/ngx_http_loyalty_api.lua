-- ngx_http_loyalty_module: a refund or an adjustment (loyalty_api), each
-- one atomic call, idempotent, in exact integer arithmetic.
--
-- KEYS[1]  <prefix>{<id>}                  the customer hash
-- KEYS[2]  <prefix>{<id>}:order:<order>    refund: the order's marker
--          <prefix>{<id>}:adjust:<id>      adjust: the adjustment's marker
-- KEYS[3]  <prefix>{<id>}:ledger           stream of balance changes
--
-- ARGV[1]  "refund" or "adjust"
-- ARGV[2]  now         unix seconds
-- ARGV[3]  ledger      entries kept in the ledger, 0 for none
-- ARGV[4]  expire      seconds the record lives without a write, 0: ever
-- ARGV[5]  order_ttl   seconds an adjustment's marker lives
-- ARGV[6]  the order id (refund) or the adjustment id (adjust)
-- ARGV[7]  refund: the order's total refunded so far, an amount or "all";
--          adjust: the points, an integer of at most 18 digits, signed or
--          not
-- ARGV[8]  the reason, for the ledger (may be empty for a refund)
--
-- Ledger entries: a refund adds kind "refund", order, refunded, reversed,
-- restored, forgiven, points (after), pending (when some are locked), ts
-- and reason; an adjustment kind "adjust", adjustment (its id), earned or
-- redeemed, points, ts and reason.
--
-- The order's marker, as the credit script writes it, is "<earned>:
-- <redeemed>:<amount>:<refunded>:<reversed>:<restored>:<release>", or
-- "<earned>:<redeemed>" when written before refunds existed.  A refund
-- keeps its expiry (read with PTTL, written with PX) and rewrites the four fields after the amount:
-- refunded is the total the shop last sent ("all" once refunded in full),
-- reversed and restored the points taken back and given back so far.
--
-- Returns {status, name, value, ...}: status "applied", "unchanged",
-- "unknown_order", "insufficient" or "invalid" (with "error" and why),
-- then the numbers the call answers with.  Nothing is written unless the
-- status is "applied".

local hash, marker, ledger = KEYS[1], KEYS[2], KEYS[3]
local find, byte, format, sub = string.find, string.byte, string.format,
                                string.sub

-- decimal digits only, without leading zeros, or nil
local function count(s)
    if type(s) ~= 'string' or not find(s, '^%d+$') then
        return nil
    end
    if byte(s) == 48 and #s > 1 then
        s = string.gsub(s, '^0+(%d)', '%1')
    end
    return s
end

-- a count below 2^53, where Lua numbers are exact, or nil
local function exact(s)
    s = count(s)
    if not s or #s > 16 or tonumber(s) >= 2^53 then
        return nil
    end
    return s
end

local function less(a, b)
    if #a ~= #b then
        return #a < #b
    end
    return a < b
end

local function fmt(n)
    return format('%d', n)
end

-- an amount ("59.9", "120", "0.0001") in ten-thousandths, as a count
local function fixed(s)
    if type(s) ~= 'string' then
        return nil
    end
    local int, frac = string.match(s, '^(%d+)%.?(%d*)$')
    if not int or #int > 12 or #frac > 4
       or (#frac == 0 and find(s, '.', 1, true))
    then
        return nil
    end
    return count(int .. frac .. string.rep('0', 4 - #frac))
end

-- a count as limbs of 7 digits, the lowest first
local function limbs(s)
    local t, i = {}, #s
    while i > 0 do
        t[#t + 1] = tonumber(sub(s, math.max(1, i - 6), i))
        i = i - 7
    end
    return t
end

-- floor(a * b / c) of counts, exactly; c > 0 and the result below 2^53
local function muldiv(a, b, c)
    local x, y = limbs(a), limbs(b)
    local m = {}
    for i = 1, #x + #y do
        m[i] = 0
    end
    for i = 1, #x do
        local carry = 0
        for j = 1, #y do
            local v = m[i + j - 1] + x[i] * y[j] + carry
            carry = math.floor(v / 1e7)
            m[i + j - 1] = v - carry * 1e7
        end
        m[i + #y] = m[i + #y] + carry
    end

    -- the product in decimal, then long division by c, a digit at a time,
    -- with the remainder (below c, at most 16 digits) in two halves
    local digits = {}
    for i = #m, 1, -1 do
        digits[#digits + 1] = format(i == #m and '%d' or '%07d', m[i])
    end
    local product = table.concat(digits)

    -- c may have 16 digits, beyond 2^53: taken in halves of 8 digits
    local half = 1e8
    local dh, dl = tonumber(sub(c, 1, -9)) or 0, tonumber(sub(c, -8))
    local q, hi, lo = 0, 0, 0

    for i = 1, #product do
        -- (hi * half + lo) * 10 + digit, normalized
        lo = lo * 10 + byte(product, i) - 48
        hi = hi * 10 + math.floor(lo / half)
        lo = lo % half

        q = q * 10
        -- the remainder is below 10 * c: subtract c at most 9 times
        while hi > dh or (hi == dh and lo >= dl) do
            hi, lo = hi - dh, lo - dl
            if lo < 0 then
                hi, lo = hi - 1, lo + half
            end
            q = q + 1
        end
    end

    return q
end

-- the record: points, lifetime and the pending points, those due released
local function record()
    local rec = redis.call('HMGET', hash, 'points', 'lifetime', 'pending')
    local now = tonumber(ARGV[2])

    local points, lifetime = count(rec[1] or '0'), count(rec[2] or '0')
    if not points or not lifetime then
        return nil, 'LOYALTY ' .. (points and 'lifetime' or 'points')
                    .. ' of ' .. hash .. ' is not a count'
    end

    local r = {p = tonumber(points), l = tonumber(lifetime), release = {},
               locked = {}, n = 0, still = 0, list = rec[3]}

    if r.list and r.list ~= '' then
        local at, len = 1, #r.list
        if byte(r.list, len) == 44 then
            return nil, 'LOYALTY pending of ' .. hash .. ' is not a list'
        end
        while at <= len do
            local colon = find(r.list, ':', at, true)
            local comma = find(r.list, ',', at, true) or len + 1
            local t, v
            if colon and colon < comma then
                t = count(sub(r.list, at, colon - 1))
                v = count(sub(r.list, colon + 1, comma - 1))
            end
            if t and v and #t <= 16 and #v <= 16 then
                t, v = tonumber(t), tonumber(v)
            end
            if type(t) ~= 'number' or type(v) ~= 'number' or t >= 2^53
               or v >= 2^53
            then
                return nil, 'LOYALTY pending of ' .. hash .. ' is not a list'
            end

            if t <= now then
                r.p, r.l = r.p + v, r.l + v
            else
                r.n = r.n + 1
                r.release[r.n], r.locked[r.n] = t, v
                r.still = r.still + v
            end

            at = comma + 1
        end

        -- by release time, as the credit script keeps it
        for i = 2, r.n do
            local t, v, j = r.release[i], r.locked[i], i - 1
            while j > 0 and r.release[j] > t do
                r.release[j + 1], r.locked[j + 1] = r.release[j], r.locked[j]
                j = j - 1
            end
            r.release[j + 1], r.locked[j + 1] = t, v
        end
    end

    if r.p + r.still >= 2^53 or r.l + r.still >= 2^53 then
        return nil, 'LOYALTY balance of ' .. hash .. ' would overflow'
    end

    return r
end

local function store(r)
    local set = {'points', fmt(r.p), 'lifetime', fmt(r.l)}
    local entries = {}

    for i = 1, r.n do
        if r.locked[i] > 0 then
            entries[#entries + 1] = fmt(r.release[i]) .. ':'
                                    .. fmt(r.locked[i])
        end
    end

    if #entries > 0 then
        set[5], set[6] = 'pending', table.concat(entries, ',')
    end

    redis.call('HSET', hash, unpack(set))

    if #entries == 0 and r.list and r.list ~= '' then
        redis.call('HDEL', hash, 'pending')
    end

    local keep, expire = count(ARGV[3]), count(ARGV[4])

    if expire and expire ~= '0' then
        redis.call('EXPIRE', hash, expire)
        if keep and keep ~= '0' then
            redis.call('EXPIRE', ledger, expire)
        end
    end
end

local function log(entry)
    local keep = count(ARGV[3])
    if not keep or keep == '0' then
        return nil
    end

    entry[#entry + 1] = 'ts'
    entry[#entry + 1] = count(ARGV[2])
    if ARGV[8] ~= '' then
        entry[#entry + 1] = 'reason'
        entry[#entry + 1] = ARGV[8]
    end

    local id = redis.pcall('XADD', ledger, 'MAXLEN', '~', keep, '*',
                           unpack(entry))
    if type(id) == 'table' then
        return 'LOYALTY ledger ' .. ledger .. ': ' .. tostring(id.err)
    end
    return nil
end

local function balance(status, r)
    return {status, 'points', r.p, 'pending', r.still}
end

local function invalid(why)
    return {'invalid', 'error', why}
end

-- the balance, for a call that changes nothing
local function unchanged()
    local r, err = record()
    if not r then
        return redis.error_reply(err)
    end
    return balance('unchanged', r)
end

-- times and lengths Redis takes: checked here, for nothing is written
-- after a command has failed

local function small(s)
    s = count(s)
    return s and #s <= 12 and s
end

if not small(ARGV[2]) or not small(ARGV[3]) or not small(ARGV[4])
   or not small(ARGV[5]) or small(ARGV[5]) == '0'
   or type(ARGV[8]) ~= 'string'
then
    return redis.error_reply('LOYALTY bad arguments')
end

local now = tonumber(ARGV[2])


if ARGV[1] == 'refund' then

    local mark = redis.call('GET', marker)
    if not mark then
        return {'unknown_order'}
    end

    local pttl = redis.call('PTTL', marker)

    local f, at = {}, 1
    while true do
        local colon = find(mark, ':', at, true)
        f[#f + 1] = sub(mark, at, (colon or 0) - 1)
        if not colon then
            break
        end
        at = colon + 1
    end

    local earned, redeemed = exact(f[1]), exact(f[2])
    local amount, refunded, reversed, restored, release =
          '', '0', '0', '0', '0'

    if #f == 7 then
        amount, refunded = f[3], f[4]
        reversed, restored, release = exact(f[5]), exact(f[6]), exact(f[7])
    end

    if (#f ~= 2 and #f ~= 7) or not earned or not redeemed or not reversed
       or not restored or not release
       or (amount ~= '' and not fixed(amount))
       or (refunded ~= 'all' and not fixed(refunded))
    then
        return redis.error_reply('LOYALTY marker ' .. marker
                                 .. ' is not an order\'s')
    end

    -- a full refund is marked "all": an order of amount 0 refunded 0 is
    -- not refunded yet, its redeemed points are still to give back

    local total = fixed(amount)         -- nil: the marker has no amount
    local before = (refunded == 'all') and total or fixed(refunded)
    local done = refunded == 'all'
    local full, now_refunded

    if ARGV[7] == 'all' then
        full, now_refunded = true, amount ~= '' and amount or 'all'

    else
        local want = fixed(ARGV[7])
        if not want then
            return invalid('refunded is not an amount')
        end

        if not total then
            if done then
                return unchanged()
            end
            return invalid('the order has no amount: only "all" refunds it')
        end

        if less(total, want) then
            return invalid('refunded is above the amount of the order')
        end

        -- the whole amount is a full refund, also of an order of 0
        if done or (not less(before, want) and want ~= total) then
            return unchanged()
        end

        full, now_refunded = (want == total), ARGV[7]
        before = want
    end

    local r, err = record()
    if not r then
        return redis.error_reply(err)
    end

    if done then
        return balance('unchanged', r)
    end

    -- what this refund takes back and gives back

    local e = tonumber(earned)
    local target = e

    if not full then
        target = (total == '0') and 0 or muldiv(earned, before, total)
    end

    local take = math.max(0, target - tonumber(reversed))
    local give = 0

    if full then
        give = math.max(0, tonumber(redeemed) - tonumber(restored))
        restored = fmt(tonumber(restored) + give)
        if r.p + give + r.still >= 2^53 then
            return redis.error_reply('LOYALTY balance of ' .. hash
                                     .. ' would overflow')
        end
        r.p = r.p + give
    end

    -- from the order's points still locked first, then from points; what
    -- points cannot cover is forgiven

    local locked = 0
    local t = tonumber(release)

    if t > now then
        for i = 1, r.n do
            if r.release[i] == t then
                locked = math.min(take, r.locked[i],
                                  math.max(0, e - tonumber(reversed)))
                r.locked[i] = r.locked[i] - locked
                r.still = r.still - locked
                break
            end
        end
    end

    local rest = take - locked
    local taken = math.min(rest, r.p)
    local forgiven = rest - taken

    r.p = r.p - taken
    r.l = math.max(0, r.l - rest)

    local mark2 = f[1] .. ':' .. f[2] .. ':' .. amount .. ':'
                  .. (full and 'all' or now_refunded) .. ':' .. fmt(target)
                  .. ':' .. restored .. ':' .. release

    local entry = {'kind', 'refund', 'order', ARGV[6],
                   'refunded', now_refunded, 'reversed', fmt(take),
                   'restored', fmt(give), 'forgiven', fmt(forgiven),
                   'points', fmt(r.p)}
    if r.still > 0 then
        entry[#entry + 1] = 'pending'
        entry[#entry + 1] = fmt(r.still)
    end

    err = log(entry)
    if err then
        return redis.error_reply(err)
    end

    -- the refund window stays where it was (PX, not KEEPTTL: Redis 5)
    if pttl > 0 then
        redis.call('SET', marker, mark2, 'PX', pttl)
    else
        redis.call('SET', marker, mark2)
    end
    store(r)

    return {'applied', 'reversed', take, 'restored', give,
            'forgiven', forgiven, 'points', r.p, 'pending', r.still}
end


if ARGV[1] == 'adjust' then

    local sign, digits = sub(ARGV[7], 1, 1), ARGV[7]
    if sign == '-' or sign == '+' then
        digits = sub(ARGV[7], 2)
    end

    local d = count(digits)
    if not d or #digits > 18 then
        return invalid('points is not an integer of at most 18 digits')
    end

    if #ARGV[8] == 0 then
        return invalid('no reason')
    end

    local r, err = record()
    if not r then
        return redis.error_reply(err)
    end

    if redis.call('EXISTS', marker) == 1 then
        return balance('unchanged', r)
    end

    local entry = {'kind', 'adjust', 'adjustment', ARGV[6]}

    if sign == '-' then
        if less(fmt(r.p), d) then
            return balance('insufficient', r)
        end
        r.p = r.p - tonumber(d)
        entry[5], entry[6], entry[7], entry[8] = 'earned', '0',
                                                 'redeemed', d
        d = '-' .. d

    else
        if #d > 16 or r.p + r.still + tonumber(d) >= 2^53
           or r.l + r.still + tonumber(d) >= 2^53
        then
            return invalid('the balance would overflow')
        end
        r.p, r.l = r.p + tonumber(d), r.l + tonumber(d)
        entry[5], entry[6], entry[7], entry[8] = 'earned', d,
                                                 'redeemed', '0'
        d = '+' .. d
    end

    entry[9], entry[10] = 'points', fmt(r.p)

    err = log(entry)
    if err then
        return redis.error_reply(err)
    end

    redis.call('SET', marker, d, 'EX', count(ARGV[5]))
    store(r)

    return balance('applied', r)
end

return redis.error_reply('LOYALTY bad arguments')
