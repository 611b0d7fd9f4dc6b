"""The shared limiter: bucket levels and concurrency leases in Redis, one Lua script per decision.

Every decision reads Redis's own clock (`TIME`), so replicas with skewed clocks agree. All the
keys of one API key share a hash tag (`{name}`), so each script touches one Cluster slot.

Each request gets an id of the server's making, and its admit, its end and its lease renewals
are scripts keyed by that id (`redis_scripts`): none counts twice, and any order leaves the same
books. An admit that got no answer (a timeout, an error, a cancelled wait) is settled with a full
refund, and an end that Redis did not confirm is retried in the background, so a slow or stalled
Redis leaves no lease and no charge behind a request that is over.

Leases carry an expiry that running requests renew (putting back any a restarted Redis lost); a
server that dies stops renewing, and its leases lapse within `lease_seconds`, so a crash never
locks a customer out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import AskError, NoScriptError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from llmserve.server.keys import KeyEntry
from llmserve.server.ratelimit.base import (
    Decision,
    Limiter,
    LimiterUnavailable,
    Reservation,
    bucket_state,
    buckets_for,
    refunds,
)
from llmserve.server.ratelimit.redis_scripts import ADMIT, RENEW, SETTLE

__all__ = ["RedisLimiter", "connect"]

log = logging.getLogger("llmserve.ratelimit")

# A settled id is remembered for this many lease periods (two minutes by default).
_SETTLED_LEASES = 4
# Settlements kept for retry while Redis is away; beyond, the oldest are given up.
_MAX_PENDING = 10_000
_RETRY_FIRST_SECONDS = 0.05
_RETRY_LONGEST_SECONDS = 2.0
# Keys whose leases are renewed at once.
_RENEW_BATCH = 64


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
        sentinel = Sentinel(hosts, **options)
        return sentinel.master_for(
            sentinel_master or "mymaster", connection_pool_class=_SentinelMasterPool
        )
    return redis.from_url(url, **options)


class _SentinelMasterPool(SentinelConnectionPool):
    """The master's connections, closed with the clients that ask the Sentinels for it: those
    serve this pool alone, and redis-py leaves them open (a connection to each Sentinel)."""

    async def aclose(self) -> None:
        await super().aclose()
        await self.sentinel_manager.aclose()


class RedisLimiter(Limiter):
    def __init__(self, client: Any, *, timeout_seconds: float, lease_seconds: float) -> None:
        self.client = client
        self.timeout = timeout_seconds
        self.lease_ms = int(lease_seconds * 1000)
        # A late admit or renewal is void if it arrives within this; one later still holds a
        # lease nobody renews, which lapses within lease_seconds like a crashed server's.
        self.settled_ms = self.lease_ms * _SETTLED_LEASES
        self.settlements_dropped = 0
        self._admit = _Script(client, ADMIT)
        self._settle = _Script(client, SETTLE)
        self._renew = _Script(client, RENEW)
        # key name -> id of each grant running here -> whether it holds a place under the key's
        # concurrency limit; their expiry is renewed until they end.
        self._held: dict[str, dict[str, bool]] = {}
        # id -> settlement Redis has not confirmed yet, oldest first.
        self._pending: dict[str, _Settlement] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._settler: asyncio.Task[None] | None = None

    async def _call(self, script: _Script, keys: list[str], args: list[Any]) -> Any:
        try:
            return await asyncio.wait_for(script(keys=keys, args=args), self.timeout)
        except AskError as exc:
            # MOVED or ASK reach this client only when it takes a Cluster node for one Redis.
            raise LimiterUnavailable(
                f"Redis answered {type(exc).__name__} ({exc}): it is a Cluster; "
                'set ratelimit.redis_mode = "cluster"'
            ) from None
        # A Cluster client with no node to reach says so with an exception outside RedisError,
        # and redis-py's connection code has failed with others (an AttributeError on a
        # connection torn down mid-send, under concurrent script loads on a Cluster). Whatever
        # the client raises, the limiter is unavailable and the failure policy decides.
        except Exception as exc:
            raise LimiterUnavailable(f"{type(exc).__name__}: {exc}") from None

    async def admit(self, key: KeyEntry, tokens: int) -> Decision:
        buckets = buckets_for(key)
        cost = {b.name: b.cost(tokens) for b in buckets}
        grant = uuid.uuid4().hex
        args: list[Any] = [self.lease_ms, key.limit("concurrency") or 0, grant, len(buckets)]
        for b in buckets:
            args += [b.name, b.capacity, int(b.window_seconds * 1000), cost[b.name]]
        keys = [_key(key.name, b.name) for b in buckets] + _books(key.name)
        # Without an answer the request goes on unchecked or is refused, but the admit may yet
        # run (a stalled Redis runs what it has received) or have run with its answer lost:
        # settling its id with a full refund undoes it whichever happens.
        undo = _Settlement(key, grant, cost, admitted=False)
        with self._settled_on_failure(undo):
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
        self._held.setdefault(key.name, {})[grant] = key.limit("concurrency") is not None
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_leases())
        return Decision(True, state=state, reservation=Reservation(key, tokens, grant))

    async def finish(
        self, reservation: Reservation, used_tokens: int, *, requests_back: bool = False
    ) -> None:
        """Settle the request's id; if Redis does not confirm it, retry in the background."""
        key = reservation.key
        grants = self._held.get(key.name, {})
        grants.pop(reservation.lease, None)
        if not grants:
            self._held.pop(key.name, None)
        back = refunds(
            buckets_for(key), reservation.tokens, used_tokens, requests_back=requests_back
        )
        settlement = _Settlement(key, reservation.lease, back, admitted=True)
        with self._settled_on_failure(settlement):
            await self._apply(settlement)

    @contextlib.contextmanager
    def _settled_on_failure(self, settlement: _Settlement) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self._settle_later(settlement)
            raise

    async def _apply(self, settlement: _Settlement) -> None:
        name, refunds = settlement.key.name, settlement.refunds
        buckets = [b for b in buckets_for(settlement.key) if b.name in refunds]
        args: list[Any] = [
            settlement.grant,
            self.settled_ms,
            int(settlement.admitted),
            len(buckets),
        ]
        for b in buckets:
            args += [b.capacity, int(b.window_seconds * 1000), refunds[b.name]]
        keys = [_key(name, b.name) for b in buckets] + _books(name)
        await self._call(self._settle, keys, args)

    def _settle_later(self, settlement: _Settlement) -> None:
        if len(self._pending) >= _MAX_PENDING:
            # Past the bound the oldest is given up: its lease lapses unrenewed, its refund is
            # lost (the strict side), and a late admit of it would stand.
            del self._pending[next(iter(self._pending))]
            self.settlements_dropped += 1
            if self.settlements_dropped % 1000 == 1:
                log.warning(
                    "%d settlements wait for Redis; %d given up so far",
                    len(self._pending),
                    self.settlements_dropped,
                )
        self._pending[settlement.grant] = settlement
        if self._settler is None or self._settler.done():
            self._settler = asyncio.get_running_loop().create_task(self._settle_pending())

    async def _settle_pending(self) -> None:
        """Retry until Redis confirms each settlement: they are idempotent, so retrying is safe."""
        pause = _RETRY_FIRST_SECONDS
        while self._pending:
            grant, settlement = next(iter(self._pending.items()))
            try:
                await self._apply(settlement)
            except LimiterUnavailable:
                # To the back of the queue, so one that keeps failing holds up no other.
                if self._pending.pop(grant, None) is not None:
                    self._pending[grant] = settlement
                await asyncio.sleep(pause)
                pause = min(pause * 2, _RETRY_LONGEST_SECONDS)
                continue
            self._pending.pop(grant, None)
            pause = _RETRY_FIRST_SECONDS

    async def _renew_leases(self) -> None:
        while self._held:
            await asyncio.sleep(self.lease_ms / 3000)
            held = [
                (name, [x for grant, place in grants.items() for x in (grant, int(place))])
                for name, grants in self._held.items()
            ]
            for start in range(0, len(held), _RENEW_BATCH):
                results = await asyncio.gather(
                    *(
                        self._call(self._renew, _books(name), [self.lease_ms, *grants])
                        for name, grants in held[start : start + _RENEW_BATCH]
                    ),
                    return_exceptions=True,
                )
                failed = [r for r in results if isinstance(r, Exception)]
                if failed:
                    log.warning("could not renew the leases of %d keys: %s", len(failed), failed[0])

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        if self._settler is not None:
            # A last chance for settlements still waiting; those left lapse with their leases.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._settler), self.timeout * 4)
            self._settler.cancel()
        await self.client.aclose()


class _Script:
    """A Lua script run by its digest, and sent whole to a node that does not know it yet.

    Redis does not replicate its script cache (neither SCRIPT LOAD nor EVAL reaches a replica),
    so after a failover the new master answers NOSCRIPT until the scripts are sent to it again.
    redis-py's own Script then sends SCRIPT LOAD to every master it knows, within the caller's
    timeout and to a dead one too until its map of the Cluster is refreshed; EVAL goes only to
    the node that holds the keys, and loads the script there in the same round trip.
    """

    def __init__(self, client: Any, source: str) -> None:
        self.client = client
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, *, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self.client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.client.eval(self.source, len(keys), *keys, *args)


@dataclass(frozen=True, slots=True)
class _Settlement:
    """Closing one request's books: its id, and what each bucket gets back."""

    key: KeyEntry
    grant: str
    refunds: dict[str, int]
    # Redis answered the admit: refund even if the lease lapsed while Redis was away.
    admitted: bool


def _books(name: str) -> list[str]:
    """The running (holding a place or not) and the settled ids of a key, the last KEYS of
    every script."""
    return [_key(name, "leases"), _key(name, "open"), _key(name, "settled")]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
