-- TokenBudget, strict mode: admits one request or refuses it, atomically, on Redis's clock,
-- after applying the settlements it carries (settle_all, defined before this file).
-- Plain Lua 5.1, no module, no command newer than Redis 7.
--
-- ARGV[1] the limits this request is decided on, the sum of: 1 requests, 2 tokens,
-- 4 concurrency, 8 spend per hour, 16 spend per day. KEYS[1] is the key of both GCRA
-- TATs (requests and tokens, see budget_settle.lua; sent even without either limit: it
-- routes the script); each limit present takes its ARGV from ARGV[2] on, and each other
-- limit its key from KEYS[2] on, in that order:
--   requests (GCRA: the theoretical arrival time in microseconds, TAT): ARGV increment
--     (window / limit), room (max(burst, 1) * window / limit); no key of its own
--   tokens (GCRA, likewise): ARGV increment (tokens * window / limit), room
--     (max(burst, tokens) * window / limit); no key of its own
--   concurrency (a sorted set of members scored by when they expire, ms): ARGV limit,
--     this request's member, how long a member holds its place in ms (so a crashed
--     replica's places come back)
--   spend per hour (the base of its calendar windows' keys, base:index): ARGV cap in
--     micro-units, window length in ms
--   spend per day: likewise
--   with either spend cap: ARGV the spend this request reserves, micro-units
-- A limit is sent only when it applies (a limit above 0, a cost above 0). With 32 added to
-- ARGV[1] (a replica's first admission of the key after an outage) two more ARGV follow:
-- the requests and tokens TATs its in-process fall-back ran ahead of its clock (us, in
-- this key's increments), added to the key's TATs before the decision (max(TAT, now) +
-- carried: what another replica wrote stays), so a Redis that lost the key (restarted
-- empty) does not give the window's burst again on top of what the fall-back admitted.
-- The settlements carried follow, to the end of ARGV and KEYS (see settle_all).
--
-- Returns {1, hour index, day index} when admitted (everything counted), or
-- {0, limit, retry in ms} when refused (nothing counted; the settlements are applied
-- either way): limit 1 requests, 2 tokens,
-- 3 concurrency, 4 spend per hour, 5 spend per day; retry -1 when it can never fit.
--
-- GCRA (the generic cell rate algorithm): each unit (a request, a token) moves the key's
-- TAT on by T = window / limit. A request of cost c fits when
-- max(TAT, now) + c*T - now <= max(burst, c) * T: so in any window the key admits at most
-- limit + max(burst, c) units, and a request as large as the limit fits an idle key.
-- The replica computes c*T and max(burst, c)*T (IEEE doubles, as Lua would) and sends
-- them. Numbers in ARGV are read by arithmetic ('x' + 0), which costs less than tonumber.

local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local now_ms = math.floor(now / 1000)

local dims = ARGV[1] + 0
local k, a = 1, 1
local carried = dims >= 32
if carried then dims = dims - 32 end
local rpm_inc, rpm_room, tpm_inc, tpm_room
local conc_key, conc_limit, member, hold, hour_key, hour_cap, hour_len, day_key, day_cap, day_len
if dims % 2 == 1 then
  rpm_inc, rpm_room = ARGV[a + 1], ARGV[a + 2]
  a = a + 2
  dims = dims - 1
end
if dims % 4 == 2 then
  tpm_inc, tpm_room = ARGV[a + 1], ARGV[a + 2]
  a = a + 2
  dims = dims - 2
end
if dims % 8 == 4 then
  k = k + 1
  conc_key, conc_limit, member, hold = KEYS[k], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  a = a + 3
  dims = dims - 4
end
if dims % 16 == 8 then
  k = k + 1
  hour_key, hour_cap, hour_len = KEYS[k], ARGV[a + 1], ARGV[a + 2]
  a = a + 2
  dims = dims - 8
end
if dims == 16 then
  k = k + 1
  day_key, day_cap, day_len = KEYS[k], ARGV[a + 1], ARGV[a + 2]
  a = a + 2
end
local cost
if hour_key or day_key then
  a = a + 1
  cost = ARGV[a] + 0
end
local rpm_carry, tpm_carry
if carried then
  rpm_carry, tpm_carry = ARGV[a + 1] + 0, ARGV[a + 2] + 0
  a = a + 2
end

tat_key = KEYS[1]
settle_all(now, k, a, tat_key, hour_key, day_key, conc_key)

-- The key's TATs, read once (settle_all may have); what the fall-back carried counts even
-- if the request is refused (written back by refuse).
if (rpm_inc or tpm_inc) and not own_r then own_r, own_t = read_tats(tat_key) end
if rpm_carry and rpm_carry > 0 and rpm_inc then
  own_r, tat_dirty = math.max(own_r, now) + rpm_carry, true
end
if tpm_carry and tpm_carry > 0 and tpm_inc then
  own_t, tat_dirty = math.max(own_t, now) + tpm_carry, true
end

local function refuse(limit, retry)
  if tat_dirty then write_tats(tat_key, own_r, own_t, now, false) end
  return {0, limit, retry}
end

-- GCRA: the new TAT, or a refusal with the retry in ms. How far the TAT would run ahead
-- of now is computed as a distance (TAT - now, exact on whole microseconds, then + c*T),
-- never as (now + c*T) - now: on Redis's clock (~1.7e15 us, doubles 0.25 apart) that sum
-- rounds, and a request that takes the whole tolerance of an idle key would be refused
-- "for 1 ms" whenever it rounded up. (Written out twice: a local function is a closure
-- made again on every run.)
local rpm_tat, tpm_tat
if rpm_inc then
  local tat = own_r
  local ahead = rpm_inc + 0
  if tat > now then ahead = (tat - now) + ahead end
  local room = rpm_room + 0
  if ahead > room then
    return refuse(1, math.ceil((ahead - room) / 1000))
  end
  rpm_tat = now + ahead
end
if tpm_inc then
  local tat = own_t
  local ahead = tpm_inc + 0
  if tat > now then ahead = (tat - now) + ahead end
  local room = tpm_room + 0
  if ahead > room then
    return refuse(2, math.ceil((ahead - room) / 1000))
  end
  tpm_tat = now + ahead
end

if conc_key then
  local concurrency = conc_limit + 0
  redis.call('ZREMRANGEBYSCORE', conc_key, '-inf', now_ms)
  if redis.call('ZCARD', conc_key) >= concurrency then
    return refuse(3, 0)
  end
end

-- Spend: the window's key (nil: no room) and the ms left in it, and its index.
local hour_index, day_index, hour_left, day_left
if cost then
  local function spend(base, cap, length)
    cap, length = cap + 0, length + 0
    local index = math.floor(now_ms / length)
    if cost > cap then return nil, -1, index end
    local key = base .. ':' .. index
    local used = tonumber(redis.call('GET', key) or '0') or 0
    if used + cost > cap then
      return nil, (index + 1) * length - now_ms, index
    end
    return key, (index + 1) * length - now_ms, index
  end
  if hour_key then
    hour_key, hour_left, hour_index = spend(hour_key, hour_cap, hour_len)
    if not hour_key then return refuse(4, hour_left) end
  end
  if day_key then
    day_key, day_left, day_index = spend(day_key, day_cap, day_len)
    if not day_key then return refuse(5, day_left) end
  end
end

-- Everything fits: count it.
-- (The tokens TAT written here includes the settlements': own_t.)
if rpm_tat or tpm_tat then
  write_tats(tat_key, rpm_tat or own_r, tpm_tat or own_t, now, true)
elseif tat_dirty then
  write_tats(tat_key, own_r, own_t, now, false)
end
if conc_key then
  hold = hold + 0
  redis.call('ZADD', conc_key, now_ms + hold, member)
  redis.call('PEXPIRE', conc_key, hold)
end
if hour_key then
  redis.call('INCRBY', hour_key, cost)
  redis.call('PEXPIRE', hour_key, hour_left + 60000)
end
if day_key then
  redis.call('INCRBY', day_key, cost)
  redis.call('PEXPIRE', day_key, day_left + 60000)
end
return {1, hour_index or 0, day_index or 0}
