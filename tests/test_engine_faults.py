"""An engine whose worker dies fails what it held, turns /ready 503 and refuses new work.

Before, a llama.cpp decode thread that raised ended its streams as if the server were shutting
down, and left /ready at 200 while every later request waited forever in a queue no thread read.
Each engine's fault is injected by making a real call inside its worker raise.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from llmserve.server.engines import create_engine, synthetic
from llmserve.server.engines.base import Engine, GenerationRequest, SamplingParams
from llmserve.server.engines.exllamav2 import engine as exllamav2_engine
from llmserve.server.engines.llamacpp import LlamaCppEngine
from llmserve.server.engines.llamacpp.model import LlamaModel
from llmserve.server.engines.text_output import TextAssembler
from tests.conftest import ExLlamaV2Factory, ServerFactory, make_config, synthetic_engine
from tests.exllamav2_double.generator.dynamic import ExLlamaV2DynamicGenerator


class InjectedFault(RuntimeError):
    pass


@pytest.fixture
async def own_llama_engine() -> AsyncIterator[LlamaCppEngine]:
    """A llamacpp engine of this test's own: the shared one must survive the fault."""
    engine = create_engine(make_config())
    assert isinstance(engine, LlamaCppEngine)
    await engine.load()
    yield engine
    await engine.close()


