"""Shared fixtures: the real bundled model, loaded once, and servers on free loopback ports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from server.app import build_app
from server.app_keys import STATE
from server.config import Config, load_config
from server.engines import create_engine
from server.engines.base import Engine

ServerFactory = Callable[..., Awaitable[TestServer]]

# Small enough that the context-overflow cases stay cheap; 8 sequences for the concurrency test.
LLAMA_SETTINGS = {"llamacpp.context_per_sequence": "512", "llamacpp.parallel": "8"}


def make_config(**overrides: str) -> Config:
    return load_config(environ={}, overrides={**LLAMA_SETTINGS, **overrides})


@pytest.fixture(scope="session")
def llama_engine() -> Iterator[Engine]:
    engine = create_engine(make_config())
    asyncio.run(engine.load())
    yield engine
    asyncio.run(engine.close())


@pytest.fixture
async def serve(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> AsyncIterator[ServerFactory]:
    """serve(engine, **config_overrides) -> a running TestServer with that engine loaded."""

    async def start(engine: Engine, **overrides: str) -> TestServer:
        app: web.Application = build_app(engine, make_config(**overrides))
        app[STATE].loaded = True
        return await aiohttp_server(app)

    yield start


@pytest.fixture
async def llama_server(serve: ServerFactory, llama_engine: Engine) -> TestServer:
    return await serve(llama_engine)


def synthetic_engine(**settings: str) -> Engine:
    overrides = {"engine.kind": "synthetic", **{f"synthetic.{k}": v for k, v in settings.items()}}
    return create_engine(make_config(**overrides))


@pytest.fixture
def model_id(llama_engine: Engine) -> str:
    return llama_engine.info.model_id
