-- TokenBudget, leased mode: gives this replica a chunk of the requests and tokens of the
-- current window, atomically, on Redis's clock, and takes back what it has left of a
-- chunk of the same window. Plain Lua 5.1, no module, no command newer than Redis 7.
--
-- Windows are fixed: index floor(now / window), so the chunks handed out in one window
-- never add up to more than the limit, and a chunk not spent by the window's end is lost
-- with it (at most one per replica, smaller near the end: see `shrink`).
--
-- KEYS[1] requests base key, KEYS[2] tokens base key (':' .. index appended)
-- ARGV[1] window in ms
-- ARGV[2] requests per window (0: no limit)   ARGV[3] request chunk
-- ARGV[4] tokens per window (0: no limit)     ARGV[5] token chunk (at least this request's)
-- ARGV[6] tokens this request needs (at least this much of the token chunk)
-- ARGV[7] window index of the chunk given back ARGV[8] requests given back
-- ARGV[9] tokens given back
--
-- Returns {1, index, requests taken, tokens taken, ms left in the window}, or
-- {0, limit, retry in ms}: limit 1 requests, 2 tokens; retry -1 when it can never fit.

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local index = math.floor(now_ms / window)
local left = (index + 1) * window - now_ms
local rkey = KEYS[1] .. ':' .. index
local tkey = KEYS[2] .. ':' .. index

if tonumber(ARGV[7]) == index then
  local back_r = tonumber(ARGV[8])
  local back_t = tonumber(ARGV[9])
  if back_r > 0 and redis.call('EXISTS', rkey) == 1 then
    if redis.call('DECRBY', rkey, back_r) < 0 then redis.call('SET', rkey, 0, 'KEEPTTL') end
  end
  if back_t > 0 and redis.call('EXISTS', tkey) == 1 then
    if redis.call('DECRBY', tkey, back_t) < 0 then redis.call('SET', tkey, 0, 'KEEPTTL') end
  end
end

-- In the last tenth of a window, chunks shrink with the time left (to at least what the
-- request needs), so what replicas hold unspent when the window ends stays small.
local shrink = math.min(1, 10 * left / window)

local function take(key, limit, chunk, need)
  if limit <= 0 then return 0, 0 end
  chunk = math.ceil(chunk * shrink)
  if need > limit then return nil, -1 end
  local used = tonumber(redis.call('GET', key) or '0') or 0
  local room = limit - used
  if room < need or room <= 0 then return nil, left end
  return math.min(math.max(chunk, need), room), 0
end

local rlimit = tonumber(ARGV[2])
local tlimit = tonumber(ARGV[4])
local r, rretry = take(rkey, rlimit, tonumber(ARGV[3]), 1)
if not r then return {0, 1, rretry} end
local tk, tretry = take(tkey, tlimit, tonumber(ARGV[5]), tonumber(ARGV[6]))
if not tk then return {0, 2, tretry} end
if rlimit > 0 then
  redis.call('INCRBY', rkey, r)
  redis.call('PEXPIRE', rkey, left + 1000)
end
if tlimit > 0 then
  redis.call('INCRBY', tkey, tk)
  redis.call('PEXPIRE', tkey, left + 1000)
end
return {1, index, r, tk, left}
