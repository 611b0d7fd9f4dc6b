"""The shared limiter: bucket levels and concurrency leases in Redis, one Lua script per decision.

Every decision reads Redis's own clock (`TIME`), so replicas with skewed clocks agree. All the
keys of one API key share a hash tag (`{name}`), so each script touches one Cluster slot.
Concurrency leases carry an expiry that running requests renew; a server that dies stops
renewing, and its leases lapse within `lease_seconds`, so a crash never locks a customer out.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.keys import KeyEntry
from server.ratelimit.base import (
    Decision,
    Limiter,
    LimiterUnavailable,
    Reservation,
    bucket_state,
    buckets_for,
)
from server.ratelimit.memory import costs

__all__ = ["RedisLimiter", "connect"]

log = logging.getLogger("llmserve.ratelimit")

# ARGV: lease ttl ms, concurrency limit (0 = none), lease id, bucket count, then per bucket:
# name, capacity, window ms, cost. KEYS: the buckets, then the lease set.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl, limit, lease, n = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local levels, caps, rates, costs = {}, {}, {}, {}
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
  levels[i], caps[i], rates[i], costs[i] = level, cap, rate, cost
  if cost > cap then
    never = name
  elseif level < cost and (cost - level) / rate > wait then
    refused, wait = name, (cost - level) / rate
  end
end
local out = {}
for i = 1, n do out[i] = tostring(levels[i]) end
if never ~= '' then return {'never', never, '0', unpack(out)} end
if refused ~= '' then return {'wait', refused, tostring(wait), unpack(out)} end
local leases = KEYS[n + 1]
if limit > 0 then
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
  if redis.call('ZCARD', leases) >= limit then
    return {'wait', 'concurrency', '1000', unpack(out)}
  end
  redis.call('ZADD', leases, now + ttl, lease)
  redis.call('PEXPIRE', leases, ttl * 2)
end
for i = 1, n do
  local b = 4 + (i - 1) * 4
  levels[i] = levels[i] - costs[i]
  out[i] = tostring(levels[i])
  redis.call('HSET', KEYS[i], 'level', tostring(levels[i]), 'ts', now)
  redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[b + 3]) + 60000)
end
return {'ok', '', '0', unpack(out)}
"""

# ARGV: lease id, refund, bucket count, then per bucket: capacity, window ms.
_FINISH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease, refund, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 1, n do
  local cap, window = tonumber(ARGV[2 + i * 2]), tonumber(ARGV[3 + i * 2])
  local saved = redis.call('HMGET', KEYS[i], 'level', 'ts')
  local level = tonumber(saved[1])
  if level ~= nil then
    level = math.min(cap, level + (now - tonumber(saved[2])) * cap / window + refund)
    redis.call('HSET', KEYS[i], 'level', tostring(level), 'ts', now)
  end
end
if lease ~= '' then redis.call('ZREM', KEYS[n + 1], lease) end
return 1
"""

# ARGV: ttl ms, then lease ids. KEYS[1]: the lease set.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
return 1
"""


def _key(name: str, part: str) -> str:
    return f"llmserve:rl:{{{name}}}:{part}"


def connect(mode: str, url: str, sentinel_master: str | None) -> Any:
    """A redis.asyncio client for a single server, a Cluster, or a Sentinel-managed master."""
    # A pooled connection that died with a restarted Redis is replaced within the same call.
    options = {
        "socket_connect_timeout": 1.0,
        "health_check_interval": 15,
        "retry": Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=2),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
    }
    if mode == "cluster":
        return RedisCluster.from_url(url, **options)
    if mode == "sentinel":
        hosts = []
        for address in url.removeprefix("sentinel://").split(","):
            host, _, port = address.rpartition(":")
            hosts.append((host, int(port or 26379)))
        return Sentinel(hosts, **options).master_for(sentinel_master or "mymaster")
    return redis.from_url(url, **options)


class RedisLimiter(Limiter):
    def __init__(self, client: Any, *, timeout_seconds: float, lease_seconds: float) -> None:
        self.client = client
        self.timeout = timeout_seconds
        self.lease_ms = int(lease_seconds * 1000)
        self._admit = client.register_script(_ADMIT)
        self._finish = client.register_script(_FINISH)
        self._renew = client.register_script(_RENEW)
        # key name -> leases held by requests running here, renewed until they end.
        self._held: dict[str, set[str]] = {}
        self._renewer: asyncio.Task[None] | None = None

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await asyncio.wait_for(script(keys=keys, args=args), self.timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            raise LimiterUnavailable(f"{type(exc).__name__}: {exc}") from None

    async def admit(self, key: KeyEntry, tokens: int) -> Decision:
        buckets = buckets_for(key)
        cost = costs(tokens)
        lease = uuid.uuid4().hex if key.concurrency is not None else ""
        args: list[Any] = [self.lease_ms, key.concurrency or 0, lease, len(buckets)]
        for b in buckets:
            args += [b.name, b.capacity, int(b.window_seconds * 1000), cost[b.name]]
        keys = [_key(key.name, b.name) for b in buckets] + [_key(key.name, "leases")]
        status, limit, wait_ms, *levels = await self._call(self._admit, keys, args)
        status, limit = _text(status), _text(limit)
        state = bucket_state(
            buckets, {b.name: float(v) for b, v in zip(buckets, levels, strict=True)}
        )
        if status == "never":
            window = next(b.window_seconds for b in buckets if b.name == limit)
            return Decision(False, limit, window, state, never=True)
        if status == "wait":
            return Decision(False, limit, float(wait_ms) / 1000, state)
        if lease:
            self._held.setdefault(key.name, set()).add(lease)
            self._ensure_renewer()
        return Decision(True, state=state, reservation=Reservation(key, tokens, lease or None))

    async def finish(self, reservation: Reservation, used_tokens: int) -> None:
        key = reservation.key
        if reservation.lease is not None:
            self._held.get(key.name, set()).discard(reservation.lease)
        buckets = [b for b in buckets_for(key) if b.name != "rpm"]
        args: list[Any] = [reservation.lease or "", reservation.tokens - used_tokens, len(buckets)]
        for b in buckets:
            args += [b.capacity, int(b.window_seconds * 1000)]
        keys = [_key(key.name, b.name) for b in buckets] + [_key(key.name, "leases")]
        await self._call(self._finish, keys, args)

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_leases())

    async def _renew_leases(self) -> None:
        while any(self._held.values()):
            await asyncio.sleep(self.lease_ms / 3000)
            for name, leases in list(self._held.items()):
                if leases:
                    try:
                        await self._call(
                            self._renew, [_key(name, "leases")], [self.lease_ms, *leases]
                        )
                    except LimiterUnavailable as exc:
                        log.warning("could not renew leases of key %s: %s", name, exc)

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        await self.client.aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
