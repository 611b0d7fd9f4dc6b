"""The in-process limiter: the embedded default, for a single server without Redis."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from llmserve.server.ratelimit.base import (
    Decision,
    Limiter,
    Reservation,
    bucket_state,
    buckets_for,
    refunds,
)

if TYPE_CHECKING:
    from llmserve.server.keys import KeyEntry

__all__ = ["MemoryLimiter"]


class MemoryLimiter(Limiter):
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # (key name, bucket name) -> (level, when it was that level)
        self._levels: dict[tuple[str, str], tuple[float, float]] = {}
        self._leases: dict[str, set[str]] = {}
        # Reservations admitted and not yet settled, so that settling one twice does nothing.
        self._open: set[str] = set()

    def _level(self, key: str, name: str, capacity: int, rate: float, now: float) -> float:
        level, updated = self._levels.get((key, name), (float(capacity), now))
        return min(float(capacity), level + (now - updated) * rate)

    async def admit(self, key: KeyEntry, tokens: int) -> Decision:
        now = self._clock()
        buckets = buckets_for(key)
        cost = {b.name: b.cost(tokens) for b in buckets}
        levels = {
            b.name: self._level(key.name, b.name, b.capacity, b.rate_per_second, now)
            for b in buckets
        }

        for b in buckets:
            if cost[b.name] > b.capacity:
                return Decision(
                    False, b.name, b.window_seconds, bucket_state(buckets, levels), never=True
                )
        waits = {
            b.name: (cost[b.name] - levels[b.name]) / b.rate_per_second
            for b in buckets
            if levels[b.name] < cost[b.name]
        }
        if waits:
            limit = max(waits, key=lambda name: waits[name])
            return Decision(False, limit, waits[limit], bucket_state(buckets, levels))
        leases = self._leases.setdefault(key.name, set())
        concurrency = key.limit("concurrency")
        if concurrency is not None and len(leases) >= concurrency:
            return Decision(False, "concurrency", 1.0, bucket_state(buckets, levels))
        after = {name: level - cost[name] for name, level in levels.items()}
        for name, level in after.items():
            self._levels[(key.name, name)] = (level, now)
        lease = uuid.uuid4().hex
        self._open.add(lease)
        if concurrency is not None:
            leases.add(lease)
        return Decision(
            True, state=bucket_state(buckets, after), reservation=Reservation(key, tokens, lease)
        )

    async def finish(
        self, reservation: Reservation, used_tokens: int, *, requests_back: bool = False
    ) -> None:
        if reservation.lease not in self._open:
            return
        self._open.discard(reservation.lease)
        key = reservation.key
        buckets = buckets_for(key)
        back = refunds(buckets, reservation.tokens, used_tokens, requests_back=requests_back)
        now = self._clock()
        for b in buckets:
            if back[b.name]:
                level = self._level(key.name, b.name, b.capacity, b.rate_per_second, now)
                self._levels[(key.name, b.name)] = (
                    min(float(b.capacity), level + back[b.name]),
                    now,
                )
        self._leases.get(key.name, set()).discard(reservation.lease)

    async def close(self) -> None:
        self._levels.clear()
        self._leases.clear()
        self._open.clear()
