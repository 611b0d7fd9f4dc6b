"""What an engine does once its worker has died: say so once, then fail every request at once.

A decode thread (or task) that raises is a bug or a broken library, not a bad request, so the
engine does not try to go on: the requests it held end with an error, readiness turns 503
through `Engine.failed`, and any request that still reaches `start()` ends at once instead of
waiting in a queue nobody reads. The process keeps answering /health and /ready so an operator
(or systemd, or a load balancer) sees why.
"""

from __future__ import annotations

import logging

__all__ = ["WorkerFault", "describe"]

log = logging.getLogger("llmserve.engine")


class WorkerFault:
    """The first exception that ended an engine's worker; None of it while the worker runs."""

    __slots__ = ("_engine", "message")

    def __init__(self, engine: str) -> None:
        self._engine = engine
        self.message: str | None = None

    def record(self, exc: BaseException) -> str:
        """Remember and log the first fault (with its traceback); return the message to use."""
        if self.message is None:
            self.message = describe(exc)
            log.critical(
                "the %s engine's worker died (%s): requests in flight fail, new ones get a 503, "
                "and /ready stays 503 until the server is restarted",
                self._engine,
                self.message,
                exc_info=exc,
            )
        return self.message


def describe(exc: BaseException) -> str:
    """An exception as one line: its type, and its message when it has one."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
