"""The OpenAPI 3.1 document, generated from the same pydantic models the handlers validate with.

OpenAPI 3.1 schemas are JSON Schema 2020-12, which is what pydantic emits, so the request schemas
here are exactly the validation rules and cannot drift from them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from llmserve.server import protocol

__all__ = ["build_openapi"]

_REF = "#/components/schemas/{model}"


class HealthStatus(BaseModel):
    status: str


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {
        400: "Invalid request: the message names the parameter.",
        401: "Missing or wrong API key (when the server has a keys file).",
        403: "This API key may not use the model.",
        404: "Unknown model.",
        413: "Request body over the size limit.",
        415: "Body is not JSON.",
        429: "A per-key limit was reached (see retry-after and x-ratelimit-* headers).",
        500: "The engine failed.",
        503: "Not ready, shutting down, or at capacity (see Retry-After).",
    }
    return {str(s): _json(protocol.ErrorResponse, reasons[s]) for s in statuses}


def _generation(
    summary: str, request: type[BaseModel], response: type[BaseModel], chunk: type[BaseModel]
) -> dict[str, Any]:
    stream_description = (
        f"With stream=true: Server-Sent Events. Each `data:` line is a {chunk.__name__}; with "
        "stream_options.include_usage a last chunk has empty choices and the usage; an error "
        "after the stream began is a `data:` line holding an ErrorResponse; `data: [DONE]` ends it."
    )
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(request)}},
            },
            "responses": {
                "200": {
                    "description": "The completion, or with stream=true an event stream.",
                    "headers": {
                        "x-request-id": {"schema": {"type": "string"}},
                    },
                    "content": {
                        "application/json": {"schema": _ref(response)},
                        "text/event-stream": {
                            "schema": {"type": "string", "description": stream_description}
                        },
                    },
                },
                **_errors(400, 401, 403, 404, 413, 415, 429, 500, 503),
            },
        }
    }


def build_openapi(version: str) -> dict[str, Any]:
    models: list[type[BaseModel]] = [
        protocol.ChatCompletionRequest,
        protocol.CompletionRequest,
    ]
    responses: list[type[BaseModel]] = [
        protocol.ChatCompletionResponse,
        protocol.ChatCompletionChunk,
        protocol.CompletionResponse,
        protocol.CompletionChunk,
        protocol.ModelList,
        protocol.Model,
        protocol.ErrorResponse,
        HealthStatus,
    ]
    _, schemas = models_json_schema(
        [(m, "validation") for m in models] + [(m, "serialization") for m in responses],
        ref_template=_REF,
    )
    return {
        "openapi": "3.1.0",
        "info": {"title": "llmserve", "version": version},
        "paths": {
            "/v1/chat/completions": _generation(
                "Create a chat completion",
                protocol.ChatCompletionRequest,
                protocol.ChatCompletionResponse,
                protocol.ChatCompletionChunk,
            ),
            "/v1/completions": _generation(
                "Create a completion (legacy)",
                protocol.CompletionRequest,
                protocol.CompletionResponse,
                protocol.CompletionChunk,
            ),
            "/v1/models": {
                "get": {
                    "summary": "List the served model",
                    "responses": {
                        "200": _json(protocol.ModelList, "The served model."),
                        **_errors(401),
                    },
                }
            },
            "/v1/models/{model_id}": {
                "get": {
                    "summary": "The served model, by id",
                    "parameters": [
                        {
                            "name": "model_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": _json(protocol.Model, "The served model."),
                        **_errors(401, 404),
                    },
                }
            },
            "/health": {
                "get": {
                    "summary": "Liveness",
                    "responses": {"200": _json(HealthStatus, "The process is up.")},
                }
            },
            "/ready": {
                "get": {
                    "summary": "Readiness",
                    "responses": {
                        "200": _json(HealthStatus, "Model loaded, accepting requests."),
                        "503": _json(HealthStatus, "Loading or draining."),
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": schemas["$defs"],
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
        # Either scheme, or none when the server runs without a keys file.
        "security": [{"bearer": []}, {"apiKeyHeader": []}, {}],
    }
