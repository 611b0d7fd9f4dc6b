"""Rolling one- and five-minute summaries per model and per key, for GET /stats.

Prometheus answers these questions with PromQL; /stats answers them without Prometheus. Time is
cut into 10-second slots and a slot holds counters and sparse histogram counts (same bucket edges
as /metrics), so memory follows activity and quantiles are estimated the way histogram_quantile
does. Per model, the five-minute window also carries its TTFT and inter-token histograms, which
the status page draws. Per key, each window carries the key's share of the service the fair
scheduler charged in it (counted as requests finish), out of every key's.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from llmserve.shared.protocol import ERROR_STATUSES
from llmserve.sidecar.metrics import ITL_BUCKETS, TTFT_BUCKETS

__all__ = ["RollingStats"]

SLOT_SECONDS = 10
WINDOWS = {"1m": 60, "5m": 300}


@dataclass(slots=True)
class _Slot:
    requests: int = 0
    errors: int = 0
    rate_limited: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generated: int = 0
    service: float = 0.0
    ttft: dict[int, int] = field(default_factory=dict)
    itl: dict[int, int] = field(default_factory=dict)

    def merge(self, other: _Slot) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.rate_limited += other.rate_limited
        self.cancelled += other.cancelled
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.generated += other.generated
        self.service += other.service
        for mine, theirs in ((self.ttft, other.ttft), (self.itl, other.itl)):
            for bucket, count in theirs.items():
                mine[bucket] = mine.get(bucket, 0) + count


def _observe(histogram: dict[int, int], edges: tuple[float, ...], value: float) -> None:
    bucket = bisect.bisect_left(edges, value)
    histogram[bucket] = histogram.get(bucket, 0) + 1


def quantile(histogram: dict[int, int], edges: tuple[float, ...], q: float) -> float | None:
    """Linear interpolation inside the bucket that holds the q-th observation."""
    total = sum(histogram.values())
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for bucket in sorted(histogram):
        count = histogram[bucket]
        if seen + count >= rank:
            lower = edges[bucket - 1] if bucket > 0 else 0.0
            if bucket >= len(edges):
                return lower
            return lower + (edges[bucket] - lower) * (rank - seen) / count
        seen += count
    return edges[-1]


class RollingStats:
    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        # (scope, name) -> deque of (slot index, slot); scope is "model" or "key".
        self._series: dict[tuple[str, str], deque[tuple[int, _Slot]]] = defaultdict(deque)

    def _slot(self, scope: str, name: str) -> _Slot:
        index = int(self._clock() // SLOT_SECONDS)
        series = self._series[(scope, name)]
        if not series or series[-1][0] != index:
            series.append((index, _Slot()))
            while series and series[0][0] <= index - WINDOWS["5m"] // SLOT_SECONDS:
                series.popleft()
        return series[-1][1]

    def _slots(self, model: str, key: str) -> tuple[_Slot, _Slot]:
        return self._slot("model", model), self._slot("key", key)

    def finished(
        self, model: str, key: str, status: str, prompt: int, completion: int, service: float
    ) -> None:
        for slot in self._slots(model, key):
            slot.requests += 1
            slot.service += service
            slot.prompt_tokens += prompt
            slot.completion_tokens += completion
            if status in ERROR_STATUSES:
                slot.errors += 1
            elif status == "rate_limited":
                slot.rate_limited += 1
            elif status == "cancelled":
                slot.cancelled += 1

    def first_token(self, model: str, key: str, seconds: float) -> None:
        for slot in self._slots(model, key):
            slot.generated += 1
            _observe(slot.ttft, TTFT_BUCKETS, seconds)

    def gaps(self, model: str, key: str, bucket_counts: Counter[int], count: int) -> None:
        """Inter-token gaps, already counted per ITL_BUCKETS bucket (see BulkHistogram)."""
        for slot in self._slots(model, key):
            slot.generated += count
            itl = slot.itl
            for bucket, n in bucket_counts.items():
                itl[bucket] = itl.get(bucket, 0) + n

    def snapshot(self, max_keys: int | None = None) -> dict[str, Any]:
        """Models, and the `max_keys` keys with the most requests in 5 minutes (None: all)."""
        now = int(self._clock() // SLOT_SECONDS)
        recent = now - WINDOWS["5m"] // SLOT_SECONDS
        out: dict[str, Any] = {"models": {}, "keys": {}}
        series_items = list(self._series.items())
        if max_keys is not None:
            # Rank keys by a cheap count first: summaries for 10,000 keys would cost ~0.3 s.
            # Keys left out are pruned here when idle, as the loop below prunes the rest.
            keys = []
            for item in series_items:
                (scope, name), series = item
                if scope != "key":
                    continue
                if series and series[-1][0] <= recent:
                    del self._series[(scope, name)]
                    continue
                keys.append((sum(slot.requests for i, slot in series if i > recent), item))
            keys.sort(key=lambda ranked: -ranked[0])
            series_items = [item for item in series_items if item[0][0] == "model"]
            series_items += [item for _, item in keys[:max_keys]]
        for (scope, name), series in series_items:
            entry = {}
            for window, seconds in WINDOWS.items():
                total = _Slot()
                for index, slot in series:
                    if index > now - seconds // SLOT_SECONDS:
                        total.merge(slot)
                entry[window] = _summary(total, seconds)
                if scope == "model" and window == "5m":
                    entry[window]["ttft_histogram"] = _dense(total.ttft, TTFT_BUCKETS)
                    entry[window]["inter_token_histogram"] = _dense(total.itl, ITL_BUCKETS)
            if entry["5m"]["requests"] or entry["5m"]["tokens_per_second"]:
                out["models" if scope == "model" else "keys"][name] = entry
            elif series and series[-1][0] <= now - WINDOWS["5m"] // SLOT_SECONDS:
                del self._series[(scope, name)]
        _add_shares(out)
        return out


def _add_shares(out: dict[str, Any]) -> None:
    """Each key's `service_share` of every key's service in each window. Every request counts
    under its model too, so the models' service is the whole, whichever keys are listed."""
    for window in WINDOWS:
        whole = sum(model[window]["service_tokens"] for model in out["models"].values())
        for key in out["keys"].values():
            share = key[window]["service_tokens"] / whole if whole else None
            key[window]["service_share"] = None if share is None else round(share, 4)