def chat(engine: Engine, *, stream: bool, max_tokens: int = 400) -> dict[str, Any]:
    return {
        "model": engine.info.model_id,
        "messages": [{"role": "user", "content": "Count to one thousand."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }


async def check_requests_fail_then_server_refuses(server: TestServer, engine: Engine) -> None:
    """A stream and a plain request in flight when the fault comes; then what a client sees.

    The injected fault fires once both are running, so both are in flight by construction.
    """
    url = server.make_url("/v1/chat/completions")
    # Unfixed, the requests never end: a bound far above the ~1 s this takes makes that a failure.
    async with asyncio.timeout(120), aiohttp.ClientSession() as session:
        async with session.post(url, json=chat(engine, stream=True)) as streamed:
            assert streamed.status == 200
            await streamed.content.readuntil(b'"content":')
            async with session.post(url, json=chat(engine, stream=False)) as collected:
                assert collected.status == 500
                assert (await collected.json())["error"]["code"] == "internal_error"
            body = (await streamed.content.read()).decode()
        assert '"code": "engine_error"' in body
        assert body.rstrip().endswith("data: [DONE]")
        async with session.get(server.make_url("/ready")) as ready:
            assert ready.status == 503
            assert await ready.json() == {"status": "failed"}
        for stream in (True, False):
            async with session.post(url, json=chat(engine, stream=stream)) as refused:
                assert refused.status == 503
                error = (await refused.json())["error"]
                assert error["code"] == "engine_failed"
                assert "restarted" in error["message"]
    assert engine.failed
    assert engine.active_sequences == 0


async def check_a_late_start_ends_at_once(engine: Engine) -> None:
    """A request already past the readiness check when the engine died is not left waiting."""
    request = GenerationRequest("late", [1, 2, 3], SamplingParams(max_tokens=4))
    async with engine.start(request) as stream:
        assert [delta async for delta in stream] == []
    assert stream.completion is not None
    assert stream.completion.finish_reason == "error"


def check_logged_once(caplog: pytest.LogCaptureFixture, fault: str) -> None:
    records = [r for r in caplog.records if "worker died" in r.getMessage()]
    assert len(records) == 1 and fault in records[0].getMessage()
    assert records[0].exc_info is not None


async def test_a_llamacpp_decode_thread_that_raises_fails_requests_and_readiness(
    own_llama_engine: LlamaCppEngine,
    serve: ServerFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = own_llama_engine
    original = LlamaModel.decode

    def decode(self: LlamaModel, rows: Sequence[tuple[int, int, int, bool]]) -> int:
        if self is engine._model:
            # The first step that carries both requests breaks, so both are in flight by then.
            if len({row[2] for row in rows}) == 2:
                raise InjectedFault("injected decode fault")
            # Alone, the first request takes seconds, however fast the machine: the second one
            # comes long before it could end.
            time.sleep(0.01)
        return original(self, rows)

    monkeypatch.setattr(LlamaModel, "decode", decode)
    await check_requests_fail_then_server_refuses(await serve(engine), engine)
    await check_a_late_start_ends_at_once(engine)
    check_logged_once(caplog, "injected decode fault")


async def test_a_synthetic_generation_that_raises_fails_requests_and_readiness(
    serve: ServerFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    engine = synthetic_engine(token_interval_seconds="0.02", completion_tokens="1000")

    class BreakingAssembler(TextAssembler):
        def feed(self, data: bytes) -> str:
            if engine.active_sequences == 2:
                raise InjectedFault("injected synthetic fault")
            return super().feed(data)

    monkeypatch.setattr(synthetic, "TextAssembler", BreakingAssembler)
    await check_requests_fail_then_server_refuses(await serve(engine), engine)
    await check_a_late_start_ends_at_once(engine)
    check_logged_once(caplog, "injected synthetic fault")


async def test_an_exllamav2_worker_that_raises_fails_requests_and_readiness(
    exllamav2_double: ExLlamaV2Factory,
    serve: ServerFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # iterate() failing is recovered from (the generator is rebuilt); anything else the worker
    # calls is not, e.g. enqueue() raising something other than its page assertion.
    engine = await exllamav2_double(cache_tokens=2048)
    original = ExLlamaV2DynamicGenerator.enqueue

    def enqueue(self: ExLlamaV2DynamicGenerator, job: Any) -> Any:
        if self.num_remaining_jobs():
            raise InjectedFault("injected enqueue fault")
        return original(self, job)

    monkeypatch.setattr(ExLlamaV2DynamicGenerator, "enqueue", enqueue)
    # Slow enough that the first request is still generating when the second one comes.
    monkeypatch.setattr(ExLlamaV2DynamicGenerator, "seconds_per_iteration", 0.01)
    await check_requests_fail_then_server_refuses(await serve(engine), engine)
    await check_a_late_start_ends_at_once(engine)
    check_logged_once(caplog, "injected enqueue fault")


async def test_an_exllamav2_request_started_as_the_worker_dies_is_ended_not_lost(
    exllamav2_double: ExLlamaV2Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A request that passed start()'s dead-worker check just before the worker died, and was
    # queued just after the worker ended everything queued, was never ended: its client waited
    # forever. The worker is made to die, and to finish ending what it held, in exactly that gap.
    engine = await exllamav2_double()

    def enqueue(self: ExLlamaV2DynamicGenerator, job: Any) -> Any:
        raise InjectedFault("injected enqueue fault")

    monkeypatch.setattr(ExLlamaV2DynamicGenerator, "enqueue", enqueue)
    real_request = exllamav2_engine._Request

    def request_as_the_worker_dies(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(exllamav2_engine, "_Request", real_request)
        engine.start(GenerationRequest("fatal", [1, 2, 3], SamplingParams(max_tokens=4)))
        deadline = time.monotonic() + 60
        while not (engine.failed and engine.active_sequences == 0):
            assert time.monotonic() < deadline, "the worker did not die"
            time.sleep(0.01)
        return real_request(*args, **kwargs)

    monkeypatch.setattr(exllamav2_engine, "_Request", request_as_the_worker_dies)
    request = GenerationRequest("unlucky", [1, 2, 3], SamplingParams(max_tokens=4))
    # Unfixed, the stream never ends: a bound far above the instant this takes makes that a failure.
    async with asyncio.timeout(30), engine.start(request) as stream:
        assert [delta async for delta in stream] == []
    assert stream.completion is not None
    assert stream.completion.finish_reason == "error"
    assert stream.completion.error == "InjectedFault: injected enqueue fault"
