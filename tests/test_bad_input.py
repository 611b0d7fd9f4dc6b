"""Bad input gets a 4xx in OpenAI's error envelope that names the problem; never a 500."""

from __future__ import annotations

import io
import json

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from llmserve.server.protocol import ErrorResponse

MODEL = "SmolLM2-135M-Instruct.Q4_1"
USER = [{"role": "user", "content": "hi"}]


def chat(**fields: object) -> bytes:
    return json.dumps({"model": MODEL, "messages": USER, **fields}).encode()


def without(field: str) -> bytes:
    body = {"model": MODEL, "messages": USER}
    del body[field]
    return json.dumps(body).encode()


JSON = {"Content-Type": "application/json"}

# (case id, path, body, headers, status, param, code)
CASES = [
    ("malformed json", "/v1/chat/completions", b'{"model": ', JSON, 400, None, "invalid_json"),
    ("not an object", "/v1/chat/completions", b"[1, 2]", JSON, 400, None, "invalid_json"),
    ("invalid utf-8", "/v1/chat/completions", b'{"model": "\xff\xfe"}', JSON, 400, None, None),
    (
        "deep nesting",
        "/v1/chat/completions",
        b"[" * 100_000 + b"]" * 100_000,
        JSON,
        400,
        None,
        "invalid_json",
    ),
    (
        "NaN",
        "/v1/chat/completions",
        chat()[:-1] + b', "temperature": NaN}',
        JSON,
        400,
        "temperature",
        "invalid_value",
    ),
    (
        "infinity",
        "/v1/chat/completions",
        chat()[:-1] + b', "top_p": Infinity}',
        JSON,
        400,
        "top_p",
        "invalid_value",
    ),
    (
        "missing messages",
        "/v1/chat/completions",
        without("messages"),
        JSON,
        400,
        "messages",
        "missing_required_parameter",
    ),
    (
        "missing model",
        "/v1/chat/completions",
        without("model"),
        JSON,
        400,
        "model",
        "missing_required_parameter",
    ),
    (
        "messages not a list",
        "/v1/chat/completions",
        chat(messages="hi"),
        JSON,
        400,
        "messages",
        "invalid_value",
    ),
    (
        "empty messages",
        "/v1/chat/completions",
        chat(messages=[]),
        JSON,
        400,
        "messages",
        "invalid_value",
    ),
    (
        "content is a number",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": 5}]),
        JSON,
        400,
        "messages[0].content",
        "invalid_value",
    ),
    (
        "unknown role",
        "/v1/chat/completions",
        chat(messages=[{"role": "tool", "content": "x"}]),
        JSON,
        400,
        "messages[0].role",
        "invalid_value",
    ),
    (
        "image part",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        JSON,
        400,
        "messages[0].content[0].type",
        "invalid_value",
    ),
    (
        "max_tokens as string",
        "/v1/chat/completions",
        chat(max_tokens="10"),
        JSON,
        400,
        "max_tokens",
        "invalid_value",
    ),
    (
        "max_tokens zero",
        "/v1/chat/completions",
        chat(max_tokens=0),
        JSON,
        400,
        "max_tokens",
        "invalid_value",
    ),
    (
        "max_tokens negative",
        "/v1/chat/completions",
        chat(max_tokens=-5),
        JSON,
        400,
        "max_tokens",
        "invalid_value",
    ),
    (
        "max_tokens huge",
        "/v1/chat/completions",
        chat(max_tokens=10**30),
        JSON,
        400,
        "max_tokens",
        None,
    ),
    (
        "max_tokens past context",
        "/v1/chat/completions",
        chat(max_tokens=100_000),
        JSON,
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    (
        "max_completion_tokens past context",
        "/v1/chat/completions",
        chat(max_completion_tokens=100_000),
        JSON,
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    (
        "prompt past context",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": "word " * 3000}]),
        JSON,
        400,
        "messages",
        "context_length_exceeded",
    ),
    (
        "temperature too high",
        "/v1/chat/completions",
        chat(temperature=3),
        JSON,
        400,
        "temperature",
        "invalid_value",
    ),
    (
        "stream not a bool",
        "/v1/chat/completions",
        chat(stream="yes"),
        JSON,
        400,
        "stream",
        "invalid_value",
    ),
    (
        "stop too long",
        "/v1/chat/completions",
        chat(stop=["x" * 300]),
        JSON,
        400,
        "stop[0]",
        "invalid_value",
    ),
    (
        "too many stops",
        "/v1/chat/completions",
        chat(stop=["a"] * 17),
        JSON,
        400,
        "stop",
        "invalid_value",
    ),
    (
        "many messages",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": "w"}] * 20_000),
        JSON,
        400,
        "messages",
        "context_length_exceeded",
    ),
    (
        "special-token flood",
        "/v1/completions",
        json.dumps({"model": MODEL, "prompt": "<|im_end|>" * 50_000}).encode(),
        JSON,
        400,
        "prompt",
        "context_length_exceeded",
    ),
    ("empty stop", "/v1/chat/completions", chat(stop=""), JSON, 400, "stop", None),
    ("n > 1", "/v1/chat/completions", chat(n=2), JSON, 400, "n", "unsupported_parameter"),
    (
        "tools",
        "/v1/chat/completions",
        chat(tools=[{"type": "function"}]),
        JSON,
        400,
        "tools",
        "unsupported_parameter",
    ),
    (
        "logprobs",
        "/v1/chat/completions",
        chat(logprobs=True),
        JSON,
        400,
        "logprobs",
        "unsupported_parameter",
    ),
    (
        "json mode",
        "/v1/chat/completions",
        chat(response_format={"type": "json_object"}),
        JSON,
        400,
        "response_format.type",
        "invalid_value",
    ),
    (
        "unknown model",
        "/v1/chat/completions",
        chat(model="gpt-4o"),
        JSON,
        404,
        "model",
        "model_not_found",
    ),
    (
        "text/plain body",
        "/v1/chat/completions",
        chat(),
        {"Content-Type": "text/plain"},
        415,
        None,
        "unsupported_media_type",
    ),
    (
        "form body",
        "/v1/chat/completions",
        b"model=x",
        {"Content-Type": "application/x-www-form-urlencoded"},
        415,
        None,
        "unsupported_media_type",
    ),
    (
        "body over 1 MiB",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": "x" * (1 << 20)}]),
        JSON,
        413,
        None,
        "request_too_large",
    ),
    (
        "several prompts",
        "/v1/completions",
        json.dumps({"model": MODEL, "prompt": ["a", "b"]}).encode(),
        JSON,
        400,
        "prompt",
        "unsupported_parameter",
    ),
    (
        "token id out of range",
        "/v1/completions",
        json.dumps({"model": MODEL, "prompt": [1, 2, 10**9]}).encode(),
        JSON,
        400,
        "prompt",
        "invalid_value",
    ),
    (
        "empty prompt list",
        "/v1/completions",
        json.dumps({"model": MODEL, "prompt": []}).encode(),
        JSON,
        400,
        "prompt",
        None,
    ),
    (
        "echo",
        "/v1/completions",
        json.dumps({"model": MODEL, "prompt": "a", "echo": True}).encode(),
        JSON,
        400,
        "echo",
        "unsupported_parameter",
    ),
    ("unknown url", "/v1/nope", chat(), JSON, 404, None, "unknown_url"),
]


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "param", "code"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
async def test_bad_request_gets_a_clear_error(
    llama_server: TestServer,
    model_id: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    param: str | None,
    code: str | None,
):
    assert model_id == MODEL
    async with aiohttp.ClientSession() as session:
        async with session.post(
            llama_server.make_url(path), data=io.BytesIO(body), headers=headers
        ) as r:
            payload = await r.json()
            assert r.status == status, payload
            assert r.headers["Content-Type"].startswith("application/json")
            assert r.headers["x-request-id"]
    error = ErrorResponse.model_validate(payload).error
    assert error.message and len(error.message) < 500
    assert error.type == "invalid_request_error"
    assert error.param == param
    if code is not None:
        assert error.code == code


async def test_wrong_method_is_405_with_allow(llama_server: TestServer):
    async with aiohttp.ClientSession() as session:
        async with session.get(llama_server.make_url("/v1/chat/completions")) as r:
            assert r.status == 405
            assert r.headers["Allow"] == "POST"
            error = ErrorResponse.model_validate(await r.json()).error
    assert error.code == "method_not_allowed"


async def test_server_is_still_healthy_after_the_abuse(llama_server: TestServer, model_id: str):
    async with aiohttp.ClientSession() as session:
        for _, path, body, headers, *_ in CASES:
            async with session.post(
                llama_server.make_url(path), data=io.BytesIO(body), headers=headers
            ) as r:
                assert r.status < 500
        async with session.post(
            llama_server.make_url("/v1/chat/completions"), data=chat(max_tokens=3), headers=JSON
        ) as ok:
            assert ok.status == 200
