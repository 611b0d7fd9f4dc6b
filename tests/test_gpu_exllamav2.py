"""The ExLlamaV2 engine on a real GPU with a real model, streamed through the server.

Skipped (the one skip in the suite) unless CUDA works and LLMSERVE_TEST_EXL2_MODEL names a model
directory: CI machines have no GPU. On a GPU host: LLMSERVE_TEST_EXL2_MODEL=/models/...
.venv/bin/pytest tests/test_gpu_exllamav2.py (see docs/gpu.md).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import AsyncIterator

import pytest
from openai import AsyncOpenAI

from llmserve.server.engines import create_engine
from llmserve.server.engines.base import Engine
from tests.conftest import ServerFactory, make_config

MODEL_DIR = os.environ.get("LLMSERVE_TEST_EXL2_MODEL")


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


pytestmark = pytest.mark.skipif(
    not MODEL_DIR or not _cuda_available(),
    reason="needs a CUDA GPU and LLMSERVE_TEST_EXL2_MODEL (an EXL2 model directory)",
)


@pytest.fixture
async def gpu_engine() -> AsyncIterator[Engine]:
    config = make_config(
        **{"engine.kind": "exllamav2", "exllamav2.model_dir": str(MODEL_DIR)},
        **{"exllamav2.max_seq_len": "4096", "exllamav2.cache_tokens": "16384"},
    )
    engine = create_engine(config)
    await engine.load()
    yield engine
    await engine.close()


async def test_streams_a_chat_completion_from_the_gpu(serve: ServerFactory, gpu_engine: Engine):
    server = await serve(gpu_engine)
    client = AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="unused")
    stream = await client.chat.completions.create(
        model=gpu_engine.info.model_id,
        messages=[{"role": "user", "content": "Name three colours, one per line."}],
        max_tokens=48,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = [], None, None
    async for chunk in stream:
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        elif chunk.usage:
            usage = chunk.usage
    assert "".join(text).strip()
    assert finish in ("stop", "length")
    assert usage is not None and 0 < usage.completion_tokens <= 48
    details = gpu_engine.info.details
    assert int(details["size_bytes"]) > 0 and details["paged"] in (0, 1)
