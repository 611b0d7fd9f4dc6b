"""Global admission: at most `max_running` generations, a bounded FIFO of waiters, a wait timeout.

Requests beyond what the engine decodes at once wait here, before any response byte is sent, so
a full queue or a timed-out wait is an honest 503 with Retry-After instead of a stalled stream.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from llmserve.server.errors import ServiceUnavailable

__all__ = ["AdmissionGate"]


class AdmissionGate:
    def __init__(self, *, max_running: int, max_waiting: int, timeout_seconds: float) -> None:
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.timeout_seconds = timeout_seconds
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def check_room(self) -> None:
        """Refuse now, before the request's body is read, if a slot could not even be queued
        for. The queue may still fill while the body arrives; `slot()` refuses then."""
        if self.running >= self.max_running and len(self._waiters) >= self.max_waiting:
            raise self._full()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[int]:
        """Hold a generation slot for the block; yields the ns spent waiting for it."""
        started = time.monotonic_ns()
        if self.running < self.max_running and not self._waiters:
            self.running += 1
        else:
            await self._wait()
        try:
            yield time.monotonic_ns() - started
        finally:
            self._release()

    async def _wait(self) -> None:
        if len(self._waiters) >= self.max_waiting:
            raise self._full()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.timeout_seconds)
        except TimeoutError:
            if not waiter.done():
                self._waiters.remove(waiter)
                raise _overloaded(
                    f"No generation slot became free within {self.timeout_seconds:g} s."
                ) from None
        except asyncio.CancelledError:
            if waiter.done():
                # The slot was handed to us just as we were cancelled: pass it on.
                self._release()
            else:
                self._waiters.remove(waiter)
            raise

    def _full(self) -> ServiceUnavailable:
        return _overloaded(
            f"The server is at capacity: {self.running} requests running and "
            f"{len(self._waiters)} waiting. Retry shortly."
        )

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                # The slot passes straight to the next waiter; `running` is unchanged.
                waiter.set_result(None)
                return
        self.running -= 1


def _overloaded(message: str) -> ServiceUnavailable:
    return ServiceUnavailable(message, code="server_overloaded", headers={"Retry-After": "1"})
