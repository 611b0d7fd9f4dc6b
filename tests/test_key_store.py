"""API keys in Redis, shared by several servers: changes reach every replica within a second, a
lost notice is caught by the periodic re-read, an unreachable Redis leaves the last keys in force
(and says so), corrupt entries are skipped, and only SHA-256 hashes are ever stored."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from llmserve.server.app_keys import SERVICE, STATE
from llmserve.server.cli import main
from llmserve.server.keys import read_keys
from llmserve.server.keys_redis import CHANNEL, KEYS_HASH, USED_HASH, VERSION, RedisKeyStore
from llmserve.server.state_reporter import StateReporter
from llmserve.shared.client import EventSender
from tests.conftest import (
    Process,
    RedisServer,
    ServerFactory,
    SidecarStack,
    start,
    start_synthetic_server,
    synthetic_engine,
)

# One token at once: an answer takes no time, so a check loop sees a change when it happens.
BODY = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def keys(redis_server: RedisServer, *args: str, capsys: pytest.CaptureFixture[str]) -> str:
    command = ["keys", "--store", "redis", "--redis-url", redis_server.url, *args]
    assert main(command) == 0
    return capsys.readouterr().out.strip()


async def status(base: str, secret: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{base}/v1/chat/completions", json=BODY, headers={"x-api-key": secret}
        ) as r:
            await r.read()
            return r.status


async def within(seconds: float, check: Callable[[], Awaitable[bool]]) -> float:
    """How long `check` took to hold; fails if it did not within `seconds`."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < seconds, f"not within {seconds} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def serve_with(
    serve: ServerFactory, store: RedisKeyStore, events: EventSender | None = None
) -> tuple[TestServer, str]:
    """An in-process server (a replica) that checks keys against `store`, and its base URL."""
    engine = synthetic_engine(completion_tokens="2")
    server = await serve(engine, keys=store, events=events, **{"engine.kind": "synthetic"})
    return server, str(server.make_url("")).rstrip("/")


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Any]:
    connection = aioredis.from_url(redis_server.url)
    yield connection
    await connection.aclose()


@pytest.fixture
async def watched(client: Any) -> AsyncIterator[Callable[..., Awaitable[RedisKeyStore]]]:
    """watched(reload_seconds, full_read_seconds=30) -> a RedisKeyStore kept current as a
    server keeps it."""
    tasks: list[asyncio.Task[None]] = []

    async def make(seconds: float, full_read_seconds: float = 30.0) -> RedisKeyStore:
        store = RedisKeyStore(client, full_read_seconds=full_read_seconds)
        tasks.append(asyncio.create_task(store.watch(seconds)))
        await within(5, lambda: _fresh(store))
        return store

    yield make
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _fresh(store: RedisKeyStore) -> bool:
    return store.stale_seconds() is None


