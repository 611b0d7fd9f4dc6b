"""The sidecar's optional bearer token, in front of everything that carries data.

/metrics and /stats need `Authorization: Bearer <sidecar.token>` when a token is set. The status
page's HTML, script and stylesheet carry no data, so a browser loads them without a header and
the page then sends the token on its own requests; /health stays open for liveness probes.
"""

from __future__ import annotations

import hmac

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

__all__ = ["PROTECTED_PATHS", "bearer_token_middleware"]

PROTECTED_PATHS = frozenset({"/metrics", "/stats"})


def _unauthorized() -> web.Response:
    # OpenAI's error envelope, as the server uses; the message says nothing of what was sent.
    error = {
        "message": "This endpoint needs the sidecar's token: Authorization: Bearer <token>.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
    return web.json_response(
        {"error": error}, status=401, headers={"WWW-Authenticate": 'Bearer realm="llmserve"'}
    )


def bearer_token_middleware(token: str) -> Middleware:
    expected = token.encode()

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PROTECTED_PATHS:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            # compare_digest: the time taken says nothing about how much of the token matched.
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), expected
            ):
                return _unauthorized()
        return await handler(request)

    return check_token
