"""Hostile input that reaches the event path through a real `llmserve serve` and its sidecar: no
request, however large its fields, may stop later requests from reaching /metrics and the log."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from tests.conftest import Process, free_port, start_synthetic_server
from tests.test_sidecar_process import logged_request_ids, sidecar_metric

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def test_a_huge_model_name_does_not_stop_later_events(
    short_tmp: str, processes: list[Process]
) -> None:
    sidecar_port = free_port()
    log_file = Path(short_tmp) / "requests.log"
    _, base = await start_synthetic_server(
        processes,
        *("--sidecar-port", str(sidecar_port), "--sidecar-socket-path", f"{short_tmp}/ev.sock"),
        *("--sidecar-log-file", str(log_file)),
    )
    for _ in range(200):
        if await sidecar_metric(sidecar_port, "llm_servers_reporting") == 1:
            break
        await asyncio.sleep(0.05)

    async with aiohttp.ClientSession() as session:
        hostile = {**CHAT, "model": "A" * 300_000}
        async with session.post(f"{base}/v1/chat/completions", json=hostile) as response:
            assert response.status == 404
            error = (await response.json())["error"]
        assert error["code"] == "model_not_found"

        ordinary = {**CHAT, "model": "synthetic"}
        headers = {"x-request-id": "after-the-hostile-one"}
        async with session.post(
            f"{base}/v1/chat/completions", json=ordinary, headers=headers
        ) as response:
            assert response.status == 200
            await response.read()

    for _ in range(400):
        if "after-the-hostile-one" in logged_request_ids(log_file):
            break
        await asyncio.sleep(0.05)
    assert "after-the-hostile-one" in logged_request_ids(log_file)
    assert await sidecar_metric(sidecar_port, "llm_servers_reporting") == 1
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{sidecar_port}/metrics") as response:
            metrics = await response.text()
    assert 'llm_requests_total{endpoint="chat",model="synthetic",status="ok"} 1.0' in metrics
    assert 'llm_requests_total{endpoint="chat",model="synthetic",status="invalid_request"} 1.0' in (
        metrics
    )
    # The message quotes the name, but only so much of it.
    assert len(error["message"]) < 1000 and "AAAA" in error["message"]
