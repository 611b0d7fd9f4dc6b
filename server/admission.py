"""Global admission: which request gets the next generation slot, a bounded queue, a wait timeout.

Requests beyond what the engine decodes at once wait here, before any response byte is sent, so
a full queue or a timed-out wait is an honest 503 with Retry-After instead of a stalled stream.

The next free slot goes to the waiting tenant (key) with the lowest service counter
(`FairShare`), first come first served within a tenant. Beyond the engine's `max_running`
slots there are `spare_slots`, given only to a tenant with nothing running: a key arriving while
another holds every slot starts at the next step instead of waiting for a stream to finish,
while a lone key never runs more streams than the engine decodes well.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from llmserve.server.errors import ServiceUnavailable
from llmserve.server.scheduler import FairShare, Tenant

__all__ = ["AdmissionGate"]


@dataclass(eq=False, slots=True)
class _Waiter:
    tenant: Tenant
    arrival: int
    future: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class AdmissionGate:
    def __init__(
        self,
        *,
        max_running: int,
        max_waiting: int,
        timeout_seconds: float,
        spare_slots: int = 0,
        share: FairShare | None = None,
    ) -> None:
        self.max_running = max_running
        self.spare_slots = spare_slots
        self.max_waiting = max_waiting
        self.timeout_seconds = timeout_seconds
        self.share = share or FairShare()
        self.running = 0
        self._queues: dict[Tenant, deque[_Waiter]] = {}
        self._waiting = 0
        self._arrivals = itertools.count()

    @property
    def waiting(self) -> int:
        return self._waiting

    def check_room(self) -> None:
        """Refuse now, before the request's body is read, if a slot could not even be queued
        for. The queue may still fill while the body arrives; `slot()` refuses then."""
        if self.running >= self.max_running and self._waiting >= self.max_waiting:
            raise self._full()

    @asynccontextmanager
    async def slot(self, tenant: Tenant | None = None) -> AsyncIterator[int]:
        """Hold a generation slot for the block; yields the ns spent waiting for it."""
        tenant = tenant or self.share.tenant("anonymous")
        started = time.monotonic_ns()
        self.share.arrive(tenant)
        try:
            await self._wait(tenant)
            try:
                yield time.monotonic_ns() - started
            finally:
                self._release(tenant)
        finally:
            self.share.depart(tenant)

    async def _wait(self, tenant: Tenant) -> None:
        if self._waiting >= self.max_waiting and not self._may_start(tenant):
            raise self._full()
        waiter = _Waiter(tenant, next(self._arrivals))
        self._enqueue(waiter)
        self._fill()
        if waiter.future.done():
            return
        tenant.waited = True
        try:
            # Not wait_for: on Python 3.11 it swallows a cancellation that arrives as the slot
            # is handed over, and the request would run on for a client that is gone.
            async with asyncio.timeout(self.timeout_seconds):
                await asyncio.shield(waiter.future)
        except TimeoutError:
            if not waiter.future.done():
                self._dequeue(waiter)
                raise _overloaded(
                    f"No generation slot became free within {self.timeout_seconds:g} s."
                ) from None
        except asyncio.CancelledError:
            if waiter.future.done():
                # The slot was handed to us just as we were cancelled: pass it on.
                self._release(tenant)
            else:
                self._dequeue(waiter)
            raise

    def _may_start(self, tenant: Tenant) -> bool:
        if self.running < self.max_running:
            return True
        return self.running < self.max_running + self.spare_slots and tenant.running == 0

    def _enqueue(self, waiter: _Waiter) -> None:
        self._queues.setdefault(waiter.tenant, deque()).append(waiter)
        waiter.tenant.waiting += 1
        self._waiting += 1

    def _dequeue(self, waiter: _Waiter) -> None:
        queue = self._queues[waiter.tenant]
        queue.remove(waiter)
        if not queue:
            del self._queues[waiter.tenant]
        waiter.tenant.waiting -= 1
        self._waiting -= 1

    def _fill(self) -> None:
        """Hand free slots to waiters: the lowest counter first among those that may start."""
        while True:
            ready = [q[0] for t, q in self._queues.items() if self._may_start(t)]
            if not ready:
                return
            waiter = min(ready, key=lambda w: (w.tenant.priority, w.arrival))
            self._dequeue(waiter)
            self.running += 1
            waiter.tenant.running += 1
            waiter.future.set_result(None)

    def _full(self) -> ServiceUnavailable:
        return _overloaded(
            f"The server is at capacity: {self.running} requests running and "
            f"{self._waiting} waiting. Retry shortly."
        )

    def _release(self, tenant: Tenant) -> None:
        self.running -= 1
        tenant.running -= 1
        self._fill()


def _overloaded(message: str) -> ServiceUnavailable:
    return ServiceUnavailable(message, code="server_overloaded", headers={"Retry-After": "1"})
