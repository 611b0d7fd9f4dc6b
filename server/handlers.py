"""Route handlers: thin, each reads its input, asks the service, and returns a response."""

from __future__ import annotations

import asyncio
import json
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from llmserve.server.app_keys import AUTH, BODY_TIMEOUT, OPENAPI, SERVICE, STATE
from llmserve.server.errors import (
    NotFound,
    RequestTimeout,
    UnsupportedMediaType,
    from_validation_error,
)
from llmserve.server.middlewares import REQUEST_ID
from llmserve.server.protocol import ChatCompletionRequest, CompletionRequest

__all__ = ["routes"]

routes = web.RouteTableDef()
_Body = TypeVar("_Body", bound=BaseModel)


async def _read_body(request: web.Request, model: type[_Body]) -> _Body:
    content_type = request.headers.get("Content-Type")
    if content_type is not None and not _is_json(request.content_type):
        raise UnsupportedMediaType(
            f"Send the request body as JSON with Content-Type: application/json "
            f"(got {request.content_type!r})."
        )
    seconds = request.app[BODY_TIMEOUT]
    try:
        async with asyncio.timeout(seconds):
            raw = await request.read()
    except TimeoutError:
        raise RequestTimeout(
            f"The request body did not arrive within {seconds:g} seconds."
        ) from None
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, ChatCompletionRequest)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, CompletionRequest)


async def _generate(
    request: web.Request, model: type[ChatCompletionRequest] | type[CompletionRequest]
) -> web.StreamResponse:
    service = request.app[SERVICE]
    endpoint = "chat" if model is ChatCompletionRequest else "completions"
    async with service.track(request, request[REQUEST_ID], endpoint) as life:
        # Everything that can refuse the request without reading its body goes first.
        key = request.app[AUTH].authenticate(request)
        await life.admit(key)
        body = await _read_body(request, model)
        service.check_model(body.model, key)
        prepared = await service.prepare(body, life)
        await life.reserve(prepared.reserved_tokens)
        return await service.respond(life, prepared)


def _model_entry(request: web.Request) -> dict[str, object]:
    info = request.app[SERVICE].engine.info
    return {
        "id": info.model_id,
        "object": "model",
        "created": int(request.app[STATE].started_at),
        "owned_by": "llmserve",
        "engine": info.engine,
        "context_length": info.context_length,
    }


@routes.get("/v1/models")
async def models(request: web.Request) -> web.Response:
    request.app[AUTH].authenticate(request)
    return web.json_response({"object": "list", "data": [_model_entry(request)]})


@routes.get("/v1/models/{model_id}")
async def model(request: web.Request) -> web.Response:
    request.app[AUTH].authenticate(request)
    entry = _model_entry(request)
    wanted = request.match_info["model_id"]
    if wanted != entry["id"]:
        raise NotFound(
            f"The model '{wanted}' does not exist. This server serves '{entry['id']}'.",
            param="model",
            code="model_not_found",
        )
    return web.json_response(entry)


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """Liveness: the process answers. Says nothing about the model."""
    return web.json_response({"status": "ok"})


@routes.get("/ready")
async def ready(request: web.Request) -> web.Response:
    """Readiness: 200 only while the model is loaded and the server is not draining."""
    state = request.app[STATE]
    body = state.readiness()
    return web.json_response(body, status=200 if body["status"] == "ready" else 503)


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.Response(text=json.dumps(request.app[OPENAPI]), content_type="application/json")
