"""The sidecar as operators run it: a child of `llmserve serve` that is restarted when it dies."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import aiohttp

from tests.conftest import Process, free_port, start, start_synthetic_server

STREAMS = 40
TOKENS = 50


async def stream(session: aiohttp.ClientSession, base: str) -> tuple[str, int, bytes]:
    body = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with session.post(f"{base}/v1/chat/completions", json=body) as response:
        raw = await response.read()
        return response.headers["x-request-id"], response.status, raw


async def sidecar_metric(port: int, name: str) -> float | None:
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                text = await response.text()
    except aiohttp.ClientError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def logged_request_ids(path: Path) -> list[str]:
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line["request_id"] for line in lines if line.get("msg") == "request finished"]


async def test_kill_9_of_the_sidecar_loses_no_request(short_tmp: str, processes: list[Process]):
    sidecar_port = free_port()
    log_file = Path(short_tmp) / "requests.log"
    server, base = await start_synthetic_server(
        processes,
        *(
            "--synthetic-token-interval-seconds",
            "0.02",
            "--synthetic-completion-tokens",
            str(TOKENS),
        ),
        *("--sidecar-port", str(sidecar_port), "--sidecar-socket-path", f"{short_tmp}/ev.sock"),
        *("--sidecar-log-file", str(log_file)),
    )
    first_pid = int((await server.wait_for_line(r"sidecar started \(pid (\d+)\)"))[1])
    for _ in range(100):
        if await sidecar_metric(sidecar_port, "llm_sidecar_events_received_total") is not None:
            break
        await asyncio.sleep(0.05)

    async with aiohttp.ClientSession() as session:

        async def wave() -> list[tuple[str, int, bytes]]:
            results = []
            for _ in range(4):
                results += await asyncio.gather(*(stream(session, base) for _ in range(10)))
            return results

        load = asyncio.create_task(wave())
        await asyncio.sleep(0.8)
        os.kill(first_pid, signal.SIGKILL)
        results = await load

    assert len(results) == STREAMS
    for _, status, raw in results:
        assert status == 200
        assert raw.count(b'"content":"') == TOKENS + 1  # the role chunk, then every token
        assert raw.endswith(b"data: [DONE]\n\n")

    restarted = await server.wait_for_line(r"sidecar started \(pid (\d+)\)", occurrence=2)
    second_pid = int(restarted[1])
    assert second_pid != first_pid
    await server.wait_for_line("sidecar exited")
    request_ids = sorted(rid for rid, _, _ in results)
    for _ in range(200):
        if len(logged_request_ids(log_file)) >= STREAMS:
            break
        await asyncio.sleep(0.05)
    assert sorted(logged_request_ids(log_file)) == request_ids
    assert await sidecar_metric(sidecar_port, "llm_sidecar_events_lost_total") == 0
    # The new sidecar never saw the model load, yet knows the model is loaded.
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{sidecar_port}/metrics") as response:
            metrics = await response.text()
    assert 'llm_model_loaded{engine="synthetic",model="synthetic"} 1.0' in metrics

    server.proc.send_signal(signal.SIGTERM)
    assert await server.finish() == 0


async def test_sidecar_runs_alone_beside_a_server_that_does_not_spawn_it(
    short_tmp: str, processes: list[Process]
):
    sidecar_port = free_port()
    socket_path = f"{short_tmp}/events.sock"
    sidecar = await start(
        "sidecar", "--sidecar-port", str(sidecar_port), "--sidecar-socket-path", socket_path
    )
    processes.append(sidecar)
    server, base = await start_synthetic_server(
        processes,
        *("--sidecar-spawn", "false", "--sidecar-socket-path", socket_path),
        *("--synthetic-completion-tokens", "5"),
    )
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(stream(session, base) for _ in range(3)))
    assert [status for _, status, _ in results] == [200, 200, 200]
    for _ in range(100):
        done = await sidecar_metric(
            sidecar_port,
            'llm_requests_total{endpoint="chat",model="synthetic",status="ok"}',
        )
        if done == 3:
            break
        await asyncio.sleep(0.05)
    assert done == 3
    server.proc.send_signal(signal.SIGTERM)
    sidecar.proc.send_signal(signal.SIGTERM)
    assert await server.finish() == 0
    assert await sidecar.finish() == 0
