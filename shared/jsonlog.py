"""One flat JSON object per log line, through loguru, for journald, files and Loki.

Both processes log this way: the sidecar's request lines and operational messages, and the
server's operational messages (stdlib logging, aiohttp's included, is routed into loguru). The
stream sink writes on its own thread, so a slow stdout never blocks the event loop that logged.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
from datetime import UTC
from typing import Any, TextIO

from aiohttp.http_exceptions import HttpProcessingError
from loguru import logger

__all__ = ["close_logging", "configure_logging", "flat_record", "logger"]

# Keys every line has; anything bound with logger.bind() is added beside them.
_RESERVED = ("ts", "level", "msg", "service", "logger")


def flat_record(record: Any, service: str) -> dict[str, Any]:
    """The JSON object for one loguru record."""
    line: dict[str, Any] = {
        "ts": record["time"].astimezone(UTC).isoformat(timespec="milliseconds"),
        "level": record["level"].name.lower(),
        "msg": record["message"],
        "service": service,
    }
    extra = record["extra"]
    line["logger"] = extra.get("logger", record["name"])
    for key, value in extra.items():
        if key not in _RESERVED and not key.startswith("_"):
            line[key] = value
    if record["exception"] is not None:
        exc_type, exc, _ = record["exception"]
        line["error_type"] = getattr(exc_type, "__name__", "Exception")
        # aiohttp's parser errors quote the raw request bytes, which may hold credentials.
        line["error"] = (
            "(request bytes withheld)" if isinstance(exc, HttpProcessingError) else str(exc)
        )
    return line


class _ThreadedJsonSink:
    """Formats in the caller, writes on a thread: a slow stdout never blocks the event loop.

    loguru's own `enqueue=True` pickles every record through a multiprocessing queue, which
    cost the sidecar more CPU than everything else it does per request.
    """

    def __init__(self, stream: TextIO, service: str) -> None:
        self.stream = stream
        self.service = service
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name="log-writer", daemon=True)
        self._writer.start()

    def __call__(self, message: Any) -> None:
        self._lines.put(json.dumps(flat_record(message.record, self.service), default=str))

    def _write(self) -> None:
        stopping = False
        while not stopping:
            # Everything queued so far goes out in one write.
            batch: list[str] = []
            item = self._lines.get()
            while True:
                if item is None:
                    stopping = True
                    break
                batch.append(item)
                try:
                    item = self._lines.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self.stream.write("\n".join(batch) + "\n")
                self.stream.flush()

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        self._lines.put(None)
        self._writer.join(timeout=5)


_sinks: list[_ThreadedJsonSink] = []


def close_logging() -> None:
    """Flush every sink; call once at process exit."""
    logger.remove()
    while _sinks:
        _sinks.pop().close()


class _InterceptHandler(logging.Handler):
    """Hands stdlib logging records to loguru, keeping the stdlib logger's name."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        message = record.getMessage()
        bound = logger.bind(logger=record.name)
        if record.exc_info:
            bound.opt(exception=record.exc_info).log(level, message)
        else:
            bound.log(level, message)


def configure_logging(
    service: str,
    level: str = "INFO",
    *,
    stream: TextIO | None = None,
    file: str | None = None,
    rotation: str = "100 MB",
    retention: int = 5,
) -> None:
    """JSON lines to `stream` (stderr by default) and optionally a rotating file."""
    close_logging()
    sink = _ThreadedJsonSink(stream or sys.stderr, service)
    _sinks.append(sink)
    logger.add(sink, level=level.upper(), catch=True)
    if file:
        logger.add(
            file,
            level=level.upper(),
            format=_file_format,
            rotation=rotation,
            retention=retention,
            # Written in place, line by line, so a killed process loses no line it logged.
            enqueue=False,
            catch=True,
            filter=lambda record: _attach_json(record, service),
        )
    logging.basicConfig(handlers=[_InterceptHandler()], level=level.upper(), force=True)
    logging.captureWarnings(True)


def _file_format(record: Any) -> str:
    # A function, not a format string: loguru would append a traceback to a string format.
    return "{extra[_json]}\n"


def _attach_json(record: Any, service: str) -> bool:
    record["extra"]["_json"] = json.dumps(flat_record(record, service), default=str)
    return True
