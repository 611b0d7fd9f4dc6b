"""Per-key limits, in memory and in a real Redis shared by several servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from llmserve.server.keys import KeyEntry, KeyStore, hash_secret, write_keys
from llmserve.server.ratelimit import Limiter, MemoryLimiter
from llmserve.server.ratelimit.redis_limiter import RedisLimiter, connect
from tests.conftest import (
    Process,
    RedisServer,
    ServerFactory,
    SidecarStack,
    start_synthetic_server,
    synthetic_engine,
)

SECRET = "sk-test-secret-for-limits"


def keys_file(directory: str, **limits: Any) -> Path:
    path = Path(directory) / "keys.toml"
    write_keys(path, {"acme": KeyEntry(name="acme", sha256=hash_secret(SECRET), **limits)})
    return path


def redis_limiter(redis: RedisServer, lease_seconds: float = 30.0) -> RedisLimiter:
    return RedisLimiter(
        connect("single", redis.url, None), timeout_seconds=0.5, lease_seconds=lease_seconds
    )


@pytest.fixture(params=["memory", "redis"])
def limiter_factory(request: pytest.FixtureRequest) -> Iterator[Callable[[], Limiter]]:
    if request.param == "memory":
        yield MemoryLimiter
        return
    redis = request.getfixturevalue("redis_server")
    yield lambda: redis_limiter(redis)


async def limited_server(
    serve: ServerFactory, directory: str, limiter: Limiter, **limits: Any
) -> TestServer:
    engine = synthetic_engine(
        first_token_seconds="0", token_interval_seconds="0.01", completion_tokens="30"
    )
    return await serve(
        engine,
        keys=KeyStore(keys_file(directory, **limits)),
        limiter=limiter,
        **{"engine.kind": "synthetic"},
    )


async def post(
    server: TestServer, *, stream: bool = False, max_tokens: int = 3, secret: str = SECRET
) -> tuple[int, CIMultiDict[str], Any]:
    body = {"model": "synthetic", "prompt": "hi", "max_tokens": max_tokens, "stream": stream}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            server.make_url("/v1/completions"),
            json=body,
            headers={"Authorization": f"Bearer {secret}"},
        ) as r:
            payload = await (r.read() if stream else r.json())
            return r.status, r.headers.copy(), payload


async def test_requests_per_minute_admit_exactly_the_limit(
    serve: ServerFactory, short_tmp: str, limiter_factory: Callable[[], Limiter]
):
    server = await limited_server(serve, short_tmp, limiter_factory(), rpm=5)
    results = await asyncio.gather(*(post(server) for _ in range(8)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] * 5 + [429] * 3
    ok_headers = next(h for s, h, _ in results if s == 200)
    assert ok_headers["x-ratelimit-limit-requests"] == "5"
    assert int(ok_headers["x-ratelimit-remaining-requests"]) in range(5)
    _, headers, error = next(r for r in results if r[0] == 429)
    assert error["error"]["code"] == "rate_limit_exceeded"
    assert error["error"]["type"] == "requests"
    assert "acme" in error["error"]["message"] and SECRET not in str(error)
    # One request comes back every 12 s at 5 per minute.
    assert 1 <= int(headers["retry-after"]) <= 12
    assert 0 < int(headers["retry-after-ms"]) <= 12_000
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s")


async def test_a_retry_after_retry_after_is_admitted(
    serve: ServerFactory, short_tmp: str, limiter_factory: Callable[[], Limiter]
):
    server = await limited_server(serve, short_tmp, limiter_factory(), rpm=60)
    # More than the bucket holds; on a slow machine it may refill a request or two meanwhile.
    results = await asyncio.gather(*(post(server) for _ in range(70)))
    refused = [h for s, h, _ in results if s == 429]
    assert refused
    await asyncio.sleep(max(int(h["retry-after-ms"]) for h in refused) / 1000)
    assert (await post(server))[0] == 200


async def test_tokens_cannot_overshoot(
    serve: ServerFactory, short_tmp: str, limiter_factory: Callable[[], Limiter]
):
    # Each request reserves 1 prompt token + 3099 = 3100: two fit in 6200 per minute.
    server = await limited_server(serve, short_tmp, limiter_factory(), tpm=6200)
    results = await asyncio.gather(*(post(server, max_tokens=3099) for _ in range(3)))
    assert sorted(s for s, _, _ in results) == [200, 200, 429]
    refused = next(r for r in results if r[0] == 429)
    assert refused[2]["error"]["type"] == "tokens"
    assert refused[1]["x-ratelimit-limit-tokens"] == "6200"


async def test_a_cancelled_request_gets_its_reservation_back(
    serve: ServerFactory, short_tmp: str, limiter_factory: Callable[[], Limiter]
):
    # One stream reserves 6001 of 6200 tokens. Cancelled after its first token, it gives back
    # the 5999 it did not use, so the same request fits again at once; the bucket alone would
    # need almost a minute to refill that much.
    server = await limited_server(serve, short_tmp, limiter_factory(), tpm=6200)
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            server.make_url("/v1/completions"),
            json={"model": "synthetic", "prompt": "hi", "max_tokens": 6000, "stream": True},
            headers={"Authorization": f"Bearer {SECRET}"},
        )
        assert response.status == 200
        assert int(response.headers["x-ratelimit-remaining-tokens"]) < 300
        await response.content.readuntil(b'"text":"lorem')
        response.close()
    deadline = time.monotonic() + 2
    while (await post(server, max_tokens=6000))[0] != 200:
        assert time.monotonic() < deadline, "the cancelled reservation was not refunded"
        await asyncio.sleep(0.05)


async def test_a_request_larger_than_the_budget_is_refused_for_good(
    serve: ServerFactory, short_tmp: str
):
    server = await limited_server(serve, short_tmp, MemoryLimiter(), tpm=20, tpd=1000)
    status, _, error = await post(server, max_tokens=25)
    assert status == 429 and "Lower max_tokens" in error["error"]["message"]


async def test_daily_quota_is_insufficient_quota(serve: ServerFactory, short_tmp: str):
    server = await limited_server(serve, short_tmp, MemoryLimiter(), tpd=10)
    assert (await post(server, max_tokens=5))[0] == 200
    status, _, error = await post(server, max_tokens=8)
    assert status == 429
    assert error["error"]["code"] == "insufficient_quota"


async def test_concurrency_limit_refuses_the_third_stream(
    serve: ServerFactory, short_tmp: str, limiter_factory: Callable[[], Limiter]
):
    server = await limited_server(serve, short_tmp, limiter_factory(), concurrency=2)
    first, second = (asyncio.create_task(post(server, stream=True, max_tokens=30)) for _ in "ab")
    await asyncio.sleep(0.1)
    status, _, error = await post(server)
    assert status == 429 and "at once" in error["error"]["message"]
    assert [(await first)[0], (await second)[0]] == [200, 200]
    assert (await post(server))[0] == 200


async def test_requests_per_day_hold_beside_requests_per_minute(
    serve: ServerFactory, short_tmp: str, limiter_factory: Callable[[], Limiter]
) -> None:
    server = await limited_server(serve, short_tmp, limiter_factory(), rpm=60, rpd=3)
    results = [await post(server) for _ in range(4)]
    assert [status for status, _, _ in results] == [200, 200, 200, 429]
    # OpenAI names headers for requests per minute and none for per day: the requests
    # headers stay the minute's, whichever limit refused.
    assert results[0][1]["x-ratelimit-limit-requests"] == "60"
    assert results[0][1]["x-ratelimit-remaining-requests"] == "59"
    _, headers, error = results[3]
    assert error["error"]["code"] == error["error"]["type"] == "insufficient_quota"
    assert "requests per day on key 'acme': limit 3" in error["error"]["message"]
    assert headers["x-ratelimit-limit-requests"] == "60"
    assert not [h for h in headers if h.startswith("x-ratelimit") and "day" in h]
    # A day's bucket of 3 gives one request back every 8 hours.
    assert 8 * 3600 - 60 <= int(headers["retry-after"]) <= 8 * 3600


async def test_a_token_limit_does_not_take_a_place_of_the_concurrency_limit(
    serve: ServerFactory, short_tmp: str, limiter_factory: Callable[[], Limiter]
) -> None:
    server = await limited_server(serve, short_tmp, limiter_factory(), concurrency=2, tpm=100_000)
    body = {"model": "synthetic", "prompt": "hi", "max_tokens": 30, "stream": True}
    headers = {"Authorization": f"Bearer {SECRET}"}
    async with aiohttp.ClientSession() as session:
        # The first stream holds its place and its tokens while the second asks for both.
        async with session.post(
            server.make_url("/v1/completions"), json=body, headers=headers
        ) as first:
            assert first.status == 200
            await first.content.readuntil(b'"text":"lorem')
            assert (await post(server))[0] == 200
            await first.read()


async def test_leases_of_a_dead_server_lapse(redis_server: RedisServer):
    key = KeyEntry(name="acme", sha256=hash_secret(SECRET), concurrency=1)
    crashed = redis_limiter(redis_server, lease_seconds=3)
    assert (await crashed.admit(key, 1)).allowed
    # The "crashed" server never finishes or renews its lease.
    crashed._held.clear()
    survivor = redis_limiter(redis_server, lease_seconds=3)
    assert not (await survivor.admit(key, 1)).allowed
    await asyncio.sleep(3.2)
    assert (await survivor.admit(key, 1)).allowed
    await crashed.close()
    await survivor.close()


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
async def test_redis_down_follows_the_policy_and_recovers(
    serve: ServerFactory, short_tmp: str, redis_server: RedisServer, policy: str
):
    engine = synthetic_engine(first_token_seconds="0", completion_tokens="2")
    server = await serve(
        engine,
        keys=KeyStore(keys_file(short_tmp, rpm=3)),
        limiter=redis_limiter(redis_server),
        **{"engine.kind": "synthetic", "ratelimit.failure_policy": policy},
    )
    assert [(await post(server))[0] for _ in range(4)] == [200, 200, 200, 429]
    redis_server.stop()
    status, headers, body = await post(server)
    if policy == "fail_open":
        assert status == 200
    else:
        assert status == 503 and body["error"]["code"] == "rate_limiter_unavailable"
        assert headers["Retry-After"] == "1"
    redis_server.start()
    # A fresh Redis holds no history: three more fit, then the limit holds again.
    for _ in range(50):
        if (await post(server))[0] == 200:
            break
        await asyncio.sleep(0.1)
    assert [(await post(server))[0] for _ in range(3)] == [200, 200, 429]


async def test_openai_client_gets_rate_limit_errors_and_retries(
    serve: ServerFactory, short_tmp: str
):
    server = await limited_server(serve, short_tmp, MemoryLimiter(), rpm=60)
    base = str(server.make_url("/v1"))
    async with openai.AsyncOpenAI(base_url=base, api_key=SECRET, max_retries=0) as client:
        for _ in range(60):
            await client.completions.create(model="synthetic", prompt="hi", max_tokens=1)
        with pytest.raises(openai.RateLimitError) as caught:
            await client.completions.create(model="synthetic", prompt="hi", max_tokens=1)
    headers = caught.value.response.headers
    assert headers["x-ratelimit-limit-requests"] == "60"
    assert int(headers["retry-after-ms"]) <= 1000
    async with openai.AsyncOpenAI(base_url=base, api_key=SECRET, max_retries=2) as patient:
        started = time.monotonic()
        done = await patient.completions.create(model="synthetic", prompt="hi", max_tokens=1)
    assert done.choices and time.monotonic() - started < 5


async def test_replicas_sharing_redis_admit_the_limit_in_total(
    short_tmp: str, redis_server: RedisServer, processes: list[Process]
):
    path = keys_file(short_tmp, rpm=10)
    replicas = await asyncio.gather(
        *(
            start_synthetic_server(
                processes,
                *("--auth-keys-file", str(path), "--ratelimit-redis-url", redis_server.url),
                *("--sidecar-spawn", "false", "--sidecar-events", "false"),
                *("--synthetic-completion-tokens", "2"),
            )
            for _ in range(4)
        )
    )
    body = {"model": "synthetic", "prompt": "hi", "max_tokens": 2}
    auth = {"Authorization": f"Bearer {SECRET}"}
    async with aiohttp.ClientSession() as session:

        async def call(base: str) -> int:
            async with session.post(f"{base}/v1/completions", json=body, headers=auth) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(call(replicas[i % 4][1]) for i in range(40)))
    assert statuses.count(200) == 10 and statuses.count(429) == 30
    for server, _ in replicas:
        server.proc.terminate()
        await server.finish()
        assert SECRET not in "".join(server.log)


async def test_decisions_reach_the_sidecar(
    serve: ServerFactory, short_tmp: str, sidecar_stack: SidecarStack
):
    engine = synthetic_engine(first_token_seconds="0", completion_tokens="2")
    server = await serve(
        engine,
        keys=KeyStore(keys_file(short_tmp, rpm=5, tpm=10_000, rpd=1000)),
        events=sidecar_stack.sender(),
        **{"engine.kind": "synthetic"},
    )
    assert sorted([(await post(server))[0] for _ in range(6)]) == [200] * 5 + [429]
    await sidecar_stack.wait_finished(6)
    for _ in range(50):
        samples = await sidecar_stack.samples()
        if samples.get(("llm_key_rate_limited_total", (("key", "acme"), ("limit", "rpm")))):
            break
        await asyncio.sleep(0.02)
    assert samples[("llm_key_rate_limited_total", (("key", "acme"), ("limit", "rpm")))] == 1
    assert samples[("llm_key_rate_limit", (("key", "acme"), ("limit", "rpm")))] == 5
    assert samples[("llm_key_rate_limit", (("key", "acme"), ("limit", "tpm")))] == 10_000
    assert samples[("llm_key_rate_limit", (("key", "acme"), ("limit", "rpd")))] == 1000
    remaining = samples[("llm_key_rate_limit_remaining", (("key", "acme"), ("limit", "rpm")))]
    assert 0 <= remaining < 1
    utilization = ("llm_key_rate_limit_utilization_ratio", (("key", "acme"), ("limit", "rpm")))
    assert samples[utilization] > 0.8
    assert samples[("llm_key_requests_total", (("key", "acme"), ("status", "rate_limited")))] == 1
    text = await sidecar_stack.metrics_text()
    assert SECRET not in text and hash_secret(SECRET) not in text


def test_redis_credentials_never_reach_the_log():
    from llmserve.server.runner import without_credentials

    assert without_credentials("redis://:s3cret@10.0.0.5:6379/0") == "redis://***@10.0.0.5:6379/0"
    assert without_credentials("rediss://user:p@ss@host:6380") == "rediss://***@host:6380"
    assert without_credentials("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
