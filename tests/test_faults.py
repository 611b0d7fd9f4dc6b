"""Faults under streaming load: clients vanishing at random, Redis restarting, the server draining.

Each case checks the same books afterwards: the engine is idle, nothing is running or waiting,
and the sidecar logged every request exactly once, as finished or cancelled.
"""

from __future__ import annotations

import asyncio
import random
import signal
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from llmserve.server.app_keys import SERVICE, STATE
from llmserve.server.engines.base import Engine
from llmserve.server.keys import KeyStore
from llmserve.server.state_reporter import StateReporter
from tests.conftest import (
    Process,
    RedisServer,
    ServerFactory,
    SidecarStack,
    free_port,
    start_synthetic_server,
    synthetic_engine,
)
from tests.test_ratelimit import SECRET, keys_file, redis_limiter
from tests.test_sidecar_process import logged_request_ids

CHAT = {"messages": [{"role": "user", "content": "Tell me a long story."}], "stream": True}


async def drop_at_random(url: str, model: str, rng: random.Random) -> str:
    """One client: hangs up while queued, mid-stream or never, streaming or not."""
    stream = rng.random() < 0.75
    body = {**CHAT, "model": model, "stream": stream, "max_tokens": 64}
    async with aiohttp.ClientSession() as session:
        request = asyncio.ensure_future(session.post(url, json=body))
        if not stream:
            await asyncio.sleep(rng.uniform(0.1, 0.8))
            request.cancel()
            try:
                (await request).close()
            except asyncio.CancelledError:
                return "hung up waiting"
            return "finished"
        response = await request
        lines_to_read = rng.choice([0, 1, 3, 10, 30, 1000])
        for _ in range(lines_to_read):
            if not await response.content.readline():
                return "finished"
        response.close()
        return "hung up mid-stream"


def assert_books_balance(engine: Engine, server: TestServer, sidecar: SidecarStack, total: int):
    rids = [event["rid"] for event in sidecar.finished]
    assert len(rids) == total, f"{len(rids)} of {total} requests logged"
    assert len(set(rids)) == total, "a request was logged twice"
    assert engine.active_sequences == 0
    gate = server.app[SERVICE].gate
    assert (gate.running, gate.waiting) == (0, 0)


async def running_gauge(sidecar: SidecarStack, model: str) -> float | None:
    """The sidecar's llm_requests_running, once the server's state report has arrived."""
    for _ in range(100):
        samples = await sidecar.samples()
        if (found := samples.get(("llm_requests_running", (("model", model),)))) is not None:
            return found
        await asyncio.sleep(0.02)
    return None


