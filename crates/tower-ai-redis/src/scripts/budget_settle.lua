-- TokenBudget, strict mode: settlements of requests admitted earlier, each replacing its
-- reservation with what the request really cost. Plain Lua 5.1, no module, no command
-- newer than Redis 7. This file defines settle_all; the admission script (which applies
-- the settlements it carries before it decides) and the flush script follow it.
--
-- A replica queues its settlements and sends them with its next admission, or on their
-- own after a short delay; until one lands its reservation stays counted, so a late
-- refund only holds the key back longer.
--
-- Each settlement i (from 0) takes 4 KEYS from key_base + 4i + 1: tokens (GCRA), the
-- bases of the spend per hour and per day windows, concurrency; and 6 ARGV from
-- arg_base + 6i + 1: tokens per window (0: no limit), tokens used - tokens reserved
-- (negative: a refund), spend used - spend reserved (micro-units), the hour and day
-- indices of the reservation, the request's member in the semaphore ('' for none).
--
-- Tokens: the TAT moves by the difference: back for a refund (an arrival time already
-- in the past stays there: an idle key cannot bank more than its room), on from now at
-- the earliest for a charge. Spend: the difference lands in the calendar window where the
-- reservation was made, if it still exists.

local function settle_all(now, window, key_base, arg_base, n)
  for i = 0, n - 1 do
    local k = key_base + i * 4
    local a = arg_base + i * 6
    local limit = tonumber(ARGV[a + 1])
    local delta = tonumber(ARGV[a + 2])
    if limit > 0 and delta ~= 0 then
      local T = window / limit
      local tat = tonumber(redis.call('GET', KEYS[k + 1]) or '0') or 0
      if delta > 0 and tat < now then tat = now end
      tat = tat + delta * T
      if tat > now then
        redis.call('SET', KEYS[k + 1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
      elseif delta < 0 then
        redis.call('DEL', KEYS[k + 1])
      end
    end
    local cost = tonumber(ARGV[a + 3])
    if cost ~= 0 then
      for j, index in ipairs({ARGV[a + 4], ARGV[a + 5]}) do
        local key = KEYS[k + 1 + j] .. ':' .. index
        if redis.call('EXISTS', key) == 1 then
          local left = redis.call('INCRBY', key, cost)
          if left < 0 then redis.call('SET', key, 0, 'KEEPTTL') end
        end
      end
    end
    if ARGV[a + 6] ~= '' then
      redis.call('ZREM', KEYS[k + 4], ARGV[a + 6])
    end
  end
end
