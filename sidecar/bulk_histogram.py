"""A labelled Prometheus histogram that takes a whole batch of observations in one call.

Inter-token gaps arrive 64 at a time and are by far the most frequent observation; feeding them
one by one through prometheus_client's Histogram (a lock and two value objects per call) cost the
sidecar most of its CPU at saturation. Here a batch is bucketed with `bisect` and counted with
`collections.Counter`, both in C, and the series are exposed through a custom collector, which
is prometheus_client's documented way to export pre-computed values.

Each bucket keeps the exemplar of the last batch that put an observation in it, as
prometheus_client's Histogram does; only the OpenMetrics exposition shows them.

`add_counts` takes observations already bucketed elsewhere (the server's decode-step
histograms, which arrive as counts).
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Iterator, Sequence

from prometheus_client.core import Exemplar, HistogramMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString

__all__ = ["BulkHistogram"]


class BulkHistogram:
    def __init__(
        self,
        name: str,
        documentation: str,
        label: str,
        buckets: Sequence[float],
        registry: CollectorRegistry,
        *,
        scale: float = 1.0,
    ) -> None:
        """`scale` converts observations to the metric's unit (1e-6 for microseconds)."""
        self.name = name
        self.documentation = documentation
        self.label = label
        self.edges = list(buckets)
        # Edges in the observations' own unit, so bucketing needs no per-value conversion.
        self._scaled_edges = [round(edge / scale, 6) for edge in self.edges]
        self.scale = scale
        self._les = [floatToGoString(edge) for edge in self.edges] + ["+Inf"]
        # label value -> (bucket counts, [sum], each bucket's latest exemplar)
        self._series: dict[str, tuple[list[int], list[float], list[Exemplar | None]]] = {}
        registry.register(self)

    def observe_many(
        self,
        label_value: str,
        values: Sequence[float],
        exemplar: dict[str, str] | None = None,
    ) -> Counter[int]:
        """Count `values` (in the observations' unit); returns bucket index -> how many fell in
        it (index len(edges) is +Inf). With `exemplar` labels, every bucket that got a value
        gets an exemplar of one of them."""
        edges = self._scaled_edges
        indices = [bisect.bisect_left(edges, v) for v in values]
        counts = Counter(indices)
        buckets, sum_, exemplars = self._series_of(label_value)
        for index, count in counts.items():
            buckets[index] += count
        sum_[0] += sum(values) * self.scale
        if exemplar:
            now = time.time()
            for index, value in dict(zip(indices, values, strict=True)).items():
                exemplars[index] = Exemplar(exemplar, value * self.scale, now)
        return counts

    def add_counts(self, label_value: str, counts: Sequence[int], total: float) -> None:
        """Add observations counted elsewhere: `counts[i]` of them in bucket i (not cumulative;
        the last is +Inf), summing to `total` in the metric's unit."""
        buckets, sum_, _ = self._series_of(label_value)
        for index, count in enumerate(counts):
            buckets[index] += count
        sum_[0] += total

    def _series_of(self, label_value: str) -> tuple[list[int], list[float], list[Exemplar | None]]:
        series = self._series.get(label_value)
        if series is None:
            size = len(self.edges) + 1
            series = self._series[label_value] = ([0] * size, [0.0], [None] * size)
        return series

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=[self.label])]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        for label_value, (buckets, sum_, exemplars) in self._series.items():
            cumulative: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
            running = 0
            for le, count, exemplar in zip(self._les, buckets, exemplars, strict=True):
                running += count
                cumulative.append((le, running) if exemplar is None else (le, running, exemplar))
            family.add_metric([label_value], cumulative, sum_value=sum_[0])
        yield family
