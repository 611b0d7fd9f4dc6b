"""One JSON line per finished request: to stdout (journald), an optional file, and Loki; and the
last few errors and cancellations kept in memory for the status page.

The line carries identifiers (the request id, and the W3C trace and span ids when the request
came with a trace context, which the latency exemplars carry too), counts and timings only. Prompt
and completion text never reach the sidecar, and API keys appear only as their names.
"""

from __future__ import annotations

import json
import time
from collections import deque
from datetime import UTC, datetime
from typing import Any

from llmserve.shared.jsonlog import logger
from llmserve.shared.protocol import ERROR_STATUSES
from llmserve.sidecar.loki import LokiPusher

__all__ = ["RecentProblems", "RequestLog", "request_fields"]

# What the status page shows of a failed or cancelled request: a subset of the log line.
_PROBLEM_FIELDS = (
    "request_id",
    "key",
    "model",
    "endpoint",
    "status",
    "http_status",
    "error_type",
    "error",
    "cancel_reason",
    "completion_tokens",
    "e2e_s",
)


def _s(ns: int | None) -> float | None:
    return None if ns is None else round(ns / 1e9, 6)


def request_fields(event: dict[str, Any]) -> dict[str, Any]:
    """The log fields for an `end` event (beside ts, level, msg and service)."""
    completion = int(event["completion_tokens"])
    generation = event.get("gen_ns") or 0
    tpot = generation / (completion - 1) / 1e9 if completion > 1 and generation else None
    return {
        "request_id": event["rid"],
        "trace_id": event.get("trace_id"),
        "span_id": event.get("span_id"),
        "key": event["key"],
        "model": event["model"],
        "endpoint": event["endpoint"],
        "stream": event["stream"],
        "status": event["status"],
        "http_status": event["http_status"],
        "finish_reason": event.get("finish_reason"),
        "cancel_reason": event.get("cancel_reason"),
        "prompt_tokens": int(event["prompt_tokens"]),
        "completion_tokens": completion,
        "cached_tokens": int(event.get("cached_tokens") or 0),
        "ttft_s": _s(event.get("ttft_ns")),
        "e2e_s": _s(event["e2e_ns"]),
        "queue_s": _s(event.get("queue_ns")),
        "tpot_s": None if tpot is None else round(tpot, 6),
        "tokens_per_s": None if tpot is None else round(1 / tpot, 3),
        "error_type": event.get("error_type"),
        "error": event.get("error"),
    }


def _level(status: str) -> str:
    return {"error": "error", "overloaded": "warning", "invalid_request": "warning"}.get(
        status, "info"
    )


class RequestLog:
    def __init__(self, service: str, loki: LokiPusher | None = None) -> None:
        self.service = service
        self.loki = loki

    def __call__(self, event: dict[str, Any]) -> None:
        fields = request_fields(event)
        level = _level(fields["status"])
        logger.bind(**fields).log(level.upper(), "request finished")
        if self.loki is not None:
            line = {
                "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "level": level,
                "msg": "request finished",
                "service": self.service,
                **fields,
            }
            metadata = {"request_id": fields["request_id"], "key": fields["key"]}
            if fields["trace_id"] is not None:
                metadata["trace_id"] = fields["trace_id"]
            self.loki.push(json.dumps(line), level, metadata)


class RecentProblems:
    """A ring of the most recent errors and cancellations, newest first."""

    def __init__(self, size: int = 30) -> None:
        self._entries: deque[dict[str, Any]] = deque(maxlen=size)

    def add(self, event: dict[str, Any]) -> None:
        status = event["status"]
        if status != "cancelled" and status not in ERROR_STATUSES:
            return
        fields = request_fields(event)
        entry = {name: fields[name] for name in _PROBLEM_FIELDS}
        self._entries.append({"ts": round(time.time(), 3), **entry})

    def entries(self) -> list[dict[str, Any]]:
        return list(reversed(self._entries))
