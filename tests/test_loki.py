"""Pushing request logs to Loki: the documented push format, retries, and a bounded buffer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from llmserve.sidecar.loki import LokiPusher
from llmserve.sidecar.metrics import Metrics
from llmserve.sidecar.request_log import RequestLog
from tests.conftest import free_port
from tests.test_sidecar_events import end_event

Receiver = Callable[..., Awaitable[TestServer]]


class FakeLoki:
    """Records pushes; answers with the queued statuses first, then 204 as Loki does."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.pushes: list[dict[str, Any]] = []
        self.attempts = 0

    async def push(self, request: web.Request) -> web.Response:
        self.attempts += 1
        assert request.path == "/loki/api/v1/push"
        assert request.headers["Content-Type"] == "application/json"
        assert request.headers["Content-Encoding"] == "gzip"
        # aiohttp undoes Content-Encoding: gzip itself, as Loki's Go server does.
        body = json.loads(await request.read())
        if self.statuses:
            return web.Response(status=self.statuses.pop(0))
        self.pushes.append(body)
        return web.Response(status=204)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/loki/api/v1/push", self.push)
        return app

    @property
    def lines(self) -> list[list[Any]]:
        return [v for push in self.pushes for stream in push["streams"] for v in stream["values"]]


def pusher(url: str, **kw: Any) -> LokiPusher:
    return LokiPusher(
        url, Metrics(), env="test", interval_seconds=0.05, max_backoff_seconds=0.2, **kw
    )


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


async def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    assert condition()


async def test_push_matches_lokis_documented_format(aiohttp_server: Receiver) -> None:
    loki = FakeLoki()
    server = await aiohttp_server(loki.app())
    push = pusher(str(server.make_url("/")))
    push.start()
    log = RequestLog("llmserve", push)
    log(end_event(1, "req-ok"))
    log(end_event(2, "req-bad", key="globex", status="error"))
    log({**end_event(3, "req-traced"), "trace_id": TRACE_ID, "span_id": "00f067aa0ba902b7"})
    await wait_for(lambda: len(loki.lines) == 3)
    await push.stop()

    (body,) = loki.pushes
    assert set(body) == {"streams"}
    by_level = {s["stream"]["level"]: s for s in body["streams"]}
    assert set(by_level) == {"info", "error"}
    for level, stream in by_level.items():
        assert stream["stream"] == {"service_name": "llmserve", "env": "test", "level": level}
        for ts, line, metadata in stream["values"]:
            assert isinstance(ts, str) and ts.isdigit() and len(ts) == 19
            fields = json.loads(line)
            # The trace id too, for requests that came with one.
            traced = {"trace_id"} if fields["trace_id"] else set()
            assert set(metadata) == {"request_id", "key"} | traced
            assert all(isinstance(v, str) for v in metadata.values())
            assert fields["trace_id"] == metadata.get("trace_id")
            assert fields["request_id"] == metadata["request_id"]
            assert fields["key"] == metadata["key"]
            assert fields["level"] == level and fields["msg"] == "request finished"
    error_line = json.loads(by_level["error"]["values"][0][1])
    assert error_line["status"] == "error" and error_line["key"] == "globex"


async def test_retries_5xx_and_429_then_delivers_once(aiohttp_server: Receiver) -> None:
    loki = FakeLoki([500, 429, 503])
    server = await aiohttp_server(loki.app())
    push = pusher(str(server.make_url("/")))
    push.start()
    push.push('{"msg": "one"}', "info", {"request_id": "1", "key": "k"})
    await wait_for(lambda: len(loki.lines) == 1)
    await push.stop()
    assert loki.attempts == 4
    assert [line for _, line, _ in loki.lines] == ['{"msg": "one"}']
    retries = push.metrics.registry.get_sample_value
    assert retries("llm_sidecar_loki_pushes_total", {"result": "retry"}) == 3


async def test_refused_connection_is_retried_and_the_buffer_is_bounded(
    aiohttp_server: Receiver,
) -> None:
    port = free_port()
    push = pusher(f"http://127.0.0.1:{port}", max_buffered=100, batch_lines=1000)
    push.start()
    for i in range(150):
        push.push(json.dumps({"n": i}), "info", {"request_id": str(i), "key": "k"})
    await asyncio.sleep(0.3)
    assert push.dropped == 50
    assert push.metrics.registry.get_sample_value("llm_sidecar_loki_lines_dropped_total") == 50

    loki = FakeLoki()
    await aiohttp_server(loki.app(), port=port)
    await wait_for(lambda: len(loki.lines) == 100)
    await push.stop()
    assert [json.loads(line)["n"] for _, line, _ in loki.lines] == list(range(50, 150))


async def test_stop_is_bounded_when_loki_never_answers_and_counts_what_it_could_not_push() -> None:
    connections: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)  # accepted, read from by nobody, never answered

    silent = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    push = pusher(f"http://127.0.0.1:{port}")
    push.start()
    for i in range(3):
        push.push(json.dumps({"n": i}), "info", {"request_id": str(i), "key": "k"})
    await wait_for(lambda: bool(connections))
    # Well under aiohttp's default 300 s; well over the 3 s the final push may take.
    await asyncio.wait_for(push.stop(), 30)
    assert push.dropped == 3
    assert push.metrics.registry.get_sample_value("llm_sidecar_loki_lines_dropped_total") == 3
    silent.close()
    for writer in connections:
        writer.close()
