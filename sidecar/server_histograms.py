"""The server's decode-step histograms, which every `state` event carries as cumulative counts since
the server started, turned into what was added since the server's previous report.

The sidecar's own histograms then count every step once, across server restarts (each a new
instance) and several servers, as its other counters count requests. A sidecar that meets a
server mid-life starts from that server's first report it sees, as it counts other events only from
the first it sees, so a restarted sidecar never counts a step twice. Counts of the wrong length,
or that shrink, are no server's (an instance only ever adds): they are ignored, and the report after
a shrink is counted from.
"""

from __future__ import annotations

from itertools import pairwise

from llmserve.shared.protocol import STEP_SECONDS_BOUNDS, STEP_TOKEN_BOUNDS, State

__all__ = ["CumulativeCounts", "ServerSteps"]


class CumulativeCounts:
    """One server's reports of one histogram of `buckets` counts (its bounds and +Inf)."""

    def __init__(self, buckets: int, *, from_start: bool) -> None:
        self.buckets = buckets
        self._last: tuple[list[int], float] | None = ([0] * buckets, 0.0) if from_start else None

    def added(self, counts: list[int], total: float) -> tuple[list[int], float] | None:
        """Per-bucket (not cumulative) counts and the sum added since the last report (zeros
        too: the sidecar's series exist from a server's first report, as counters should), or
        None when there is no last report to count from or the counts are no server's."""
        if len(counts) != self.buckets or any(low > high for low, high in pairwise(counts)):
            return None
        last, self._last = self._last, (counts, total)
        if last is None:
            return None
        grown = [now - before for now, before in zip(counts, last[0], strict=True)]
        per_bucket = [grown[0], *(high - low for low, high in pairwise(grown))]
        if min(per_bucket) < 0 or total < last[1]:
            return None
        return per_bucket, total - last[1]


class ServerSteps:
    """One server's decode-step size and duration histograms."""

    def __init__(self, *, from_start: bool = False) -> None:
        """`from_start`: this sidecar got the server's first event, so its counts start at 0."""
        self.tokens = CumulativeCounts(len(STEP_TOKEN_BOUNDS) + 1, from_start=from_start)
        self.seconds = CumulativeCounts(len(STEP_SECONDS_BOUNDS) + 1, from_start=from_start)

    def added(
        self, event: State
    ) -> tuple[tuple[list[int], float] | None, tuple[list[int], float] | None]:
        """What `event` adds to the step-tokens and step-seconds histograms."""
        return (
            self.tokens.added(event.step_tokens, event.step_tokens_sum),
            self.seconds.added(event.step_seconds, event.step_seconds_sum),
        )
