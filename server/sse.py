"""A Server-Sent Events response: headers that defeat proxy buffering, `data:` framing, pings.

Each event is written to the socket as soon as it is sent (aiohttp sets TCP_NODELAY). A comment
ping goes out only when the stream has been silent for `ping_seconds`, so it never delays a token
and keeps idle proxies from closing a stream whose prompt is still being read. One timer per
stream re-arms itself for the remaining silence instead of being reset on every token.

A client that stops reading would otherwise hold its engine slot for as long as it keeps the
connection open: a write that makes no progress for `send_timeout_seconds` drops the connection
and raises ClientStalled. The timer is armed only when unsent bytes are already queued, so the
common case (the socket took everything) costs nothing extra per token.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

from aiohttp import web

__all__ = ["SSE_HEADERS", "ClientStalled", "EventStream"]

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",
}
_PING = b": ping\n\n"


class ClientStalled(ConnectionError):
    """The client stopped reading the stream; the connection has been dropped."""


class EventStream:
    """Open with `await open()`, then `send()` JSON strings; `close()` ends the response."""

    def __init__(
        self,
        request: web.Request,
        *,
        ping_seconds: float,
        send_timeout_seconds: float,
        headers: Mapping[str, str],
    ) -> None:
        self._request = request
        self._response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **headers})
        self._loop = asyncio.get_running_loop()
        self._ping_seconds = ping_seconds
        self._send_timeout = send_timeout_seconds
        self._last_write = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._ping_task: asyncio.Task[None] | None = None

    @property
    def response(self) -> web.StreamResponse:
        return self._response

    async def open(self) -> None:
        await self._response.prepare(self._request)
        self._last_write = self._loop.time()
        self._timer = self._loop.call_later(self._ping_seconds, self._check_idle)

    async def send(self, data: str) -> None:
        """Write one `data:` event (data must be a single line, as JSON is)."""
        self._last_write = self._loop.time()
        payload = b"data: " + data.encode() + b"\n\n"
        transport = self._request.transport
        if transport is None or not transport.get_write_buffer_size():
            await self._response.write(payload)
            return
        try:
            async with asyncio.timeout(self._send_timeout):
                await self._response.write(payload)
        except TimeoutError:
            transport.abort()
            raise ClientStalled(
                f"the client read nothing for {self._send_timeout:g} seconds"
            ) from None

    async def close(self) -> None:
        self._stop_timer()
        if self._ping_task is not None:
            self._ping_task.cancel()
        with contextlib.suppress(ConnectionError):
            await self._response.write_eof()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check_idle(self) -> None:
        silent = self._loop.time() - self._last_write
        if silent >= self._ping_seconds:
            self._last_write = self._loop.time()
            self._ping_task = self._loop.create_task(self._ping())
            delay = self._ping_seconds
        else:
            delay = self._ping_seconds - silent
        self._timer = self._loop.call_later(delay, self._check_idle)

    async def _ping(self) -> None:
        try:
            await self._response.write(_PING)
        except ConnectionError:
            # The client is gone; the handler finds out on its next write or is cancelled.
            self._stop_timer()
