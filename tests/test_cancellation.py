"""A client that goes away stops its generation within a decode step."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp.test_utils import TestServer

from llmserve.server.app_keys import SERVICE
from llmserve.server.engines.base import Engine
from tests.conftest import ServerFactory, synthetic_engine

LONG = {"max_tokens": 400, "temperature": 0, "ignore_eos": True}


async def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.005)
    return condition()


def chat(model: str, **params: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "Tell a story."}], **params}


async def test_stream_disconnect_frees_the_engine(
    llama_server: TestServer, llama_engine: Engine, model_id: str
):
    cancelled_before = llama_engine.cancelled_total
    session = aiohttp.ClientSession()
    response = await session.post(
        llama_server.make_url("/v1/chat/completions"), json=chat(model_id, stream=True, **LONG)
    )
    await response.content.readuntil(b'"content":"')
    await response.content.readuntil(b'"content":"')
    assert llama_engine.active_sequences == 1
    response.close()
    await session.close()
    # 400 tokens take seconds; a freed engine is idle within a few decode steps.
    assert await wait_until(lambda: llama_engine.active_sequences == 0, 1.0)
    assert llama_engine.cancelled_total == cancelled_before + 1

    async with aiohttp.ClientSession() as again:
        async with again.post(
            llama_server.make_url("/v1/chat/completions"), json=chat(model_id, max_tokens=4)
        ) as follow_up:
            assert follow_up.status == 200
            body = await follow_up.json()
    assert body["usage"]["completion_tokens"] <= 4


async def test_non_streaming_hang_up_frees_the_engine(
    llama_server: TestServer, llama_engine: Engine, model_id: str
):
    cancelled_before = llama_engine.cancelled_total

    async def call() -> None:
        async with aiohttp.ClientSession() as session:
            await session.post(
                llama_server.make_url("/v1/chat/completions"), json=chat(model_id, **LONG)
            )

    client = asyncio.create_task(call())
    assert await wait_until(lambda: llama_engine.active_sequences == 1, 5.0)
    client.cancel()
    assert await wait_until(lambda: llama_engine.active_sequences == 0, 1.0)
    assert llama_engine.cancelled_total == cancelled_before + 1


async def test_hang_up_while_queued_leaves_the_queue(serve: ServerFactory):
    engine = synthetic_engine(parallel="1", token_interval_seconds="0.05", completion_tokens="40")
    server = await serve(engine, **{"engine.kind": "synthetic"})
    gate = server.app[SERVICE].gate

    async def call() -> int:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                server.make_url("/v1/chat/completions"), json=chat("synthetic")
            ) as response:
                await response.read()
                return response.status

    running = asyncio.create_task(call())
    assert await wait_until(lambda: gate.running == 1, 2.0)
    queued = asyncio.create_task(call())
    assert await wait_until(lambda: gate.waiting == 1, 2.0)
    queued.cancel()
    assert await wait_until(lambda: gate.waiting == 0, 1.0)
    assert await running == 200
    assert gate.running == 0