def _dense(histogram: dict[int, int], edges: tuple[float, ...]) -> dict[str, list[Any]]:
    """Per-bucket (not cumulative) counts: counts[i] is (edges[i-1], edges[i]], the last +Inf."""
    return {"edges": list(edges), "counts": [histogram.get(i, 0) for i in range(len(edges) + 1)]}


def _summary(slot: _Slot, seconds: int) -> dict[str, Any]:
    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 6)

    return {
        "requests": slot.requests,
        "requests_per_second": round(slot.requests / seconds, 3),
        "errors": slot.errors,
        "rate_limited": slot.rate_limited,
        "cancelled": slot.cancelled,
        "prompt_tokens": slot.prompt_tokens,
        "completion_tokens": slot.completion_tokens,
        # Weighted tokens, as the fair scheduler charged them.
        "service_tokens": round(slot.service, 3),
        # Counted as tokens reach clients, so long streams show up before they finish.
        "tokens_per_second": round(slot.generated / seconds, 3),
        "ttft_p50_seconds": rounded(quantile(slot.ttft, TTFT_BUCKETS, 0.5)),
        "ttft_p95_seconds": rounded(quantile(slot.ttft, TTFT_BUCKETS, 0.95)),
        "ttft_p99_seconds": rounded(quantile(slot.ttft, TTFT_BUCKETS, 0.99)),
        "inter_token_p50_seconds": rounded(quantile(slot.itl, ITL_BUCKETS, 0.5)),
        "inter_token_p95_seconds": rounded(quantile(slot.itl, ITL_BUCKETS, 0.95)),
        "inter_token_p99_seconds": rounded(quantile(slot.itl, ITL_BUCKETS, 0.99)),
    }
