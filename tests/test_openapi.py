"""/openapi.json is valid OpenAPI 3.1 and describes exactly what the server routes and returns."""

from __future__ import annotations

from typing import Any

import aiohttp
import jsonschema
from aiohttp.test_utils import TestServer
from openapi_spec_validator import validate

from llmserve.server.handlers import routes


async def fetch_json(server: TestServer, method: str, path: str, **kw: Any) -> Any:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, server.make_url(path), **kw) as response:
            return await response.json()


def component_validator(document: dict[str, Any], name: str) -> jsonschema.Validator:
    schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return jsonschema.Draft202012Validator(schema)


async def test_document_is_valid_openapi_31(llama_server: TestServer):
    document = await fetch_json(llama_server, "GET", "/openapi.json")
    assert document["openapi"] == "3.1.0"
    validate(document)


async def test_every_route_is_documented_and_nothing_else(llama_server: TestServer):
    document = await fetch_json(llama_server, "GET", "/openapi.json")
    served = {(r.path, r.method.lower()) for r in routes}  # type: ignore[attr-defined]
    documented = {(p, m) for p, ops in document["paths"].items() for m in ops}
    assert served == documented


async def test_real_responses_match_the_documented_schemas(llama_server: TestServer, model_id: str):
    document = await fetch_json(llama_server, "GET", "/openapi.json")
    chat = await fetch_json(
        llama_server,
        "POST",
        "/v1/chat/completions",
        json={"model": model_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
    )
    component_validator(document, "ChatCompletionResponse").validate(chat)
    completion = await fetch_json(
        llama_server,
        "POST",
        "/v1/completions",
        json={"model": model_id, "prompt": "Hi", "max_tokens": 3},
    )
    component_validator(document, "CompletionResponse").validate(completion)
    models = await fetch_json(llama_server, "GET", "/v1/models")
    component_validator(document, "ModelList").validate(models)
    error = await fetch_json(llama_server, "POST", "/v1/chat/completions", json={"model": model_id})
    component_validator(document, "ErrorResponse").validate(error)


async def test_request_schema_rejects_what_the_handler_rejects(llama_server: TestServer):
    document = await fetch_json(llama_server, "GET", "/openapi.json")
    request = component_validator(document, "ChatCompletionRequest")
    good = {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0.5}
    assert request.is_valid(good)
    assert not request.is_valid({**good, "temperature": 5})
    assert not request.is_valid({**good, "messages": []})
    assert not request.is_valid({"model": "m"})
