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
-- ARGV[10] release     unix seconds when the order's earned points are
--                      released (its ts plus loyalty_pending), 0 or not
--                      after ts: not locked; optional
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
-- Every order runs this script, so it avoids what costs in Lua: numbers
-- made from strings by arithmetic rather than tonumber() and compared as
-- strings where they can be, no gsub unless a number has leading zeros,
-- no tables beyond the commands' arguments on the common paths, integer
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

-- The entries of a "pending" field as the credits write them: canonical
-- numbers, the release times of as many digits as "now" (the order time,
-- below 10^15), the points below 10^15, by release time.  Returns the
-- points released (due at "now"), those still locked, the length of the
-- entries released, which come first, and the latest release time; or
-- nil for any other field, which locked() then reads.  Strings only: the
-- release times are compared as strings of the same length (Redis's Lua
-- compares with strcoll(), which orders such digit strings as numbers in
-- every locale), and a number is made only of the points, by adding them
-- up.

local function scan(list, now)
    local due, still, cut, pos, last, len = 0, 0, 0, 1, '', #list
    local digits = #now

    if byte(list, len) == 44 or digits > 15 then
        return nil
    end

    repeat
        local _, e, release, points = find(list, '^([1-9]%d*):([1-9]%d*),?',
                                           pos)

        if not e or #release ~= digits or #points > 15 or release < last then
            return nil
        end

        if release > now then
            still = still + points
        else
            due, cut = due + points, e
        end

        last, pos = release, e + 1
    until pos > len

    return due, still, cut, last
end

-- Any "pending" field: the points released, and the entries still locked
-- by release time, as numbers; nil when it is not a list of entries.

local function locked(list, now)
    local due, n, r, p, seen = 0, 0, {}, {}, 0

    if byte(list, #list) == 44 then
        return nil
    end

    -- one match per entry: what the matches do not cover is not a list

    for release, points, comma in gmatch(list, '(%d+):(%d+)(,?)') do
        seen = seen + #release + #points + 1 + #comma
        release, points = tonumber(release), tonumber(points)

        if release >= 2^53 or points >= 2^53 then
            return nil
        end

        if release <= now then
            due = due + points

        else
            -- in its place, when out of order (written by another tool)
            local i = n
            while i > 0 and r[i] > release do
                r[i + 1], p[i + 1] = r[i], p[i]
                i = i - 1
            end
            r[i + 1], p[i + 1] = release, points
            n = n + 1
        end
    end

    if seen ~= #list then
        return nil
    end

    return due, r, p, n
end

local earned, redeem, ts = count(ARGV[1]), count(ARGV[2]), count(ARGV[3])
local ttl, release = count(ARGV[9] or '2592000'), count(ARGV[10] or '0')

if not (earned and redeem and ts and ttl and release) or ttl == '0'
   or #release > 16 or (#release == 16 and tonumber(release) >= 2^53)
then
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

-- the order's points are locked only when it earns some; the release
-- comes from nginx, so that Redis has no number to format for it
if e == 0 or #release < #ts or (#release == #ts and release <= ts) then
    release = '0'
end

-- Points locked until a release time: those due are released first.
-- Nearly always the field is as the credits write it and the order's
-- entry, if any, goes at its end: the field is then cut and appended to
-- as a string ("rest").  Otherwise it is read into r[] and q[] and
-- written again in order.

local list, rest, r, q, n = rec[6], nil, nil, nil, 0
local due, still, cut, latest = 0, 0, 0, ''

if list and list ~= '' then
    due, still, cut, latest = scan(list, ts)

    if due and (release == '0' or #latest < #release
                or (#latest == #release and latest < release))
    then
        rest = (cut > 0) and string.sub(list, cut + 1) or list

    else
        due, r, q, n = locked(list, tonumber(ts))
        if not due then
            return redis.error_reply('LOYALTY pending of ' .. hash
                                     .. ' is not a list')
        end

        still = 0
        for i = 1, n do
            still = still + q[i]
        end
    end

    if p + due + still >= 2^53 or l + due + still >= 2^53 then
        return redis.error_reply('LOYALTY balance of ' .. hash
                                 .. ' would overflow')
    end

    p, l = p + due, l + due
end

local redeemed, short = redeem, 0

if due == 0 then
    if less(points, redeem) then
        redeemed, short = points, 1
    end

elseif redeem ~= '0' and p < tonumber(redeem) then
    redeemed, short = fmt(p), 1
end

if p + e + still >= 2^53 or l + e + still >= 2^53 or o + 1 >= 2^53 then
    return redis.error_reply('LOYALTY balance of ' .. hash
                             .. ' would overflow')
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

-- the "pending" field to write, when it is no longer the one read, and
-- whether it is to go

local pending, drop

if release == '0' then
    after, l = after + e, l + e

    if rest then
        if cut > 0 then
            pending, drop = rest, rest == ''
        end

    elseif r then
        drop = n == 0
    end

else
    if r then
        -- by release time; an entry of the same second takes the points
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

    else
        if rest and rest ~= '' then
            pending = rest .. ',' .. release .. ':' .. earned
        else
            pending = release .. ':' .. earned
        end
    end

    still = still + e
end

if r and n > 0 then
    local entries = {}
    for i = 1, n do
        entries[i] = fmt(r[i]) .. ':' .. fmt(q[i])
    end
    pending = table.concat(entries, ',')
end

local balance = fmt(after)

-- the fields to set; like the ledger entry, the table is made as large
-- as it may get at once, since one that grows is rehashed as it does

local set = {'points', balance, 'lifetime', fmt(l), 'orders', fmt(o + 1),
             false, false, false, false, false, false}
local k = 6

local first, last = count(rec[4]), count(rec[5])

if not first or less(ts, first) then
    set[7], set[8], k = 'first_order', ts, 8
end

if not last or less(last, ts) then
    set[k + 1], set[k + 2], k = 'last_order', ts, k + 2
end

if pending and not drop then
    set[k + 1], set[k + 2], k = 'pending', pending, k + 2
end

if keep > 0 then
    local entry = {'order', ARGV[6], 'amount', ARGV[7],
                   'earned', earned, 'redeemed', redeemed,
                   'points', balance, 'ts', ts, 'pending', false}
    local fields = 12
    if release ~= '0' then
        entry[14], fields = fmt(still), 14
    end
    local id = redis.pcall('XADD', ledger, 'MAXLEN', '~',
                           redis_number(ARGV[4], keep), '*',
                           unpack(entry, 1, fields))
    if type(id) == 'table' then
        redis.call('DEL', marker)
        return redis.error_reply('LOYALTY ledger ' .. ledger .. ': '
                                 .. tostring(id.err))
    end
end

redis.call('HSET', hash, unpack(set, 1, k))

if drop then
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
