"""Whether the server takes new work: model loaded, not draining, and what is still in flight.

Readiness is derived from these facts rather than stored, so /ready can never disagree with what
the handlers actually do.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from llmserve.server.errors import ServiceUnavailable

__all__ = ["ServerState"]


@dataclass
class ServerState:
    loaded: bool = False
    draining: bool = False
    in_flight: int = 0
    # The engine's own health: it may be rebuilding after a fault while loaded.
    engine_healthy: Callable[[], bool] = lambda: True
    # Its worker died: unlike recovering, this lasts until the process is restarted.
    engine_failed: Callable[[], bool] = lambda: False
    # Seconds since the shared key store was last read, while it cannot be; None: current.
    keys_stale_seconds: Callable[[], float | None] = lambda: None
    started_at: float = field(default_factory=time.time)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._idle.set()

    @property
    def status(self) -> str:
        if self.draining:
            return "draining"
        if not self.loaded:
            return "loading"
        if self.engine_failed():
            return "failed"
        return "ready" if self.engine_healthy() else "recovering"

    def readiness(self) -> dict[str, object]:
        """/ready's body: the status, and how old the keys are while their store is unreachable
        (the server keeps serving the keys it read last, so this does not change the status)."""
        body: dict[str, object] = {"status": self.status}
        stale = self.keys_stale_seconds()
        if stale is not None:
            body["keys_stale_seconds"] = round(stale, 1)
        return body

    def check_accepting(self) -> None:
        """Raise a 503 unless a new generation may start now."""
        if self.draining:
            raise ServiceUnavailable(
                "The server is shutting down and takes no new requests.",
                code="server_shutting_down",
                headers={"Retry-After": "5"},
            )
        if not self.loaded:
            raise ServiceUnavailable(
                "The model is still loading.", code="model_loading", headers={"Retry-After": "5"}
            )
        if self.engine_failed():
            raise ServiceUnavailable(
                "The engine has failed; this server generates nothing until it is restarted.",
                code="engine_failed",
            )
        if not self.engine_healthy():
            raise ServiceUnavailable(
                "The engine is recovering from a fault.",
                code="engine_recovering",
                headers={"Retry-After": "5"},
            )

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, seconds: float) -> bool:
        """Wait until nothing is in flight; False if `seconds` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), seconds)
        except TimeoutError:
            return False
        return True
