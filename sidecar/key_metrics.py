"""Per-API-key counters and gauges held as plain objects and rendered from cached text lines, so
/metrics stays fast with 10,000 keys and event ingestion goes on while it renders.

At 10,000 keys the sidecar holds about 90,000 per-key series. prometheus_client's generate_latest
builds a Sample for every one on every scrape, then validates and escapes its label names and
formats its value: 0.7-0.9 s a scrape, with the event loop, and so event ingestion, stopped for
all of it. Here a series formats its line once and keeps it until its value changes, and
`MetricsRegistry.exposition` renders the families a chunk at a time, letting the loop run in
between. The lines are those generate_latest writes: same HELP and TYPE, labels sorted by name
and escaped the same way, values through prometheus_client's own `floatToGoString`. Asked for
OpenMetrics, the registry writes what prometheus_client's OpenMetrics exposition writes (the
histograms' exemplars with it), and the key families differ from the text format only in their
HELP and TYPE lines.

The families are prometheus_client collectors too: `registry.collect()` and `get_sample_value`
see them as they saw the prometheus_client objects they replace.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar, Generic, TypeVar, cast

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

__all__ = ["CHUNK_SERIES", "KeyCounter", "KeyGauge", "MetricsRegistry"]

# Series rendered between two yields to the event loop: about a millisecond of work when every
# line has to be formatted again.
CHUNK_SERIES = 1000
# The line that ends an OpenMetrics exposition; the key families go before it.
_EOF = b"# EOF\n"


def _escape(text: str) -> str:
    # The text format's escapes for label values, in prometheus_client's order.
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class _Series:
    """One labelled series: its value and, until the value changes, its exposition line."""

    __slots__ = ("_line", "_prefix", "value")

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._line: str | None = None
        self.value = 0.0

    def line(self) -> str:
        line = self._line
        if line is None:
            line = self._line = f"{self._prefix}{floatToGoString(self.value)}\n"
        return line


class CounterSeries(_Series):
    """What `KeyCounter.labels()` returns: `inc()` as on a prometheus_client Counter's child."""

    __slots__ = ()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount
        self._line = None


class GaugeSeries(_Series):
    """What `KeyGauge.labels()` returns: `set()` as on a prometheus_client Gauge's child."""

    __slots__ = ()

    def set(self, value: float) -> None:
        self.value = float(value)
        self._line = None


S = TypeVar("S", bound=_Series)


class _Family(Generic[S]):
    """A labelled family whose `labels(*values)` returns its series, created on first use."""

    metric_type: ClassVar[str]
    # What the text format appends to the family's name in its HELP, TYPE and sample lines.
    suffix: ClassVar[str]
    series_type: ClassVar[type[_Series]]
    # prometheus_client's family of this type, which collect() fills for registry.collect().
    library_family: ClassVar[type[CounterMetricFamily] | type[GaugeMetricFamily]]

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        registry: MetricsRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._sample_name = sample = name + self.suffix
        help_text = documentation.replace("\\", r"\\").replace("\n", r"\n")
        self._header = f"# HELP {sample} {help_text}\n# TYPE {sample} {self.metric_type}\n"
        # OpenMetrics names the family without the counter's suffix and escapes quotes in HELP.
        om_help = help_text.replace('"', r"\"")
        self._om_header = f"# HELP {name} {om_help}\n# TYPE {name} {self.metric_type}\n"
        self._series: dict[tuple[str, ...], S] = {}
        registry.register(self)

    def labels(self, *values: str) -> S:
        # prometheus_client makes every label value a string the same way.
        key = tuple(map(str, values))
        series = self._series.get(key)
        if series is None:
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {key}")
            pairs = sorted(zip(self.labelnames, key, strict=True))
            labels = ",".join(f'{name}="{_escape(value)}"' for name, value in pairs)
            prefix = f"{self._sample_name}{{{labels}}} "
            series = self._series[key] = cast(S, self.series_type(prefix))
        return series

    def _empty_family(self) -> CounterMetricFamily | GaugeMetricFamily:
        return self.library_family(self.name, self.documentation, labels=self.labelnames)

    def describe(self) -> list[Metric]:
        return [self._empty_family()]

    def collect(self) -> Iterator[Metric]:
        family = self._empty_family()
        for key, series in self._series.items():
            family.add_metric(key, series.value)
        yield family

    def render(self, *, openmetrics: bool = False) -> Iterator[str]:
        """The family's HELP and TYPE lines, then its series `CHUNK_SERIES` at a time.

        Series added while a render is paused appear in the next one."""
        yield self._om_header if openmetrics else self._header
        series = list(self._series.values())
        for start in range(0, len(series), CHUNK_SERIES):
            yield "".join([s.line() for s in series[start : start + CHUNK_SERIES]])


class KeyCounter(_Family[CounterSeries]):
    metric_type = "counter"
    suffix = "_total"
    series_type = CounterSeries
    library_family = CounterMetricFamily


class KeyGauge(_Family[GaugeSeries]):
    metric_type = "gauge"
    suffix = ""
    series_type = GaugeSeries
    library_family = GaugeMetricFamily


class _LibraryCollectors:
    """The registry without its key families, for generate_latest (which only calls collect())."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        return CollectorRegistry.collect(self._registry)


class MetricsRegistry(CollectorRegistry):
    """A CollectorRegistry that keeps its key families apart and renders them itself."""

    def __init__(self) -> None:
        super().__init__()
        self._key_families: list[_Family[Any]] = []

    def register(self, collector: Collector) -> None:
        # Key families stay out of CollectorRegistry's own list, so generate_latest never turns
        # them into Samples: that was most of the time a scrape took.
        if isinstance(collector, _Family):
            self._key_families.append(collector)
        else:
            super().register(collector)

    def collect(self) -> Iterator[Metric]:
        yield from super().collect()
        for family in self._key_families:
            yield from family.collect()

    async def exposition(self, *, openmetrics: bool = False) -> bytes:
        """Every series in the text format 0.0.4, as generate_latest would write them, or with
        `openmetrics` in OpenMetrics 1.0.0, exemplars included."""
        library = _LibraryCollectors(self)
        if openmetrics:
            parts = [cast(bytes, openmetrics_latest(library)).removesuffix(_EOF)]
        else:
            parts = [generate_latest(library)]
        for family in self._key_families:
            for text in family.render(openmetrics=openmetrics):
                parts.append(text.encode())
                # Events queued on the socket (and other requests) are handled between chunks.
                await asyncio.sleep(0)
        if openmetrics:
            parts.append(_EOF)
        return b"".join(parts)
