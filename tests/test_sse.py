"""The exact bytes of a stream: headers, `data:` framing, pings, the end marker, late errors."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp.test_utils import TestServer

from llmserve.server.protocol import ChatCompletionChunk, ErrorResponse
from tests.conftest import ServerFactory, synthetic_engine


async def post_raw(
    server: TestServer, body: dict[str, object]
) -> tuple[aiohttp.ClientResponse, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/v1/chat/completions"), json=body) as response:
            return response, await response.read()


async def test_stream_bytes_are_exact_sse(llama_server: TestServer, model_id: str):
    response, raw = await post_raw(
        llama_server,
        {
            "model": model_id,
            "messages": [{"role": "user", "content": "Count to five."}],
            "stream": True,
            "max_tokens": 10,
            "temperature": 0,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert len(response.headers["x-request-id"]) == 32
    assert "Content-Length" not in response.headers

    assert raw.endswith(b"\n\ndata: [DONE]\n\n")
    events = raw.split(b"\n\n")
    assert events[-1] == b""
    events = events[:-1]
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events)
    payloads = [e[len(b"data: ") :] for e in events]
    assert payloads[-1] == b"[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(p) for p in payloads[:-1]]

    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    tokens = chunks[1:-2]
    assert all(c.choices[0].delta.content and c.choices[0].finish_reason is None for c in tokens)
    finish = chunks[-2]
    assert finish.choices[0].finish_reason == "length"
    assert finish.choices[0].delta.content is None and finish.choices[0].delta.role is None
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert len({c.created for c in chunks}) == 1


async def test_caller_request_id_is_echoed_if_plain(llama_server: TestServer):
    async with aiohttp.ClientSession() as session:
        async with session.get(
            llama_server.make_url("/health"), headers={"x-request-id": "trace-1234"}
        ) as plain:
            assert plain.headers["x-request-id"] == "trace-1234"
        async with session.get(
            llama_server.make_url("/health"), headers={"x-request-id": "bad id\twith tab"}
        ) as hostile:
            assert hostile.headers["x-request-id"] != "bad id\twith tab"


async def test_ping_while_nothing_else_is_sent(serve: ServerFactory):
    engine = synthetic_engine(first_token_seconds="0.7", completion_tokens="2")
    server = await serve(engine, **{"server.sse_ping_seconds": "0.25", "engine.kind": "synthetic"})
    _, raw = await post_raw(
        server,
        {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    )
    before_first_token = raw.split(b'"content":"lorem')[0]
    assert before_first_token.count(b": ping\n\n") >= 2
    # Once tokens flow every 20 ms, nothing idles long enough to need a ping.
    after = raw.split(b'"content":"lorem')[1]
    assert b": ping" not in after


async def test_error_after_stream_start_is_an_in_band_event(serve: ServerFactory):
    engine = synthetic_engine(first_token_seconds="0", token_interval_seconds="0.05")
    server = await serve(engine, **{"engine.kind": "synthetic"})
    async with aiohttp.ClientSession() as session:
        async with session.post(
            server.make_url("/v1/chat/completions"),
            json={
                "model": "synthetic",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
            },
        ) as response:
            await response.content.readuntil(b'"content":"lorem')
            await engine.close()
            rest = await asyncio.wait_for(response.content.read(), 5)
    events = [e for e in rest.split(b"\n\n") if e.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]"
    error = ErrorResponse.model_validate(json.loads(events[-2][len(b"data: ") :]))
    assert error.error.code == "generation_cancelled"
