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
-- ARGV[9]  order_ttl   seconds the marker lives (refunds are possible while
--                      it does); optional, 30 days
-- ARGV[10] pending     seconds the earned points stay locked, 0: none;
--                      optional
--
-- The hash field "pending" holds the locked points of the customer as
-- "<release>:<points>[,<release>:<points>...]", by release time (unix
-- seconds); points whose release time has come are released into points
-- and lifetime by the next write, and counted as released by every read.
--
-- The marker is "<earned>:<redeemed>:<amount>:<refunded>:<reversed>:
-- <restored>:<release>": what the order did, what refunds have done to it
-- since (the refund script), and when its points are released, 0 when
-- they were never locked.  Markers written before refunds existed hold
-- "<earned>:<redeemed>" only.
--
-- Returns {1, marker, points, short, pending} when applied, short being 1
-- when the order redeemed more than the balance, pending the points still
-- locked; {0, marker} when the order was credited before.
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
local find, byte, format, gmatch = string.find, string.byte, string.format,
                                   string.gmatch

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

-- the entries of a "pending" field, released ones added to "due", or nil
-- The entries of a "pending" field, released ones added to "due", or nil.
-- "cut": the length of the entries released, when they are the first
-- ones, so that the rest of the field is kept as it is; "rebuild": the
-- field is to be written again, in order and in canonical form (it has
-- leading zeros, or is out of order).

