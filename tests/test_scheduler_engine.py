"""The scheduler on the real model: a light key starts while a heavy key holds every slot, a
prompt longer than the step budget is read across steps to the same greedy text, and a
sequence paused by a full step can be cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from openai import AsyncOpenAI

from llmserve.server.app_keys import SERVICE
from llmserve.server.engines import create_engine
from llmserve.server.engines.base import Engine, GenerationRequest, SamplingParams
from llmserve.server.keys import KeyEntry, KeyStore, hash_secret, write_keys
from tests.conftest import ServerFactory, make_config
from tests.test_cancellation import wait_until

EngineFactory = Callable[..., Awaitable[Engine]]
QUESTION = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture
async def engine_with() -> AsyncIterator[EngineFactory]:
    """engine_with(**llamacpp_settings) -> the bundled model loaded with those settings."""
    engines: list[Engine] = []

    async def make(**settings: str) -> Engine:
        engine = create_engine(make_config(**{f"llamacpp.{k}": v for k, v in settings.items()}))
        engines.append(engine)
        await engine.load()
        return engine

    yield make
    for engine in engines:
        await engine.close()


def _keys(tmp_path: Path) -> KeyStore:
    path = tmp_path / "keys.toml"
    entries = {
        name: KeyEntry(name=name, sha256=hash_secret(f"sk-{name}-secret"))
        for name in ("heavy", "light")
    }
    write_keys(path, entries)
    return KeyStore(path)


def _client(server_url: str, name: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=server_url, api_key=f"sk-{name}-secret", max_retries=0)


@pytest.mark.parametrize("policy", ["fair", "fifo"])
async def test_a_light_keys_request_starts_while_a_heavy_key_holds_every_slot(
    serve: ServerFactory, engine_with: EngineFactory, tmp_path: Path, policy: str
):
    engine = await engine_with(parallel="2", spare_slots="1", context_per_sequence="512")
    server = await serve(engine, keys=_keys(tmp_path), **{"scheduler.policy": policy})
    gate = server.app[SERVICE].gate
    url = str(server.make_url("/v1"))
    model = engine.info.model_id
    heavy_done: list[int] = []

    async def heavy_stream(client: AsyncOpenAI) -> None:
        stream = await client.chat.completions.create(
            model=model,
            messages=QUESTION,
            max_tokens=300,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        async for _ in stream:
            pass
        heavy_done.append(1)

    async with _client(url, "heavy") as heavy, _client(url, "light") as light:
        # Four heavy streams: two hold both slots, two more wait behind them.
        streams = [asyncio.create_task(heavy_stream(heavy)) for _ in range(4)]
        assert await wait_until(lambda: (gate.running, gate.waiting) == (2, 2), 60)
        stream = await light.chat.completions.create(
            model=model, messages=QUESTION, max_tokens=5, stream=True
        )
        async for _ in stream:
            break
        heavy_finished_before_light = len(heavy_done)
        async for _ in stream:
            pass
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
    if policy == "fair":
        # It took the spare slot: its first token came while every heavy stream still ran.
        assert heavy_finished_before_light == 0
    else:
        # First come, first served: it waited until both queued heavy streams had a slot and
        # one of the first two had ended (the test can tell the two policies apart).
        assert heavy_finished_before_light >= 1


async def test_a_prompt_longer_than_the_step_is_read_across_steps_to_the_same_text(
    engine_with: EngineFactory,
):
    stepped = await engine_with(step_tokens="16", parallel="2")
    whole = await engine_with(step_tokens="512", parallel="2")
    words = "harbor maple quartz river stone lantern orbit meadow copper violin " * 30
    messages = [{"role": "user", "content": "Repeat the last word of: " + words}]
    prompt = stepped.tokenize(stepped.chat_template.render(messages), add_special=True)
    assert len(prompt) > 300
    # A few tokens: rounding differs with the shape of the batches that computed the cache,
    # enough to flip a close greedy choice many tokens on, but a chunk read at the wrong
    # positions, twice, or not at all changes the first ones.
    # A stream running beside it: only then is the step budget kept (alone, a prompt stalls
    # nobody and is read whole).
    companion = stepped.start(
        GenerationRequest("beside", prompt[:8], SamplingParams(max_tokens=200, ignore_eos=True))
    )
    async with companion:
        async for _ in companion:
            break
        stepped_text, stepped_steps = await _generate_counting_steps(stepped, prompt)
    whole_text, whole_steps = await _generate_counting_steps(whole, prompt)
    assert stepped_text == whole_text and stepped_text
    # 16 tokens a step, one of them the companion's: at least len/15 steps; read whole, one.
    assert stepped_steps >= len(prompt) // 15
    assert whole_steps <= 6
    sizes = stepped.steps.tokens.snapshot()
    # Every step but the companion's first (its prompt, read alone) held at most 16 tokens.
    assert sizes.counts[-1] - sizes.counts[sizes.bounds.index(16)] <= 1


async def _generate_counting_steps(engine: Engine, prompt: list[int]) -> tuple[str, int]:
    # A few tokens: rounding differs with the shape of the batches that computed the cache,
    # enough to flip a close greedy choice many tokens on, but a chunk read at the wrong
    # positions, twice, or not at all changes the first ones.
    params = SamplingParams(max_tokens=6, temperature=0.0)
    before = engine.steps.tokens.snapshot().counts[-1]
    async with engine.start(GenerationRequest("long", prompt, params)) as stream:
        text = "".join([d.text async for d in stream])
    assert stream.completion is not None
    assert stream.completion.finish_reason in ("stop", "length")
    return text, engine.steps.tokens.snapshot().counts[-1] - before


async def test_a_sequence_paused_by_a_full_step_can_be_cancelled(engine_with: EngineFactory):
    # Two tokens per step for three streams: one of them is paused at every step.
    engine = await engine_with(step_tokens="2", parallel="3", spare_slots="0")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompt = engine.tokenize("Once upon a time", add_special=True)
    streams = [engine.start(GenerationRequest(f"s{i}", prompt, params)) for i in range(3)]
    cancelled_before = engine.cancelled_total

    async def read(i: int) -> int:
        received = 0
        async with streams[i] as stream:
            async for delta in stream:
                received += len(delta.token_ids)
                if i == 1 and received >= 2:
                    break  # leaving the block cancels it, whichever step it waits for
        return received

    counts = await asyncio.wait_for(asyncio.gather(*(read(i) for i in range(3))), 120)
    assert (counts[0], counts[2]) == (12, 12)
    assert await wait_until(lambda: engine.active_sequences == 0, 30)
    assert engine.cancelled_total == cancelled_before + 1
    # No step carried more than two tokens but the first (the prompts, read while nothing
    # streamed): the streams really did take turns.
    sizes = engine.steps.tokens.snapshot()
    assert sizes.counts[-1] - sizes.counts[sizes.bounds.index(2)] <= 1
