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
--
-- Returns {1, "<earned>:<redeemed>", points, short} when applied, short
-- being 1 when the order redeemed more than the balance,
-- {0, "<earned>:<redeemed>"} when the order was credited before.
-- Nothing is written before every check has passed: one HGETALL, one SET NX,
-- one HSET, one XADD (and EXPIREs) per order.

local hash, marker, ledger = KEYS[1], KEYS[2], KEYS[3]
local earned, redeem, ts = ARGV[1], ARGV[2], ARGV[3]
local keep, expire = tonumber(ARGV[4]), tonumber(ARGV[5])

local function uint(s)
    return type(s) == 'string' and s:match('^%d+$') ~= nil
end

-- without leading zeros, so that decimal strings compare exactly
local function canon(s)
    return (s:gsub('^0+(%d)', '%1'))
end

local function less(a, b)
    if #a ~= #b then
        return #a < #b
    end
    return a < b
end

-- counts stay below 2^53, where Lua numbers are exact
local function fmt(n)
    return string.format('%.0f', n)
end

if not (uint(earned) and uint(redeem) and uint(ts)) then
    return redis.error_reply('LOYALTY bad arguments')
end

earned, redeem, ts = canon(earned), canon(redeem), canon(ts)

local rec = {}
local all = redis.call('HGETALL', hash)
for i = 1, #all, 2 do
    rec[all[i]] = all[i + 1]
end

local count = {}
for i, field in ipairs({'points', 'lifetime', 'orders'}) do
    local v = rec[field] or '0'
    if not uint(v) then
        return redis.error_reply('LOYALTY ' .. field .. ' of ' .. hash
                                 .. ' is not a count')
    end
    count[i] = canon(v)
end

local points, lifetime, orders = count[1], count[2], count[3]

local redeemed, short = redeem, 0
if less(points, redeem) then
    redeemed, short = points, 1
end

local e = tonumber(earned)
if tonumber(points) + e >= 2^53 or tonumber(lifetime) + e >= 2^53
   or tonumber(orders) + 1 >= 2^53
then
    return redis.error_reply('LOYALTY balance of ' .. hash .. ' would overflow')
end

local mark = earned .. ':' .. redeemed

if not redis.call('SET', marker, mark, 'NX', 'EX', 2592000) then
    return {0, redis.call('GET', marker)}
end

local after = tonumber(points) - tonumber(redeemed) + e

local set = {'points', fmt(after), 'lifetime', fmt(tonumber(lifetime) + e),
             'orders', fmt(tonumber(orders) + 1)}

if not uint(rec.first_order) or less(ts, canon(rec.first_order)) then
    set[#set + 1] = 'first_order'
    set[#set + 1] = ts
end

if not uint(rec.last_order) or less(canon(rec.last_order), ts) then
    set[#set + 1] = 'last_order'
    set[#set + 1] = ts
end

redis.call('HSET', hash, unpack(set))

if keep > 0 then
    redis.call('XADD', ledger, 'MAXLEN', '~', keep, '*',
               'order', ARGV[6], 'amount', ARGV[7], 'earned', earned,
               'redeemed', redeemed, 'points', fmt(after), 'ts', ts)
end

if expire > 0 then
    redis.call('EXPIRE', hash, expire)
    if keep > 0 then
        redis.call('EXPIRE', ledger, expire)
    end
end

return {1, mark, after, short}
