"""The ExLlamaV2 engine against tests/exllamav2_double, the test double of exllamav2 0.3.2 (no
GPU here), and its startup refusal without CUDA, run for real (no torch is installed here)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from llmserve.server.engines.base import (
    Completion,
    Engine,
    GenerationRequest,
    SamplingParams,
    TokenDelta,
)
from llmserve.server.engines.exllamav2.files import read_model_files
from llmserve.server.engines.exllamav2.jobs import sampler_settings
from tests import exllamav2_double as double
from tests.conftest import ExLlamaV2Factory, ServerFactory, start
from tests.exllamav2_double.generator.dynamic import ExLlamaV2DynamicGenerator
from tests.exllamav2_double.generator.sampler import ExLlamaV2Sampler
from tests.exllamav2_double.model import SCRIPT
from tests.exllamav2_double.model_dir import ENDOFTEXT, IM_END, IM_START, write_model_dir

DRY_STATE = {"ngram_trie", "ngram_index", "ngram_history"}


async def run(engine: Engine, text: str, **params: Any) -> tuple[list[TokenDelta], Completion]:
    ids = engine.tokenize(text, add_special=True)
    request = GenerationRequest("r", ids, SamplingParams(**{"max_tokens": 200, **params}))
    async with engine.start(request) as stream:
        deltas = [d async for d in stream]
    assert stream.completion is not None
    return deltas, stream.completion


@pytest.fixture
def enqueued(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every job the engine hands to the double's generator."""
    jobs: list[Any] = []
    original = ExLlamaV2DynamicGenerator.enqueue

    def spy(self: ExLlamaV2DynamicGenerator, job: Any) -> Any:
        jobs.append(job)
        return original(self, job)

    monkeypatch.setattr(ExLlamaV2DynamicGenerator, "enqueue", spy)
    return jobs


async def test_streams_the_text_in_order_and_ends_on_an_eos_id(exllamav2_double: ExLlamaV2Factory):
    engine = await exllamav2_double()
    deltas, completion = await run(engine, "Hi")
    assert "".join(d.text for d in deltas) == SCRIPT
    times = [d.time_ns for d in deltas]
    assert times == sorted(times)
    # The EOS token ends the job (eos_reason "stop_token") and is neither sent nor counted.
    assert completion.finish_reason == "stop"
    assert completion.completion_tokens == len(SCRIPT) == sum(len(d.token_ids) for d in deltas)
    assert completion.prompt_tokens == 2
    assert completion.prefill_ns >= 0 and completion.decode_ns > 0


async def test_the_first_delta_carries_text_so_ttft_is_not_stamped_before_any_is_sent(
    exllamav2_double: ExLlamaV2Factory,
) -> None:
    # A special token decodes to no text (decode_special_tokens=False), and the library streams
    # its id alone; the server stamps TTFT at the first delta, so that delta must carry text.
    engine = await exllamav2_double(script="<|im_start|>Calm sea")
    deltas, completion = await run(engine, "Hi")
    assert [d.text for d in deltas] == list("Calm sea")
    assert deltas[0].token_ids == (IM_START, *engine.tokenize("C", add_special=False))
    assert completion.completion_tokens == 1 + len("Calm sea")
    assert sum(len(d.token_ids) for d in deltas) == completion.completion_tokens


async def test_jobs_interleave(exllamav2_double: ExLlamaV2Factory):
    engine = await exllamav2_double(cache_tokens=2048)
    arrivals: list[str] = []

    async def read(name: str) -> Completion:
        ids = engine.tokenize(name, add_special=True)
        params = SamplingParams(max_tokens=20, ignore_eos=True)
        async with engine.start(GenerationRequest(name, ids, params)) as stream:
            async for _ in stream:
                arrivals.append(name)
        assert stream.completion is not None
        return stream.completion

    completions = await asyncio.gather(*(read(n) for n in ("a", "b", "c")))
    assert [c.completion_tokens for c in completions] == [20, 20, 20]
    # Each stream's first token comes before any stream's last: one batch, not a queue.
    assert max(arrivals.index(n) for n in "abc") < min(
        len(arrivals) - 1 - arrivals[::-1].index(n) for n in "abc"
    )


async def test_cancel_mid_stream_and_after_finish(exllamav2_double: ExLlamaV2Factory):
    engine = await exllamav2_double()
    ids = engine.tokenize("x", add_special=True)
    long = engine.start(GenerationRequest("long", ids, SamplingParams(900, ignore_eos=True)))
    other = asyncio.create_task(run(engine, "y", max_tokens=30, ignore_eos=True))
    async for _ in long:
        long.cancel()
        long.cancel()
    assert long.completion is not None and long.completion.finish_reason == "cancelled"
    _, finished = await other
    assert (finished.finish_reason, finished.completion_tokens) == ("length", 30)
    assert engine.cancelled_total == 1
    long.cancel()
    assert engine.cancelled_total == 1 and engine.active_sequences == 0


