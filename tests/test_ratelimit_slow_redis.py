"""The limiter's books under a slow, stalled, restarted or failing Redis.

Whatever Redis does, every request the limiter was asked about ends with no concurrency lease
left behind and its charge refunded down to what it used: a request Redis never answered in time
is charged nothing, even if Redis runs its admit later. The books are read straight from Redis.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis
from aiohttp.test_utils import TestServer
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from server.app_keys import SERVICE
from server.keys import KeyEntry, KeyStore, hash_secret
from server.ratelimit import Limiter
from server.ratelimit.redis_limiter import RedisLimiter, connect
from tests.conftest import RedisServer, ServerFactory, synthetic_engine
from tests.test_ratelimit import SECRET, keys_file, post

# 100,000 tokens a day refill at 1.16 a second: a reservation left unrefunded stays visible.
TPD = 100_000
# Refill over the slowest test, well under any reservation these tests make.
SLACK = 100
KEY = KeyEntry.model_validate(
    {"name": "acme", "sha256": hash_secret(SECRET), "concurrency": 1, "tpd": TPD}
)


async def eventually(check: Callable[[], Awaitable[bool] | bool], seconds: float = 15.0) -> bool:
    """Whether `check` holds within `seconds` (generous: the machine may be loaded)."""
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result or time.monotonic() > deadline:
            return bool(result)
        await asyncio.sleep(0.05)


class Books:
    """What Redis holds for the key `acme`: its leases and its daily token level."""

    def __init__(self, url: str) -> None:
        # Its connection may die with a restarted Redis: the next command reconnects.
        self.admin = redis.from_url(
            url, retry=Retry(NoBackoff(), 3), retry_on_error=[redis.ConnectionError]
        )

    async def leases(self) -> list[bytes]:
        members = await self.admin.zrange("llmserve:rl:{acme}:leases", 0, -1)
        return [m for m in members if isinstance(m, bytes)]

    async def tokens_left(self) -> float:
        level, ts = await self.admin.hmget("llmserve:rl:{acme}:tpd", ["level", "ts"])
        if level is None or ts is None:
            return float(TPD)
        elapsed_ms = await self.now_ms() - int(ts)
        return min(float(TPD), float(level) + elapsed_ms * TPD / 86_400_000)

    async def now_ms(self) -> int:
        seconds, micros = await self.admin.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def leases_are(self, *expected: bytes) -> bool:
        return await self.leases() == list(expected)

    async def balanced(self, spent: int) -> bool:
        """No lease held and exactly `spent` tokens charged (give or take the refill)."""
        left = await self.tokens_left()
        return not await self.leases() and TPD - spent - 1 <= left <= TPD - spent + SLACK


@pytest.fixture
async def books(redis_server: RedisServer) -> AsyncIterator[Books]:
    books = Books(redis_server.url)
    yield books
    await books.admin.aclose()


@pytest.fixture
def stalled(redis_server: RedisServer) -> Iterator[Callable[[bool], None]]:
    """stalled(True) freezes redis-server: it still accepts and buffers, and runs it all later."""
    process = redis_server.process
    assert process is not None

    def stall(on: bool) -> None:
        process.send_signal(signal.SIGSTOP if on else signal.SIGCONT)

    yield stall
    stall(False)


def slow_redis_limiter(redis_server: RedisServer, lease_seconds: float = 30.0) -> RedisLimiter:
    return RedisLimiter(
        connect("single", redis_server.url, None),
        timeout_seconds=0.25,
        lease_seconds=lease_seconds,
    )


async def limited_server(
    serve: ServerFactory,
    directory: str,
    limiter: Limiter,
    policy: str = "fail_open",
    **engine: str,
) -> TestServer:
    settings = {"first_token_seconds": "0", "token_interval_seconds": "0.01", **engine}
    return await serve(
        synthetic_engine(**settings),
        keys=KeyStore(keys_file(directory, concurrency=1, tpd=TPD)),
        limiter=limiter,
        **{"engine.kind": "synthetic", "ratelimit.failure_policy": policy},
    )


def used_tokens(body: Any) -> int:
    return int(body["usage"]["total_tokens"])


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
async def test_an_admit_that_redis_runs_late_is_undone(
    serve: ServerFactory,
    short_tmp: str,
    redis_server: RedisServer,
    books: Books,
    stalled: Callable[[bool], None],
    policy: str,
) -> None:
    server = await limited_server(serve, short_tmp, slow_redis_limiter(redis_server), policy)
    status, _, body = await post(server)
    assert status == 200
    spent = used_tokens(body)
    assert await eventually(books.leases_are)  # its lease ended, so Redis is quiet
    # Frozen, Redis takes the admit into its socket buffer and runs it once it wakes, long after
    # the request stopped waiting for it (CLIENT PAUSE would drop it with its closed connection).
    stalled(True)
    try:
        status, _, body = await post(server, max_tokens=5000)
    finally:
        stalled(False)
    assert server.app[SERVICE].limits.backend_errors == 1
    if policy == "fail_open":
        assert status == 200
    else:
        assert status == 503 and body["error"]["code"] == "rate_limiter_unavailable"
    # The request went through unchecked (or not at all): it is charged nothing and holds no
    # lease, so the key's single slot is free again.
    assert await eventually(lambda: books.balanced(spent)), (
        await books.leases(),
        await books.tokens_left(),
    )
    assert (await post(server))[0] == 200


async def test_a_finish_during_client_pause_is_settled_after_it(
    serve: ServerFactory, short_tmp: str, redis_server: RedisServer, books: Books
) -> None:
    server = await limited_server(serve, short_tmp, slow_redis_limiter(redis_server))
    limits = server.app[SERVICE].limits
    body = {
        "model": "synthetic",
        "prompt": "hi",
        "max_tokens": 5000,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with aiohttp.ClientSession() as session:
        async with session.post(
            server.make_url("/v1/completions"),
            json=body,
            headers={"Authorization": f"Bearer {SECRET}"},
        ) as response:
            assert response.status == 200
            await response.content.readuntil(b"data: ")
            await books.admin.client_pause(600_000, all=False)
            try:
                stream = await response.read()
                # The stream has ended and its reconciliation has given up on the paused Redis.
                assert await eventually(lambda: limits.backend_errors >= 1)
                assert len(await books.leases()) == 1
            finally:
                await books.admin.client_unpause()
    usage = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith(b"data: {")]
    spent = used_tokens(usage[-1])
    assert await eventually(lambda: books.balanced(spent)), (
        await books.leases(),
        await books.tokens_left(),
    )
    assert (await post(server))[0] == 200


async def test_an_admit_cancelled_in_flight_is_undone(
    redis_server: RedisServer, books: Books, stalled: Callable[[bool], None]
) -> None:
    limiter = RedisLimiter(
        connect("single", redis_server.url, None), timeout_seconds=30, lease_seconds=30
    )
    warm_up = await limiter.admit(KEY, 1)
    assert warm_up.reservation is not None
    # The script is loaded and a connection pooled: the admit below is written at once.
    await limiter.finish(warm_up.reservation, 1)
    stalled(True)
    try:
        admit = asyncio.create_task(limiter.admit(KEY, 5000))
        await asyncio.sleep(0.5)
        admit.cancel()
        with pytest.raises(asyncio.CancelledError):
            await admit
    finally:
        stalled(False)
    assert await eventually(lambda: books.balanced(1)), (
        await books.leases(),
        await books.tokens_left(),
    )
    assert (await limiter.admit(KEY, 1)).allowed
    await limiter.close()


async def test_a_stream_outliving_its_lease_keeps_its_slot_across_a_redis_restart(
    serve: ServerFactory, short_tmp: str, redis_server: RedisServer, books: Books
) -> None:
    # Leases of 3 s renewed every second; the stream would run for over a minute.
    limiter = slow_redis_limiter(redis_server, lease_seconds=3)
    server = await limited_server(serve, short_tmp, limiter, completion_tokens="8000")
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            server.make_url("/v1/completions"),
            json={"model": "synthetic", "prompt": "hi", "max_tokens": 8000, "stream": True},
            headers={"Authorization": f"Bearer {SECRET}"},
        )
        assert response.status == 200
        await response.content.readuntil(b"data: ")
        (lease,) = await books.leases()
        first_expiry = await books.admin.zscore("llmserve:rl:{acme}:leases", lease)
        assert first_expiry is not None

        async def past_first_expiry() -> bool:
            return await books.now_ms() > first_expiry + 500

        assert await eventually(past_first_expiry)
        assert await books.leases() == [lease]
        assert (await post(server))[0] == 429

        # A restarted Redis has forgotten the lease; the next renewal puts it back.
        redis_server.stop()
        redis_server.start()
        assert await eventually(lambda: books.leases_are(lease))
        assert (await post(server))[0] == 429
        response.close()
    assert await eventually(books.leases_are)
    assert (await post(server))[0] == 200
