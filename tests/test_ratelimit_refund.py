"""A 503 the server causes itself after charging a key's requests gives the charge back: the
customer did not get what it paid for, and waiting out the refill would punish it for that."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from llmserve.server.app_keys import SERVICE
from llmserve.server.keys import KeyEntry, KeyStore, hash_secret, write_keys
from llmserve.server.ratelimit import Decision, Limiter, LimiterUnavailable, MemoryLimiter
from llmserve.server.ratelimit.redis_limiter import RedisLimiter, connect
from tests.conftest import RedisServer, ServerFactory, synthetic_engine
from tests.test_request_life import until

SECRETS = {"acme": "sk-refund-acme-secret", "blocker": "sk-refund-blocker-secret"}


@pytest.fixture(params=["memory", "redis"])
def limiter_factory(request: pytest.FixtureRequest) -> Iterator[Callable[[], Limiter]]:
    if request.param == "memory":
        yield MemoryLimiter
        return
    redis: RedisServer = request.getfixturevalue("redis_server")
    yield lambda: RedisLimiter(
        connect("single", redis.url, None), timeout_seconds=0.5, lease_seconds=30.0
    )


async def one_slot_server(
    serve: ServerFactory,
    directory: str,
    limiter: Limiter,
    limits: dict[str, int],
    settings: dict[str, str] | None = None,
) -> TestServer:
    """One generation at a time, a short queue wait; `acme` has `limits`, `blocker` none."""
    path = Path(directory) / "keys.toml"
    write_keys(
        path,
        {
            name: KeyEntry.model_validate(
                {"name": name, "sha256": hash_secret(secret), **(limits if name == "acme" else {})}
            )
            for name, secret in SECRETS.items()
        },
    )
    engine = synthetic_engine(
        first_token_seconds="0",
        token_interval_seconds="0.01",
        completion_tokens="100000",
        parallel="1",
    )
    return await serve(
        engine,
        keys=KeyStore(path),
        limiter=limiter,
        **{"engine.kind": "synthetic", "server.queue_timeout_seconds": "1", **(settings or {})},
    )


async def post(session: aiohttp.ClientSession, server: TestServer, key: str) -> int:
    body = {"model": "synthetic", "prompt": "hi", "max_tokens": 3}
    headers = {"Authorization": f"Bearer {SECRETS[key]}"}
    async with session.post(server.make_url("/v1/completions"), json=body, headers=headers) as r:
        if r.status == 503:
            assert (await r.json())["error"]["code"] == "server_overloaded"
        await r.read()
        return r.status


@pytest.mark.parametrize("limit", ["rpm", "rpd"])
async def test_requests_that_time_out_in_the_queue_are_given_back(
    serve: ServerFactory, short_tmp: str, limiter_factory: Callable[[], Limiter], limit: str
) -> None:
    server = await one_slot_server(serve, short_tmp, limiter_factory(), {limit: 2})
    body = {"model": "synthetic", "prompt": "hi", "max_tokens": 5000, "stream": True}
    headers = {"Authorization": f"Bearer {SECRETS['blocker']}"}
    async with aiohttp.ClientSession() as session:
        # The blocker holds the only slot, generating until it is closed.
        blocker = await session.post(server.make_url("/v1/completions"), json=body, headers=headers)
        await blocker.content.readuntil(b'"text":"lorem')
        assert await asyncio.gather(*(post(session, server, "acme") for _ in "ab")) == [503, 503]
        blocker.close()
        gate = server.app[SERVICE].gate
        await until(lambda: gate.running == 0, "the blocker was not stopped")
        # Both 503s were the server's doing: the key still has both of its requests.
        assert [await post(session, server, "acme") for _ in "abc"] == [200, 200, 429]


class TokenStageOutage(MemoryLimiter):
    """The shared store goes away between a request's two checks: the requests are charged,
    then the token check gets no answer (as RedisLimiter reports a Redis that does not)."""

    async def admit(self, key: KeyEntry, tokens: int) -> Decision:
        if key.limit("tpm") is not None:
            raise LimiterUnavailable("Redis did not answer")
        return await super().admit(key, tokens)


async def test_a_fail_closed_token_check_gives_the_request_back(
    serve: ServerFactory, short_tmp: str
) -> None:
    server = await one_slot_server(
        serve,
        short_tmp,
        TokenStageOutage(),
        {"rpm": 1, "tpm": 1000},
        settings={"ratelimit.failure_policy": "fail_closed"},
    )
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(
                server.make_url("/v1/completions"),
                json={"model": "synthetic", "prompt": "hi", "max_tokens": 3},
                headers={"Authorization": f"Bearer {SECRETS['acme']}"},
            ) as response:
                assert response.status == 503
                assert (await response.json())["error"]["code"] == "rate_limiter_unavailable"


async def test_a_request_given_back_twice_comes_back_once(
    limiter_factory: Callable[[], Limiter],
) -> None:
    limiter = limiter_factory()
    key = KeyEntry.model_validate(
        {"name": "acme", "sha256": hash_secret(SECRETS["acme"]), "rpm": 2, "rpd": 100}
    )
    first, second = [await limiter.admit(key, 0) for _ in "ab"]
    assert first.allowed and second.allowed and first.reservation is not None
    for _ in "ab":
        await limiter.finish(first.reservation, 0, requests_back=True)
    assert (await limiter.admit(key, 0)).allowed
    refused = await limiter.admit(key, 0)
    assert (refused.allowed, refused.limit) == (False, "rpm")
    await limiter.close()
