"""`llmserve bench` against real servers: the numbers it reports add up, and it notices errors
and streams that end early."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import Process, start_synthetic_server

TOKENS = 20


async def bench(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmserve.server.cli",
        "bench",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_a_sweep_reports_every_level_and_writes_json_and_a_chart(
    tmp_path: Path, processes: list[Process]
):
    _, base = await start_synthetic_server(
        processes,
        *("--synthetic-completion-tokens", "1000", "--synthetic-token-interval-seconds", "0.005"),
        "--sidecar-spawn",
        "false",
    )
    results, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    code, out, err = await bench(
        *("--url", f"{base}/v1", "--concurrency", "1,4", "--requests", "8"),
        *("--max-tokens", str(TOKENS), "--json", str(results), "--chart", str(chart)),
        *("--temperature", "0.7"),
    )
    assert code == 0, err
    assert "concurrency 4" in err and "8/8" in err
    run = json.loads(results.read_text())
    assert run["model"] == "synthetic" and run["url"] == base
    assert run["temperature"] == 0.7
    for level, expected in zip(run["levels"], (1, 4), strict=True):
        assert level["concurrency"] == expected
        assert (level["ok"], level["errors"], level["truncated"]) == (8, 0, 0)
        assert level["completion_tokens"] == 8 * TOKENS
        assert 0 < level["ttft_ms_p50"] <= level["ttft_ms_p95"] <= level["ttft_ms_p99"]
        assert 0 < level["inter_token_ms_p50"] <= level["inter_token_ms_p99"]
        assert level["aggregate_tokens_per_second"] > 0
    assert "tok/s" in out.splitlines()[0]
    assert chart.read_bytes().startswith(b"\x89PNG")


async def cut_short(request: web.Request) -> web.StreamResponse:
    """Two tokens, then the connection ends without a finish reason or [DONE]."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for word in ("one", "two"):
        chunk: dict[str, Any] = {"choices": [{"index": 0, "delta": {"content": word}}]}
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
    return response


async def refuse(request: web.Request) -> web.Response:
    return web.json_response({"error": {"message": "no"}}, status=401)


async def test_errors_and_truncated_streams_are_counted(tmp_path: Path):
    app = web.Application()
    app.router.add_post("/v1/chat/completions", cut_short)
    app.router.add_post("/v1/completions", refuse)
    async with TestServer(app) as server:
        base = str(server.make_url("")).rstrip("/")
        results = tmp_path / "bench.json"
        common = ("--url", base, "--model", "m", "--concurrency", "2", "--requests", "4")
        code, _, err = await bench(*common, "--warmup", "0", "--json", str(results))
        level = json.loads(results.read_text())["levels"][0]
        assert code == 0, err
        assert (level["ok"], level["truncated"], level["completion_tokens"]) == (4, 4, 8)

        code, _, _ = await bench(*common, "--endpoint", "completions", "--json", str(results))
        level = json.loads(results.read_text())["levels"][0]
        assert code == 1
        assert (level["ok"], level["errors"]) == (0, 4)
        assert level["error_samples"] == ['{"error": {"message": "no"}}']
