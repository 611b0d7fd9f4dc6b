"""The official openai client, unmodified, against a real server on a free loopback port."""

from __future__ import annotations

import openai
import pytest
from aiohttp.test_utils import TestServer

from llmserve.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionResponse,
)

MESSAGES = [{"role": "user", "content": "Name three colours."}]


def client_for(server: TestServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="unused", max_retries=0)


async def test_streams_a_chat_completion_with_usage(llama_server: TestServer, model_id: str):
    async with client_for(llama_server) as client:
        stream = await client.chat.completions.create(
            model=model_id,
            messages=MESSAGES,
            stream=True,
            max_tokens=24,
            temperature=0,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text.strip()
    assert content[-1].choices[0].finish_reason in ("stop", "length")
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert 0 < usage_chunk.usage.completion_tokens <= 24
    assert usage_chunk.usage.prompt_tokens > 5
    assert usage_chunk.usage.total_tokens == (
        usage_chunk.usage.prompt_tokens + usage_chunk.usage.completion_tokens
    )
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk.model_dump(exclude_unset=True))


async def test_no_usage_chunk_unless_asked(llama_server: TestServer, model_id: str):
    async with client_for(llama_server) as client:
        stream = await client.chat.completions.create(
            model=model_id, messages=MESSAGES, stream=True, max_tokens=8
        )
        chunks = [chunk async for chunk in stream]
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


async def test_chat_completion_without_streaming(llama_server: TestServer, model_id: str):
    async with client_for(llama_server) as client:
        response = await client.chat.completions.create(
            model=model_id,
            messages=MESSAGES,
            max_completion_tokens=6,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
    ChatCompletionResponse.model_validate(response.model_dump(exclude_unset=True))
    assert response.choices[0].finish_reason == "length"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content
    assert response.usage is not None and response.usage.completion_tokens == 6


async def test_streams_a_completion(llama_server: TestServer, model_id: str):
    async with client_for(llama_server) as client:
        stream = await client.completions.create(
            model=model_id,
            prompt="The capital of France is",
            stream=True,
            max_tokens=12,
            temperature=0,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = [chunk async for chunk in stream]
    for chunk in chunks:
        CompletionChunk.model_validate(chunk.model_dump(exclude_unset=True))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert chunks[-2].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks if c.choices).strip()


async def test_completion_without_streaming(llama_server: TestServer, model_id: str):
    async with client_for(llama_server) as client:
        response = await client.completions.create(
            model=model_id, prompt="1, 2, 3, 4,", max_tokens=5, temperature=0
        )
    CompletionResponse.model_validate(response.model_dump(exclude_unset=True))
    assert response.object == "text_completion"
    assert response.usage is not None and 0 < response.usage.completion_tokens <= 5


async def test_greedy_is_deterministic_and_seed_repeats(llama_server: TestServer, model_id: str):
    async def once(**params: object) -> str:
        async with client_for(llama_server) as client:
            response = await client.chat.completions.create(
                model=model_id, messages=MESSAGES, max_tokens=16, **params
            )
        return response.choices[0].message.content or ""

    assert await once(temperature=0) == await once(temperature=0)
    assert await once(temperature=1.0, seed=42) == await once(temperature=1.0, seed=42)


async def test_stop_text_is_not_emitted(llama_server: TestServer, model_id: str):
    async with client_for(llama_server) as client:
        free = await client.completions.create(
            model=model_id, prompt="1, 2, 3, 4, 5,", max_tokens=20, temperature=0
        )
        text = free.choices[0].text
        assert "8" in text, text
        stopped = await client.completions.create(
            model=model_id, prompt="1, 2, 3, 4, 5,", max_tokens=20, temperature=0, stop=["8"]
        )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index("8")]


async def test_unknown_model_is_a_not_found_error(llama_server: TestServer):
    async with client_for(llama_server) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.code == "model_not_found"


async def test_lists_the_served_model(llama_server: TestServer, model_id: str):
    async with client_for(llama_server) as client:
        models = await client.models.list()
        one = await client.models.retrieve(model_id)
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("gpt-4o")
    assert [m.id for m in models.data] == [model_id]
    assert one.id == model_id and one.owned_by == "llmserve"
