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
-- Nothing is written before every check has passed.

local hash, marker, ledger = KEYS[1], KEYS[2], KEYS[3]
local earned, redeem, ts = ARGV[1], ARGV[2], ARGV[3]
local keep, expire = tonumber(ARGV[4]), tonumber(ARGV[5])

local done = redis.call('GET', marker)
if done then
    return {0, done}
end

-- decimal strings of any length compare exactly
local function less(a, b)
    if #a ~= #b then
        return #a < #b
    end
    return a < b
end

local function uint(s)
    return type(s) == 'string' and s:match('^%d+$') ~= nil
end

if not (uint(earned) and uint(redeem) and uint(ts)) then
    return redis.error_reply('LOYALTY bad arguments')
end

earned = earned:gsub('^0+(%d)', '%1')
redeem = redeem:gsub('^0+(%d)', '%1')

local points = redis.call('HGET', hash, 'points') or '0'
if not uint(points) then
    return redis.error_reply('LOYALTY points of ' .. hash .. ' is not a count')
end
points = points:gsub('^0+(%d)', '%1')

local redeemed, short = redeem, 0
if less(points, redeem) then
    redeemed = points
    short = 1
end

if tonumber(points) + tonumber(earned) >= 2^53 then
    return redis.error_reply('LOYALTY balance of ' .. hash .. ' would overflow')
end

redis.call('SET', marker, earned .. ':' .. redeemed, 'EX', 2592000)

if redeemed ~= '0' then
    redis.call('HINCRBY', hash, 'points', '-' .. redeemed)
end

local after = redis.call('HINCRBY', hash, 'points', earned)
redis.call('HINCRBY', hash, 'lifetime', earned)
redis.call('HINCRBY', hash, 'orders', 1)

local first = redis.call('HGET', hash, 'first_order')
if not first or less(ts, first) then
    redis.call('HSET', hash, 'first_order', ts)
end

local last = redis.call('HGET', hash, 'last_order')
if not last or less(last, ts) then
    redis.call('HSET', hash, 'last_order', ts)
end

if keep > 0 then
    redis.call('XADD', ledger, 'MAXLEN', '~', keep, '*',
               'order', ARGV[6], 'amount', ARGV[7], 'earned', earned,
               'redeemed', redeemed, 'points', after, 'ts', ts)
end

if expire > 0 then
    redis.call('EXPIRE', hash, expire)
    if keep > 0 then
        redis.call('EXPIRE', ledger, expire)
    end
end

return {1, earned .. ':' .. redeemed, after, short}
