"""Chat templates render like Hugging Face's, in a sandbox, and their refusals are 400s."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from llmserve.server.chat_template import ChatTemplate, ChatTemplateError
from llmserve.server.engines.base import Engine


def test_bundled_model_template_from_gguf_metadata(llama_engine: Engine):
    text = llama_engine.chat_template.render(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_bundled_template_adds_its_default_system_prompt(llama_engine: Engine):
    text = llama_engine.chat_template.render([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_hugging_face_globals_are_available():
    template = ChatTemplate(
        "{{ bos_token }}{% for m in messages %}{{ m | tojson }}{% endfor %}"
        "{{ strftime_now('%Y') | length }}",
        bos_token="<s>",
    )
    assert template.render([{"role": "user", "content": "é"}]) == (
        '<s>{"role": "user", "content": "é"}4'
    )


def test_raise_exception_becomes_a_template_error():
    template = ChatTemplate("{{ raise_exception('Conversation roles must alternate') }}")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        template.render([{"role": "user", "content": "x"}])


def test_the_sandbox_blocks_python_internals():
    template = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError):
        template.render([])


def test_the_sandbox_forbids_mutating_inputs():
    template = ChatTemplate("{{ messages.append(1) }}")
    with pytest.raises(ChatTemplateError):
        template.render([])


async def test_developer_role_renders_as_system(llama_server: TestServer, model_id: str):
    async with aiohttp.ClientSession() as session:
        async with session.post(
            llama_server.make_url("/v1/chat/completions"),
            json={
                "model": model_id,
                "messages": [
                    {"role": "developer", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                ],
                "max_tokens": 2,
            },
        ) as response:
            body = await response.json()
    assert response.status == 200, body
    # The default system prompt is not added when a system (developer) message is present.
    assert body["usage"]["prompt_tokens"] < 20
