"""The limiter's books under a slow, stalled, restarted or failing Redis.

Whatever Redis does, every request the limiter was asked about ends with no concurrency lease
left behind and its charge refunded down to what it used: a request Redis never answered in time
is charged nothing, even if Redis runs its admit later. The books are read straight from Redis.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis
from aiohttp.test_utils import TestServer
from pydantic import ValidationError
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from llmserve.server.app_keys import SERVICE
from llmserve.server.keys import KeyEntry, KeyStore, hash_secret
from llmserve.server.ratelimit import Limiter, LimiterUnavailable, MemoryLimiter, redis_limiter
from llmserve.server.ratelimit.redis_limiter import RedisLimiter, connect
from llmserve.server.ratelimit.redis_scripts import ADMIT, RENEW, SETTLE
from tests.conftest import RedisServer, ServerFactory, free_port, synthetic_engine
from tests.redis_topologies import Cluster, command, eventually
from tests.test_ratelimit import SECRET, keys_file, post

# 100,000 tokens a day refill at 1.16 a second: a reservation left unrefunded stays visible.
TPD = 100_000
# Refill over the slowest test, well under any reservation these tests make.
SLACK = 100
KEY = KeyEntry.model_validate(
    {"name": "acme", "sha256": hash_secret(SECRET), "concurrency": 1, "tpd": TPD}
)


class Books:
    """What Redis holds for the key `acme`: its leases and its daily token level."""

    def __init__(self, admin: redis.Redis) -> None:
        self.admin = admin

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

    async def balanced(self, spent: int, at_most: int | None = None) -> bool:
        """No lease held, and `spent` tokens charged (or up to `at_most`), give or take the
        refill."""
        left = await self.tokens_left()
        low, high = TPD - (at_most or spent) - 1, TPD - spent + SLACK
        return not await self.leases() and low <= left <= high


@pytest.fixture
async def books(redis_server: RedisServer) -> AsyncIterator[Books]:
    # Its connection may die with a restarted Redis: the next command reconnects.
    books = Books(
        redis.from_url(
            redis_server.url, retry=Retry(NoBackoff(), 3), retry_on_error=[redis.ConnectionError]
        )
    )
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


async def open_stream(
    session: aiohttp.ClientSession, server: TestServer, max_tokens: int
) -> aiohttp.ClientResponse:
    """A completion stream, admitted and under way."""
    response = await session.post(
        server.make_url("/v1/completions"),
        json={"model": "synthetic", "prompt": "hi", "max_tokens": max_tokens, "stream": True},
        headers={"Authorization": f"Bearer {SECRET}"},
    )
    assert response.status == 200
    await response.content.readuntil(b"data: ")
    return response


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
    # Open, the request goes on to its token check, which Redis does not answer either. The
    # settlement that undoes the admit may time out too while Redis is frozen, on a slow machine.
    checks = 2 if policy == "fail_open" else 1
    assert server.app[SERVICE].limits.backend_errors >= checks
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
    serve: ServerFactory,
    short_tmp: str,
    redis_server: RedisServer,
    books: Books,
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = slow_redis_limiter(redis_server)
    server = await limited_server(serve, short_tmp, limiter, completion_tokens="5000")
    limits = server.app[SERVICE].limits
    async with aiohttp.ClientSession() as session:
        response = await open_stream(session, server, max_tokens=5000)
        await books.admin.client_pause(600_000, all=False)
        try:
            assert len(await books.leases()) == 1
            # Hung up on, the stream ends now, and its reconciliation gives up on Redis.
            response.close()
            assert await eventually(lambda: limits.backend_errors >= 1)
            assert len(await books.leases()) == 1
            # The limiter keeps the settlement and retries it: the log says so, not that the
            # lease will lapse.
            (warning,) = [r.getMessage() for r in caplog.records if "settle" in r.getMessage()]
            assert "retrying in the background" in warning and "lapse" not in warning
        finally:
            await books.admin.client_unpause()
    # Its lease is gone and the 5001 tokens it reserved are back but for the few it used.
    assert await eventually(lambda: books.balanced(1, 1000)), (
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


async def test_settlements_waiting_for_redis_are_bounded_and_sent_when_it_is_back(
    redis_server: RedisServer, books: Books, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_limiter, "_MAX_PENDING", 5)
    limiter = slow_redis_limiter(redis_server)
    redis_server.stop()
    for _ in range(8):
        with pytest.raises(LimiterUnavailable):
            await limiter.admit(KEY, 10)
    assert limiter.settlements_dropped == 3
    redis_server.start()

    # The five kept are sent once Redis is back: each admit that never ran is settled.
    async def five_settled() -> bool:
        return await books.admin.zcard("llmserve:rl:{acme}:settled") == 5

    assert await eventually(five_settled)
    await limiter.close()


async def test_a_settlement_held_up_past_its_lease_still_refunds(
    redis_server: RedisServer, books: Books, stalled: Callable[[bool], None]
) -> None:
    """A request that ends while Redis is away (a failover) is settled once it is back, maybe
    after its lease lapsed and was swept: it is still charged only what it used."""
    limiter = slow_redis_limiter(redis_server, lease_seconds=1)
    admitted = await limiter.admit(KEY, 5000)
    assert admitted.reservation is not None
    stalled(True)
    try:
        with pytest.raises(LimiterUnavailable):
            await limiter.finish(admitted.reservation, 40)
        # Redis's clock runs on while it is stopped: past the lease, and past the expiry of the
        # set of leases (two lease periods), so the settlement finds no lease at all.
        await asyncio.sleep(2.5)
    finally:
        stalled(False)
    assert await eventually(lambda: books.balanced(40)), await books.tokens_left()
    await limiter.close()


async def test_a_stream_outliving_its_lease_keeps_its_slot_across_a_redis_restart(
    serve: ServerFactory, short_tmp: str, redis_server: RedisServer, books: Books
) -> None:
    # Leases of 3 s renewed every second; the stream would run for over a minute.
    limiter = slow_redis_limiter(redis_server, lease_seconds=3)
    server = await limited_server(serve, short_tmp, limiter, completion_tokens="8000")
    async with aiohttp.ClientSession() as session:
        response = await open_stream(session, server, max_tokens=8000)
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


@pytest.fixture(params=["memory", "redis"])
def any_limiter(request: pytest.FixtureRequest) -> Limiter:
    if request.param == "memory":
        return MemoryLimiter()
    return slow_redis_limiter(request.getfixturevalue("redis_server"))


async def test_a_request_cancelled_while_queued_gives_back_its_lease_and_tokens(
    serve: ServerFactory, short_tmp: str, any_limiter: Limiter
) -> None:
    # One engine slot: the second request waits in the queue holding a lease and 5001 tokens.
    engine = synthetic_engine(
        parallel="1", first_token_seconds="0", token_interval_seconds="0.02", completion_tokens="40"
    )
    server = await serve(
        engine,
        keys=KeyStore(keys_file(short_tmp, concurrency=2, tpd=8000)),
        limiter=any_limiter,
        **{"engine.kind": "synthetic"},
    )
    gate = server.app[SERVICE].gate
    running = asyncio.create_task(post(server, max_tokens=100))
    assert await eventually(lambda: gate.running == 1)
    queued = asyncio.create_task(post(server, max_tokens=5000))
    assert await eventually(lambda: gate.waiting == 1)
    queued.cancel()
    assert await eventually(lambda: gate.waiting == 0)
    assert (await running)[0] == 200
    # Both slots and over 7,100 of the 8,000 tokens are free again only if the cancelled
    # request gave back its lease and its reservation.
    # (The first request's own finish runs in the background: it may take a moment.)

    async def both_admitted() -> bool:
        big, small = await asyncio.gather(post(server, max_tokens=7000), post(server))
        return big[0] == small[0] == 200

    assert await eventually(both_admitted)


async def test_a_memory_admit_cannot_be_cancelled_halfway() -> None:
    # It never suspends: a cancel lands before it starts (nothing charged) or after it returns
    # (the caller holds the reservation and its finally settles it).
    limiter = MemoryLimiter()
    cancelled = asyncio.create_task(limiter.admit(KEY, 5000))
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    whole = asyncio.create_task(limiter.admit(KEY, 5000))
    await asyncio.sleep(0)
    assert whole.done() and whole.result().allowed
    refused = await limiter.admit(KEY, 1)
    assert not refused.allowed and refused.limit == "concurrency"
    reservation = whole.result().reservation
    assert reservation is not None
    await limiter.finish(reservation, 0)
    assert (await limiter.admit(KEY, TPD)).allowed


async def test_the_scripts_commute_whatever_order_redis_runs_them_in(books: Books) -> None:
    client = books.admin
    admit, settle, renew = (client.register_script(s) for s in (ADMIT, SETTLE, RENEW))
    running = [f"llmserve:rl:{{acme}}:{book}" for book in ("leases", "open", "settled")]
    keys = ["llmserve:rl:{acme}:tpd", *running]
    day = 86_400_000

    async def admitted(grant: str) -> bytes:
        status, *_ = await admit(keys=keys, args=[30_000, 1, grant, 1, "tpd", TPD, day, 5000])
        return bytes(status)

    async def settled(grant: str, admitted: int = 1) -> None:
        await settle(keys=keys, args=[grant, 120_000, admitted, 1, TPD, day, 5000])

    # Settled first (its request gave up on Redis), the admit that runs late is void.
    await settled("late", admitted=0)
    assert await admitted("late") == b"void"
    assert await books.balanced(0)
    # An admit run twice (a retry after a lost answer) charges once and holds one lease.
    assert [await admitted("twice"), await admitted("twice")] == [b"ok", b"ok"]
    assert await books.leases() == [b"twice"]
    assert TPD - 5000 - 1 <= await books.tokens_left() <= TPD - 5000 + SLACK
    # Settled twice, it is refunded once; a renewal in flight when it ended does not revive it.
    await settled("twice")
    await settled("twice")
    await renew(keys=running, args=[30_000, "twice", 1])
    assert await books.balanced(0)


async def test_scripts_flushed_from_redis_are_loaded_again(
    redis_server: RedisServer, books: Books
) -> None:
    """As on a replica promoted by a failover: Redis does not replicate its script cache."""
    limiter = slow_redis_limiter(redis_server)
    await books.admin.config_resetstat()
    await books.admin.script_flush()
    first = await limiter.admit(KEY, 10)
    assert first.reservation is not None
    await books.admin.script_flush()
    await limiter.finish(first.reservation, 4)
    await books.admin.script_flush()
    second = await limiter.admit(KEY, 10)
    assert second.reservation is not None
    await limiter.finish(second.reservation, 4)
    assert await books.balanced(8)
    # Each of the four calls met its script flushed, and sent it along (EVAL) to the node that
    # holds the keys: no SCRIPT LOAD, which redis-py sends to every master of a Cluster, a dead
    # one included.
    calls = await books.admin.info("commandstats")
    assert calls["cmdstat_eval"]["calls"] == 4 and "cmdstat_script|load" not in calls
    await limiter.close()


async def test_a_read_only_replica_follows_the_policy_and_recovers(
    serve: ServerFactory, short_tmp: str, redis_server: RedisServer, books: Books
) -> None:
    server = await limited_server(serve, short_tmp, slow_redis_limiter(redis_server), "fail_closed")
    # Demoted by a failover, a node answers every write, a script's included, with READONLY.
    await books.admin.replicaof("127.0.0.1", str(free_port()))
    status, _, body = await post(server)
    assert status == 503 and body["error"]["code"] == "rate_limiter_unavailable"
    assert "READONLY" not in body["error"]["message"]
    await books.admin.replicaof("NO", "ONE")

    answers: list[Any] = []

    async def admitted() -> bool:
        status, _, body = await post(server)
        answers.append(body)
        return status == 200

    assert await eventually(admitted)
    # The request refused while Redis was read-only is charged nothing.
    assert await eventually(lambda: books.balanced(used_tokens(answers[-1])))


async def test_nothing_a_client_sends_reaches_a_redis_key(
    serve: ServerFactory, short_tmp: str, redis_server: RedisServer, books: Books
) -> None:
    server = await limited_server(serve, short_tmp, slow_redis_limiter(redis_server))
    hostile = {
        "Authorization": f"Bearer {SECRET}",
        "x-request-id": "\xff\xfe{acme}:leases" * 400,  # not UTF-8 on the wire, and long
    }
    body = {
        "model": "synthetic",
        "prompt": "hi",
        "max_tokens": 3,
        "user": "\u00e9}{acme}:leases" * 16,
    }
    async with aiohttp.ClientSession() as session:
        async with session.post(
            server.make_url("/v1/completions"),
            data=json.dumps(body),
            headers={**hostile, "Content-Type": "application/json"},
        ) as response:
            answer = await response.json()
            assert response.status == 200, answer
            spent = used_tokens(answer)
    assert await eventually(lambda: books.balanced(spent))
    names = [name for name in await books.admin.keys("*") if isinstance(name, bytes)]
    assert names
    for name in names:
        assert re.fullmatch(rb"llmserve:rl:\{acme\}:(rpm|tpm|tpd|leases|settled)", name)
        if name.endswith((b"leases", b"settled")):
            for grant in await books.admin.zrange(name, 0, -1):
                assert isinstance(grant, bytes) and re.fullmatch(rb"[0-9a-f]{32}", grant)
    # Key names come from the keys file, where anything but a short ASCII name is refused.
    for bad in ("\udcff", "acme}:leases", "a" * 300):
        with pytest.raises(ValidationError):
            KeyEntry.model_validate({"name": bad, "sha256": hash_secret(SECRET)})


@pytest.fixture
async def cluster(short_tmp: str) -> AsyncIterator[Cluster]:
    cluster = Cluster(short_tmp)
    try:
        await cluster.form()
        yield cluster
    finally:
        await cluster.stop()


async def test_one_redis_mode_against_a_cluster_says_what_to_set(cluster: Cluster) -> None:
    slot = await command(cluster.nodes[0], "CLUSTER", "KEYSLOT", "{acme}")
    elsewhere = cluster.ports[1 - cluster.owner(slot)]
    limiter = RedisLimiter(
        connect("single", f"redis://127.0.0.1:{elsewhere}/0", None),
        timeout_seconds=0.25,
        lease_seconds=30,
    )
    with pytest.raises(LimiterUnavailable, match='redis_mode = "cluster"'):
        await limiter.admit(KEY, 10)
    await limiter.close()


async def test_a_cluster_slot_moved_mid_lease_keeps_the_books(cluster: Cluster) -> None:
    slot = await command(cluster.nodes[0], "CLUSTER", "KEYSLOT", "{acme}")
    owner = cluster.owner(slot)
    limiter = RedisLimiter(
        connect("cluster", f"redis://127.0.0.1:{cluster.ports[1 - owner]}/0", None),
        timeout_seconds=1.0,
        lease_seconds=30,
    )
    first = await limiter.admit(KEY, 5000)
    assert first.reservation is not None
    assert not (await limiter.admit(KEY, 1)).allowed
    # Resharded while the request runs: the client still sends the slot to its old owner, is
    # told MOVED, and follows.
    await cluster.move(slot, owner, 1 - owner)
    await limiter.finish(first.reservation, 40)
    second = await limiter.admit(KEY, 10)
    assert second.allowed and second.reservation is not None
    await limiter.finish(second.reservation, 10)
    assert await Books(cluster.nodes[1 - owner]).balanced(50)
    await limiter.close()


@pytest.mark.parametrize(("policy", "status"), [("fail_open", 200), ("fail_closed", 503)])
async def test_any_error_from_the_redis_client_follows_the_policy(
    serve: ServerFactory, short_tmp: str, redis_server: RedisServer, policy: str, status: int
) -> None:
    """redis-py's own code raised an AttributeError (a connection torn down mid-send) in a
    clean-clone run of the Cluster tests, and the request got a 500."""
    limiter = slow_redis_limiter(redis_server)

    async def broken(**_: Any) -> Any:
        raise AttributeError("'NoneType' object has no attribute 'writelines'")

    limiter._admit = broken
    server = await limited_server(serve, short_tmp, limiter, policy)
    assert (await post(server))[0] == status
