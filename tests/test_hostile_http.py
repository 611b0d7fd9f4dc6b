"""Hostile HTTP at the connection level, against a real `llmserve serve` over raw sockets.

What aiohttp refuses before any handler runs (an unknown method, oversized or too many headers,
broken chunked encoding) must still be a 4xx in OpenAI's envelope that quotes none of the
client's bytes, and slow clients (slowloris headers, dribbled bodies, silent connections) must
be let go after a bounded time while everyone else is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.conftest import LLMSERVE, Process, free_port, start_synthetic_server

SECRET = "sk-never-echo-this-0123456789"
IDLE_SECONDS = 1
BODY_SECONDS = 1


@pytest.fixture
async def server(processes: list[Process]) -> AsyncIterator[tuple[Process, int]]:
    process, base = await start_synthetic_server(
        processes,
        *("--server-idle-timeout-seconds", str(IDLE_SECONDS)),
        *("--server-body-timeout-seconds", str(BODY_SECONDS)),
        *("--sidecar-spawn", "false"),
    )
    yield process, int(base.rsplit(":", 1)[1])


async def exchange(port: int, *parts: bytes, pause: float = 0.0, seconds: float = 30) -> bytes:
    """Send the parts (pausing between them), then read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(pause)
        return await asyncio.wait_for(reader.read(), seconds)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def parse(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"application/json" in head, raw
    return status, json.loads(body)


GET = b"GET /health HTTP/1.1\r\nHost: x\r\n"

MALFORMED = [
    ("header over 8 KiB", GET + f"Authorization: Bearer {SECRET}".encode() + b"x" * 9000),
    (
        "too many headers",
        GET + b"".join(b"X-%d: %s\r\n" % (i, SECRET.encode()) for i in range(200)),
    ),
    ("unknown method", f"{SECRET} / HTTP/1.1\r\nHost: x\r\n".encode()),
    ("not HTTP at all", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + SECRET.encode()),
    (
        "broken chunked body",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + SECRET.encode() + b"\r\n",
    ),
    ("control character in a header", GET + b"X-Evil: a\x00" + SECRET.encode() + b"\r\n"),
]


@pytest.mark.parametrize(("name", "request_bytes"), MALFORMED, ids=[m[0] for m in MALFORMED])
async def test_malformed_http_is_a_4xx_envelope_that_quotes_nothing(
    server: tuple[Process, int], name: str, request_bytes: bytes
):
    process, port = server
    raw = await exchange(port, request_bytes + b"\r\n\r\n")
    status, body = parse(raw)
    assert 400 <= status < 500, raw
    assert body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert SECRET.encode() not in raw
    await process.wait_for_line("refused a request that is not valid HTTP")
    assert not any(SECRET in line for line in process.log)


async def test_slow_headers_are_cut_off(server: tuple[Process, int]):
    _, port = server
    # One header byte every 0.2 s would hold the connection for ever without the idle timer.
    dribble = [bytes([b]) for b in GET + b"X-Slow: " + b"a" * 200]
    raw = await exchange(port, *dribble, pause=0.2, seconds=30)
    assert b"200 OK" not in raw


async def test_a_dribbled_body_gets_408_and_the_connection_is_closed(
    server: tuple[Process, int],
):
    _, port = server
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    raw = await exchange(port, head, b'{"model": ', pause=BODY_SECONDS * 3)
    status, body = parse(raw)
    assert status == 408
    assert body["error"]["code"] == "request_timeout"  # type: ignore[index]
    assert b"connection: close" in raw.lower()


async def test_silent_connections_are_released_and_others_are_served(
    server: tuple[Process, int],
):
    _, port = server
    silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(200)]
    async with aiohttp.ClientSession() as session:
        body = {"model": "synthetic", "prompt": "hi", "max_tokens": 3}
        async with session.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as response:
            assert response.status == 200
    # Each silent connection is closed by the server: reading it ends (EOF), none is kept.
    closed = await asyncio.wait_for(
        asyncio.gather(*(reader.read() for reader, _ in silent)), IDLE_SECONDS * 30
    )
    assert closed == [b""] * len(silent)
    for _, writer in silent:
        writer.close()


async def test_the_sidecars_log_withholds_malformed_request_bytes(short_tmp: str):
    port = free_port()
    sidecar = await asyncio.create_subprocess_exec(
        *LLMSERVE,
        *("sidecar", "--sidecar-port", str(port), "--sidecar-socket-path", f"{short_tmp}/ev.sock"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        for _ in range(600):
            with contextlib.suppress(ConnectionRefusedError):
                raw = await exchange(port, MALFORMED[0][1] + b"\r\n\r\n")
                break
            await asyncio.sleep(0.05)
        assert raw.startswith(b"HTTP/1.0 400")
    finally:
        sidecar.terminate()
        log, _ = await sidecar.communicate()
    assert b"request bytes withheld" in log
    assert SECRET.encode() not in log


async def test_a_client_that_stops_reading_gives_up_its_slot(processes: list[Process]):
    _, base = await start_synthetic_server(
        processes,
        *("--synthetic-parallel", "1", "--synthetic-token-interval-seconds", "0"),
        *("--synthetic-context-length", "1000000", "--synthetic-completion-tokens", "900000"),
        *("--server-send-timeout-seconds", "1", "--sidecar-spawn", "false"),
    )
    port = int(base.rsplit(":", 1)[1])
    body = json.dumps(
        {"model": "synthetic", "prompt": "x", "max_tokens": 900000, "stream": True}
    ).encode()
    # A tiny receive window and no reads: the server's writes back up within a second.
    _, writer = await asyncio.open_connection("127.0.0.1", port, limit=1024)
    writer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    try:
        # The only slot is the stalled stream's; the next request gets it once that is dropped.
        async with aiohttp.ClientSession() as session:
            small = {"model": "synthetic", "prompt": "x", "max_tokens": 2}
            async with session.post(f"{base}/v1/completions", json=small) as response:
                assert response.status == 200
    finally:
        writer.close()
