"""The Lua scripts of the Redis limiter: each decision is one atomic script, keyed by request.

Per API key, Redis holds one hash per token bucket (`level`, `ts`), two sorted sets of the ids
admitted and still running (id -> expiry): `leases`, those that hold a place under the key's
concurrency limit, and `open`, those that hold none (the token reservation a request makes
after its place, or a request of a key without that limit), and a sorted set `settled` of the
ids whose books are closed (id -> when that can be forgotten). Every request the limiter is asked
about has a server-made id, so the scripts are idempotent and commute:

- ADMIT charges the buckets and adds the id to `leases` (given a concurrency limit) or `open`,
  unless the id is already settled (its
  request gave up on this admit, which Redis ran late: nothing is charged) or already admitted
  (a client retry of an admit that ran: not charged twice).
- SETTLE closes the id: it refunds what it is told to if the id is running, removes it, and
  records the id as settled, so an admit or a renewal arriving afterwards is void.
  Run twice, or before its admit, it changes nothing more. The settlement of an id whose admit
  Redis answered 'ok' refunds even if the id is no longer running: delayed while Redis was away
  (a failover), it may arrive after the id's lease lapsed and was swept, and its request must
  not be charged its whole reservation for that. (Should such a settlement run, lose its answer
  and be retried only after the id is forgotten as settled, it refunds twice.)
- RENEW pushes the expiry of running ids, and puts back those a restarted Redis lost in the
  set they belong to, but never revives a settled one.

All times are Redis's own clock (`TIME`), in milliseconds.
"""

from __future__ import annotations

__all__ = ["ADMIT", "RENEW", "SETTLE"]

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: the buckets, then leases, open, settled. ARGV: lease ttl ms, concurrency limit (0 = none:
# the id holds no place), id, bucket count, then per bucket: name, capacity, window ms, cost.
# Returns status ('ok', 'wait', 'never' or 'void'), the refusing limit, the wait in ms, and the
# bucket levels after the decision.
ADMIT = (
    _NOW
    + """
local ttl, limit, id, n = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local leases, open, settled = KEYS[n + 1], KEYS[n + 2], KEYS[n + 3]
local closed = tonumber(redis.call('ZSCORE', settled, id))
if closed and closed > now then return {'void', '', '0'} end
local levels, costs = {}, {}
local refused, wait, never = '', -1, ''
for i = 1, n do
  local b = 4 + (i - 1) * 4
  local name, cap, window, cost = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]),
    tonumber(ARGV[b + 4])
  local rate = cap / window
  local saved = redis.call('HMGET', KEYS[i], 'level', 'ts')
  local level = tonumber(saved[1])
  if level == nil then
    level = cap
  else
    level = math.min(cap, level + (now - tonumber(saved[2])) * rate)
  end
  levels[i], costs[i] = level, cost
  if cost > cap then
    never = name
  elseif level < cost and (cost - level) / rate > wait then
    refused, wait = name, (cost - level) / rate
  end
end
local out = {}
for i = 1, n do out[i] = tostring(levels[i]) end
redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
redis.call('ZREMRANGEBYSCORE', open, '-inf', now)
if redis.call('ZSCORE', leases, id) or redis.call('ZSCORE', open, id) then
  return {'ok', '', '0', unpack(out)}
end
if never ~= '' then return {'never', never, '0', unpack(out)} end
if refused ~= '' then return {'wait', refused, tostring(wait), unpack(out)} end
if limit > 0 and redis.call('ZCARD', leases) >= limit then
  return {'wait', 'concurrency', '1000', unpack(out)}
end
local book = open
if limit > 0 then book = leases end
redis.call('ZADD', book, now + ttl, id)
redis.call('PEXPIRE', book, ttl * 2)
for i = 1, n do
  local b = 4 + (i - 1) * 4
  levels[i] = levels[i] - costs[i]
  out[i] = tostring(levels[i])
  redis.call('HSET', KEYS[i], 'level', tostring(levels[i]), 'ts', now)
  redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[b + 3]) + 60000)
end
return {'ok', '', '0', unpack(out)}
"""
)

# KEYS: the buckets to refund, then leases, open, settled. ARGV: id, ms to remember it as settled,
# 1 if Redis admitted the id (0: its admit got no answer), bucket count, then per bucket:
# capacity, window ms, refund (negative: charge more).
# Returns 1 if the id was refunded, else 0.
SETTLE = (
    _NOW
    + """
local id, keep, admitted, n = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local leases, open, settled = KEYS[n + 1], KEYS[n + 2], KEYS[n + 3]
redis.call('ZREMRANGEBYSCORE', settled, '-inf', now)
local closed = redis.call('ZSCORE', settled, id)
redis.call('ZADD', settled, now + keep, id)
redis.call('PEXPIRE', settled, keep)
local running = redis.call('ZREM', leases, id) + redis.call('ZREM', open, id)
if closed or (running == 0 and admitted ~= '1') then return 0 end
for i = 1, n do
  local b = 4 + (i - 1) * 3
  local cap, window, refund = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local saved = redis.call('HMGET', KEYS[i], 'level', 'ts')
  local level = tonumber(saved[1])
  if level ~= nil and refund ~= 0 then
    level = math.min(cap, level + (now - tonumber(saved[2])) * cap / window + refund)
    redis.call('HSET', KEYS[i], 'level', tostring(level), 'ts', now)
  end
end
return 1
"""
)

# KEYS: leases, open, settled. ARGV: lease ttl ms, then for each id still running: the id, and
# 1 if it holds a place (it belongs in leases), else 0.
RENEW = (
    _NOW
    + """
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  local closed = tonumber(redis.call('ZSCORE', KEYS[3], ARGV[i]))
  if not closed or closed <= now then
    local book = KEYS[2]
    if ARGV[i + 1] == '1' then book = KEYS[1] end
    redis.call('ZADD', book, now + ttl, ARGV[i])
  end
end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
redis.call('PEXPIRE', KEYS[2], ttl * 2)
return 1
"""
)
