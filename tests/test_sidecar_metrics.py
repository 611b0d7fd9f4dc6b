"""Known timings in, known metrics out: the synthetic engine streams at a fixed pace and the
sidecar's histograms, counters and per-key series must say exactly that."""

from __future__ import annotations

import asyncio
import json
import random
import time

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from llmserve.server.app_keys import SERVICE, STATE
from llmserve.server.state_reporter import StateReporter
from tests.conftest import ServerFactory, SidecarStack, synthetic_engine
from tests.test_metrics_exposition import promtool_check

MODEL = "synthetic"
TOKENS = 10
FIRST_TOKEN = 0.1
INTERVAL = 0.02


async def stream_once(server: TestServer, **extra: object) -> tuple[float, float, int]:
    """Stream one chat completion; the client's own TTFT, tokens/s and token count."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        **extra,
    }
    stamps: list[float] = []
    start = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/v1/chat/completions"), json=body) as r:
            assert r.status == 200
            async for line in r.content:
                if b'"delta":{"content":"' in line and b'"content":""' not in line:
                    stamps.append(time.perf_counter())
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return stamps[0] - start, rate, len(stamps)


async def paced_server(serve: ServerFactory, stack: SidecarStack) -> TestServer:
    engine = synthetic_engine(
        first_token_seconds=str(FIRST_TOKEN),
        token_interval_seconds=str(INTERVAL),
        completion_tokens=str(TOKENS),
    )
    return await serve(engine, events=stack.sender(), **{"engine.kind": "synthetic"})


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_known_timings_become_known_metrics(serve: ServerFactory, sidecar_stack):
    server = await paced_server(serve, sidecar_stack)
    requests = 5
    await asyncio.gather(*(stream_once(server) for _ in range(requests)))
    await sidecar_stack.wait_finished(requests)
    s = await sidecar_stack.samples()
    m = {"model": MODEL}

    assert value(s, "llm_time_to_first_token_seconds_count", **m) == requests
    # TTFT is 100 ms plus serving overhead: above the 0.1 edge, below 0.25.
    assert value(s, "llm_time_to_first_token_seconds_bucket", le="0.1", **m) == 0
    assert value(s, "llm_time_to_first_token_seconds_bucket", le="0.25", **m) == requests

    gaps = requests * (TOKENS - 1)
    assert value(s, "llm_inter_token_latency_seconds_count", **m) == gaps
    assert value(s, "llm_inter_token_latency_seconds_bucket", le="0.01", **m) == 0
    assert value(s, "llm_inter_token_latency_seconds_bucket", le="0.075", **m) == gaps
    mean_gap = value(s, "llm_inter_token_latency_seconds_sum", **m) / gaps
    # The engine keeps an absolute schedule, so a late token makes the next gap shorter.
    assert INTERVAL * 0.95 <= mean_gap < INTERVAL * 1.5

    ok = {"model": MODEL, "endpoint": "chat", "status": "ok"}
    assert value(s, "llm_requests_total", **ok) == requests
    assert value(s, "llm_generation_tokens_total", **m) == requests * TOKENS
    assert value(s, "llm_request_completion_tokens_count", **m) == requests
    assert value(s, "llm_request_completion_tokens_sum", **m) == requests * TOKENS
    # 50 tokens/s per stream: above the 30 tokens/s edge, and below 75 even with some jitter.
    assert value(s, "llm_request_generation_tokens_per_second_bucket", le="30.0", **m) == 0
    assert value(s, "llm_request_generation_tokens_per_second_bucket", le="75.0", **m) == requests
    assert value(s, "llm_key_requests_total", key="anonymous", status="ok") == requests
    assert value(s, "llm_key_generation_tokens_total", key="anonymous") == requests * TOKENS
    assert value(s, "llm_sidecar_events_lost_total") == 0
    assert value(s, "llm_sidecar_events_malformed_total") == 0


async def test_client_and_sidecar_agree(serve: ServerFactory, sidecar_stack):
    server = await paced_server(serve, sidecar_stack)
    measured = [await stream_once(server) for _ in range(3)]
    await sidecar_stack.wait_finished(3)
    for (ttft, rate, tokens), event in zip(measured, sidecar_stack.finished, strict=True):
        # The server stamps before the network and the client after it: within 30 ms on loopback.
        assert abs(ttft - event["ttft_ns"] / 1e9) < 0.03
        server_rate = (event["completion_tokens"] - 1) / (event["gen_ns"] / 1e9)
        assert abs(rate - server_rate) / server_rate < 0.1
        assert tokens == event["completion_tokens"] == TOKENS


async def test_errors_and_cancellations_are_counted(serve: ServerFactory, sidecar_stack):
    server = await paced_server(serve, sidecar_stack)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            server.make_url("/v1/chat/completions"), json={"model": "other", "messages": []}
        ) as r:
            assert r.status == 400
        response = await session.post(
            server.make_url("/v1/chat/completions"),
            json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True},
        )
        await response.content.readuntil(b'"content":"lorem')
        response.close()
    await sidecar_stack.wait_finished(2)
    s = await sidecar_stack.samples()
    invalid = {"model": MODEL, "endpoint": "chat", "status": "invalid_request"}
    assert value(s, "llm_requests_total", **invalid) == 1
    assert value(s, "llm_errors_total", type="invalid_value") == 1
    assert value(s, "llm_requests_cancelled_total", reason="client_disconnect") == 1
    cancelled = next(e for e in sidecar_stack.finished if e["status"] == "cancelled")
    assert cancelled["completion_tokens"] >= 1


async def test_state_and_load_gauges(serve: ServerFactory, sidecar_stack):
    server = await paced_server(serve, sidecar_stack)
    app = server.app
    reporter = StateReporter(
        app[SERVICE].events, app[SERVICE].engine, app[SERVICE].gate, app[STATE]
    )
    reporter.loaded(app[SERVICE].engine.info)
    task = asyncio.create_task(stream_once(server))
    await asyncio.sleep(FIRST_TOKEN + 3 * INTERVAL)
    reporter.report()
    # Events leave in batches up to 50 ms apart.
    for _ in range(50):
        s = await sidecar_stack.samples()
        if value(s, "llm_requests_running", model=MODEL) == 1:
            break
        await asyncio.sleep(0.02)
    assert value(s, "llm_requests_running", model=MODEL) == 1
    assert value(s, "llm_model_loaded", model=MODEL, engine="synthetic") == 1
    assert value(s, "llm_servers_reporting") == 1
    await task


async def test_metrics_parse_and_pass_promtool(serve: ServerFactory, sidecar_stack):
    server = await paced_server(serve, sidecar_stack)
    await stream_once(server)
    await sidecar_stack.wait_finished(1)
    await promtool_check(await sidecar_stack.metrics_text())


@pytest.mark.parametrize("stream", [True, False])
async def test_stats_reports_the_last_minutes(serve: ServerFactory, sidecar_stack, stream: bool):
    server = await paced_server(serve, sidecar_stack)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(server.make_url("/v1/chat/completions"), json=body) as r:
                await r.read()
        await sidecar_stack.wait_finished(2)
        async with session.get(sidecar_stack.http.make_url("/stats")) as r:
            stats = await r.json()
    minute = stats["models"][MODEL]["1m"]
    assert minute["requests"] == 2
    assert minute["completion_tokens"] == 2 * TOKENS
    assert FIRST_TOKEN <= minute["ttft_p50_seconds"] <= 0.25
    assert stats["keys"]["anonymous"]["5m"]["requests"] == 2
    assert stats["sidecar"]["events_lost"] == 0


async def test_disconnect_storm_logs_every_request_once(serve: ServerFactory, sidecar_stack):
    engine = synthetic_engine(
        parallel="10", first_token_seconds="0.02", token_interval_seconds="0.01"
    )
    server = await serve(engine, events=sidecar_stack.sender(), **{"engine.kind": "synthetic"})
    gate = server.app[SERVICE].gate
    rng = random.Random(7)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}

    async def drop_after(seconds: float, stream: bool) -> None:
        # The whole request is written before the client waits and hangs up, so every one of
        # them reaches the server (a client cancelled while still connecting would exist only
        # for itself, and a loaded machine makes that common).
        payload = json.dumps({**body, "stream": stream}).encode()
        _, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(payload), payload)
        )
        await writer.drain()
        await asyncio.sleep(seconds)
        writer.close()

    # 60 clients for 10 slots: some leave while queued, some mid-stream, some finish.
    await asyncio.gather(*(drop_after(rng.uniform(0.1, 0.6), stream=i % 4 != 0) for i in range(60)))
    await sidecar_stack.wait_finished(60)
    await asyncio.sleep(0.2)
    rids = [e["rid"] for e in sidecar_stack.finished]
    assert len(rids) == len(set(rids)) == 60
    assert engine.active_sequences == 0
    assert gate.running == 0 and gate.waiting == 0
    statuses = {e["status"] for e in sidecar_stack.finished}
    assert "cancelled" in statuses


async def test_requests_sharing_an_id_keep_their_own_model_and_key(
    serve: ServerFactory, sidecar_stack: SidecarStack
) -> None:
    # Clients choose x-request-id: two concurrent requests with the same one are still two
    # requests, and every sample of each belongs to the served model, none to "unknown".
    server = await paced_server(serve, sidecar_stack)
    headers = {"x-request-id": "same-id"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}

    async def shared_id() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                server.make_url("/v1/chat/completions"), json=body, headers=headers
            ) as r:
                assert r.status == 200 and r.headers["x-request-id"] == "same-id"
                await r.read()

    await asyncio.gather(shared_id(), shared_id())
    await sidecar_stack.wait_finished(2)
    s = await sidecar_stack.samples()
    assert value(s, "llm_inter_token_latency_seconds_count", model=MODEL) == 2 * (TOKENS - 1)
    assert value(s, "llm_time_to_first_token_seconds_count", model=MODEL) == 2
    assert not [name for name, labels in s if ("model", "unknown") in labels]
