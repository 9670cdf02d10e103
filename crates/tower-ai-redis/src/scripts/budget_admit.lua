
-- TokenBudget, strict mode: admits one request or refuses it, atomically, on Redis's clock,
-- after applying the settlements it carries (settle_all, defined before this file).
-- Plain Lua 5.1, no module, no command newer than Redis 7.
--
-- KEYS[1] requests (GCRA: the theoretical arrival time, in microseconds)
-- KEYS[2] tokens   (GCRA, likewise)
-- KEYS[3] spend per hour: the base of its calendar windows' keys (base:index)
-- KEYS[4] spend per day: likewise
-- KEYS[5] concurrency: a sorted set of members scored by when they expire (ms)
-- ARGV[1]  window (the "minute") in microseconds
-- ARGV[2]  requests per window (0: no limit)     ARGV[3]  request burst
-- ARGV[4]  tokens per window (0: no limit)       ARGV[5]  token burst
-- ARGV[6]  tokens this request reserves
-- ARGV[7]  spend cap per hour, micro-units (0: none)
-- ARGV[8]  spend cap per day, micro-units (0: none)
-- ARGV[9]  spend this request reserves, micro-units
-- ARGV[10] hour in ms                            ARGV[11] day in ms
-- ARGV[12] concurrency limit (0: none)
-- ARGV[13] this request's member in the semaphore
-- ARGV[14] how long a member holds its place, ms (a crashed replica's places come back)
-- ARGV[15] number of settlements carried: their KEYS from KEYS[6], their ARGV from
--          ARGV[16] (see settle_all)
--
-- Returns {1, hour index, day index} when admitted (everything counted), or
-- {0, limit, retry in ms} when refused (nothing counted; the settlements are applied
-- either way): limit 1 requests, 2 tokens,
-- 3 concurrency, 4 spend per hour, 5 spend per day; retry -1 when it can never fit.
--
-- GCRA (the generic cell rate algorithm): each unit (a request, a token) moves the key's
-- theoretical arrival time (TAT) on by T = window / limit. A request of cost c fits when
-- max(TAT, now) + c*T - now <= max(burst, c) * T: so in any window the key admits at most
-- limit + max(burst, c) units, and a request as large as the limit fits an idle key.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now / 1000)
local window = tonumber(ARGV[1])
settle_all(now, window, 5, 15, tonumber(ARGV[15]))

local function gcra(key, limit, burst, cost)
  if limit <= 0 or cost <= 0 then return true, nil, 0 end
  if cost > limit then return false, nil, -1 end
  local T = window / limit
  local tat = tonumber(redis.call('GET', key) or '0') or 0
  if tat < now then tat = now end
  local new_tat = tat + cost * T
  local room = math.max(burst, cost) * T
  if new_tat - now > room then
    return false, nil, math.ceil((new_tat - now - room) / 1000)
  end
  return true, new_tat, 0
end

local function spend(base, cap, cost, length)
  if cap <= 0 or cost <= 0 then return true, nil, 0, 0 end
  local index = math.floor(now_ms / length)
  if cost > cap then return false, nil, -1, index end
  local key = base .. ':' .. index
  local used = tonumber(redis.call('GET', key) or '0') or 0
  if used + cost > cap then
    return false, nil, (index + 1) * length - now_ms, index
  end
  return true, key, (index + 1) * length - now_ms, index
end

local ok, rpm_tat, retry = gcra(KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[3]), 1)
if not ok then return {0, 1, retry} end
local tokens = tonumber(ARGV[6])
local tpm_tat
ok, tpm_tat, retry = gcra(KEYS[2], tonumber(ARGV[4]), tonumber(ARGV[5]), tokens)
if not ok then return {0, 2, retry} end

local concurrency = tonumber(ARGV[12])
if concurrency > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now_ms)
  if redis.call('ZCARD', KEYS[5]) >= concurrency then
    return {0, 3, 0}
  end
end

local cost = tonumber(ARGV[9])
local hour_key, hour_left, hour_index, day_key, day_left, day_index
ok, hour_key, hour_left, hour_index = spend(KEYS[3], tonumber(ARGV[7]), cost, tonumber(ARGV[10]))
if not ok then return {0, 4, hour_left} end
ok, day_key, day_left, day_index = spend(KEYS[4], tonumber(ARGV[8]), cost, tonumber(ARGV[11]))
if not ok then return {0, 5, day_left} end

-- Everything fits: count it.
if rpm_tat then
  redis.call('SET', KEYS[1], string.format('%.0f', rpm_tat), 'PX', math.ceil((rpm_tat - now) / 1000) + 1000)
end
if tpm_tat then
  redis.call('SET', KEYS[2], string.format('%.0f', tpm_tat), 'PX', math.ceil((tpm_tat - now) / 1000) + 1000)
end
if concurrency > 0 then
  redis.call('ZADD', KEYS[5], now_ms + tonumber(ARGV[14]), ARGV[13])
  redis.call('PEXPIRE', KEYS[5], tonumber(ARGV[14]))
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
