"""Per-request events for the sidecar: start, first token, inter-token gaps, end.

Everything here is a few attribute updates per token; gaps leave in batches (every 64 tokens or
every second, and never more than protocol.MAX_GAPS to an event) so that a long generation shows
up live without an event per token. Each request's events carry a serial the server assigns,
because the request id is the client's to choose and two requests may share one. With events
turned off the same calls do nothing. `start` and `end` carry the request's trace context, when it
came with one, so that its exemplars and its log line name the caller's trace. `end` carries the
service the fair scheduler charged the request's key, computed here from the request's final
token counts with the scheduler's own weights.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from llmserve.server.engines.base import Completion
from llmserve.server.scheduler import ServiceWeights
from llmserve.server.trace_context import TraceContext
from llmserve.shared.client import EventSender
from llmserve.shared.protocol import MAX_GAPS, End, First, Gaps, Start

__all__ = ["RequestTelemetry"]

_GAPS_PER_EVENT = 64
_GAP_FLUSH_NS = 1_000_000_000
_DEFAULT_WEIGHTS = ServiceWeights()


class RequestTelemetry:
    __slots__ = (
        "_ended",
        "_first_ns",
        "_flushed_ns",
        "_req",
        "_sender",
        "_stamps",
        "_weights",
        "endpoint",
        "key",
        "model",
        "prompt_tokens",
        "queue_ns",
        "received_ns",
        "request_id",
        "stream",
        "tokens_written",
        "trace",
    )

    def __init__(
        self,
        sender: EventSender | None,
        *,
        request_id: str,
        key: str,
        model: str,
        endpoint: str,
        received_ns: int,
        weights: ServiceWeights = _DEFAULT_WEIGHTS,
    ) -> None:
        """`weights`: the scheduler's (`FairShare.weights`), which price the request's service."""
        self._sender = sender
        self._weights = weights
        self._req = sender.next_request() if sender is not None else 0
        self.request_id = request_id
        self.key = key
        self.model = model
        self.endpoint = endpoint
        self.received_ns = received_ns
        self.stream = False
        self.prompt_tokens = 0
        self.queue_ns: int | None = None
        self.tokens_written = 0
        self._first_ns = 0
        self._flushed_ns = 0
        self._stamps: list[int] = []
        self._ended = False
        self.trace: TraceContext | None = None

    def _request_fields(self) -> dict[str, Any]:
        """What `start` and `end` both say of the request (their RequestEvent base)."""
        trace = self.trace
        return {
            "req": self._req,
            "rid": self.request_id,
            "key": self.key,
            "model": self.model,
            "endpoint": self.endpoint,
            "stream": self.stream,
            "trace_id": None if trace is None else trace.trace_id,
            "span_id": None if trace is None else trace.span_id,
        }

    def started(self, *, stream: bool, prompt_tokens: int, queue_ns: int) -> None:
        self.stream = stream
        self.prompt_tokens = prompt_tokens
        self.queue_ns = queue_ns
        if self._sender is not None:
            self._sender.send(
                Start(**self._request_fields(), prompt_tokens=prompt_tokens, queue_ns=queue_ns)
            )

    def written(self, tokens: int) -> None:
        """`tokens` more tokens reached the client (or, not streaming, were generated)."""
        self.tokens_written += tokens
        if self._sender is None:
            return
        now = time.monotonic_ns()
        stamps = self._stamps
        if not stamps:
            self._first_ns = self._flushed_ns = now
            self._sender.send(First(req=self._req, ttft_ns=now - self.received_ns))
        # One stamp per token: tokens written together are 0 µs apart. Gaps are computed only
        # when a batch leaves, which keeps the per-token cost to a clock read and an append.
        stamps.append(now)
        if tokens > 1:
            stamps.extend([now] * (tokens - 1))
        if len(stamps) > _GAPS_PER_EVENT or now - self._flushed_ns >= _GAP_FLUSH_NS:
            self._flush_gaps(now)

    def _flush_gaps(self, now: int) -> None:
        stamps = self._stamps
        if len(stamps) > 1 and self._sender is not None:
            gaps = [(later - earlier) // 1000 for earlier, later in itertools.pairwise(stamps)]
            for start in range(0, len(gaps), MAX_GAPS):
                self._sender.send(Gaps(req=self._req, gaps_us=gaps[start : start + MAX_GAPS]))
            # The last stamp stays as the start of the next gap.
            del stamps[:-1]
        self._flushed_ns = now

    def finished(
        self,
        status: str,
        http_status: int,
        *,
        completion: Completion | None = None,
        error_type: str | None = None,
        error: str | None = None,
        cancel_reason: str | None = None,
    ) -> None:
        # Only the first ending counts: a request is reported exactly once, however it ends.
        if self._sender is None or self._ended:
            return
        self._ended = True
        now = time.monotonic_ns()
        self._flush_gaps(now)
        event = End(
            **self._request_fields(),
            status=status,
            http_status=http_status,
            finish_reason=None,
            error_type=error_type,
            error=error,
            cancel_reason=cancel_reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.tokens_written,
            cached_tokens=0,
            e2e_ns=now - self.received_ns,
            ttft_ns=self._first_ns - self.received_ns if self._first_ns else None,
            queue_ns=self.queue_ns,
            prefill_ns=None,
            decode_ns=None,
            gen_ns=self._stamps[-1] - self._first_ns if self._stamps else 0,
        )
        if completion is not None:
            event.finish_reason = completion.finish_reason
            event.prompt_tokens = completion.prompt_tokens
            event.cached_tokens = completion.cached_tokens
            event.prefill_ns = completion.prefill_ns
            event.decode_ns = completion.decode_ns
            if status == "ok":
                event.completion_tokens = completion.completion_tokens
        # What the engines charge the key's counter: the prompt tokens they read, not those
        # found in the prefix cache, and every token generated.
        read = max(0, event.prompt_tokens - event.cached_tokens)
        event.service = self._weights.of(read, event.completion_tokens)
        self._sender.send(event)
