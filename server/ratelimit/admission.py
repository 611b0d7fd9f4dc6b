"""Per-key admission on the request path: ask the limiter, turn a refusal into OpenAI's 429,
apply the failure policy when Redis is away, and report every decision to the sidecar."""

from __future__ import annotations

import asyncio
import logging
import time

from llmserve.server.errors import RateLimited, ServiceUnavailable
from llmserve.server.keys import KeyEntry
from llmserve.server.ratelimit.base import Decision, Limiter, LimiterUnavailable, Reservation
from llmserve.server.ratelimit.kinds import KINDS, kind
from llmserve.shared.client import EventSender

__all__ = ["KeyAdmission"]

log = logging.getLogger("llmserve.ratelimit")

_WARN_EVERY_SECONDS = 10.0


class KeyAdmission:
    def __init__(self, limiter: Limiter, *, fail_open: bool, events: EventSender | None) -> None:
        self.limiter = limiter
        self.fail_open = fail_open
        self.events = events
        self.backend_errors = 0
        # Admission checks (a request makes up to two: its place, then its tokens) that the
        # failure policy decided because Redis did not answer; the sidecar counts them too.
        self.policy_decisions = 0
        self._warned_at = 0.0
        self._finishing: set[asyncio.Task[None]] = set()

    async def admit_request(self, key: KeyEntry, request_id: str) -> Decision | None:
        """Charge one request against the key's limits counted in requests (per minute, per
        day, at once), before the body is read (None: the key has no such limit)."""
        part = _counted_in(key, "requests")
        if not part.limits:
            return None
        return await self._admit(part, key, 0, request_id)

    async def admit_tokens(self, key: KeyEntry, tokens: int, request_id: str) -> Decision | None:
        """Reserve a tokenized request's prompt and max_tokens against the key's token limits
        (None: the key has none). A request larger than a whole bucket is refused for good."""
        part = _counted_in(key, "tokens")
        if not part.limits:
            return None
        smallest = min(part.limits, key=part.limits.__getitem__)
        if tokens > part.limits[smallest]:
            self._emit(key, request_id, smallest, allowed=False, backend_error=False, state={})
            raise _never(key, tokens, smallest)
        # Requests and leases were charged by admit_request: only the token buckets here.
        return await self._admit(part, key, tokens, request_id)

    @staticmethod
    def token_budget(key: KeyEntry) -> int | None:
        """The most tokens one request of this key can ever be granted."""
        limits = _counted_in(key, "tokens").limits.values()
        return min(limits) if limits else None

    async def _admit(
        self, part: KeyEntry, key: KeyEntry, tokens: int, request_id: str
    ) -> Decision | None:
        try:
            decision = await self.limiter.admit(part, tokens)
        except LimiterUnavailable as exc:
            self._unavailable(key, request_id, exc)
            return None
        self._report(key, request_id, decision)
        if not decision.allowed:
            if decision.never:
                raise _never(key, tokens, decision.limit or "tpm")
            raise _refusal(key, tokens, decision)
        return decision

    def finish(
        self, decision: Decision | None, used_tokens: int, *, requests_back: bool = False
    ) -> None:
        """Reconcile in the background: a request's end never waits on Redis. `requests_back`:
        the server refused the request itself (a 503) after charging it, so its request is
        given back too."""
        if decision is None or decision.reservation is None:
            return
        task = asyncio.get_running_loop().create_task(
            self._reconcile(decision.reservation, used_tokens, requests_back)
        )
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _reconcile(
        self, reservation: Reservation, used_tokens: int, requests_back: bool
    ) -> None:
        try:
            await self.limiter.finish(reservation, used_tokens, requests_back=requests_back)
        except LimiterUnavailable as exc:
            # The limiter keeps the settlement and retries it until Redis confirms it.
            self._warn(f"could not settle a reservation yet ({exc}); retrying in the background")

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
        self.policy_decisions += 1
        self._warn(f"rate limiter unavailable ({exc}); {policy}")
        self._emit(key, request_id, "backend", allowed=self.fail_open, backend_error=True, state={})
        if self.fail_open:
            return None
        raise ServiceUnavailable(
            "The rate limiter is unavailable; retry shortly.",
            code="rate_limiter_unavailable",
            headers={"Retry-After": "1"},
        )

    def _report(self, key: KeyEntry, request_id: str, decision: Decision) -> None:
        state = {name: [limit, left] for name, (limit, left, _) in decision.state.items()}
        self._emit(
            key,
            request_id,
            decision.limit or "",
            allowed=decision.allowed,
            backend_error=False,
            state=state,
        )

    def _emit(
        self,
        key: KeyEntry,
        request_id: str,
        limit: str,
        *,
        allowed: bool,
        backend_error: bool,
        state: dict[str, list[float]],
    ) -> None:
        if self.events is not None:
            self.events.emit(
                "ratelimit",
                rid=request_id,
                key=key.name,
                limit=limit,
                allowed=allowed,
                backend_error=backend_error,
                state=state,
            )


def _counted_in(key: KeyEntry, unit: str) -> KeyEntry:
    """The key with only its limits counted in `unit` (requests or tokens)."""
    limits = {k.name: n for k in KINDS if k.unit == unit and (n := key.limit(k.name)) is not None}
    return key.model_copy(update={"limits": limits})


def _never(key: KeyEntry, tokens: int, limit: str) -> RateLimited:
    """A refusal that waiting cannot cure: no Retry-After, and `x-should-retry: false` so that
    OpenAI's clients give up at once instead of retrying."""
    message = (
        f"This request needs {tokens} tokens (prompt + max_tokens), more than key "
        f"'{key.name}' may ever use in one request ({key.limit(limit)} {kind(limit).meaning}). "
        f"Lower max_tokens or shorten the prompt."
    )
    return _rate_limited(message, limit, {"x-should-retry": "false"})


def _refusal(key: KeyEntry, tokens: int, decision: Decision) -> RateLimited:
    refused = kind(decision.limit or "rpm")
    capacity = key.limit(refused.name)
    if refused.window_seconds is None:
        message = f"Too many {refused.meaning} for key '{key.name}' (limit {capacity})."
    else:
        message = (
            f"Rate limit reached for {refused.meaning} on key '{key.name}': limit {capacity}, "
            f"requested {refused.cost(tokens)}. "
            f"Try again in {decision.retry_after_seconds:.1f}s."
        )
    return _rate_limited(message, refused.name, decision.headers())


def _rate_limited(message: str, limit: str, headers: dict[str, str]) -> RateLimited:
    refused = kind(limit)
    return RateLimited(message, type_=refused.error_type, code=refused.error_code, headers=headers)
