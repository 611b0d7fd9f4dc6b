"""What an engine does once its worker has died: say so once, then fail every request at once.

A decode thread (or task) that raises is a bug or a broken library, not a bad request, so the
engine does not try to go on: the requests it held end with an error, readiness turns 503
through `Engine.failed`, and any request that still reaches `start()` ends at once instead of
waiting in a queue nobody reads. The process keeps answering /health and /ready so an operator
(or systemd, or a load balancer) sees why.
"""

from __future__ import annotations

import logging

from server.engines.base import Completion, GenerationRequest, GenerationStream

__all__ = ["WorkerFault"]

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
            self.message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            log.critical(
                "the %s engine's worker died (%s): requests in flight fail, new ones get a 503, "
                "and /ready stays 503 until the server is restarted",
                self._engine,
                self.message,
                exc_info=exc,
            )
        return self.message

    def ended_stream(self, request: GenerationRequest) -> GenerationStream:
        """A stream for `request` that is already over, with the fault as its error."""
        stream = GenerationStream(cancel=lambda: None)
        stream.deliver(
            Completion(
                finish_reason="error",
                prompt_tokens=len(request.prompt_tokens),
                completion_tokens=0,
                error=self.message,
            )
        )
        return stream
