"""`llmserve serve` stopping: its built-in sidecar outlives the drain, and a stop during a long
model load does not wait for the load.

Each server runs in a session of its own, so a signal to its process group reaches the server
and its sidecar child together, as systemd's default KillMode and a terminal's Ctrl-C do.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import LLMSERVE, Process, free_port
from tests.test_sidecar_process import logged_request_ids, sidecar_metric

BODY = {"model": "synthetic", "prompt": "Hi", "max_tokens": 40, "stream": True}
STREAMS = 10


@pytest.fixture
async def servers() -> AsyncIterator[list[Process]]:
    started: list[Process] = []
    yield started
    for server in started:
        if server.proc.returncode is None:
            os.killpg(server.proc.pid, signal.SIGKILL)
            await server.proc.wait()


SERVE = (*LLMSERVE, "serve", "--port", "0")


async def serve(servers: list[Process], *args: str, argv: Sequence[str] = SERVE) -> Process:
    """`llmserve serve` (or `argv`) with `args`, in a session of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSERVE_")}
    proc = await asyncio.create_subprocess_exec(
        *argv, *args,
        stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True,
    )  # fmt: skip
    server = Process(proc)
    servers.append(server)
    return server


async def synthetic_server(servers: list[Process], short_tmp: str) -> tuple[Process, str, Path]:
    log_file = Path(short_tmp) / "requests.log"
    server = await serve(
        servers,
        *("--engine", "synthetic", "--synthetic-token-interval-seconds", "0.05"),
        *("--sidecar-port", str(free_port()), "--sidecar-socket-path", f"{short_tmp}/ev.sock"),
        *("--sidecar-log-file", str(log_file)),
    )
    port = (await server.wait_for_line(r"listening on http://127\.0\.0\.1:(\d+)"))[1]
    return server, f"http://127.0.0.1:{port}/v1/completions", log_file


async def streams_then(url: str, stop: asyncio.Future[None]) -> list[str]:
    """Start STREAMS streams; once each has its first chunk, resolve `stop`; their request ids."""
    started = asyncio.Semaphore(0)
    async with aiohttp.ClientSession() as session:

        async def stream() -> str:
            async with session.post(url, json=BODY) as response:
                await response.content.readline()
                started.release()
                raw = await response.read()
                assert raw.endswith(b"data: [DONE]\n\n")
                return response.headers["x-request-id"]

        tasks = [asyncio.create_task(stream()) for _ in range(STREAMS)]
        for _ in tasks:
            await started.acquire()
        stop.set_result(None)
        return list(await asyncio.gather(*tasks))


async def test_sigterm_to_the_process_group_leaves_the_sidecar_to_record_the_drain(
    short_tmp: str, servers: list[Process]
) -> None:
    server, url, log_file = await synthetic_server(servers, short_tmp)
    await server.wait_for_line("ready: ")
    stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    requests = asyncio.create_task(streams_then(url, stop))
    await stop
    os.killpg(server.proc.pid, signal.SIGTERM)
    request_ids = await requests
    assert await server.finish() == 0
    assert sorted(logged_request_ids(log_file)) == sorted(request_ids)


async def test_a_sidecar_child_slow_to_start_still_gets_every_event(
    short_tmp: str, servers: list[Process]
) -> None:
    server, url, log_file = await synthetic_server(servers, short_tmp)
    child = int((await server.wait_for_line(r"sidecar started \(pid (\d+)\)"))[1])
    # A starved child (niceness 10 on a saturated machine): not even listening yet.
    os.kill(child, signal.SIGSTOP)
    await server.wait_for_line("ready: ")
    stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    requests = asyncio.create_task(streams_then(url, stop))
    await stop
    server.proc.send_signal(signal.SIGTERM)
    request_ids = await requests
    await server.wait_for_line(r"\"stopped\"")
    # Longer than a sidecar that is away is waited for; the server's own child is waited for.
    await asyncio.sleep(3)
    os.kill(child, signal.SIGCONT)
    assert await server.finish() == 0
    assert sorted(logged_request_ids(log_file)) == sorted(request_ids)
    assert not any("could not be delivered" in line for line in server.log)


# The llama.cpp engine, its model load made endless: the load runs on a worker thread.
ENDLESS_LOAD = """
import sys, time
from llmserve.server.cli import main
from llmserve.server.engines.llamacpp import LlamaCppEngine
LlamaCppEngine._load_model = lambda self: time.sleep(3600)
sys.exit(main())
"""


async def test_sigterm_during_a_long_model_load_exits_without_waiting_for_it(
    short_tmp: str, servers: list[Process]
) -> None:
    server = await serve(
        servers,
        *("--sidecar-port", str(free_port()), "--sidecar-socket-path", f"{short_tmp}/ev.sock"),
        argv=[sys.executable, "-c", ENDLESS_LOAD, "serve", "--port", "0"],
    )
    await server.wait_for_line("with llama.cpp")
    server.proc.send_signal(signal.SIGTERM)
    assert await server.finish(60) == 0
    assert any("stopped while the model was loading" in line for line in server.log)


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody has reaped yet."""
    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "State:\tZ" in status.read_text()


async def test_the_sidecar_child_stops_when_the_server_is_killed(
    short_tmp: str, servers: list[Process]
) -> None:
    server, _, _ = await synthetic_server(servers, short_tmp)
    child = int((await server.wait_for_line(r"sidecar started \(pid (\d+)\)"))[1])
    await server.wait_for_line("ready: ")
    server.proc.kill()
    await server.proc.wait()
    for _ in range(600):
        if gone(child):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the sidecar child outlived its server by 30 s")


async def test_events_a_server_could_not_deliver_are_counted_by_the_next_sidecar(
    short_tmp: str, servers: list[Process]
) -> None:
    socket_path, sidecar_port = f"{short_tmp}/ev.sock", free_port()
    server = await serve(
        servers,
        *("--engine", "synthetic", "--synthetic-completion-tokens", "3"),
        *("--sidecar-spawn", "false", "--sidecar-socket-path", socket_path),
    )
    port = (await server.wait_for_line(r"listening on http://127\.0\.0\.1:(\d+)"))[1]
    await server.wait_for_line("ready: ")
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{port}/v1/completions"
        for _ in range(3):
            async with session.post(url, json={**BODY, "stream": False}) as response:
                assert response.status == 200
    server.proc.send_signal(signal.SIGTERM)
    assert await server.finish() == 0
    undelivered = re.search(r"(\d+) events could not be delivered", "".join(server.log))
    assert undelivered, server.log

    sidecar = await serve(
        servers,
        *("--sidecar-port", str(sidecar_port), "--sidecar-socket-path", socket_path),
        argv=[*LLMSERVE, "sidecar"],
    )
    lost = None
    while lost is None and sidecar.proc.returncode is None:
        await asyncio.sleep(0.1)
        lost = await sidecar_metric(sidecar_port, "llm_sidecar_events_lost_total")
    assert lost == int(undelivered[1]) > 0
    sidecar.proc.send_signal(signal.SIGTERM)
    assert await sidecar.finish() == 0
