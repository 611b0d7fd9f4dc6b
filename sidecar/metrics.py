"""Every Prometheus metric the sidecar exports, declared once, on a registry of its own.

Bucket edges are vLLM's (so its dashboards and habits carry over) plus the edges our alerts and
SLOs need to be exact: 1/30 s between tokens and 30 tokens/s per stream, and round TTFT
thresholds. docs/metrics.md describes every metric here.

The TTFT, inter-token, end-to-end and queue-time histograms carry exemplars (request id and trace
id) so that a point on a latency panel leads to the log line of a request that made it.
"""

from __future__ import annotations

from prometheus_client import (
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)

from llmserve.shared.protocol import STEP_SECONDS_BOUNDS, STEP_TOKEN_BOUNDS
from llmserve.sidecar.bulk_histogram import BulkHistogram
from llmserve.sidecar.key_metrics import KeyCounter, KeyGauge, MetricsRegistry

__all__ = [
    "EXEMPLAR_MAX_CHARS",
    "ITL_BUCKETS",
    "LATENCY_BUCKETS",
    "RATE_BUCKETS",
    "TTFT_BUCKETS",
    "Metrics",
    "exemplar_labels",
]

# OpenMetrics: an exemplar's label names and values together are at most 128 UTF-8 characters.
EXEMPLAR_MAX_CHARS = 128

# `*_created` series double the exposition size and no rule or dashboard here uses them.
disable_created_metrics()

_VLLM_TTFT = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
_VLLM_ITL = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_VLLM_LATENCY = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)

# 1/30 s is the gap of a 30 tokens/s stream; 0.2, 0.3, 1.5, 2 and 3 s are common TTFT SLOs.
TTFT_BUCKETS = tuple(sorted({*_VLLM_TTFT, 0.2, 0.3, 1.5, 2.0, 3.0}))
ITL_BUCKETS = tuple(sorted({*_VLLM_ITL, 0.001, 0.0025, 0.005, 0.0075, 1 / 30, 0.04}))
LATENCY_BUCKETS = tuple(sorted({*_VLLM_LATENCY, 0.01, 0.025, 0.05, 0.1, 0.2, 3.0}))
RATE_BUCKETS = (
    1.0,
    2.0,
    5.0,
    10.0,
    15.0,
    20.0,
    25.0,
    30.0,
    40.0,
    50.0,
    75.0,
    100.0,
    150.0,
    200.0,
    300.0,
    500.0,
    1000.0,
    2000.0,
)
TOKEN_BUCKETS = (
    1,
    2,
    5,
    10,
    20,
    50,
    100,
    200,
    500,
    1000,
    2000,
    5000,
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
)


def exemplar_labels(request_id: str, trace_id: str | None) -> dict[str, str]:
    """A request's exemplar labels: its trace id (32 hex digits, checked by the protocol) when it
    has one, and as much of its request id as then fits in OpenMetrics' bound. The request id is
    the caller's text; the exposition escapes it."""
    labels = {"trace_id": trace_id} if trace_id else {}
    room = EXEMPLAR_MAX_CHARS - len("request_id") - sum(map(len, [*labels, *labels.values()]))
    labels["request_id"] = request_id[:room]
    return labels


