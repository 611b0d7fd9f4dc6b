"""Optional direct push of log lines to Loki's HTTP API, off the ingest path.

Lines wait in a bounded buffer; a background task sends them in batches as gzip JSON to
`/loki/api/v1/push`, retrying 5xx, 429 and connection failures with exponential backoff. When
Loki stays away and the buffer fills, the oldest lines are dropped and counted. Labels stay
low-cardinality (service_name, env, level); request_id and key travel as structured metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import itertools
import json
import logging
import time
from collections import deque
from dataclasses import dataclass

import aiohttp

from llmserve.sidecar.metrics import Metrics

__all__ = ["LokiPusher", "build_push_body"]

log = logging.getLogger("llmserve.sidecar.loki")

# The sidecar unit's TimeoutStopSec is 10 s: the last push gets a part of it.
STOP_SECONDS = 3.0


@dataclass(frozen=True, slots=True)
class LogLine:
    ts_ns: int
    level: str
    line: str
    metadata: dict[str, str]


def build_push_body(lines: list[LogLine], service: str, env: str) -> dict[str, object]:
    """Loki's push format: one stream per label set, values [ts_ns, line, metadata]."""
    streams: dict[str, list[list[object]]] = {}
    for entry in lines:
        streams.setdefault(entry.level, []).append([str(entry.ts_ns), entry.line, entry.metadata])
    return {
        "streams": [
            {"stream": {"service_name": service, "env": env, "level": level}, "values": values}
            for level, values in streams.items()
        ]
    }


class LokiPusher:
    def __init__(
        self,
        url: str,
        metrics: Metrics,
        *,
        service: str = "llmserve",
        env: str = "dev",
        max_buffered: int = 10_000,
        batch_lines: int = 1000,
        interval_seconds: float = 1.0,
        max_backoff_seconds: float = 30.0,
    ) -> None:
        self.endpoint = url.rstrip("/") + "/loki/api/v1/push"
        self.metrics = metrics
        self.service = service
        self.env = env
        self.max_buffered = max_buffered
        self.batch_lines = batch_lines
        self.interval = interval_seconds
        self.max_backoff = max_backoff_seconds
        self._buffer: deque[LogLine] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    def push(self, line: str, level: str, metadata: dict[str, str]) -> None:
        if len(self._buffer) >= self.max_buffered:
            self._buffer.popleft()
            self.dropped += 1
            self.metrics.log_lines_dropped.inc()
        self._buffer.append(LogLine(time.time_ns(), level, line, metadata))
        if len(self._buffer) >= self.batch_lines:
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self, seconds: float = STOP_SECONDS) -> None:
        """Send what is buffered, for at most `seconds`; lines left over are dropped, counted
        (llm_sidecar_loki_lines_dropped_total and the exit log line) and the sidecar exits."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # A Loki that accepts and never answers would otherwise hold the exit for aiohttp's
        # default 300 s, past systemd's TimeoutStopSec, and the sidecar would be killed.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds), aiohttp.ClientSession() as session:
                while self._buffer:
                    batch = list(itertools.islice(self._buffer, self.batch_lines))
                    if not await self._send(session, batch):
                        break
                    for _ in batch:
                        self._buffer.popleft()
        if self._buffer:
            left = len(self._buffer)
            self._buffer.clear()
            self.dropped += left
            self.metrics.log_lines_dropped.inc(left)
            log.warning("%d log lines could not be pushed to Loki before exit", left)

    async def _run(self) -> None:
        backoff = self.interval
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval)
                self._wake.clear()
                while self._buffer:
                    batch = list(itertools.islice(self._buffer, self.batch_lines))
                    if not await self._send(session, batch):
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, self.max_backoff)
                        break
                    backoff = self.interval
                    # Lines dropped for room while the batch was in flight are gone already.
                    sent = {id(line) for line in batch}
                    while self._buffer and id(self._buffer[0]) in sent:
                        self._buffer.popleft()

    async def _send(self, session: aiohttp.ClientSession, batch: list[LogLine]) -> bool:
        """True when Loki took the batch, or refused it for good (4xx): either way it is done."""
        body = gzip.compress(json.dumps(build_push_body(batch, self.service, self.env)).encode())
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        try:
            async with session.post(self.endpoint, data=body, headers=headers) as response:
                if response.status < 300:
                    self.metrics.loki_pushes.labels("ok").inc()
                    return True
                if response.status == 429 or response.status >= 500:
                    self.metrics.loki_pushes.labels("retry").inc()
                    return False
                log.warning(
                    "Loki refused a batch of %d lines: HTTP %d", len(batch), response.status
                )
                self.metrics.loki_pushes.labels("rejected").inc()
                return True
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.metrics.loki_pushes.labels("retry").inc()
            log.debug("Loki push failed: %s", exc)
            return False