async def test_a_job_too_large_for_the_cache_is_a_400_not_a_crash(
    exllamav2_double: ExLlamaV2Factory, serve: ServerFactory, enqueued: list[Any]
):
    engine = await exllamav2_double(cache_tokens=512)
    assert engine.info.context_length == 512
    server = await serve(engine)
    body = {"model": engine.info.model_id, "prompt": "Hi", "max_tokens": 600}
    async with aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/v1/completions"), json=body) as response:
            assert response.status == 400
            error = (await response.json())["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    assert enqueued == []
    # Past check_fits, the library's own page assertion in enqueue() fails only that request.
    ids = engine.tokenize("Hi", add_special=True)
    async with engine.start(GenerationRequest("big", ids, SamplingParams(600))) as stream:
        assert [d async for d in stream] == []
    assert stream.completion is not None and stream.completion.finish_reason == "error"
    assert "Job requires 3 pages (only 2 available)" in (stream.completion.error or "")
    _, completion = await run(engine, "Hi", max_tokens=5)
    assert completion.finish_reason == "length"


async def test_check_fits_matches_the_page_budget_of_enqueue(
    exllamav2_double: ExLlamaV2Factory, enqueued: list[Any]
):
    engine = await exllamav2_double(cache_tokens=512, max_seq_len=512)
    ids = engine.tokenize("Hello", add_special=True)
    assert engine.check_fits(len(ids), None, "prompt") == 512 - len(ids)
    _, completion = await run(engine, "Hello", max_tokens=512 - len(ids), ignore_eos=True)
    assert completion.completion_tokens == 512 - len(ids)
    _, refused = await run(engine, "Hello", max_tokens=513 - len(ids))
    assert refused.finish_reason == "error" and "cannot be enqueued" in (refused.error or "")
    assert [job.max_new_tokens for job in enqueued] == [512 - len(ids), 513 - len(ids)]


async def test_an_iterate_failure_fails_the_streams_and_the_generator_is_rebuilt(
    exllamav2_double: ExLlamaV2Factory, serve: ServerFactory, monkeypatch: pytest.MonkeyPatch
):
    engine = await exllamav2_double()
    server = await serve(engine)
    gate = threading.Event()
    monkeypatch.setattr(ExLlamaV2DynamicGenerator, "construction_gate", gate)
    monkeypatch.setattr(ExLlamaV2DynamicGenerator, "fail_after_iterations", 5)
    chat = {
        "model": engine.info.model_id,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 500,
        "ignore_eos": True,
        "stream": True,
    }
    async with aiohttp.ClientSession() as session:
        try:
            async with session.post(server.make_url("/v1/chat/completions"), json=chat) as r:
                body = await r.text()
            assert r.status == 200
            assert '"code": "engine_error"' in body and body.rstrip().endswith("data: [DONE]")
            assert await status(session, server, "/ready") == (503, {"status": "recovering"})
            async with session.post(server.make_url("/v1/chat/completions"), json=chat) as r:
                assert r.status == 503
                assert (await r.json())["error"]["code"] == "engine_recovering"
        finally:
            gate.set()
        await wait_for_ready(session, server)
        async with session.post(
            server.make_url("/v1/chat/completions"), json={**chat, "stream": False}
        ) as r:
            assert r.status == 200
            assert (await r.json())["usage"]["completion_tokens"] == 500


async def status(
    session: aiohttp.ClientSession, server: TestServer, path: str
) -> tuple[int, object]:
    async with session.get(server.make_url(path)) as response:
        return response.status, await response.json()


async def wait_for_ready(session: aiohttp.ClientSession, server: TestServer) -> None:
    for _ in range(1000):
        if (await status(session, server, "/ready"))[0] == 200:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the engine did not become ready again")


async def test_stop_conditions_are_python_ints_then_strs(
    exllamav2_double: ExLlamaV2Factory, enqueued: list[Any]
):
    engine = await exllamav2_double()
    deltas, completion = await run(engine, "Hi", stop=("double",))
    assert "".join(d.text for d in deltas) == SCRIPT[: SCRIPT.index("double")]
    assert completion.finish_reason == "stop"
    await run(engine, "Hi", max_tokens=3, ignore_eos=True, stop=("zz",))
    conditions = [job.stop_conditions for job in enqueued]
    # config.json's eos id, then generation_config.json's other one, then the stop strings.
    assert conditions == [[IM_END, ENDOFTEXT, "double"], ["zz"]]
    assert [type(c) for c in conditions[0]] == [int, int, str]


async def test_text_held_for_a_partial_stop_string_is_sent_when_a_stop_token_ends_it(
    exllamav2_double: ExLlamaV2Factory,
):
    # "sea" begins the stop string "seahorse", so the library holds it; then EOS ends the job.
    engine = await exllamav2_double(script="Calm sea")
    deltas, completion = await run(engine, "Hi", stop=("seahorse",))
    assert "".join(d.text for d in deltas) == "Calm sea"
    assert completion.finish_reason == "stop" and completion.completion_tokens == 8


async def test_sampler_settings_are_built_per_request_with_every_field(
    exllamav2_double: ExLlamaV2Factory, enqueued: list[Any]
):
    fields = {f.name for f in dataclasses.fields(ExLlamaV2Sampler.Settings)}
    assert set(sampler_settings(SamplingParams(max_tokens=1))) == fields - DRY_STATE
    engine = await exllamav2_double()
    await run(engine, "Hi", max_tokens=2, temperature=0, seed=7)
    await run(engine, "Hi", max_tokens=2, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05)
    greedy, sampled = (job.gen_settings for job in enqueued)
    assert greedy is not sampled
    assert (greedy.temperature, greedy.top_k, greedy.top_p) == (1.0, 1, 1.0)
    assert (sampled.temperature, sampled.top_k, sampled.top_p, sampled.min_p) == (
        0.7,
        40,
        0.9,
        0.05,
    )
    # The library defaults that are not neutral are all overridden.
    assert (sampled.token_repetition_penalty, sampled.typical, sampled.tfs) == (1.0, 0.0, 0.0)
    assert enqueued[0].seed == 7


async def test_cached_prefix_tokens_are_reported(exllamav2_double: ExLlamaV2Factory):
    engine = await exllamav2_double(cache_tokens=2048)
    prompt = "The same long prompt. " * 30
    _, first = await run(engine, prompt, max_tokens=4)
    _, second = await run(engine, prompt, max_tokens=4)
    assert (first.cached_tokens, second.cached_tokens) == (0, 512)
    assert second.prompt_tokens == len(prompt)


async def test_a_draft_model_still_gives_exactly_max_tokens(
    exllamav2_double: ExLlamaV2Factory, tmp_path: Path
):
    draft = write_model_dir(tmp_path / "draft")
    engine = await exllamav2_double(draft_model_dir=draft, draft_tokens=4)
    assert engine.info.context_length == 1024 - 4
    _, completion = await run(engine, "Hi", max_tokens=7, ignore_eos=True)
    assert (completion.finish_reason, completion.completion_tokens) == ("length", 7)


async def test_without_flash_attn_it_runs_unpaged_one_at_a_time_and_says_so(
    exllamav2_double: ExLlamaV2Factory,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setattr(double.attn, "has_flash_attn_with_paged", False)
    with caplog.at_level(logging.INFO, "llmserve.engine"):
        engine = await exllamav2_double(cache_tokens=2048)
    assert "ONE request at a time" in caplog.text
    assert "loading model: module 0 of 11" in caplog.text
    assert "loading model: module 11 of 11" in caplog.text
    assert (engine.parallel, engine.info.details["paged"]) == (1, 0)
    results = await asyncio.gather(*(run(engine, "Hi", max_tokens=5) for _ in range(3)))
    assert [c.completion_tokens for _, c in results] == [5, 5, 5]
    _, again = await run(engine, "Hi", max_tokens=5)
    # Unpaged, the one page still holds the previous prompt: all but its last token is reused.
    assert again.cached_tokens == 1


async def test_vram_and_cache_shape_are_reported(exllamav2_double: ExLlamaV2Factory):
    engine = await exllamav2_double(cache_type="q4", cache_tokens=1024)
    details = engine.info.details
    # 4 layers x 2 KV heads x 64 dims: Q4 is 1.125 bytes per element per token, plus one fp16
    # K and V of the whole length (exllamav2/cache.py).
    cache_bytes = 1024 * 4 * int(2 * 64 * 1.125) + 4 * 1024 * 2 * 64
    assert details["vram_bytes_cuda:0"] == double.model.WEIGHT_BYTES + cache_bytes
    assert details["size_bytes"] == details["vram_bytes_cuda:0"]
    assert (details["cache_type"], details["cache_tokens"]) == ("q4", 1024)


def test_model_files_give_every_eos_id_and_the_template(tmp_path: Path):
    model = write_model_dir(tmp_path / "m")
    files = read_model_files(str(model))
    assert files.eos_token_ids == (IM_END, ENDOFTEXT)
    assert files.chat_template is not None and "<|im_start|>" in files.chat_template
    assert (files.bos_token, files.eos_token, files.add_bos) == ("", "<|im_end|>", False)
    (model / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert read_model_files(str(model)).chat_template == "{{ messages[0]['content'] }}"


async def test_without_cuda_the_startup_error_names_what_is_missing(
    exllamav2_double: ExLlamaV2Factory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.setattr(double.torch_double.cuda, "available", False)
    with pytest.raises(Exception, match="needs a CUDA GPU") as refused:
        await exllamav2_double()
    assert "pip install '.[gpu]'" in str(refused.value)


async def test_serve_without_torch_exits_with_a_clear_message(tmp_path: Path):
    model = write_model_dir(tmp_path / "m")
    server = await start(
        "serve", "--port", "0", "--sidecar-spawn", "false", "--sidecar-events", "false",
        "--engine", "exllamav2", "--exllamav2-model-dir", str(model),
    )  # fmt: skip
    assert await server.finish() == 1
    log = "".join(server.log)
    assert "needs PyTorch with CUDA" in log and "pip install '.[gpu]'" in log
    assert "CUDA toolkit" in log and "Traceback" not in log
