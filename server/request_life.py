"""One owner for a generation request's life, from arrival to its single report.

A request can end in many places: refused before its body (bad key, rate limit, draining),
refused after it (bad input, token limit, full queue), gone while queued, stalled, failed in
the engine, stopped by a shutdown, or finished. `RequestLife` is the one place that holds what
the request took (its place in flight, the key's lease and token reservation) and gives it all
back, and the one place that reports how the request ended, exactly once: each path either
states its outcome or raises, and the exception becomes the outcome.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import TracebackType

from aiohttp import web

from llmserve.server.admission import AdmissionGate
from llmserve.server.engines.base import Completion
from llmserve.server.errors import APIError, from_http_exception
from llmserve.server.keys import KeyEntry
from llmserve.server.middlewares import TRACE, trace_headers
from llmserve.server.ratelimit.admission import KeyAdmission
from llmserve.server.ratelimit.base import Decision
from llmserve.server.state import ServerState
from llmserve.server.telemetry import RequestTelemetry

__all__ = ["Outcome", "RequestLife"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a request ended, as the sidecar records it."""

    status: str
    http_status: int
    completion: Completion | None = None
    error_type: str | None = None
    error: str | None = None
    cancel_reason: str | None = None


class RequestLife:
    """`async with` it around everything a generation request does."""

    def __init__(
        self,
        request: web.Request,
        telemetry: RequestTelemetry,
        *,
        state: ServerState,
        gate: AdmissionGate,
        limits: KeyAdmission,
        max_body_bytes: int,
    ) -> None:
        self.request = request
        self.telemetry = telemetry
        self.headers = trace_headers(request)
        telemetry.trace = request.get(TRACE)
        self.key: KeyEntry | None = None
        self._state = state
        self._gate = gate
        self._limits = limits
        self._max_body_bytes = max_body_bytes
        # The limiter's grants still held: the request lease first, then the token reservation.
        self._grants: list[tuple[Decision, bool]] = []
        self._outcome: Outcome | None = None

    async def __aenter__(self) -> RequestLife:
        self._state.enter()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            outcome = self._outcome or self._outcome_of(exc)
            # A 503 is the server's own refusal: the requests it was charged come back.
            self.release(requests_back=outcome.http_status == 503)
            self.telemetry.finished(
                outcome.status,
                outcome.http_status,
                completion=outcome.completion,
                error_type=outcome.error_type,
                error=outcome.error,
                cancel_reason=outcome.cancel_reason,
            )
        finally:
            # Whatever failed above, nothing the request took stays taken (a no-op if done).
            self.release()
            self._state.leave()

    async def admit(self, key: KeyEntry) -> None:
        """What can be refused before the body is read: draining, a full queue, the key's
        limits counted in requests. Nothing here costs the server any work."""
        self.key = key
        self.telemetry.key = key.name
        self._state.check_accepting()
        self._gate.check_room()
        self._hold(await self._limits.admit_request(key, self.telemetry.request_id), False)

    async def reserve(self, tokens: int) -> None:
        """Charge the key's token limits for a tokenized request's prompt and max_tokens."""
        assert self.key is not None, "admit() names the key first"
        decision = await self._limits.admit_tokens(self.key, tokens, self.telemetry.request_id)
        self._hold(decision, True)

    def token_budget(self) -> int | None:
        """The most tokens this key may ever spend on one request (None: no token limit)."""
        return None if self.key is None else self._limits.token_budget(self.key)

    def release(self, *, requests_back: bool = False) -> None:
        """Give back the lease and the unused tokens, once; called as soon as the engine slot
        is free, before the last bytes are flushed to a client that may never read them.
        `requests_back`: the server refused the request after charging it, so its request
        counts for nothing either."""
        used = self.telemetry.prompt_tokens + self.telemetry.tokens_written
        for decision, tokens in self._grants:
            self._limits.finish(decision, used if tokens else 0, requests_back=requests_back)
        self._grants.clear()

    def conclude(self, outcome: Outcome) -> None:
        """State how the request ended; the report leaves when the life ends."""
        self._outcome = outcome

    def refused_at_shutdown(self, error: APIError) -> APIError:
        """A request that got its turn only after the engine stopped: an honest 503."""
        self.conclude(Outcome("cancelled", error.status, cancel_reason="shutdown"))
        return error

    def _hold(self, decision: Decision | None, tokens: bool) -> None:
        if decision is None:
            return
        self.headers.update(decision.headers())
        self._grants.append((decision, tokens))

    def _outcome_of(self, exc: BaseException | None) -> Outcome:
        if isinstance(exc, web.HTTPException):
            exc = from_http_exception(self.request, exc, self._max_body_bytes)
        if isinstance(exc, APIError):
            return Outcome(
                _status_class(exc.status), exc.status, error_type=exc.code, error=exc.message
            )
        if isinstance(exc, ConnectionError | asyncio.CancelledError):
            # Gone while its body was read, while it waited for a slot, or mid-stream. 499 is
            # nginx's "client closed request"; a stream had already answered 200.
            http_status = 200 if self.telemetry.stream else 499
            return Outcome("cancelled", http_status, cancel_reason="client_disconnect")
        # An exception nobody expected, or (a bug) a path that ended without stating how.
        return Outcome("error", 500, error_type="internal_error")


def _status_class(http_status: int) -> str:
    if http_status == 429:
        return "rate_limited"
    if http_status == 503:
        return "overloaded"
    return "invalid_request" if http_status < 500 else "error"