class Metrics:
    """The sidecar's metric objects; a fresh registry per instance keeps tests independent."""

    def __init__(self, registry: MetricsRegistry | None = None) -> None:
        self.registry = reg = registry or MetricsRegistry()
        # process_* (CPU, memory, start time, open files) of the sidecar itself.
        ProcessCollector(registry=reg)
        m = ("model",)

        self.ttft = Histogram(
            "llm_time_to_first_token_seconds",
            "Request received to first content byte written to the client "
            "(non-streaming: to the first token generated).",
            m,
            buckets=TTFT_BUCKETS,
            registry=reg,
        )
        self.inter_token = BulkHistogram(
            "llm_inter_token_latency_seconds",
            "Gap between consecutive tokens as written to the client; every gap is one sample.",
            "model",
            ITL_BUCKETS,
            reg,
            scale=1e-6,
        )
        self.time_per_output_token = Histogram(
            "llm_time_per_output_token_seconds",
            "Per request: (duration - TTFT) / (completion tokens - 1).",
            m,
            buckets=ITL_BUCKETS,
            registry=reg,
        )
        self.request_duration = Histogram(
            "llm_request_duration_seconds",
            "Request received to response complete.",
            m,
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.queue_time = Histogram(
            "llm_request_queue_time_seconds",
            "Time waiting for a generation slot.",
            m,
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.prefill_time = Histogram(
            "llm_request_prefill_time_seconds",
            "Engine start to first token (prompt reading).",
            m,
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.generation_rate = Histogram(
            "llm_request_generation_tokens_per_second",
            "Per request: tokens after the first over the time from first to last token.",
            m,
            buckets=RATE_BUCKETS,
            registry=reg,
        )
        self.prompt_tokens_hist = Histogram(
            "llm_request_prompt_tokens",
            "Prompt tokens per request.",
            m,
            buckets=TOKEN_BUCKETS,
            registry=reg,
        )
        self.completion_tokens_hist = Histogram(
            "llm_request_completion_tokens",
            "Completion tokens per request.",
            m,
            buckets=TOKEN_BUCKETS,
            registry=reg,
        )

        self.requests = Counter(
            "llm_requests",
            "Finished requests by status: ok, invalid_request, overloaded, "
            "error, cancelled, rate_limited.",
            ("model", "endpoint", "status"),
            registry=reg,
        )
        self.prompt_tokens = Counter(
            "llm_prompt_tokens", "Prompt tokens of finished requests.", m, registry=reg
        )
        self.generation_tokens = Counter(
            "llm_generation_tokens",
            "Tokens generated, cancelled requests included.",
            m,
            registry=reg,
        )
        self.cached_tokens = Counter(
            "llm_prompt_cached_tokens",
            "Prompt tokens served from the prefix cache.",
            m,
            registry=reg,
        )
        self.errors = Counter(
            "llm_errors",
            "Failed requests by error type (the error code).",
            ("type",),
            registry=reg,
        )
        self.cancelled = Counter(
            "llm_requests_cancelled",
            "Requests stopped early, by reason: client_disconnect, client_stalled, shutdown.",
            ("reason",),
            registry=reg,
        )
        self.cancelled_tokens = Counter(
            "llm_cancelled_generation_tokens",
            "Tokens generated for requests that were then cancelled.",
            registry=reg,
        )

        # The fair scheduler, from the server's state reports.
        self.fairness = Gauge(
            "llm_scheduler_fairness_index",
            "Jain's index over the last minute of service per unit of key weight, among the keys "
            "that had a request waiting: 1 is an equal share each, 1/n one key got it all; NaN "
            "while fewer than two keys waited.",
            m,
            registry=reg,
        )
        self.step_tokens = BulkHistogram(
            "llm_scheduler_step_tokens",
            "Tokens in one decode step: one per stream decoded and each prompt token read.",
            "model",
            STEP_TOKEN_BOUNDS,
            reg,
        )
        self.step_seconds = BulkHistogram(
            "llm_scheduler_step_seconds",
            "Duration of one decode step.",
            "model",
            STEP_SECONDS_BOUNDS,
            reg,
        )

        self.running = Gauge("llm_requests_running", "Requests generating now.", m, registry=reg)
        self.waiting = Gauge(
            "llm_requests_waiting", "Requests queued for a generation slot.", m, registry=reg
        )
        self.kv_cache_usage = Gauge(
            "llm_kv_cache_usage_ratio",
            "Share of the KV cache holding tokens (0-1).",
            m,
            registry=reg,
        )
        self.keys_store_stale = Gauge(
            "llm_keys_store_stale",
            "1 while the server cannot read its shared key store and serves the keys read last.",
            registry=reg,
        )
        self.keys_store_stale_seconds = Gauge(
            "llm_keys_store_stale_seconds",
            "Seconds since the server last read its shared key store, while it cannot; else 0.",
            registry=reg,
        )
        self.servers_reporting = Gauge(
            "llm_servers_reporting",
            "Servers whose state report reached this sidecar in the last 5 seconds.",
            registry=reg,
        )
        self.model_loaded = Gauge(
            "llm_model_loaded",
            "1 while the model is loaded and the server is ready.",
            ("model", "engine"),
            registry=reg,
        )
        self.model_load_duration = Gauge(
            "llm_model_load_duration_seconds",
            "How long the last model load took.",
            m,
            registry=reg,
        )
        self.model_memory = Gauge(
            "llm_model_memory_bytes", "Memory the model weights take.", m, registry=reg
        )

        # One series per API key name and label, tens of thousands at full `max_keys`: these
        # families are sidecar.key_metrics' own, which render fast and without blocking ingestion.
        k = ("key",)
        self.key_requests = KeyCounter(
            "llm_key_requests",
            "Finished requests per API key name, by status.",
            ("key", "status"),
            registry=reg,
        )
        self.key_prompt_tokens = KeyCounter(
            "llm_key_prompt_tokens", "Prompt tokens per API key name.", k, registry=reg
        )
        self.key_generation_tokens = KeyCounter(
            "llm_key_generation_tokens", "Generated tokens per API key name.", k, registry=reg
        )
        self.key_service = KeyCounter(
            "llm_key_service_tokens",
            "Service the fair scheduler charged each API key name: prompt tokens read and tokens "
            "generated, each weighted (1 and 2 by default).",
            k,
            registry=reg,
        )
        self.key_queue = KeyCounter(
            "llm_key_queue_seconds",
            "Seconds each API key name's requests waited for a generation slot.",
            k,
            registry=reg,
        )
        self.key_rate_limited = KeyCounter(
            "llm_key_rate_limited",
            "Requests refused by a per-key limit, by limit.",
            ("key", "limit"),
            registry=reg,
        )
        self.key_limit = KeyGauge(
            "llm_key_rate_limit",
            "A key's limit per bucket, in requests or tokens per window.",
            ("key", "limit"),
            registry=reg,
        )
        self.key_limit_remaining = KeyGauge(
            "llm_key_rate_limit_remaining",
            "What the key's bucket held after its last decision.",
            ("key", "limit"),
            registry=reg,
        )
        self.key_limit_utilization = KeyGauge(
            "llm_key_rate_limit_utilization_ratio",
            "Share of the key's bucket in use after its last decision (0-1).",
            ("key", "limit"),
            registry=reg,
        )
        self.limiter_errors = Counter(
            "llm_ratelimit_backend_errors",
            "Limit checks that got no answer from Redis, by what the policy did.",
            ("outcome",),
            registry=reg,
        )
        self.key_errors = KeyCounter(
            "llm_key_errors",
            "Failed requests per API key name, by error type.",
            ("key", "type"),
            registry=reg,
        )

        self.events_received = Counter(
            "llm_sidecar_events_received", "Events the sidecar decoded.", registry=reg
        )
        self.events_malformed = Counter(
            "llm_sidecar_events_malformed", "Datagrams that could not be decoded.", registry=reg
        )
        self.events_lost = Counter(
            "llm_sidecar_events_lost",
            "Events missing from a server's sequence that it did not report dropping.",
            registry=reg,
        )
        self.server_overflow = Counter(
            "llm_sidecar_server_overflow_events",
            "Events servers reported dropping because their buffer was full.",
            registry=reg,
        )
        self.events_unsendable = Counter(
            "llm_sidecar_events_unsendable",
            "Events servers dropped because they could never be sent (unpackable, or too large"
            " for the event socket even alone).",
            registry=reg,
        )
        self.processing_lag = Gauge(
            "llm_sidecar_processing_lag_seconds",
            "Age of the newest event at the time it was processed.",
            registry=reg,
        )
        self.keys_tracked = Gauge(
            "llm_sidecar_keys_tracked", "API key names with their own series.", registry=reg
        )
        self.max_keys = Gauge(
            "llm_sidecar_max_keys",
            "API key names that may have their own series (sidecar.max_keys).",
            registry=reg,
        )
        self.log_lines_dropped = Counter(
            "llm_sidecar_loki_lines_dropped",
            "Log lines dropped because Loki was unreachable and the buffer was full.",
            registry=reg,
        )
        self.loki_pushes = Counter(
            "llm_sidecar_loki_pushes",
            "Push attempts to Loki by result.",
            ("result",),
            registry=reg,
        )
