"""One flat JSON object per log line, through loguru, for journald, files and Loki.

Both processes log this way: the sidecar's request lines and operational messages, and the
server's operational messages (stdlib logging, aiohttp's included, is routed into loguru). Sinks
are enqueued, so a slow stdout or disk never blocks the event loop that logged.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC
from typing import Any, TextIO

from loguru import logger

__all__ = ["configure_logging", "flat_record", "logger"]

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
        line["error"] = str(exc)
    return line


def _json_sink(stream: TextIO, service: str) -> Callable[[Any], None]:
    def sink(message: Any) -> None:
        stream.write(json.dumps(flat_record(message.record, service), default=str) + "\n")
        stream.flush()

    return sink


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
    logger.remove()
    logger.add(
        _json_sink(stream or sys.stderr, service), level=level.upper(), enqueue=True, catch=True
    )
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