@pytest.mark.slow
@pytest.mark.parametrize("engine_kind, clients", [("synthetic", 500), ("llamacpp", 150)])
async def test_disconnect_storm_leaves_nothing_behind(
    serve: ServerFactory,
    sidecar_stack: SidecarStack,
    llama_engine: Engine,
    engine_kind: str,
    clients: int,
):
    if engine_kind == "synthetic":
        engine = synthetic_engine(
            parallel="16", first_token_seconds="0.02", token_interval_seconds="0.01"
        )
    else:
        engine = llama_engine
    server = await serve(
        engine,
        events=sidecar_stack.sender(),
        **{"engine.kind": engine_kind, "server.max_waiting": str(clients)},
    )
    app = server.app
    reporter = StateReporter(app[SERVICE].events, engine, app[SERVICE].gate, app[STATE])
    reporter.loaded(engine.info)
    rng = random.Random(8)
    url = str(server.make_url("/v1/chat/completions"))
    outcomes = Counter(
        await asyncio.gather(
            *(drop_at_random(url, engine.info.model_id, rng) for _ in range(clients))
        )
    )
    # Clients that hung up before their request reached the server exist only for themselves.
    await sidecar_stack.wait_finished(clients - outcomes["hung up waiting"], seconds=60)
    await asyncio.sleep(0.5)
    logged = len(sidecar_stack.finished)
    assert_books_balance(engine, server, sidecar_stack, logged)
    assert logged >= clients - outcomes["hung up waiting"]
    statuses = Counter(event["status"] for event in sidecar_stack.finished)
    assert statuses["cancelled"] > 0 and statuses["ok"] > 0, statuses
    assert set(statuses) <= {"ok", "cancelled"}, statuses
    reporter.report()
    assert await running_gauge(sidecar_stack, engine.info.model_id) == 0


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
async def test_redis_restart_under_streaming_load(
    serve: ServerFactory,
    sidecar_stack: SidecarStack,
    short_tmp: str,
    redis_server: RedisServer,
    policy: str,
):
    engine = synthetic_engine(
        parallel="32", first_token_seconds="0.01", token_interval_seconds="0.02"
    )
    server = await serve(
        engine,
        events=sidecar_stack.sender(),
        keys=KeyStore(keys_file(short_tmp, rpm=10_000, tpm=10_000_000, concurrency=64)),
        limiter=redis_limiter(redis_server),
        **{"engine.kind": "synthetic", "ratelimit.failure_policy": policy},
    )
    url = server.make_url("/v1/completions")
    headers = {"Authorization": f"Bearer {SECRET}"}
    sent = 0

    async def stream(session: aiohttp.ClientSession) -> tuple[int, bytes]:
        nonlocal sent
        sent += 1
        body = {"model": "synthetic", "prompt": "hi", "max_tokens": 40, "stream": True}
        async with session.post(url, json=body, headers=headers) as response:
            return response.status, await response.read()

    async with aiohttp.ClientSession() as session:
        in_flight = [asyncio.create_task(stream(session)) for _ in range(20)]
        await asyncio.sleep(0.3)
        redis_server.stop()
        during = await asyncio.gather(*(stream(session) for _ in range(5)))
        redis_server.start()
        admitted_before = await asyncio.gather(*in_flight)
        for _ in range(50):
            status, _ = await stream(session)
            if status == 200:
                break
            await asyncio.sleep(0.1)
        after = await asyncio.gather(*(stream(session) for _ in range(5)))

    # Streams admitted before the outage finish in full whatever the policy.
    for status, raw in admitted_before + after:
        assert status == 200 and raw.endswith(b"data: [DONE]\n\n")
        assert raw.count(b'"text":') == 40 + 1  # every token, then the finish chunk
    expected_during = 200 if policy == "fail_open" else 503
    assert {status for status, _ in during} == {expected_during}
    await sidecar_stack.wait_finished(sent, seconds=20)
    await asyncio.sleep(0.3)
    assert_books_balance(engine, server, sidecar_stack, sent)


async def test_sigterm_under_load_finishes_every_stream_and_logs_each_once(
    short_tmp: str, processes: list[Process]
):
    log_file = Path(short_tmp) / "requests.log"
    server, base = await start_synthetic_server(
        processes,
        *("--synthetic-token-interval-seconds", "0.02", "--synthetic-completion-tokens", "50"),
        *("--synthetic-parallel", "40", "--sidecar-port", str(free_port())),
        *("--sidecar-socket-path", f"{short_tmp}/ev.sock", "--sidecar-log-file", str(log_file)),
    )
    body = {**CHAT, "model": "synthetic"}
    async with aiohttp.ClientSession() as session:

        async def stream() -> tuple[str, int, bytes]:
            async with session.post(f"{base}/v1/chat/completions", json=body) as response:
                first = await response.content.readline()
                started.release()
                rest = await response.read()
                return response.headers["x-request-id"], response.status, first + rest

        started = asyncio.Semaphore(0)
        tasks = [asyncio.create_task(stream()) for _ in range(30)]
        for _ in tasks:
            await started.acquire()
        server.proc.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*tasks)
    assert await server.finish() == 0
    for _, status, raw in results:
        assert status == 200
        assert raw.endswith(b"data: [DONE]\n\n") and raw.count(b'"content":"') == 51
    assert sorted(logged_request_ids(log_file)) == sorted(rid for rid, _, _ in results)
