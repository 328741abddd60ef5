-- ngx_http_loyalty_module: credit one order, atomically and exactly once.
--
-- KEYS[1]  <prefix>{<id>}                 the customer hash
-- KEYS[2]  <prefix>{<id>}:order:<order>   idempotency marker
-- KEYS[3]  <prefix>{<id>}:ledger          stream of balance changes
--
-- ARGV[1]  earned      points this order earns (decimal, >= 0)
-- ARGV[2]  redeem      points the order spends (decimal, >= 0)
-- ARGV[3]  ts          unix seconds of the order
-- ARGV[4]  ledger      entries kept in the ledger, 0 for none
-- ARGV[5]  expire      seconds the record lives without a credit, 0: ever
-- ARGV[6]  order       order id, for the ledger
-- ARGV[7]  amount      order amount as sent by the shop, for the ledger
-- ARGV[8]  "1": a duplicate writes its marker again (same value, same
--          expiry), so that a WAIT behind it covers the first write too
--          (loyalty_credit_wait); optional
--
-- Returns {1, "<earned>:<redeemed>", points, short} when applied, short
-- being 1 when the order redeemed more than the balance,
-- {0, "<earned>:<redeemed>"} when the order was credited before.
-- Nothing is written before every check has passed: one HMGET, one SET NX,
-- one XADD, one HSET (and EXPIREs) per order.  A ledger that is not a
-- stream fails the XADD: the marker is deleted again and the error
-- returned, so the order is retried and journaled, not half applied.
--
-- Every order runs this script, so it avoids what costs in Lua: no
-- pattern captures, no gsub unless a number has leading zeros, integer
-- formatting only.

local hash, marker, ledger = KEYS[1], KEYS[2], KEYS[3]
local keep, expire = tonumber(ARGV[4]), tonumber(ARGV[5])
local find, byte, format = string.find, string.byte, string.format

-- as sent, when already in the form Redis would give the number
local function redis_number(s, n)
    if find(s, '^[1-9]%d*$') then
        return s
    end
    return n
end

-- decimal digits only, without leading zeros (so that decimal strings
-- compare exactly), or nil
local function count(s)
    if type(s) ~= 'string' or not find(s, '^%d+$') then
        return nil
    end
    if byte(s) == 48 and #s > 1 then
        s = string.gsub(s, '^0+(%d)', '%1')
    end
    return s
end

local function less(a, b)
    if #a ~= #b then
        return #a < #b
    end
    return a < b
end

-- counts stay below 2^53, where Lua numbers are exact
local function fmt(n)
    return format('%d', n)
end

local earned, redeem, ts = count(ARGV[1]), count(ARGV[2]), count(ARGV[3])

if not (earned and redeem and ts) then
    return redis.error_reply('LOYALTY bad arguments')
end

local rec = redis.call('HMGET', hash, 'points', 'lifetime', 'orders',
                       'first_order', 'last_order')

local points = count(rec[1] or '0')
if not points then
    return redis.error_reply('LOYALTY points of ' .. hash .. ' is not a count')
end

local lifetime = count(rec[2] or '0')
if not lifetime then
    return redis.error_reply('LOYALTY lifetime of ' .. hash
                             .. ' is not a count')
end

local orders = count(rec[3] or '0')
if not orders then
    return redis.error_reply('LOYALTY orders of ' .. hash .. ' is not a count')
end

local redeemed, short = redeem, 0
if less(points, redeem) then
    redeemed, short = points, 1
end

local e, p, l, o = tonumber(earned), tonumber(points), tonumber(lifetime),
                   tonumber(orders)

if p + e >= 2^53 or l + e >= 2^53 or o + 1 >= 2^53 then
    return redis.error_reply('LOYALTY balance of ' .. hash
                             .. ' would overflow')
end

local mark = earned .. ':' .. redeemed

if not redis.call('SET', marker, mark, 'NX', 'EX', '2592000') then
    local done = redis.call('GET', marker)
    if ARGV[8] == '1' then
        local ttl = redis.call('PTTL', marker)
        if ttl > 0 then
            redis.call('PEXPIRE', marker, ttl)
        else
            redis.call('SET', marker, done)
        end
    end
    return {0, done}
end

local after = p - tonumber(redeemed) + e
local balance = fmt(after)

local set = {'points', balance, 'lifetime', fmt(l + e), 'orders', fmt(o + 1)}

local first, last = count(rec[4]), count(rec[5])

if not first or less(ts, first) then
    set[7] = 'first_order'
    set[8] = ts
end

if not last or less(last, ts) then
    set[#set + 1] = 'last_order'
    set[#set + 1] = ts
end

if keep > 0 then
    local id = redis.pcall('XADD', ledger, 'MAXLEN', '~',
                           redis_number(ARGV[4], keep), '*',
                           'order', ARGV[6], 'amount', ARGV[7],
                           'earned', earned, 'redeemed', redeemed,
                           'points', balance, 'ts', ts)
    if type(id) == 'table' then
        redis.call('DEL', marker)
        return redis.error_reply('LOYALTY ledger ' .. ledger .. ': '
                                 .. tostring(id.err))
    end
end

redis.call('HSET', hash, unpack(set))

if expire > 0 then
    expire = redis_number(ARGV[5], expire)
    redis.call('EXPIRE', hash, expire)
    if keep > 0 then
        redis.call('EXPIRE', ledger, expire)
    end
end

return {1, mark, after, short}
