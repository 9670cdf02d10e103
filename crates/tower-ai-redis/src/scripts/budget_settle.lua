-- TokenBudget, strict mode: settlements of requests admitted earlier, each replacing its
-- reservation with what the request really cost. Plain Lua 5.1, no module, no command
-- newer than Redis 7. This file defines settle_all; the admission script (which applies
-- the settlements it carries before it decides) and the flush script follow it.
--
-- A replica queues its settlements and sends them with its next admission, or on their
-- own after a short delay; until one lands its reservation stays counted, so a late
-- refund only holds the key back longer.
--
-- Each settlement starts with its flags in ARGV, the sum of the parts it has:
--   1 tokens:  ARGV d, the move of the key's TAT in microseconds: (tokens used - tokens
--              reserved) * window / limit, as the replica computed it (negative: a
--              refund); its key: tokens (GCRA)
--   2 spend:   ARGV spend used - spend reserved (micro-units), then the hour and day
--              indices of the reservation; its keys: the bases of the spend per hour and
--              per day windows
--   4 release: ARGV the request's member in the semaphore; its key: concurrency
--   8 the keys are the admission's (the same name): none of its own in KEYS
-- then the ARGV of its parts in that order, and (without 8) one key per part (two for
-- spend) in KEYS, in the same order. A part that changes nothing is not sent.
--
-- Tokens: the TAT moves by d: back for a refund (an arrival time already in the past
-- stays there: an idle key cannot bank more than its room), on from now at the earliest
-- for a charge. Spend: the difference lands in the calendar window where the reservation
-- was made, if it still exists.
--
-- A name's two GCRA TATs, requests and tokens, share one key (one GET and one SET instead
-- of two each): a string "requests TAT:tokens TAT", whole microseconds. A value of any
-- other shape (a key from before, or none) reads as no TAT where it does not parse.
--
-- The admission's own TAT key (KEYS[1]) is read once and written once per script: tat_key
-- names it; its TATs are kept in own_r and own_t (changed by a settlement: tat_dirty)
-- until the admission writes them. (Few local functions: each is a closure made on every
-- call.)

local tat_key, own_r, own_t, tat_dirty

-- The two TATs of a key: requests, tokens (0 when missing or unreadable).
local function read_tats(key)
  local v = redis.call('GET', key)
  if not v then return 0, 0 end
  local i = string.find(v, ':', 1, true)
  if not i then return tonumber(v) or 0, 0 end
  return tonumber(string.sub(v, 1, i - 1)) or 0, tonumber(string.sub(v, i + 1)) or 0
end

-- One TAT as written: rounded to the microsecond, by '%d' (a quarter of what '%.0f'
-- costs) while the TAT is an exact integer of a double.
local function tat_text(tat)
  if tat < 9007199254740992 then
    return string.format('%d', math.floor(tat + 0.5))
  end
  return string.format('%.0f', tat)
end

-- Writes a key's two TATs, kept until the later + 1 s; or, unless keep, deletes the key
-- when neither is ahead of now.
local function write_tats(key, r, t, now, keep)
  local last = r
  if t > last then last = t end
  if keep or last > now then
    redis.call('SET', key, tat_text(r) .. ':' .. tat_text(t), 'PX',
      math.ceil((last - now) / 1000) + 1000)
  else
    redis.call('DEL', key)
  end
end

-- Applies the settlements from KEYS[k + 1] and ARGV[a + 1] to the end of ARGV; own_* are
-- the admission's keys (nil: none).
local function settle_all(now, k, a, own_tpm, own_hour, own_day, own_conc)
  local last = #ARGV
  while a < last do
    a = a + 1
    local flags = ARGV[a] + 0
    local own = flags >= 8
    if own then flags = flags - 8 end
    if flags % 2 == 1 then
      a = a + 1
      local d = ARGV[a] + 0
      local key = own_tpm
      if not own then k = k + 1; key = KEYS[k] end
      local r, tat
      if key == tat_key then
        if not own_r then own_r, own_t = read_tats(key) end
        tat = own_t
      else
        r, tat = read_tats(key)
      end
      if d > 0 and tat < now then tat = now end
      tat = tat + d
      if key == tat_key then
        own_t = tat
        tat_dirty = true
      else
        write_tats(key, r, tat, now, false)
      end
      flags = flags - 1
    end
    local release = flags >= 4
    if release then flags = flags - 4 end
    if flags == 2 then
      local cost = ARGV[a + 1]
      local hour, day = own_hour, own_day
      if not own then hour = KEYS[k + 1]; day = KEYS[k + 2]; k = k + 2 end
      for _, key in ipairs({hour .. ':' .. ARGV[a + 2], day .. ':' .. ARGV[a + 3]}) do
        if redis.call('EXISTS', key) == 1 then
          local left = redis.call('INCRBY', key, cost)
          if left < 0 then redis.call('SET', key, 0, 'KEEPTTL') end
        end
      end
      a = a + 3
    end
    if release then
      a = a + 1
      local key = own_conc
      if not own then k = k + 1; key = KEYS[k] end
      redis.call('ZREM', key, ARGV[a])
    end
  end
end
