"""Request ids and trace context, and one place where every failure becomes an OpenAI error
envelope.

aiohttp's own HTTP exceptions (unknown URL, wrong method, body over the size limit) are mapped
too, so a client never sees an HTML or plain-text error page from this server.
"""

from __future__ import annotations

import logging
import re
import uuid

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from llmserve.server.errors import APIError, InternalError, from_http_exception
from llmserve.server.trace_context import TraceContext, continue_trace

__all__ = ["REQUEST_ID", "REQUEST_ID_HEADER", "TRACE", "error_middleware", "trace_headers"]

log = logging.getLogger("llmserve.http")

REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID = web.RequestKey("request_id", str)
# A caller-chosen id is echoed only if it is short and plain, so it cannot inject into logs.
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Set only when the request came with a valid traceparent.
TRACE = web.RequestKey("trace", TraceContext)


def trace_headers(request: web.Request) -> dict[str, str]:
    """The request id and, if it has one, the continued trace context, for its response."""
    trace = request.get(TRACE)
    headers = trace.response_headers() if trace is not None else {}
    return {REQUEST_ID_HEADER: request[REQUEST_ID], **headers}


def error_middleware(max_body_bytes: int) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        offered = request.headers.get(REQUEST_ID_HEADER, "")
        request_id = offered if _SAFE_REQUEST_ID.fullmatch(offered) else uuid.uuid4().hex
        request[REQUEST_ID] = request_id
        trace = continue_trace(request.headers)
        if trace is not None:
            request[TRACE] = trace
        try:
            response = await handler(request)
        except APIError as exc:
            response = exc.response()
        except web.HTTPException as exc:
            response = from_http_exception(request, exc, max_body_bytes).response()
        except Exception:
            log.exception(
                "unhandled error in %s %s (request %s)", request.method, request.path, request_id
            )
            response = InternalError("The server had an internal error.").response()
        if not response.prepared:
            response.headers.update(trace_headers(request))
        return response

    return middleware
