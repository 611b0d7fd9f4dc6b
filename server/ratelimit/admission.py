"""Per-key admission on the request path: ask the limiter, turn a refusal into OpenAI's 429,
apply the failure policy when Redis is away, and report every decision to the sidecar."""

from __future__ import annotations

import asyncio
import logging
import time

from server.errors import RateLimited, ServiceUnavailable
from server.keys import KeyEntry
from server.ratelimit.base import Decision, Limiter, LimiterUnavailable, Reservation
from sidecar.client import EventSender

__all__ = ["KeyAdmission"]

log = logging.getLogger("llmserve.ratelimit")

_WARN_EVERY_SECONDS = 10.0
_NOUNS = {
    "rpm": "requests per minute",
    "tpm": "tokens per minute",
    "tpd": "tokens per day",
    "concurrency": "requests running at once",
}


class KeyAdmission:
    def __init__(self, limiter: Limiter, *, fail_open: bool, events: EventSender | None) -> None:
        self.limiter = limiter
        self.fail_open = fail_open
        self.events = events
        self.backend_errors = 0
        self._warned_at = 0.0
        self._finishing: set[asyncio.Task[None]] = set()

    async def admit(self, key: KeyEntry, tokens: int, request_id: str) -> Decision | None:
        """The decision for a key with limits (None for one without); raises on refusal."""
        if not key.has_limits:
            return None
        try:
            decision = await self.limiter.admit(key, tokens)
        except LimiterUnavailable as exc:
            return self._unavailable(key, request_id, exc)
        self._report(key, request_id, decision)
        if not decision.allowed:
            raise _refusal(key, tokens, decision)
        return decision

    def finish(self, decision: Decision | None, used_tokens: int) -> None:
        """Reconcile in the background: a request's end never waits on Redis."""
        if decision is None or decision.reservation is None:
            return
        task = asyncio.get_running_loop().create_task(
            self._reconcile(decision.reservation, used_tokens)
        )
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _reconcile(self, reservation: Reservation, used_tokens: int) -> None:
        try:
            await self.limiter.finish(reservation, used_tokens)
        except LimiterUnavailable as exc:
            # The lease lapses by itself; the refund is lost, which only errs on the strict side.
            self._warn(f"could not reconcile a reservation ({exc}); its lease will lapse")

    def _warn(self, message: str) -> None:
        """Count a backend failure; log at most one line per interval, however many fail."""
        self.backend_errors += 1
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_SECONDS:
            self._warned_at = now
            log.warning("%s (%d errors so far)", message, self.backend_errors)

    async def close(self) -> None:
        await asyncio.gather(*self._finishing, return_exceptions=True)
        await self.limiter.close()

    def _unavailable(self, key: KeyEntry, request_id: str, exc: LimiterUnavailable) -> None:
        policy = "admitting requests unchecked" if self.fail_open else "refusing requests"
        self._warn(f"rate limiter unavailable ({exc}); {policy}")
        if self.events is not None:
            self.events.emit(
                "ratelimit",
                rid=request_id,
                key=key.name,
                limit="backend",
                allowed=self.fail_open,
                backend_error=True,
                state={},
            )
        if self.fail_open:
            return None
        raise ServiceUnavailable(
            "The rate limiter is unavailable; retry shortly.",
            code="rate_limiter_unavailable",
            headers={"Retry-After": "1"},
        )

    def _report(self, key: KeyEntry, request_id: str, decision: Decision) -> None:
        if self.events is None:
            return
        self.events.emit(
            "ratelimit",
            rid=request_id,
            key=key.name,
            limit=decision.limit or "",
            allowed=decision.allowed,
            backend_error=False,
            state={
                name: [limit, remaining] for name, (limit, remaining, _) in decision.state.items()
            },
        )


def _refusal(key: KeyEntry, tokens: int, decision: Decision) -> RateLimited:
    limit = decision.limit or "rpm"
    noun = _NOUNS[limit]
    capacity = getattr(key, limit)
    if decision.never:
        message = (
            f"This request needs {tokens} tokens (prompt + max_tokens), more than key "
            f"'{key.name}' may use ({capacity} {noun}). Lower max_tokens or shorten the prompt."
        )
    elif limit == "concurrency":
        message = f"Too many requests running at once for key '{key.name}' (limit {capacity})."
    else:
        message = (
            f"Rate limit reached for {noun} on key '{key.name}': limit {capacity}, requested "
            f"{1 if limit == 'rpm' else tokens}. Try again in {decision.retry_after_seconds:.1f}s."
        )
    if limit == "tpd":
        return RateLimited(
            message,
            type_="insufficient_quota",
            code="insufficient_quota",
            headers=decision.headers(),
        )
    kind = "tokens" if limit in ("tpm", "tpd") else "requests"
    return RateLimited(message, type_=kind, code="rate_limit_exceeded", headers=decision.headers())