async def test_import_and_export_round_trip_and_redis_holds_only_hashes(
    redis_server: RedisServer, client: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "keys.toml"
    secrets = []
    acme = ["--rpm", "60", "--expires", "30d", "--weight", "3"]
    for name, extra in (("acme", acme), ("globex", [])):
        assert main(["keys", "--file", str(source), "create", name, *extra]) == 0
        secrets.append(capsys.readouterr().out.strip())
    assert main(["keys", "--file", str(source), "rotate", "globex", "--overlap", "1h"]) == 0
    secrets.append(capsys.readouterr().out.strip())

    keys(redis_server, "import", str(source), capsys=capsys)
    stored = await client.hgetall(KEYS_HASH)
    assert sorted(stored) == [b"acme", b"globex"]
    for secret in secrets:
        assert all(secret.encode() not in value for value in stored.values())
    listed = keys(redis_server, "list", capsys=capsys)
    assert "acme: rpm 60" in listed and "previous secret valid until" in listed
    assert "; weight 3;" in listed

    target = tmp_path / "exported.toml"
    keys(redis_server, "export", str(target), capsys=capsys)
    assert oct(target.stat().st_mode & 0o777) == "0o600"
    assert read_keys(target) == read_keys(source)


async def test_a_weight_is_stored_listed_and_changed_on_every_replica_from_the_next_request(
    redis_server: RedisServer,
    client: Any,
    watched: Callable[..., Awaitable[RedisKeyStore]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    secret = keys(redis_server, "create", "acme", "--weight", "2", capsys=capsys)
    keys(redis_server, "create", "globex", capsys=capsys)
    stored = await client.hgetall(KEYS_HASH)
    assert json.loads(stored[b"acme"])["weight"] == 2.0
    # The default is left out, as in the file: entries without weights read as they always did.
    assert "weight" not in json.loads(stored[b"globex"])
    listed = dict(
        line.split(":", 1) for line in keys(redis_server, "list", capsys=capsys).splitlines()
    )
    assert "; weight 2;" in listed["acme"] and "; weight 1;" in listed["globex"]

    stores = [await watched(1.0) for _ in range(2)]
    running = [store.authenticate(secret) for store in stores]
    assert [entry.weight if entry else None for entry in running] == [2.0, 2.0]
    keys(redis_server, "set", "acme", "--weight", "0.25", capsys=capsys)

    async def renewed(store: RedisKeyStore) -> bool:
        entry = store.authenticate(secret)
        return entry is not None and entry.weight == 0.25

    for store in stores:
        await within(5.0, functools.partial(renewed, store))
    # A request already running keeps the entry it started with.
    assert [entry.weight if entry else None for entry in running] == [2.0, 2.0]

    # Refused by the CLI, naming key and field, and the stored weight stays.
    command = ["keys", "--store", "redis", "--redis-url", redis_server.url]
    assert main([*command, "set", "acme", "--weight", "0"]) == 1
    assert "'acme' is not a valid key: weight: Input should be greater than or equal to 0.001" in (
        capsys.readouterr().err
    )
    assert json.loads(await client.hget(KEYS_HASH, "acme"))["weight"] == 0.25


async def test_a_revoke_on_one_replica_is_refused_by_the_others_within_a_second(
    redis_server: RedisServer, processes: list[Process], capsys: pytest.CaptureFixture[str]
) -> None:
    # A long periodic re-read: only the change notice can make it within a second.
    shared = ("--auth-store", "redis", "--auth-redis-url", redis_server.url)
    quiet = ("--auth-reload-seconds", "60", "--sidecar-spawn", "false", "--sidecar-events", "false")
    instant = ("--synthetic-first-token-seconds", "0")
    replicas = [
        (await start_synthetic_server(processes, *shared, *quiet, *instant))[1] for _ in range(3)
    ]
    secret = keys(redis_server, "create", "acme", capsys=capsys)

    async def everywhere(expected: int) -> bool:
        codes = await asyncio.gather(*(status(base, secret) for base in replicas))
        return all(code == expected for code in codes)

    await within(1.0, lambda: everywhere(200))
    keys(redis_server, "revoke", "acme", capsys=capsys)
    await within(1.0, lambda: everywhere(401))


async def test_a_missed_change_notice_is_caught_by_the_periodic_reread(
    redis_server: RedisServer,
    client: Any,
    serve: ServerFactory,
    watched: Callable[..., Awaitable[RedisKeyStore]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    secret = keys(redis_server, "create", "acme", capsys=capsys)
    other = keys(redis_server, "create", "globex", capsys=capsys)
    store = await watched(0.5)
    _, base = await serve_with(serve, store)
    assert await status(base, secret) == 200

    # The subscription is killed just as the key is revoked: the notice goes nowhere.
    assert await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
    keys(redis_server, "revoke", "acme", capsys=capsys)
    await within(2.0, lambda: _refused(base, secret))

    # With the subscription back, a key deleted by hand, announced only by the version, goes.
    await within(5.0, lambda: _subscribed(client))
    assert await status(base, other) == 200
    await client.hdel(KEYS_HASH, "globex")
    await client.incr(VERSION)
    await within(2.0, lambda: _refused(base, other))


async def test_a_hand_edit_without_version_or_notice_is_caught_by_the_full_reread(
    redis_server: RedisServer,
    client: Any,
    serve: ServerFactory,
    watched: Callable[..., Awaitable[RedisKeyStore]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    secret = keys(redis_server, "create", "acme", capsys=capsys)
    store = await watched(0.2, full_read_seconds=1.0)
    _, base = await serve_with(serve, store)
    assert await status(base, secret) == 200
    await client.hdel(KEYS_HASH, "acme")
    await within(3.0, lambda: _refused(base, secret))


async def _refused(base: str, secret: str) -> bool:
    return await status(base, secret) == 401


async def _subscribed(client: Any) -> bool:
    counts = await client.pubsub_numsub(CHANNEL)
    return bool(counts and counts[0][1] >= 1)


async def test_redis_paused_leaves_the_last_keys_in_force_and_says_so(
    redis_server: RedisServer,
    serve: ServerFactory,
    sidecar_stack: SidecarStack,
    watched: Callable[..., Awaitable[RedisKeyStore]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    secret = keys(redis_server, "create", "acme", capsys=capsys)
    store = await watched(0.2)
    events = sidecar_stack.sender()
    server, base = await serve_with(serve, store, events)
    service = server.app[SERVICE]
    reporter = StateReporter(events, service.engine, service.gate, server.app[STATE])
    assert redis_server.process is not None

    async def ready() -> dict[str, Any]:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/ready") as r:
                assert r.status == 200
                body: dict[str, Any] = await r.json()
                return body

    async def stale_metric(expected: float) -> bool:
        reporter.report()
        samples = await sidecar_stack.samples()
        return samples.get(("llm_keys_store_stale", ()), -1) == expected

    assert await ready() == {"status": "ready"}
    await within(5.0, lambda: stale_metric(0))
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        await within(10.0, lambda: _stale(store))
        body = await ready()
        assert body["status"] == "ready" and body["keys_stale_seconds"] >= 0
        await within(5.0, lambda: stale_metric(1))
        # The request path does not wait on Redis: the known key works, an unknown one does not.
        assert await status(base, secret) == 200
        assert await status(base, "sk-not-a-key") == 401
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    await within(10.0, lambda: _fresh(store))
    assert await ready() == {"status": "ready"}
    await within(5.0, lambda: stale_metric(0))
    events.close()


async def _stale(store: RedisKeyStore) -> bool:
    return store.stale_seconds() is not None


async def test_corrupt_entries_are_logged_and_skipped(
    redis_server: RedisServer,
    client: Any,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = keys(redis_server, "create", "acme", capsys=capsys)
    good = (await client.hget(KEYS_HASH, "acme")).decode()
    await client.hset(
        KEYS_HASH,
        mapping={
            b"caf\xe9": good.replace('"acme"', '"caf"'),
            "huge": '{"name": "huge", "sha256": "' + "a" * 300_000 + '"}',
            "garbage": b"\xff\xfe not json",
            "other": good,
            "leaky": good.replace('"acme"', '"leaky"').replace("}", ', "secret": "sk-LEAK"}'),
        },
    )
    store = RedisKeyStore(client)
    with caplog.at_level(logging.ERROR, logger="llmserve.keys"):
        assert await store.refresh()
    assert len(store) == 1
    assert store.authenticate(secret) is not None
    logged = caplog.text
    for name in ("caf\\xe9", "huge", "garbage", "other", "leaky"):
        assert f"skipping key b'{name}'" in logged
    assert "sk-LEAK" not in logged and "a" * 100 not in logged
    # The CLI lists what is valid and still manages the key beside the corrupt ones.
    assert keys(redis_server, "list", capsys=capsys).startswith("acme:")
    keys(redis_server, "revoke", "acme", capsys=capsys)


async def test_an_entry_with_a_bad_weight_is_logged_naming_key_and_field_and_skipped(
    redis_server: RedisServer,
    client: Any,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = keys(redis_server, "create", "acme", capsys=capsys)
    good = json.loads(await client.hget(KEYS_HASH, "acme"))
    bad = {
        "zero": ("0", "greater than or equal to 0.001"),
        "negative": ("-1.5", "greater than or equal to 0.001"),
        "huge": ("1e6", "less than or equal to 1000"),
        "nan": ("NaN", "a finite number"),
        "inf": ("Infinity", "a finite number"),
        "overflow": ("1e400", "a finite number"),
        "boolean": ("true", "a valid number"),
        "string": ('"2"', "a valid number"),
        "null": ("null", "a valid number"),
    }
    # Written by hand, as JSON text: json.dumps would not write NaN or 1e400 as given.
    await client.hset(
        KEYS_HASH,
        mapping={
            name: json.dumps({**good, "name": name})[:-1] + f', "weight": {value}}}'
            for name, (value, _) in bad.items()
        },
    )
    store = RedisKeyStore(client)
    with caplog.at_level(logging.ERROR, logger="llmserve.keys"):
        assert await store.refresh()
    assert len(store) == 1
    assert store.authenticate(secret) is not None
    for name, (_, reason) in bad.items():
        assert f"skipping key b'{name}' in Redis {KEYS_HASH}: weight: Input should be {reason}" in (
            caplog.text
        )
    assert keys(redis_server, "list", capsys=capsys).startswith("acme:")


async def test_last_use_is_recorded_coarsely_and_listed(
    redis_server: RedisServer, client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = keys(redis_server, "create", "acme", "--expires", "30d", capsys=capsys)
    keys(redis_server, "create", "idle", capsys=capsys)
    store = RedisKeyStore(client)
    assert await store.refresh()
    for _ in range(50):
        assert store.authenticate(secret) is not None
    # No write per request: nothing reaches Redis until the periodic write.
    assert await client.hgetall(USED_HASH) == {}
    await store.record_usage(now=True)
    used = await client.hgetall(USED_HASH)
    assert list(used) == [b"acme"]
    assert re.fullmatch(rb"\d{4}-\d\d-\d\dT\d\d:\d\d\+00:00", used[b"acme"])
    listed = dict(
        line.split(":", 1) for line in keys(redis_server, "list", capsys=capsys).splitlines()
    )
    assert f"last used {used[b'acme'].decode()}" in listed["acme"]
    assert "created 20" in listed["acme"] and "expires 20" in listed["acme"]
    assert "last used never" in listed["idle"] and "expires never" in listed["idle"]


async def test_a_redis_store_without_a_url_stops_startup_naming_the_fields(
    processes: list[Process],
) -> None:
    server = await start(
        "serve", "--port", "0", "--auth-store", "redis", "--sidecar-spawn", "false"
    )
    processes.append(server)
    assert await server.finish() == 1
    assert "auth.redis_url (or ratelimit.redis_url)" in "".join(server.log)


async def test_keys_names_that_are_not_utf8_are_refused_in_redis_too(
    redis_server: RedisServer, client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    command = ["keys", "--store", "redis", "--redis-url", redis_server.url, "create", "\udcff"]
    assert main(command) == 1
    assert "not a valid key" in capsys.readouterr().err
    assert await client.hgetall(KEYS_HASH) == {}


@pytest.mark.parametrize(
    "header",
    [b"x-api-key: sk-\xff\xfe", b"Authorization: Bearer \xc3\x28sk", b"x-api-key: \xe2\x82"],
)
async def test_secrets_that_are_not_utf8_get_a_401(
    redis_server: RedisServer,
    serve: ServerFactory,
    watched: Callable[..., Awaitable[RedisKeyStore]],
    capsys: pytest.CaptureFixture[str],
    header: bytes,
) -> None:
    keys(redis_server, "create", "acme", capsys=capsys)
    store = await watched(1.0)
    server, _ = await serve_with(serve, store)
    reader, writer = await asyncio.open_connection(server.host, server.port)
    payload = b'{"model": "synthetic", "messages": [{"role": "user", "content": "hi"}]}'
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + header
        + f"\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
        + payload
    )
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert b'"code": "invalid_api_key"' in answer or b'"code":"invalid_api_key"' in answer


async def test_an_expired_key_in_redis_is_refused_on_every_replica_saying_so(
    redis_server: RedisServer,
    serve: ServerFactory,
    watched: Callable[..., Awaitable[RedisKeyStore]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    secret = keys(redis_server, "create", "acme", "--expires", "1d", capsys=capsys)
    stores = [await watched(1.0) for _ in range(2)]
    bases = [(await serve_with(serve, store))[1] for store in stores]
    assert [await status(base, secret) for base in bases] == [200, 200]
    keys(redis_server, "set", "acme", "--expires", "now", capsys=capsys)
    for base in bases:
        await within(1.0, lambda b=base: _refused(b, secret))  # type: ignore[misc]
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{base}/v1/chat/completions", json=BODY, headers={"x-api-key": secret}
            ) as r:
                error = (await r.json())["error"]
        assert error["code"] == "expired_api_key" and "expired at" in error["message"]


def test_keys_commands_with_redis_unreachable_say_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"redis://:hunter2@127.0.0.1:{probe.getsockname()[1]}/0"
        assert main(["keys", "--store", "redis", "--redis-url", url, "list"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("llmserve keys: Redis: ConnectionError")
    assert "Traceback" not in error and "hunter2" not in error


async def test_a_server_that_cannot_reach_its_key_store_at_startup_takes_no_key(
    processes: list[Process],
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"redis://:hunter2@127.0.0.1:{probe.getsockname()[1]}/0"
        server, base = await start_synthetic_server(
            processes,
            *("--auth-store", "redis", "--auth-redis-url", url),
            *("--sidecar-spawn", "false", "--sidecar-events", "false"),
        )
        await server.wait_for_line("cannot read the API keys from Redis")
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/ready") as r:
                body = await r.json()
        assert r.status == 200 and body["keys_stale_seconds"] >= 0
        assert await status(base, "sk-anything") == 401
    assert not any("hunter2" in line for line in server.log)
