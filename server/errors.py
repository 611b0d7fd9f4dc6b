"""Errors the API returns, all in OpenAI's envelope `{"error": {message, type, param, code}}`.

Hierarchy::

    APIError
    ├── InvalidRequest          400 invalid_request_error
    ├── Unauthorized            401 invalid_request_error (missing_api_key, invalid_api_key)
    ├── PermissionDenied        403 invalid_request_error (model_not_allowed)
    ├── RateLimited             429 requests / tokens (rate_limit_exceeded), insufficient_quota
    ├── NotFound                404 invalid_request_error (model_not_found, unknown_url)
    ├── MethodNotAllowed        405 invalid_request_error
    ├── PayloadTooLarge         413 invalid_request_error (request_too_large)
    ├── UnsupportedMediaType    415 invalid_request_error
    ├── ServiceUnavailable      503 server_error (not ready, draining, overloaded)
    ├── InternalError           500 server_error (a bug or an engine failure; details in the log)
    └── HTTPStatusError         any other status aiohttp raised

Handlers raise these; one middleware turns them into responses. Messages never include request
headers, keys or prompt text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from pydantic import ValidationError

__all__ = [
    "APIError",
    "HTTPStatusError",
    "InternalError",
    "InvalidRequest",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "RateLimited",
    "RequestTimeout",
    "ServiceUnavailable",
    "Unauthorized",
    "UnsupportedMediaType",
    "envelope",
    "from_http_exception",
    "from_validation_error",
]


class APIError(Exception):
    status = 500
    type = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return envelope(self.message, self.type, self.param, self.code)

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            text=json.dumps(self.body()),
            content_type="application/json",
            headers=self.headers,
        )


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(APIError):
    status = 401
    type = "invalid_request_error"

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message, code=code, headers={"WWW-Authenticate": "Bearer"})


class PermissionDenied(APIError):
    status = 403
    type = "invalid_request_error"


class RateLimited(APIError):
    """A per-key limit refused the request; `type` says which kind, as OpenAI's does."""

    status = 429

    def __init__(self, message: str, *, type_: str, code: str, headers: dict[str, str]) -> None:
        super().__init__(message, code=code, headers=headers)
        self.type = type_


class NotFound(APIError):
    status = 404
    type = "invalid_request_error"


class MethodNotAllowed(APIError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"


class PayloadTooLarge(APIError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class RequestTimeout(APIError):
    status = 408
    type = "invalid_request_error"
    default_code = "request_timeout"

    def __init__(self, message: str) -> None:
        # The rest of the body may still be on its way: the connection cannot be reused.
        super().__init__(message, headers={"Connection": "close"})


class UnsupportedMediaType(APIError):
    status = 415
    type = "invalid_request_error"
    default_code = "unsupported_media_type"


class ServiceUnavailable(APIError):
    status = 503
    type = "server_error"


class InternalError(APIError):
    status = 500
    type = "server_error"
    default_code = "internal_error"


class HTTPStatusError(APIError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.type = "invalid_request_error" if status < 500 else "server_error"


def envelope(message: str, type_: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _param_path(loc: tuple[int | str, ...]) -> str | None:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not path:
            path = part
        # pydantic names the union member it tried ("str", "list[TextPart]"); clients know
        # only field names, so those steps are dropped.
        elif not any(c in part for c in "[]()-") and part not in ("str", "int", "float", "bool"):
            path += f".{part}"
    return path or None


def from_validation_error(exc: ValidationError) -> InvalidRequest:
    """The most specific problem pydantic found, with the offending field as `param`."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return InvalidRequest(
            f"The request body is not valid JSON: {first['msg']}", code="invalid_json"
        )
    if not first["loc"]:
        return InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    # A value that matches no member of a union yields one error per member; the deepest one
    # is the closest miss (a list whose part has a bad type beats "not a string").
    deepest = max(errors, key=lambda e: len(e["loc"]))
    param = _param_path(tuple(deepest["loc"]))
    if len(deepest["loc"]) == len(first["loc"]):
        siblings = [e for e in errors if _param_path(tuple(e["loc"])) == param]
        detail = ", or ".join(dict.fromkeys(e["msg"] for e in siblings))
    else:
        detail = deepest["msg"]
    if deepest["type"] == "missing":
        message = f"Missing required parameter: '{param}'."
    elif deepest["type"] == "unsupported":
        message = f"{detail}."
    else:
        message = f"Invalid value for '{param}': {detail}."
    return InvalidRequest(message, param=param, code=_code_for(deepest["type"]))


def _code_for(error_type: str) -> str:
    return {
        "missing": "missing_required_parameter",
        "unsupported": "unsupported_parameter",
    }.get(error_type, "invalid_value")


def from_http_exception(
    request: web.Request, exc: web.HTTPException, max_body_bytes: int
) -> APIError:
    """aiohttp's own refusals (unknown URL, wrong method, body too large) as API errors, so the
    client gets the envelope and the request log records the status the client saw."""
    if isinstance(exc, web.HTTPNotFound):
        return NotFound(f"Unknown URL: {request.method} {request.path}", code="unknown_url")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return MethodNotAllowed(
            f"{request.method} is not allowed on {request.path}; use {allowed}.",
            headers={"Allow": allowed},
        )
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge(
            f"The request body is larger than this server's limit of {max_body_bytes} bytes."
        )
    return HTTPStatusError(exc.status, exc.reason or "HTTP error")
