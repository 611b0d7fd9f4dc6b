"""What a limiter decides and the interface both backends implement."""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field

from server.keys import KeyEntry

__all__ = ["BUCKETS", "Bucket", "Decision", "Limiter", "LimiterUnavailable", "Reservation"]


@dataclass(frozen=True, slots=True)
class Bucket:
    """A token bucket: `capacity` units refilled evenly over `window_seconds`."""

    name: str
    capacity: int
    window_seconds: float

    @property
    def rate_per_second(self) -> float:
        return self.capacity / self.window_seconds


# Bucket name (also the KeyEntry field holding its limit) -> window in seconds. Concurrency is a
# count of leases, not a bucket.
BUCKETS = {"rpm": 60.0, "tpm": 60.0, "tpd": 86_400.0}


def buckets_for(key: KeyEntry) -> list[Bucket]:
    return [
        Bucket(name, limit, window)
        for name, window in BUCKETS.items()
        if (limit := getattr(key, name)) is not None
    ]


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
    # The limit that refused the request: rpm, tpm, tpd or concurrency.
    limit: str | None = None
    retry_after_seconds: float = 0.0
    # name -> (limit, remaining, seconds until full) after this decision.
    state: dict[str, tuple[int, float, float]] = field(default_factory=dict)
    reservation: Reservation | None = None
    # Requested more than the bucket can ever hold: waiting will not help.
    never: bool = False

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for the request and token buckets that exist."""
        out: dict[str, str] = {}
        for bucket, noun in (("rpm", "requests"), ("tpm", "tokens")):
            if bucket in self.state:
                limit, remaining, reset = self.state[bucket]
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
    async def finish(self, reservation: Reservation, used_tokens: int) -> None:
        """Refund unused reserved tokens (or charge more) and end the concurrency lease.

        Raises LimiterUnavailable if the shared store cannot be reached; the limiter still
        settles the reservation once the store is back."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""
