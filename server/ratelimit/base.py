"""What a limiter decides and the interface both backends implement."""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmserve.server.ratelimit.kinds import KINDS, kind

if TYPE_CHECKING:
    # Only for annotations: server.keys reads the table of kinds from this package.
    from llmserve.server.keys import KeyEntry

__all__ = ["Bucket", "Decision", "Limiter", "LimiterUnavailable", "Reservation", "refunds"]


@dataclass(frozen=True, slots=True)
class Bucket:
    """A token bucket: `capacity` units refilled evenly over `window_seconds`."""

    name: str
    capacity: int
    window_seconds: float

    @property
    def rate_per_second(self) -> float:
        return self.capacity / self.window_seconds

    def cost(self, tokens: int) -> int:
        """What a request reserving `tokens` takes from this bucket."""
        return kind(self.name).cost(tokens)


def buckets_for(key: KeyEntry) -> list[Bucket]:
    """The key's token buckets (concurrency is a count of leases, not a bucket)."""
    return [
        Bucket(k.name, limit, k.window_seconds)
        for k in KINDS
        if k.window_seconds is not None and (limit := key.limit(k.name)) is not None
    ]


def refunds(
    buckets: list[Bucket], reserved_tokens: int, used_tokens: int, *, requests_back: bool
) -> dict[str, int]:
    """What each bucket gets back when a request ends: the tokens it reserved and did not use
    (negative: it used more), and its request only if the server refused it after charging."""
    unused = reserved_tokens - used_tokens
    return {
        b.name: unused if kind(b.name).unit == "tokens" else int(requests_back) for b in buckets
    }


def bucket_state(
    buckets: list[Bucket], levels: dict[str, float]
) -> dict[str, tuple[int, float, float]]:
    """name -> (limit, remaining, seconds until full again) for the headers and the sidecar."""
    return {
        b.name: (b.capacity, levels[b.name], (b.capacity - levels[b.name]) / b.rate_per_second)
        for b in buckets
    }


@dataclass(frozen=True, slots=True)
class Reservation:
    """What an admitted request holds until it ends."""

    key: KeyEntry
    tokens: int
    # The id the limiter knows this request by: its concurrency lease, and in Redis the key to
    # its books, so that settling them is idempotent.
    lease: str


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    # The kind of limit (kinds.KINDS) that refused the request.
    limit: str | None = None
    retry_after_seconds: float = 0.0
    # name -> (limit, remaining, seconds until full) after this decision.
    state: dict[str, tuple[int, float, float]] = field(default_factory=dict)
    reservation: Reservation | None = None
    # Requested more than the bucket can ever hold: waiting will not help.
    never: bool = False

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for the key's buckets that OpenAI has a name for."""
        out: dict[str, str] = {}
        for k in KINDS:
            if k.header is not None and k.name in self.state:
                noun = k.header
                limit, remaining, reset = self.state[k.name]
                out[f"x-ratelimit-limit-{noun}"] = str(limit)
                out[f"x-ratelimit-remaining-{noun}"] = str(max(0, math.floor(remaining)))
                out[f"x-ratelimit-reset-{noun}"] = format_duration(reset)
        if not self.allowed:
            out["retry-after"] = str(max(1, math.ceil(self.retry_after_seconds)))
            out["retry-after-ms"] = str(max(1, math.ceil(self.retry_after_seconds * 1000)))
        return out


def format_duration(seconds: float) -> str:
    """Go-style durations as OpenAI sends them: 120ms, 1s, 6m0s, 1h2m3s."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    total = math.ceil(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class LimiterUnavailable(Exception):
    """The shared limiter state (Redis) did not answer in time."""


class Limiter(abc.ABC):
    @abc.abstractmethod
    async def admit(self, key: KeyEntry, tokens: int) -> Decision:
        """Charge one request and `tokens` reserved tokens, or refuse without charging."""

    @abc.abstractmethod
    async def finish(
        self, reservation: Reservation, used_tokens: int, *, requests_back: bool = False
    ) -> None:
        """Refund unused reserved tokens (or charge more) and end the concurrency lease; with
        `requests_back`, also give back the request it was charged (the server refused it
        itself, with a 503, after charging it). Settling a reservation twice changes nothing.

        Raises LimiterUnavailable if the shared store cannot be reached; the limiter still
        settles the reservation once the store is back."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""
