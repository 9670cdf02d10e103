-- TokenBudget, strict mode: settles one admitted request with what it really cost.
-- Plain Lua 5.1, no module, no command newer than Redis 7.
--
-- KEYS as budget_admit.lua: 1 requests, 2 tokens, 3 spend per hour, 4 spend per day,
-- 5 concurrency.
-- ARGV[1] window in microseconds    ARGV[2] tokens per window (0: no limit)
-- ARGV[3] tokens used - tokens reserved (negative: a refund)
-- ARGV[4] spend used - spend reserved, micro-units
-- ARGV[5] hour index of the reservation   ARGV[6] day index of the reservation
-- ARGV[7] the request's member in the semaphore ('' for none)
--
-- Tokens: the TAT moves by the difference: back for a refund (an arrival time already
-- in the past stays there: an idle key cannot bank more than its room), on from now at
-- the earliest for a charge. Spend: the difference lands in the calendar window where the
-- reservation was made, if it still exists. Returns 1.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local limit = tonumber(ARGV[2])
local delta = tonumber(ARGV[3])
if limit > 0 and delta ~= 0 then
  local T = tonumber(ARGV[1]) / limit
  local tat = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
  if delta > 0 and tat < now then tat = now end
  tat = tat + delta * T
  if tat > now then
    redis.call('SET', KEYS[2], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
  elseif delta < 0 then
    redis.call('DEL', KEYS[2])
  end
end

local cost = tonumber(ARGV[4])
if cost ~= 0 then
  for i, index in ipairs({ARGV[5], ARGV[6]}) do
    local key = KEYS[2 + i] .. ':' .. index
    if redis.call('EXISTS', key) == 1 then
      local left = redis.call('INCRBY', key, cost)
      if left < 0 then redis.call('SET', key, 0, 'KEEPTTL') end
    end
  end
end

if ARGV[7] ~= '' then
  redis.call('ZREM', KEYS[5], ARGV[7])
end
return 1
