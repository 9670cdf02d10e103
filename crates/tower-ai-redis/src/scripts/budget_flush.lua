
-- The flush script (after settle_all): settlements only, none carried by an admission.
-- ARGV[1] window in microseconds   ARGV[2] number of settlements; then settle_all's.
-- Returns 1.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
settle_all(now, tonumber(ARGV[1]), 0, 2, tonumber(ARGV[2]))
return 1
