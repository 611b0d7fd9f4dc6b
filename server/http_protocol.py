"""The connection layer under the app: requests that are not valid HTTP, and idle connections.

aiohttp answers a request line or header it cannot parse (an unknown method, a header over 8 KiB,
more than 128 headers, a broken chunk) before any middleware runs, with a plain-text body that
quotes the offending bytes, and logs them at error level. Those bytes can be a client's
credentials, so here such a request gets OpenAI's error envelope naming only what was wrong,
and one info line without the bytes.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from llmserve.server.errors import HTTPStatusError

__all__ = ["AppRunner"]

log = logging.getLogger("llmserve.http")


class _RequestHandler(RequestHandler):
    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status == HTTPStatus.INTERNAL_SERVER_ERROR:
            return super().handle_error(request, status, exc, message)
        reason = type(exc).__name__ if exc is not None else "malformed request"
        log.info("refused a request that is not valid HTTP (%s) from %s", reason, request.remote)
        error = HTTPStatusError(
            status,
            f"The request is not valid HTTP/1.1 ({reason}): check the request line and the "
            "headers (at most 128, each line under 8 KiB).",
        )
        response = error.response()
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)


class AppRunner(web.AppRunner):
    """aiohttp's AppRunner, with connections served by the handler above."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return _Server(
            server.request_handler,
            request_factory=server.request_factory,
            loop=asyncio.get_running_loop(),
            **self._kwargs,
        )
