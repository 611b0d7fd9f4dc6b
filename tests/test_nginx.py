"""scripts/nginx/llmserve.conf in Debian's real nginx, in front of two llmserve replicas.

The snippet is used as shipped; only the parts an operator must adapt (the replica addresses,
the TLS listener) are swapped for loopback ones. It must pass tokens through as they are made,
keep the client's request id, and route around a replica that is draining.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Process, free_port, start_synthetic_server
from tests.nginx_process import running_nginx

ROOT = Path(__file__).resolve().parent.parent
SNIPPET = ROOT / "scripts" / "nginx" / "llmserve.conf"
TOKENS = 60
INTERVAL = 0.05


def runnable_config(directory: Path, port: int, replicas: list[str]) -> Path:
    snippet = SNIPPET.read_text()
    upstreams = re.findall(r"^\s*server 127\.0\.0\.1:\d+ [^;]*;$", snippet, flags=re.M)
    assert len(upstreams) == 2, "the snippet's example upstream servers moved"
    for line, replica in zip(upstreams, replicas, strict=True):
        snippet = snippet.replace(line, re.sub(r"127\.0\.0\.1:\d+", replica, line))
    snippet = snippet.replace("listen 443 ssl http2;", f"listen 127.0.0.1:{port};")
    snippet = re.sub(r"^\s*ssl_certificate\S* [^;]*;$", "", snippet, flags=re.M)
    snippet = snippet.replace("/var/log/nginx/", f"{directory}/")
    (directory / "llmserve.conf").write_text(snippet)
    temp = " ".join(
        f"{kind}_temp_path {directory}/{kind};" for kind in ("client_body", "proxy", "fastcgi")
    )
    config = directory / "nginx.conf"
    config.write_text(
        f"daemon off;\npid {directory}/nginx.pid;\nerror_log {directory}/error.log;\n"
        f"events {{}}\nhttp {{\naccess_log off;\n{temp}\nuwsgi_temp_path {directory}/uwsgi;\n"
        f"scgi_temp_path {directory}/scgi;\ninclude {directory}/llmserve.conf;\n}}\n"
    )
    return config


@pytest.fixture
async def proxied(
    tmp_path: Path, processes: list[Process]
) -> AsyncIterator[tuple[str, list[Process]]]:
    replicas = []
    addresses = []
    for _ in range(2):
        server, base = await start_synthetic_server(
            processes,
            *("--synthetic-completion-tokens", str(TOKENS)),
            *("--synthetic-token-interval-seconds", str(INTERVAL)),
            *("--sidecar-spawn", "false", "--server-drain-timeout-seconds", "30"),
        )
        replicas.append(server)
        addresses.append(base.removeprefix("http://"))
    port = free_port()
    config = runnable_config(tmp_path, port, addresses)
    async with running_nginx(config, port):
        yield f"http://127.0.0.1:{port}", replicas


BODY = {"model": "synthetic", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


async def test_tokens_pass_through_unbuffered_with_the_clients_request_id(
    proxied: tuple[str, list[Process]],
):
    base, _ = proxied
    async with aiohttp.ClientSession() as session:
        headers = {"X-Request-Id": "customer-trace-42"}
        started = time.monotonic()
        async with session.post(
            f"{base}/v1/chat/completions", json=BODY, headers=headers
        ) as response:
            assert response.status == 200
            assert response.headers["x-request-id"] == "customer-trace-42"
            arrivals = []
            async for line in response.content:
                if line.startswith(b"data: {"):
                    arrivals.append(time.monotonic() - started)
        # Buffered, every chunk would arrive together at the end (3 s here); unbuffered, the
        # first comes after one token and the chunks spread over the whole generation.
        assert len(arrivals) >= TOKENS
        assert arrivals[1] < arrivals[-1] / 3

        async with session.post(f"{base}/v1/chat/completions", json=BODY) as response:
            assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
            await response.read()


async def test_the_trace_context_passes_through_and_is_logged(
    proxied: tuple[str, list[Process]], tmp_path: Path
) -> None:
    base, _ = proxied
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traceparent = f"00-{trace_id}-00f067aa0ba902b7-01"
    headers = {"X-Request-Id": "traced-through-nginx", "traceparent": traceparent}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{base}/v1/chat/completions", json=BODY, headers=headers
        ) as response:
            assert response.status == 200
            await response.read()
            # The replica saw the caller's trace and continued it.
            assert response.headers["traceparent"].split("-")[1] == trace_id
    log = (tmp_path / "llmserve.access.log").read_text()
    assert f'request_id=traced-through-nginx traceparent="{traceparent}"' in log


async def test_a_draining_replica_is_routed_around(proxied: tuple[str, list[Process]]):
    base, replicas = proxied
    async with aiohttp.ClientSession() as session:
        # A stream in flight keeps the replica draining, not gone, while the others arrive.
        direct = replicas[0]
        port = (await direct.wait_for_line(r"listening on http://127\.0\.0\.1:(\d+)"))[1]
        async with session.post(
            f"http://127.0.0.1:{port}/v1/chat/completions", json=BODY
        ) as in_flight:
            await in_flight.content.readline()
            direct.proc.send_signal(signal.SIGTERM)
            await direct.wait_for_line("draining")

            async def through_nginx() -> int:
                async with session.post(f"{base}/v1/chat/completions", json=BODY) as response:
                    await response.read()
                    return response.status

            statuses = await asyncio.gather(*(through_nginx() for _ in range(6)))
            assert statuses == [200] * 6
            assert b"[DONE]" in await in_flight.read()
    assert await direct.finish() == 0
