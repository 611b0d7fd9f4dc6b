"""Many streams at once: batched decoding, no truncation, and a bounded wait queue."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
from aiohttp.test_utils import TestServer

from llmserve.server.engines.base import Engine
from tests.conftest import ServerFactory, synthetic_engine
from tests.test_openai_client import client_for


async def test_eight_concurrent_streams_all_complete_in_full(
    llama_server: TestServer, llama_engine: Engine, model_id: str
):
    peak = 0

    async def one(i: int, client: openai.AsyncOpenAI) -> tuple[str, int, str | None]:
        nonlocal peak
        stream = await client.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": f"Story number {i}, please."}],
            stream=True,
            max_tokens=48,
            temperature=0.8,
            seed=i,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        text, usage, finish = "", 0, None
        async for chunk in stream:
            peak = max(peak, llama_engine.active_sequences)
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return text, usage, finish

    async with client_for(llama_server) as client:
        results = await asyncio.gather(*(one(i, client) for i in range(8)))
    assert peak == 8, "the streams should have been decoded together"
    for text, usage, finish in results:
        assert usage == 48
        assert finish == "length"
        assert text
    assert llama_engine.active_sequences == 0


async def test_full_queue_is_a_503_with_retry_after(serve: ServerFactory):
    engine = synthetic_engine(parallel="1", token_interval_seconds="0.02", completion_tokens="25")
    server = await serve(engine, **{"engine.kind": "synthetic", "server.max_waiting": "1"})
    body = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}]}

    async with aiohttp.ClientSession() as session:

        async def call() -> tuple[int, dict[str, str], dict[str, object]]:
            async with session.post(server.make_url("/v1/chat/completions"), json=body) as r:
                return r.status, dict(r.headers), await r.json()

        results = await asyncio.gather(*(call() for _ in range(3)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200, 200, 503]
    _, headers, error = next(r for r in results if r[0] == 503)
    assert headers["Retry-After"] == "1"
    assert error["error"]["code"] == "server_overloaded"
    assert error["error"]["type"] == "server_error"


async def test_queue_wait_timeout_is_a_503(serve: ServerFactory):
    engine = synthetic_engine(parallel="1", token_interval_seconds="0.05", completion_tokens="20")
    server = await serve(
        engine, **{"engine.kind": "synthetic", "server.queue_timeout_seconds": "0.2"}
    )
    body = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as session:

        async def call() -> int:
            async with session.post(server.make_url("/v1/chat/completions"), json=body) as r:
                await r.read()
                return r.status

        assert sorted(await asyncio.gather(call(), call())) == [200, 503]
