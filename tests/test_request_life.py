"""A request's life from arrival to its single report: every way out is answered and logged once.

Real HTTP over loopback against the synthetic engine (model speed is irrelevant here), the
sidecar's own ingest on a private socket, and raw sockets for the clients that misbehave.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from llmserve.server.app import build_app
from llmserve.server.app_keys import SERVICE, STATE
from llmserve.server.engines.base import Engine
from llmserve.server.keys import KeyEntry, KeyStore, hash_secret, write_keys
from tests.conftest import (
    ExLlamaV2Factory,
    Process,
    ServerFactory,
    SidecarStack,
    free_port,
    make_config,
    start,
    synthetic_engine,
)
from tests.exllamav2_double.generator.dynamic import ExLlamaV2DynamicGenerator

SECRETS = {name: f"sk-life-{name}-secret" for name in ("free", "rpm", "tight", "lease")}
LIMITS: dict[str, dict[str, int]] = {
    "free": {},
    "rpm": {"rpm": 2},
    "tight": {"tpm": 1000},
    "lease": {"concurrency": 8},
}


def port(server: TestServer) -> int:
    assert server.port is not None
    return server.port


def keys(directory: str) -> KeyStore:
    path = Path(directory) / "keys.toml"
    write_keys(
        path,
        {
            name: KeyEntry.model_validate(
                {"name": name, "sha256": hash_secret(secret), **LIMITS[name]}
            )
            for name, secret in SECRETS.items()
        },
    )
    return KeyStore(path)


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[name]}"}


class LifeServers(Protocol):
    def __call__(
        self,
        engine: Engine,
        *,
        small_send_buffers: bool = False,
        settings: dict[str, str] | None = None,
    ) -> Awaitable[TestServer]: ...


@pytest.fixture
def life_server(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    sidecar_stack: SidecarStack,
    short_tmp: str,
) -> LifeServers:
    """life_server(engine, ...) -> a server with this module's keys, reporting to the sidecar."""

    async def make(
        engine: Engine,
        *,
        small_send_buffers: bool = False,
        settings: dict[str, str] | None = None,
    ) -> TestServer:
        app = build_app(
            engine,
            make_config(**{"engine.kind": "synthetic", **(settings or {})}),
            events=sidecar_stack.sender(),
            keys=keys(short_tmp),
        )
        app[STATE].loaded = True
        if small_send_buffers:
            app.on_response_prepare.append(_small_send_buffer)
        return await aiohttp_server(app)

    return make


async def _small_send_buffer(request: web.Request, _: web.StreamResponse) -> None:
    # Fixed, the server's socket send buffer absorbs as much of a non-reading client's stream
    # on every machine (Linux otherwise grows it as it sees fit).
    assert request.transport is not None
    sock = request.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


async def raw_request(
    port: int, head: bytes, body: bytes = b""
) -> tuple[asyncio.StreamReader, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + body)
    await writer.drain()
    return reader, writer


