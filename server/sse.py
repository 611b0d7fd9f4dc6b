"""A Server-Sent Events response: headers that defeat proxy buffering, `data:` framing, pings.

Each event is written to the socket as soon as it is sent (aiohttp sets TCP_NODELAY). A comment
ping goes out only when the stream has been silent for `ping_seconds`, so it never delays a token
and keeps idle proxies from closing a stream whose prompt is still being read. One timer per
stream re-arms itself for the remaining silence instead of being reset on every token.

A client that stops reading would otherwise hold its engine slot for as long as it keeps the
connection open: every write that may wait for the client (an event, a ping, the end of the
response) gives up after `send_timeout_seconds`, drops the connection and raises ClientStalled.
The timer is armed only when unsent bytes are already queued or the write is large, so the
common case (the socket took a small event at once) costs nothing extra per token. `close()`
waits the same bounded time and says whether the client took the end of the stream; callers
release the engine slot and any lease before they call it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping
from typing import Any

from aiohttp import web

__all__ = ["SSE_HEADERS", "ClientStalled", "EventStream"]

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",
}
_PING = b": ping\n\n"
# A write this small into an empty transport buffer cannot push it past its high-water mark,
# so it never waits for the client and needs no timer.
_UNTIMED_WRITE_BYTES = 16 * 1024


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
        await self._write(b"data: " + data.encode() + b"\n\n")

    async def close(self) -> bool:
        """End the response; False if the client took nothing for `send_timeout_seconds`."""
        self._stop_timer()
        if self._ping_task is not None:
            self._ping_task.cancel()
        try:
            await self._bounded(self._response.write_eof())
        except ClientStalled:
            return False
        except ConnectionError:
            pass
        return True

    async def _write(self, payload: bytes) -> None:
        transport = self._request.transport
        if (
            transport is not None
            and not transport.get_write_buffer_size()
            and len(payload) <= _UNTIMED_WRITE_BYTES
        ):
            await self._response.write(payload)
            return
        await self._bounded(self._response.write(payload))

    async def _bounded(self, write: Coroutine[Any, Any, None]) -> None:
        try:
            async with asyncio.timeout(self._send_timeout):
                await write
        except TimeoutError:
            transport = self._request.transport
            if transport is not None:
                transport.abort()
            raise ClientStalled(
                f"the client read nothing for {self._send_timeout:g} seconds"
            ) from None

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
            await self._write(_PING)
        except ConnectionError:
            # The client is gone; the handler finds out on its next write or is cancelled.
            self._stop_timer()
