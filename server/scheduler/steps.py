"""What goes into the next decode step: the next token of every running stream first, then
prompt chunks, within a budget of tokens per step.

A step's duration grows with the tokens it carries, and every running stream waits for the
whole step; bounding it (Sarathi-Serve's stall-free batching) keeps streams moving while long
prompts are read across several steps. When more is ready than a step can carry, the tenant
with the lowest counter goes first (`FairShare`), so the same order decides slots and rows.
Engine-agnostic: an engine hands in its sequences and gets back the plan.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from llmserve.server.scheduler.fair_share import Tenant

__all__ = ["Histogram", "StepPlan", "StepStats", "plan_step"]


class Schedulable(Protocol):
    @property
    def tenant(self) -> Tenant: ...

    @property
    def arrival(self) -> int:
        """Order of arrival within the engine (ties among one tenant's sequences)."""

    @property
    def served(self) -> int:
        """Tokens this sequence has been given (rotates one tenant's streams when paused)."""

    @property
    def prompt_left(self) -> int:
        """Prompt tokens still to read; 0 once generating."""


S = TypeVar("S", bound=Schedulable)


@dataclass(slots=True)
class StepPlan(Generic[S]):
    """The sequences that get their next token, and the prompt chunks read, in this step."""

    decode: list[S] = field(default_factory=list)
    prefill: list[tuple[S, int]] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return len(self.decode) + sum(n for _, n in self.prefill)


def plan_step(sequences: Sequence[S], budget: int) -> StepPlan[S]:
    """Fill a step of at most `budget` tokens (at least 2): decodes by (counter, least served),
    then prompt chunks by (counter, arrival), so one tenant's prompts are read in order and its
    first reader starts generating soonest. A sequence left out is paused for this step; its
    cache stays where it is."""
    plan: StepPlan[S] = StepPlan()
    decoding = [s for s in sequences if s.prompt_left == 0]
    decoding.sort(key=lambda s: (s.tenant.priority, s.served, s.arrival))
    reading = [s for s in sequences if s.prompt_left > 0]
    reading.sort(key=lambda s: (s.tenant.priority, s.arrival))
    # A budget smaller than the streams could starve every prompt; one token is kept for them.
    rows = budget - 1 if reading and budget > 1 and len(decoding) >= budget else budget
    plan.decode = decoding[:rows]
    budget -= len(plan.decode)
    for seq in reading:
        if budget <= 0:
            break
        chunk = min(seq.prompt_left, budget)
        plan.prefill.append((seq, chunk))
        budget -= chunk
    return plan


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    bounds: tuple[float, ...]
    # Cumulative, one per bound and a last one for +Inf (Prometheus' le buckets).
    counts: tuple[int, ...]
    total: float


class Histogram:
    """A thread-safe cumulative histogram the engine's worker fills and the reporter reads."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)
        self._total = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self._counts[index] += 1
            self._total += value

    def snapshot(self) -> HistogramSnapshot:
        with self._lock:
            counts = list(self._counts)
            total = self._total
        running = 0
        cumulative = []
        for count in counts:
            running += count
            cumulative.append(running)
        return HistogramSnapshot(self.bounds, tuple(cumulative), total)


class StepStats:
    """Every decode step's size in tokens and its duration."""

    TOKEN_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
    SECONDS_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

    def __init__(self) -> None:
        self.tokens = Histogram(self.TOKEN_BOUNDS)
        self.seconds = Histogram(self.SECONDS_BOUNDS)

    def record(self, tokens: int, seconds: float) -> None:
        self.tokens.observe(tokens)
        self.seconds.observe(seconds)
