"""The engine contract, held by every engine: llama.cpp with the real bundled model, synthetic,
and ExLlamaV2 over its library's test double (there is no GPU here)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from llmserve.server.engines.base import (
    Completion,
    Engine,
    EngineError,
    GenerationRequest,
    RequestTooLarge,
    SamplingParams,
    TokenDelta,
)
from tests.conftest import ExLlamaV2Factory, synthetic_engine

PROMPT = "Write one sentence about the sea."


@pytest.fixture(params=["llamacpp", "synthetic", "exllamav2"])
def engine_kind(request: pytest.FixtureRequest) -> str:
    # Fixtures that start their own event loop are set up here, outside the test's loop.
    needs = {"llamacpp": "llama_engine", "exllamav2": "exllamav2_double"}.get(request.param)
    if needs:
        request.getfixturevalue(needs)
    return str(request.param)


@pytest.fixture
async def engine(engine_kind: str, request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    if engine_kind == "llamacpp":
        yield request.getfixturevalue("llama_engine")
    elif engine_kind == "synthetic":
        synthetic = synthetic_engine(first_token_seconds="0", token_interval_seconds="0.001")
        await synthetic.load()
        yield synthetic
        await synthetic.close()
    else:
        make: ExLlamaV2Factory = request.getfixturevalue("exllamav2_double")
        yield await make(cache_tokens=4096)


def prompt(engine: Engine) -> list[int]:
    return engine.tokenize(
        engine.chat_template.render([{"role": "user", "content": PROMPT}]), add_special=True
    )


async def run(
    engine: Engine, params: SamplingParams, request_id: str = "r"
) -> tuple[list[TokenDelta], Completion]:
    async with engine.start(GenerationRequest(request_id, prompt(engine), params)) as stream:
        deltas = [delta async for delta in stream]
    assert stream.completion is not None
    return deltas, stream.completion


async def test_deltas_then_a_completion_with_consistent_counts(engine: Engine):
    tokens = prompt(engine)
    deltas, completion = await run(engine, SamplingParams(max_tokens=8, temperature=0))
    assert deltas and completion.finish_reason in ("stop", "length")
    assert completion.prompt_tokens == len(tokens)
    assert completion.completion_tokens == sum(len(d.token_ids) for d in deltas)
    assert [d.time_ns for d in deltas] == sorted(d.time_ns for d in deltas)
    assert min(completion.queue_ns, completion.prefill_ns, completion.decode_ns) >= 0


async def test_max_tokens_is_honoured(engine: Engine):
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    _, completion = await run(engine, params)
    assert (completion.finish_reason, completion.completion_tokens) == ("length", 3)


async def test_cancel_mid_stream_frees_the_sequence_and_is_idempotent(engine: Engine):
    cancelled = engine.cancelled_total
    tokens = prompt(engine)
    room = engine.check_fits(len(tokens), None, "prompt")
    params = SamplingParams(max_tokens=room, temperature=0, ignore_eos=True)
    stream = engine.start(GenerationRequest("c", tokens, params))
    async for _ in stream:
        stream.cancel()
    assert stream.completion is not None
    assert stream.completion.finish_reason == "cancelled"
    assert stream.completion.completion_tokens < room
    assert engine.active_sequences == 0
    assert engine.cancelled_total == cancelled + 1
    stream.cancel()
    _, finished = await run(engine, SamplingParams(max_tokens=2, temperature=0))
    assert finished.finish_reason in ("stop", "length")
    assert engine.cancelled_total == cancelled + 1
    assert engine.active_sequences == 0


async def test_stop_strings_are_not_emitted(engine: Engine):
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    deltas, _ = await run(engine, greedy)
    text = "".join(d.text for d in deltas)
    stop = next(text[i : i + 3] for i in range(2, len(text) - 3) if text[i : i + 3].strip())
    deltas, completion = await run(engine, SamplingParams(**{**_fields(greedy), "stop": (stop,)}))
    stopped = "".join(d.text for d in deltas)
    assert completion.finish_reason == "stop"
    assert stopped == text[: text.index(stop)]


async def test_concurrent_requests_all_complete(engine: Engine):
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    results = await asyncio.gather(*(run(engine, params, f"r{i}") for i in range(4)))
    assert [c.finish_reason for _, c in results] == ["length"] * 4
    assert all(c.completion_tokens == 6 for _, c in results)
    assert engine.active_sequences == 0


async def test_out_of_vocabulary_token_ids_are_rejected(engine: Engine):
    engine.validate_token_ids(prompt(engine))
    for bad in (-1, 10**9):
        with pytest.raises(EngineError, match="outside the vocabulary"):
            engine.validate_token_ids([1, bad])


async def test_check_fits_names_what_does_not_fit(engine: Engine):
    context = engine.info.context_length
    assert engine.check_fits(10, None, "prompt") == context - 10
    with pytest.raises(RequestTooLarge) as prompt_error:
        engine.check_fits(context, None, "prompt")
    assert prompt_error.value.param == "prompt"
    with pytest.raises(RequestTooLarge) as budget_error:
        engine.check_fits(10, context, "prompt")
    assert budget_error.value.param == "max_tokens"


def _fields(params: SamplingParams) -> dict[str, object]:
    return {name: getattr(params, name) for name in SamplingParams.__slots__}