local function locked(list, now)
    local due, n, r, p, seen, cut, rebuild = 0, 0, {}, {}, 0, 0, false
    local len = #list

    if byte(list, len) == 44 then
        return nil
    end

    -- one match per entry: what the matches do not cover is not a list

    for release, points, comma in gmatch(list, '(%d+):(%d+)(,?)') do
        seen = seen + #release + #points + 1 + #comma

        if (byte(release) == 48 and #release > 1)
           or (byte(points) == 48 and #points > 1)
        then
            rebuild = true
        end

        release, points = tonumber(release), tonumber(points)

        if release >= 2^53 or points >= 2^53 then
            return nil
        end

        if release <= now then
            due = due + points
            if n > 0 then
                rebuild = true
            else
                cut = seen
            end

        elseif n > 0 and r[n] > release then
            -- out of order (written by another tool): put in its place
            local i = n
            while i > 0 and r[i] > release do
                r[i + 1], p[i + 1] = r[i], p[i]
                i = i - 1
            end
            r[i + 1], p[i + 1] = release, points
            n = n + 1
            rebuild = true

        else
            n = n + 1
            r[n], p[n] = release, points
        end
    end

    if seen ~= len then
        return nil
    end

    return due, r, p, n, cut, rebuild
end

local earned, redeem, ts = count(ARGV[1]), count(ARGV[2]), count(ARGV[3])
local ttl, lock = count(ARGV[9] or '2592000'), count(ARGV[10] or '0')

if not (earned and redeem and ts and ttl and lock) or ttl == '0' then
    return redis.error_reply('LOYALTY bad arguments')
end

local rec = redis.call('HMGET', hash, 'points', 'lifetime', 'orders',
                       'first_order', 'last_order', 'pending')

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

local e, p, l, o = tonumber(earned), tonumber(points), tonumber(lifetime),
                   tonumber(orders)

-- points locked until a release time: those due are released first
local list, r, q, n = rec[6], nil, nil, 0
local now, still, due, cut, rebuild = tonumber(ts), 0, 0, 0, false

if list and list ~= '' then
    due, r, q, n, cut, rebuild = locked(list, now)
    if not due then
        return redis.error_reply('LOYALTY pending of ' .. hash
                                 .. ' is not a list')
    end

    for i = 1, n do
        still = still + q[i]
    end

    if p + due + still >= 2^53 or l + due + still >= 2^53 then
        return redis.error_reply('LOYALTY balance of ' .. hash
                                 .. ' would overflow')
    end

    if due > 0 then
        p, l = p + due, l + due
        points = fmt(p)
    end
end

local redeemed, short = redeem, 0
if less(points, redeem) then
    redeemed, short = points, 1
end

if p + e + still >= 2^53 or l + e + still >= 2^53 or o + 1 >= 2^53 then
    return redis.error_reply('LOYALTY balance of ' .. hash
                             .. ' would overflow')
end

-- the order's points are locked only when it earns some
local release = '0'
if lock ~= '0' and e > 0 then
    if now + tonumber(lock) >= 2^53 then
        return redis.error_reply('LOYALTY bad arguments')
    end
    release = fmt(now + tonumber(lock))
end

-- kept as sent when it is an amount as nginx takes one (12 digits, 4
-- decimals at most), which a refund can then divide by

local amount = ARGV[7] or ''
local dot = find(amount, '.', 1, true)

if not find(amount, '^%d+%.?%d*$') or (dot or #amount + 1) > 13
   or (dot and (dot == #amount or #amount - dot > 4))
then
    amount = ''
end

local mark = earned .. ':' .. redeemed .. ':' .. amount .. ':0:0:0:'
             .. release

if not redis.call('SET', marker, mark, 'NX', 'EX', ttl) then
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

local after = p - tonumber(redeemed)

-- the "pending" field to write, when it is no longer the one read: what
-- was read less the entries released, as it was, when it can be
local pending, rest

if list and list ~= '' and not rebuild then
    rest = (cut > 0) and string.sub(list, cut + 1) or list
end

if release == '0' then
    after, l = after + e, l + e

    if rest and cut > 0 and rest ~= '' then
        pending = rest
    end

elseif n == 0 or r[n] < tonumber(release) then
    -- the latest release, as nearly always: the entry goes at the end
    local entry = release .. ':' .. earned
    if n == 0 then
        pending = entry
    elseif rest then
        pending = rest .. ',' .. entry
    else
        n = n + 1
        r[n], q[n] = tonumber(release), e
    end
    still = still + e

else
    -- by release time; an entry of the same second takes the points too
    local at, t = n + 1, tonumber(release)
    while at > 1 and r[at - 1] > t do
        at = at - 1
    end

    if r[at - 1] == t then
        q[at - 1] = q[at - 1] + e
    else
        table.insert(r, at, t)
        table.insert(q, at, e)
        n = n + 1
    end

    still = still + e
end

local balance = fmt(after)

local set = {'points', balance, 'lifetime', fmt(l), 'orders', fmt(o + 1)}

local first, last = count(rec[4]), count(rec[5])

if not first or less(ts, first) then
    set[7] = 'first_order'
    set[8] = ts
end

if not last or less(last, ts) then
    set[#set + 1] = 'last_order'
    set[#set + 1] = ts
end

if not pending and n > 0 and (rebuild or release ~= '0') then
    local entries = {}
    for i = 1, n do
        entries[i] = fmt(r[i]) .. ':' .. fmt(q[i])
    end
    pending = table.concat(entries, ',')
end

if pending then
    set[#set + 1] = 'pending'
    set[#set + 1] = pending
end

if keep > 0 then
    local entry = {'order', ARGV[6], 'amount', ARGV[7],
                   'earned', earned, 'redeemed', redeemed,
                   'points', balance, 'ts', ts}
    if release ~= '0' then
        entry[13], entry[14] = 'pending', fmt(still)
    end
    local id = redis.pcall('XADD', ledger, 'MAXLEN', '~',
                           redis_number(ARGV[4], keep), '*', unpack(entry))
    if type(id) == 'table' then
        redis.call('DEL', marker)
        return redis.error_reply('LOYALTY ledger ' .. ledger .. ': '
                                 .. tostring(id.err))
    end
end

redis.call('HSET', hash, unpack(set))

if not pending and n == 0 and list and list ~= '' then
    redis.call('HDEL', hash, 'pending')
end

if expire > 0 then
    expire = redis_number(ARGV[5], expire)
    redis.call('EXPIRE', hash, expire)
    if keep > 0 then
        redis.call('EXPIRE', ledger, expire)
    end
end

return {1, mark, after, short, still}
