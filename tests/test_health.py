"""Liveness and readiness answer honestly: /ready is 200 only with a model loaded and no drain."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp.test_utils import TestServer

from llmserve.server.app import build_app
from llmserve.server.app_keys import STATE
from tests.conftest import make_config, synthetic_engine


async def get(server: TestServer, path: str) -> tuple[int, object]:
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url(path)) as response:
            return response.status, await response.json()


async def test_readiness_follows_loading_and_draining(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
):
    engine = synthetic_engine()
    app = build_app(engine, make_config(**{"engine.kind": "synthetic"}))
    server = await aiohttp_server(app)
    state = app[STATE]

    assert await get(server, "/health") == (200, {"status": "ok"})
    assert await get(server, "/ready") == (503, {"status": "loading"})
    status, body = await _post_chat(server)
    assert status == 503 and body["error"]["code"] == "model_loading"

    state.loaded = True
    assert await get(server, "/ready") == (200, {"status": "ready"})
    assert (await _post_chat(server))[0] == 200

    state.draining = True
    assert await get(server, "/ready") == (503, {"status": "draining"})
    assert await get(server, "/health") == (200, {"status": "ok"})
    status, body = await _post_chat(server)
    assert status == 503 and body["error"]["code"] == "server_shutting_down"


async def test_models_names_the_synthetic_engine(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
):
    app = build_app(synthetic_engine(), make_config(**{"engine.kind": "synthetic"}))
    server = await aiohttp_server(app)
    status, body = await get(server, "/v1/models")
    assert status == 200
    assert body["data"][0]["id"] == "synthetic"
    assert body["data"][0]["engine"] == "synthetic"


async def _post_chat(server: TestServer) -> tuple[int, dict[str, object]]:
    body = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/v1/chat/completions"), json=body) as response:
            return response.status, await response.json()
