"""Shared fixtures: the real bundled model, loaded once, and servers on free loopback ports."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from llmserve.server.app import build_app
from llmserve.server.app_keys import STATE
from llmserve.server.config import Config, load_config
from llmserve.server.engines import create_engine
from llmserve.server.engines.base import Engine
from llmserve.server.keys import KeyTable
from llmserve.server.ratelimit import Limiter
from llmserve.shared.client import EventSender
from llmserve.sidecar.app import build_sidecar_app
from llmserve.sidecar.ingest import open_event_socket
from llmserve.sidecar.metrics import Metrics
from llmserve.sidecar.recorder import Recorder
from llmserve.sidecar.stats import RollingStats

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

    async def start(
        engine: Engine,
        *,
        events: EventSender | None = None,
        keys: KeyTable | None = None,
        limiter: Limiter | None = None,
        **overrides: str,
    ) -> TestServer:
        app: web.Application = build_app(
            engine, make_config(**overrides), events=events, keys=keys, limiter=limiter
        )
        app[STATE].loaded = True
        return await aiohttp_server(app)

    yield start


@pytest.fixture
async def llama_server(serve: ServerFactory, llama_engine: Engine) -> TestServer:
    return await serve(llama_engine)


def synthetic_engine(**settings: str) -> Engine:
    overrides = {"engine.kind": "synthetic", **{f"synthetic.{k}": v for k, v in settings.items()}}
    return create_engine(make_config(**overrides))


ExLlamaV2Factory = Callable[..., Awaitable[Engine]]


@pytest.fixture
async def exllamav2_double(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AsyncIterator[ExLlamaV2Factory]:
    """exllamav2_double(script=None, context=1024, **exllamav2_settings) -> a loaded ExLlamaV2
    engine over tests/exllamav2_double, the stand-in for the GPU library (no GPU here)."""
    from tests import exllamav2_double as double
    from tests.exllamav2_double.model_dir import write_model_dir

    double.install(monkeypatch)
    engines: list[Engine] = []

    async def make(*, script: str | None = None, context: int = 1024, **settings: object) -> Engine:
        model_dir = write_model_dir(
            tmp_path / f"model{len(engines)}", script=script, context=context
        )
        overrides = {f"exllamav2.{name}": str(value) for name, value in settings.items()}
        config = make_config(
            **{"engine.kind": "exllamav2", "exllamav2.model_dir": str(model_dir), **overrides}
        )
        engine = create_engine(config)
        engines.append(engine)
        await engine.load()
        return engine

    yield make
    for engine in engines:
        await engine.close()


@pytest.fixture
def model_id(llama_engine: Engine) -> str:
    return llama_engine.info.model_id


@pytest.fixture
def short_tmp() -> Iterator[str]:
    """A temp dir with a short path: Unix socket paths must fit in 108 bytes."""
    path = tempfile.mkdtemp(prefix="llms-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class SidecarStack:
    """The sidecar's parts running in the test's event loop, on a private socket."""

    recorder: Recorder
    http: TestServer
    socket_path: str
    finished: list[dict[str, Any]] = field(default_factory=list)

    def sender(self, max_buffered: int = 100_000) -> EventSender:
        return EventSender(self.socket_path, max_buffered=max_buffered)

    async def wait_finished(self, count: int, seconds: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + seconds
        while len(self.finished) < count:
            assert asyncio.get_running_loop().time() < deadline, (
                f"sidecar saw {len(self.finished)} of {count} requests finish"
            )
            await asyncio.sleep(0.01)

    async def metrics_text(self) -> str:
        async with aiohttp.ClientSession() as session:
            async with session.get(self.http.make_url("/metrics")) as response:
                return await response.text()

    async def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = await self.metrics_text()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


@pytest.fixture
async def sidecar_stack(
    aiohttp_server: Callable[..., Awaitable[TestServer]], short_tmp: str
) -> AsyncIterator[SidecarStack]:
    finished: list[dict[str, Any]] = []
    recorder = Recorder(Metrics(), RollingStats(), finished.append, max_keys=100)
    path = f"{short_tmp}/events.sock"
    transport = await open_event_socket(path, recorder)
    http = await aiohttp_server(build_sidecar_app(recorder))
    yield SidecarStack(recorder, http, path, finished)
    transport.close()


LLMSERVE = [sys.executable, "-m", "llmserve.server.cli"]


class Process:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.log: list[str] = []

    async def wait_for_line(
        self, pattern: str, seconds: float = 60, occurrence: int = 1
    ) -> re.Match[str]:
        """The `occurrence`-th log line matching `pattern`, waiting for it if need be."""

        async def scan() -> re.Match[str]:
            found = 0
            index = 0
            while True:
                while index < len(self.log):
                    if match := re.search(pattern, self.log[index]):
                        found += 1
                        if found == occurrence:
                            return match
                    index += 1
                assert self.proc.stderr is not None
                raw = await self.proc.stderr.readline()
                if not raw:
                    raise AssertionError(f"exited before logging {pattern!r}:\n{''.join(self.log)}")
                self.log.append(raw.decode())

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


async def start_synthetic_server(processes: list[Process], *args: str) -> tuple[Process, str]:
    """`llmserve serve` with the synthetic engine on a free port; returns it and its base URL."""
    server = await start("serve", "--port", "0", "--engine", "synthetic", *args)
    processes.append(server)
    port = (await server.wait_for_line(r"listening on http://127\.0\.0\.1:(\d+)"))[1]
    await server.wait_for_line("ready: ")
    return server, f"http://127.0.0.1:{port}"


def free_port() -> int:
    """A loopback port free right now (a process started next may bind it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    port: int
    directory: str
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is missing: scripts/setup --test installs it"
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.directory,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(200):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.01)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture
def redis_server(short_tmp: str) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, for this test only."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = RedisServer(port, short_tmp)
    server.start()
    yield server
    server.stop()
