-- The flush script (after settle_all): settlements only, none carried by an admission,
-- from KEYS[1] and ARGV[1] (see settle_all). Returns 1.
local t = redis.call('TIME')
settle_all(t[1] * 1000000 + t[2], 0, 0)
return 1
