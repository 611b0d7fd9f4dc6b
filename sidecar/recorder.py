"""Apply decoded events to the metrics, the rolling stats and the request log, and keep what
/stats adds for the status page: each server's last state, each key's limit use, recent problems.

Sequence numbers are checked per server instance: a gap is counted as lost events, a repeat is
ignored, so a restarted sidecar or a resent datagram never counts a request twice. What a server
reports dropping (a full buffer) or never sending (unsendable) explains a gap instead; a sidecar
counts those from what the last datagram the server delivered said, so a restarted sidecar does not
count again what its predecessor was told. A request's events are tied together by the server's
serial `req`, never by the client's request id. Per-key series are bounded: the first `max_keys`
names get their own, later ones share `other`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from llmserve.shared.protocol import (
    ERROR_STATUSES,
    AnyEvent,
    Datagram,
    End,
    First,
    Gaps,
    Load,
    Malformed,
    RateLimit,
    Start,
    State,
)
from llmserve.sidecar.metrics import Metrics, exemplar_labels
from llmserve.sidecar.request_log import RecentProblems
from llmserve.sidecar.server_histograms import ServerSteps
from llmserve.sidecar.stats import RollingStats

__all__ = ["KeyNames", "Recorder"]

log = logging.getLogger("llmserve.sidecar")

OTHER_KEY = "other"
# Servers report every second; this long without a report means the server is gone.
SERVER_SILENT_SECONDS = 5.0
# Servers silent this long drop out of /stats (a restarted server is a new instance).
SERVER_FORGET_SECONDS = 300.0
_STATE_FIELDS = ("running", "waiting", "kv_usage", "ready", "draining")
_MAX_LIVE = 100_000
_UNKNOWN: tuple[str, str, dict[str, str]] = ("unknown", "unknown", {})

RequestLogger = Callable[[dict[str, Any]], None]


class KeyNames:
    """Maps key names to metric label values, at most `max_keys` distinct ones."""

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self._known: set[str] = set()

    def label(self, name: str) -> str:
        if name in self._known:
            return name
        if len(self._known) < self.max_keys:
            self._known.add(name)
            return name
        return OTHER_KEY

    def __len__(self) -> int:
        return len(self._known)


@dataclass(slots=True)
class _Instance:
    last_seq: int = 0
    dropped: int = 0
    unsendable: int = 0
    # req -> (model, key, exemplar labels) for requests whose start was seen, so that first
    # tokens and gaps can be attributed.
    live: dict[int, tuple[str, str, dict[str, str]]] = field(default_factory=dict)
    # When it last reported its state (every second while it runs); 0 = never.
    last_state: float = 0.0
    first_seen: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    # From its `load` and `state` events, for /stats.
    model: str | None = None
    engine: str | None = None
    loaded: bool | None = None
    state: dict[str, Any] = field(default_factory=dict)
    steps: ServerSteps = field(default_factory=ServerSteps)

    def reporting(self, now: float) -> bool:
        return self.last_state > now - SERVER_SILENT_SECONDS


def _seconds(ns: int | None) -> float:
    return (ns or 0) / 1e9


class Recorder:
    def __init__(
        self,
        metrics: Metrics,
        stats: RollingStats,
        request_logger: RequestLogger,
        *,
        max_keys: int,
    ) -> None:
        self.metrics = metrics
        self.stats = stats
        self.request_logger = request_logger
        self.keys = KeyNames(max_keys)
        metrics.max_keys.set(max_keys)
        self.instances: dict[str, _Instance] = {}
        self.finished_requests = 0
        self.recent = RecentProblems()
        # key label -> limit name -> its use at the key's last decision.
        self.limit_use: dict[str, dict[str, dict[str, float]]] = {}
        metrics.servers_reporting.set_function(self.servers_reporting)
        self.received = 0
        self.lost = 0
        self.malformed = 0

    def servers_reporting(self) -> int:
        """Servers whose state report arrived within the last few seconds."""
        now = time.monotonic()
        return sum(1 for instance in self.instances.values() if instance.reporting(now))

    def server_states(self) -> list[dict[str, Any]]:
        """What each server seen in the last few minutes last said, most recent first."""
        now = time.monotonic()
        recent = [
            (name, instance)
            for name, instance in self.instances.items()
            if instance.last_seen > now - SERVER_FORGET_SECONDS
        ]
        recent.sort(key=lambda item: item[1].last_seen, reverse=True)
        return [
            {
                "instance": name,
                "model": instance.model,
                "engine": instance.engine,
                "loaded": instance.loaded,
                "reporting": instance.reporting(now),
                "seconds_since_report": (
                    round(now - instance.last_state, 1) if instance.last_state else None
                ),
                "seen_seconds": round(now - instance.first_seen, 1),
                **{attr: instance.state.get(attr) for attr in _STATE_FIELDS},
            }
            for name, instance in recent
        ]

    def count_malformed(self) -> None:
        self.malformed += 1
        self.metrics.events_malformed.inc()

    def handle(self, datagram: Datagram) -> None:
        header = datagram.header
        instance = self.instances.get(header.instance)
        if instance is None:
            # What a server sent before this sidecar started went to an earlier one (or nowhere
            # when it had none): count from the first event seen, not from 1, and count only the
            # drops no earlier sidecar was told of.
            first = next((e.seq for e in datagram.events if e.seq is not None), 1)
            instance = self.instances[header.instance] = _Instance(
                last_seq=first - 1,
                dropped=header.dropped_reported,
                unsendable=header.unsendable_reported,
                steps=ServerSteps(from_start=first == 1),
            )
        instance.last_seen = time.monotonic()
        explained = self._server_losses(instance, header.dropped, header.unsendable)
        newest_ts = 0.0
        for event in datagram.events:
            if event.seq is not None:
                if event.seq <= instance.last_seq:
                    continue
                # Events the server dropped or could not send leave a gap too; count them once,
                # as the server reported them, and only the rest of the gap as lost on the way.
                gap = event.seq - instance.last_seq - 1
                if gap:
                    unexplained = max(0, gap - explained)
                    explained = max(0, explained - gap)
                    self.lost += unexplained
                    self.metrics.events_lost.inc(unexplained)
                instance.last_seq = event.seq
            if isinstance(event, Malformed):
                self.count_malformed()
                log.warning("malformed event (seq %s): %s", event.seq, event.reason[:200])
                continue
            self.received += 1
            self.metrics.events_received.inc()
            newest_ts = max(newest_ts, event.ts)
            self._apply(instance, event)
        if newest_ts:
            self.metrics.processing_lag.set(max(0.0, time.time() - newest_ts))
        self.metrics.keys_tracked.set(len(self.keys))

    def _server_losses(self, instance: _Instance, dropped: int, unsendable: int) -> int:
        """Count what the server newly reports dropping; returns how many events that is."""
        overflow = max(0, dropped - instance.dropped)
        never_sent = max(0, unsendable - instance.unsendable)
        if overflow:
            self.metrics.server_overflow.inc(overflow)
            instance.dropped = dropped
        if never_sent:
            self.metrics.events_unsendable.inc(never_sent)
            instance.unsendable = unsendable
        return overflow + never_sent

    def _apply(self, instance: _Instance, event: AnyEvent) -> None:
        match event:
            case Start():
                if len(instance.live) >= _MAX_LIVE:
                    # Only lost `end` events leave entries behind; do not let them pile up.
                    instance.live.clear()
                exemplar = exemplar_labels(event.rid, event.trace_id)
                instance.live[event.req] = (event.model, event.key, exemplar)
            case First():
                model, key, exemplar = instance.live.get(event.req, _UNKNOWN)
                ttft = _seconds(event.ttft_ns)
                self.metrics.ttft.labels(model).observe(ttft, exemplar or None)
                self.stats.first_token(model, key, ttft)
            case Gaps():
                model, key, exemplar = instance.live.get(event.req, _UNKNOWN)
                counts = self.metrics.inter_token.observe_many(model, event.gaps_us, exemplar)
                self.stats.gaps(model, key, counts, len(event.gaps_us))
            case End():
                instance.live.pop(event.req, None)
                self._finished(event)
            case State():
                instance.last_state = time.monotonic()
                model = instance.model = event.model
                instance.state = {attr: getattr(event, attr) for attr in _STATE_FIELDS}
                self.metrics.running.labels(model).set(event.running)
                self.metrics.waiting.labels(model).set(event.waiting)
                self.metrics.kv_cache_usage.labels(model).set(event.kv_usage)
                self.metrics.keys_store_stale.set(event.keys_stale_s is not None)
                self.metrics.keys_store_stale_seconds.set(event.keys_stale_s or 0.0)
                self._scheduler(instance, event)
            case Load():
                model = instance.model = event.model
                instance.engine = event.engine
                instance.loaded = event.loaded
                self.metrics.model_loaded.labels(model, event.engine).set(1 if event.loaded else 0)
                self.metrics.model_load_duration.labels(model).set(event.load_s)
                self.metrics.model_memory.labels(model).set(event.memory_bytes)
            case RateLimit():
                self._rate_limit(event)

    def _scheduler(self, instance: _Instance, event: State) -> None:
        m, model = self.metrics, event.model
        m.fairness.labels(model).set(math.nan if event.fairness is None else event.fairness)
        tokens, seconds = instance.steps.added(event)
        if tokens is not None:
            m.step_tokens.add_counts(model, *tokens)
        if seconds is not None:
            m.step_seconds.add_counts(model, *seconds)

    def _rate_limit(self, event: RateLimit) -> None:
        m = self.metrics
        if event.backend_error:
            m.limiter_errors.labels("admitted" if event.allowed else "refused").inc()
            return
        key = self.keys.label(event.key)
        if not event.allowed:
            m.key_rate_limited.labels(key, event.limit).inc()
        for name, (limit, remaining) in event.state.items():
            left = max(0.0, remaining)
            utilization = min(1.0, max(0.0, 1 - remaining / limit)) if limit else 0.0
            m.key_limit.labels(key, name).set(limit)
            m.key_limit_remaining.labels(key, name).set(left)
            m.key_limit_utilization.labels(key, name).set(utilization)
            self.limit_use.setdefault(key, {})[name] = {
                "limit": limit,
                "remaining": left,
                "utilization": round(utilization, 4),
            }

    def _finished(self, event: End) -> None:
        m = self.metrics
        model, status, key = event.model, event.status, event.key
        key_label = self.keys.label(key)
        prompt, completion = event.prompt_tokens, event.completion_tokens
        self.finished_requests += 1

        m.requests.labels(model, event.endpoint, status).inc()
        m.key_requests.labels(key_label, status).inc()
        exemplar = exemplar_labels(event.rid, event.trace_id)
        m.request_duration.labels(model).observe(_seconds(event.e2e_ns), exemplar)
        if event.queue_ns is not None:
            m.queue_time.labels(model).observe(_seconds(event.queue_ns), exemplar)
            # Admitted requests only: the key's series start when it first gets a slot.
            m.key_queue.labels(key_label).inc(_seconds(max(0, event.queue_ns)))
            m.key_service.labels(key_label).inc(event.service)
        if status in ("ok", "cancelled"):
            m.prompt_tokens.labels(model).inc(prompt)
            m.generation_tokens.labels(model).inc(completion)
            m.cached_tokens.labels(model).inc(event.cached_tokens)
            m.key_prompt_tokens.labels(key_label).inc(prompt)
            m.key_generation_tokens.labels(key_label).inc(completion)
        if status == "ok":
            m.prefill_time.labels(model).observe(_seconds(event.prefill_ns))
            m.prompt_tokens_hist.labels(model).observe(prompt)
            m.completion_tokens_hist.labels(model).observe(completion)
            generation = _seconds(event.gen_ns)
            if completion > 1 and generation > 0:
                m.time_per_output_token.labels(model).observe(generation / (completion - 1))
                m.generation_rate.labels(model).observe((completion - 1) / generation)
        elif status == "cancelled":
            m.cancelled.labels(event.cancel_reason or "unknown").inc()
            m.cancelled_tokens.inc(completion)
        elif status in ERROR_STATUSES:
            error_type = event.error_type or status
            m.errors.labels(error_type).inc()
            m.key_errors.labels(key_label, error_type).inc()
        self.stats.finished(model, key, status, prompt, completion, event.service)
        # The request log and the status page read the event as the flat fields it carries.
        fields = msgspec.structs.asdict(event)
        self.recent.add(fields)
        self.request_logger(fields)