async def stalled_stream(
    port: int, max_tokens: int, secret: str, request_id: str = "stalled"
) -> Any:
    """A client that asks for a stream and never reads a byte of it, with a tiny window."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    body = json.dumps(
        {"model": "synthetic", "prompt": "x", "max_tokens": max_tokens, "stream": True}
    ).encode()
    _, writer = await asyncio.open_connection(sock=sock, limit=1024)
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer %s\r\nx-request-id: %s\r\nContent-Length: %d\r\n\r\n%s"
        % (secret.encode(), request_id.encode(), len(body), body)
    )
    await writer.drain()
    return writer


# With a 4 KB send buffer and a 4 KB receive window, streams of 400 to 620 tokens are written in
# full into the socket and the transport's buffer, past its high-water mark, without a write ever
# having to wait: the only wait left is the one at the end of the response.
ENDING_IN_A_FULL_BUFFER = [410, 440, 470, 500, 530, 560, 590, 610]


async def until(condition: Callable[[], bool], failure: str, seconds: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, failure
        await asyncio.sleep(0.01)


def fast_engine() -> Engine:
    return synthetic_engine(
        parallel="8",
        first_token_seconds="0",
        token_interval_seconds="0",
        completion_tokens="100000",
        context_length="200000",
    )


@asynccontextmanager
async def streams_stalled_at_their_end(
    life_server: LifeServers,
    *,
    send_timeout: str,
    key: str,
) -> AsyncIterator[TestServer]:
    """A server with eight streams whose clients read nothing, each ending in a full buffer."""
    server = await life_server(
        fast_engine(),
        small_send_buffers=True,
        settings={"server.send_timeout_seconds": send_timeout},
    )
    writers = [await stalled_stream(port(server), n, SECRETS[key]) for n in ENDING_IN_A_FULL_BUFFER]
    try:
        yield server
    finally:
        for writer in writers:
            writer.close()


async def test_streams_stalled_at_their_end_free_slot_and_lease_at_once(
    life_server: LifeServers, sidecar_stack: SidecarStack
) -> None:
    # A send timeout far beyond the test: only releasing before the last flush can pass.
    async with streams_stalled_at_their_end(life_server, send_timeout="600", key="lease") as server:
        gate = server.app[SERVICE].gate
        # All written, none read: each stream is now at its last flush.
        await until(lambda: gate.running == 0, "the stalled streams still hold their slots")
        # Eight streams that once held all eight slots and the key's eight leases for ever;
        # a ninth request of the same key is served.
        async with aiohttp.ClientSession() as session:
            body = {"model": "synthetic", "prompt": "x", "max_tokens": 2}
            async with session.post(
                server.make_url("/v1/completions"), json=body, headers=auth("lease")
            ) as response:
                assert response.status == 200


async def test_streams_stalled_at_their_end_are_dropped_and_logged_once(
    life_server: LifeServers, sidecar_stack: SidecarStack
) -> None:
    async with streams_stalled_at_their_end(life_server, send_timeout="1", key="free"):
        await sidecar_stack.wait_finished(len(ENDING_IN_A_FULL_BUFFER), seconds=60)
    ends = [(e["status"], e["http_status"], e["cancel_reason"]) for e in sidecar_stack.finished]
    assert Counter(ends) == {("cancelled", 200, "client_stalled"): len(ENDING_IN_A_FULL_BUFFER)}


def slow_engine(**settings: str) -> Engine:
    return synthetic_engine(
        **{
            "parallel": "1",
            "first_token_seconds": "0",
            "token_interval_seconds": "0.01",
            **settings,
        }
    )


async def read_status(reader: asyncio.StreamReader, seconds: float = 10.0) -> int:
    line = await asyncio.wait_for(reader.readline(), seconds)
    return int(line.split()[1])


async def test_header_bytes_that_are_not_utf8_get_a_4xx_and_a_log_line(
    life_server: LifeServers, sidecar_stack: SidecarStack
) -> None:
    server = await life_server(slow_engine())
    key = b"Authorization: Bearer " + SECRETS["free"].encode()
    cases = [
        (b"Authorization: Bearer sk-\xff\xfe", 401, "invalid_api_key"),
        (b"x-api-key: \xc3\x28", 401, "invalid_api_key"),
        (key + b"\r\nContent-Type: application/\xff", 415, "unsupported_media_type"),
        (key + b"\r\nx-request-id: \xff\xfe", 400, "missing_required_parameter"),
    ]
    for header, status, _ in cases:
        reader, writer = await raw_request(
            port(server),
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n%s\r\n\r\n{}"
            % header,
        )
        assert await read_status(reader) == status
        writer.close()
    await sidecar_stack.wait_finished(len(cases))
    logged = [(e["http_status"], e["error_type"]) for e in sidecar_stack.finished]
    assert sorted(logged) == sorted((status, code) for _, status, code in cases)


async def test_an_oversize_body_is_logged_as_the_413_it_got(
    life_server: LifeServers, sidecar_stack: SidecarStack
) -> None:
    server = await life_server(slow_engine())
    async with aiohttp.ClientSession() as session:
        body = json.dumps({"model": "synthetic", "prompt": "x" * (1 << 20)}).encode()
        async with session.post(
            server.make_url("/v1/completions"),
            data=io.BytesIO(body),
            headers={**auth("free"), "Content-Type": "application/json"},
        ) as response:
            assert response.status == 413
            assert (await response.json())["error"]["code"] == "request_too_large"
    await sidecar_stack.wait_finished(1)
    end = sidecar_stack.finished[0]
    assert (end["status"], end["http_status"], end["error_type"]) == (
        "invalid_request",
        413,
        "request_too_large",
    )


async def test_a_throttled_key_is_refused_before_its_body_is_read(
    life_server: LifeServers, sidecar_stack: SidecarStack
) -> None:
    server = await life_server(slow_engine())
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(
                server.make_url("/v1/completions"),
                json={"model": "synthetic", "prompt": "x", "max_tokens": 1},
                headers=auth("rpm"),
            ) as response:
                assert response.status == 200
    # Headers that announce a megabyte, and no body at all: the answer cannot wait for it.
    reader, writer = await raw_request(
        port(server),
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer %s\r\nContent-Length: 1000000\r\n\r\n" % SECRETS["rpm"].encode(),
    )
    assert await read_status(reader) == 429
    writer.close()


async def test_a_full_queue_does_not_spend_the_keys_requests(
    life_server: LifeServers, sidecar_stack: SidecarStack
) -> None:
    server = await life_server(
        slow_engine(completion_tokens="100000", context_length="200000"),
        settings={"server.max_waiting": "0"},
    )
    gate = server.app[SERVICE].gate
    url = server.make_url("/v1/completions")
    async with aiohttp.ClientSession() as session:
        long = {"model": "synthetic", "prompt": "x", "max_tokens": 100000, "stream": True}
        busy = await session.post(url, json=long, headers=auth("free"))
        await until(lambda: gate.running == 1, "the long stream did not start")
        short = {"model": "synthetic", "prompt": "x", "max_tokens": 1}
        for _ in range(3):
            async with session.post(url, json=short, headers=auth("rpm")) as response:
                assert response.status == 503
        busy.close()
        await until(lambda: gate.running == 0, "the long stream was not stopped")
        # The three 503s were the server's doing: the key still has both of its requests.
        for _ in range(2):
            async with session.post(url, json=short, headers=auth("rpm")) as response:
                assert response.status == 200


async def test_default_chat_calls_fit_a_small_token_limit(
    life_server: LifeServers, sidecar_stack: SidecarStack
) -> None:
    # The synthetic context is 8192 tokens, far above the key's 1000 tokens per minute.
    server = await life_server(slow_engine())
    client = openai.AsyncOpenAI(
        base_url=str(server.make_url("/v1")), api_key=SECRETS["tight"], max_retries=2
    )
    reply = await client.chat.completions.create(
        model="synthetic", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content
    await sidecar_stack.wait_finished(1)
    # A request that can never fit is refused at once, and the client does not retry it.
    try:
        await client.chat.completions.create(
            model="synthetic", messages=[{"role": "user", "content": "hi"}], max_tokens=2000
        )
    except openai.RateLimitError as exc:
        refusal = exc
    else:
        raise AssertionError("a request above the key's token limit was admitted")
    assert refusal.response.headers["x-should-retry"] == "false"
    assert "retry-after" not in refusal.response.headers
    assert "Lower max_tokens" in refusal.message
    await sidecar_stack.wait_finished(2)
    assert [e["http_status"] for e in sidecar_stack.finished] == [200, 429]
    await client.close()


async def sidecar_gauge(url: str, name: str) -> float | None:
    async with aiohttp.ClientSession() as session:
        try:
            async with session.get(url) as response:
                text = await response.text()
        except aiohttp.ClientError:
            return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None


async def test_requests_still_queued_at_the_drain_timeout_get_a_clear_503(
    short_tmp: str, processes: list[Process]
) -> None:
    log_file = Path(short_tmp) / "requests.log"
    sidecar_port = free_port()
    server = await start(
        "serve",
        *("--port", "0", "--llamacpp-parallel", "1", "--server-drain-timeout-seconds", "0.5"),
        *("--sidecar-port", str(sidecar_port), "--sidecar-socket-path", f"{short_tmp}/ev.sock"),
        *("--sidecar-log-file", str(log_file)),
    )
    processes.append(server)
    port = (await server.wait_for_line(r"listening on http://127\.0\.0\.1:(\d+)"))[1]
    model = (await server.wait_for_line(r"ready: .* serves model '([^']+)'"))[1]
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    chat = {
        "model": model,
        "messages": [{"role": "user", "content": "Tell a long story."}],
        "max_tokens": 1500,
        "temperature": 0,
        "ignore_eos": True,
    }
    async with aiohttp.ClientSession() as session:

        async def call(stream: bool) -> tuple[str, int, bytes]:
            async with session.post(url, json={**chat, "stream": stream}) as response:
                return response.headers["x-request-id"], response.status, await response.read()

        running = await session.post(url, json={**chat, "stream": True})
        await running.content.readuntil(b'"content":"')
        queued = [asyncio.create_task(call(stream)) for stream in (True, False)]
        metrics = f"http://127.0.0.1:{sidecar_port}/metrics"
        for _ in range(600):
            if await sidecar_gauge(metrics, "llm_requests_waiting") == 2:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the two requests were never seen queued")
        server.proc.send_signal(signal.SIGTERM)
        rest = await running.read()
        running_id = running.headers["x-request-id"]
        results = await asyncio.gather(*queued)
    assert await server.finish() == 0

    events = [e for e in rest.split(b"\n\n") if e.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]"
    assert json.loads(events[-2][len(b"data: ") :])["error"]["code"] == "generation_cancelled"
    for _, status, raw in results:
        assert status == 503
        assert json.loads(raw)["error"]["code"] == "server_shutting_down"
    lines = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    ends = {
        line["request_id"]: (line["status"], line["http_status"], line["cancel_reason"])
        for line in lines
        if line.get("msg") == "request finished"
    }
    assert len(ends) == 3
    assert ends[running_id] == ("cancelled", 200, "shutdown")
    for request_id, _, _ in results:
        assert ends[request_id] == ("cancelled", 503, "shutdown")


async def test_every_way_out_is_reported_once_with_its_status(
    life_server: LifeServers,
    sidecar_stack: SidecarStack,
    serve: ServerFactory,
    exllamav2_double: ExLlamaV2Factory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = synthetic_engine(
        parallel="1",
        first_token_seconds="0",
        token_interval_seconds="0.001",
        completion_tokens="100000",
        context_length="200000",
    )
    server = await life_server(
        engine,
        small_send_buffers=True,
        settings={"server.max_waiting": "1", "server.send_timeout_seconds": "1"},
    )
    gate = server.app[SERVICE].gate
    url = server.make_url("/v1/completions")
    expected: dict[str, tuple[str, int]] = {}

    def body(max_tokens: int, stream: bool = False) -> dict[str, object]:
        return {"model": "synthetic", "prompt": "x", "max_tokens": max_tokens, "stream": stream}

    async def call(
        rid: str, end: tuple[str, int], key: str = "free", **kwargs: Any
    ) -> aiohttp.ClientResponse:
        expected[rid] = end
        headers = {**auth(key), "x-request-id": rid, **kwargs.pop("headers", {})}
        return await session.post(url, headers=headers, **kwargs)

    async with aiohttp.ClientSession() as session:
        bad_key = {"Authorization": "Bearer sk-nobody"}
        (await call("bad-key", ("invalid_request", 401), json=body(1), headers=bad_key)).close()
        as_json = {"Content-Type": "application/json"}
        (await call("bad-json", ("invalid_request", 400), data=b"{", headers=as_json)).close()
        big = io.BytesIO(json.dumps({"model": "synthetic", "prompt": "x" * (1 << 20)}).encode())
        (await call("too-large", ("invalid_request", 413), data=big, headers=as_json)).close()
        for n in range(2):
            (await call(f"rpm-{n}", ("ok", 200), "rpm", json=body(1))).close()
        (await call("rpm-over", ("rate_limited", 429), "rpm", json=body(1))).close()

        running = await call("gone-mid-stream", ("cancelled", 200), json=body(100000, True))
        await running.content.readuntil(b'"text":"')
        gone = asyncio.create_task(call("gone-queued", ("cancelled", 499), json=body(1)))
        await until(lambda: gate.waiting == 1, "the request was not queued")
        gone.cancel()
        await until(lambda: gate.waiting == 0, "the cancelled request stayed queued")
        queued = asyncio.create_task(call("served-later", ("ok", 200), json=body(3)))
        await until(lambda: gate.waiting == 1, "the request was not queued")
        (await call("queue-full", ("overloaded", 503), json=body(1))).close()
        running.close()
        (await queued).close()

        expected["stalled"] = ("cancelled", 200)
        stalled = await stalled_stream(port(server), 5000, SECRETS["free"], request_id="stalled")
        await sidecar_stack.wait_finished(len(expected), seconds=30)
        stalled.close()

        at_shutdown = await call("shutdown", ("cancelled", 200), json=body(100000, True))
        await at_shutdown.content.readuntil(b'"text":"')
        await engine.close()
        assert (await at_shutdown.read()).endswith(b"data: [DONE]\n\n")

        failing = await exllamav2_double()
        monkeypatch.setattr(ExLlamaV2DynamicGenerator, "fail_after_iterations", 5)
        other = await serve(failing, events=sidecar_stack.sender())
        expected["engine-error"] = ("error", 200)
        async with session.post(
            other.make_url("/v1/completions"),
            json={**body(500, True), "model": failing.info.model_id, "ignore_eos": True},
            headers={"x-request-id": "engine-error"},
        ) as response:
            assert b'"engine_error"' in await response.read()

    await sidecar_stack.wait_finished(len(expected), seconds=30)
    await asyncio.sleep(0.2)
    ends = Counter(e["rid"] for e in sidecar_stack.finished)
    assert ends == Counter(list(expected)), "every request is reported exactly once"
    got = {e["rid"]: (e["status"], e["http_status"]) for e in sidecar_stack.finished}
    assert got == expected
    reasons = {e["rid"]: e["cancel_reason"] for e in sidecar_stack.finished}
    assert reasons["gone-mid-stream"] == reasons["gone-queued"] == "client_disconnect"
    assert reasons["stalled"] == "client_stalled" and reasons["shutdown"] == "shutdown"
