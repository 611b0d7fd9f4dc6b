"""The llamacpp engine keeps each finished sequence's KV cache in its slot and reuses the longest
matching prefix: the result is the same as reading the whole prompt, and the reuse is reported."""

from __future__ import annotations

import random

from openai import AsyncOpenAI

from llmserve.server.engines.base import Engine, GenerationRequest, SamplingParams
from tests.conftest import ServerFactory

WORDS = "river stone lantern orbit meadow copper violin harbor maple quartz"


async def generate(engine: Engine, prompt: list[int]) -> tuple[str, int]:
    # A few tokens of a continuation the context settles: rounding differs with the shape of
    # the batch that computed the cache, enough to flip a close greedy choice many tokens on,
    # but a cache at the wrong positions or of the wrong tokens changes the first ones.
    params = SamplingParams(max_tokens=6, temperature=0.0)
    async with engine.start(GenerationRequest("prefix-test", prompt, params)) as stream:
        text = "".join([delta.text async for delta in stream])
    assert stream.completion is not None
    return text, stream.completion.cached_tokens


def chat(engine: Engine, system: str, question: str) -> list[int]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return engine.tokenize(engine.chat_template.render(messages), add_special=True)


async def test_a_shared_prefix_is_reused_and_changes_nothing(llama_engine: Engine):
    rng = random.Random(3)
    words = WORDS.split()
    system = "You answer briefly. Context: " + " ".join(rng.choice(words) for _ in range(120))
    first = chat(llama_engine, system, "What is the first word of the context?")
    second = chat(llama_engine, system, "Continue counting: one, two, three, four,")
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert shared > 100

    reference, cached = await generate(llama_engine, second)
    assert cached < shared  # nothing of this system prompt was cached yet
    await generate(llama_engine, first)
    again, cached = await generate(llama_engine, second)
    assert cached >= shared
    assert again == reference

    # The very same prompt again: everything but the last token comes from the cache.
    once_more, cached = await generate(llama_engine, second)
    assert (once_more, cached) == (reference, len(second) - 1)


async def test_clients_see_cached_tokens_in_usage(serve: ServerFactory, llama_engine: Engine):
    server = await serve(llama_engine)
    client = AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="unused")
    messages = [
        {"role": "system", "content": "You are terse. " + "Remember the number 7. " * 20},
        {"role": "user", "content": "Which number?"},
    ]
    usages = []
    for _ in range(2):
        response = await client.chat.completions.create(
            model=llama_engine.info.model_id, messages=messages, max_tokens=4, temperature=0
        )
        usages.append(response.usage)
    await client.close()
    assert usages[1].prompt_tokens_details.cached_tokens == usages[1].prompt_tokens - 1
    assert usages[0].prompt_tokens_details.cached_tokens < usages[1].prompt_tokens - 1
