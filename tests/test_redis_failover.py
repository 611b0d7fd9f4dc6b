"""Four replicas sharing their limits through a real Redis Cluster and a real Sentinel group.

The limits hold exactly across the replicas (admitted equals the limit, not limit x replicas),
and when the node holding a key's books dies under streaming load, each failure policy does
what it says, no request hangs, the limits are exact again within seconds of the failover, and
the books balance: no lease left behind, no reservation left unrefunded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from redis.asyncio.cluster import RedisCluster

from llmserve.server.app_keys import SERVICE
from llmserve.server.keys import KeyEntry, KeyStore, hash_secret, write_keys
from llmserve.server.ratelimit.redis_limiter import RedisLimiter, connect
from tests.conftest import ServerFactory, free_port, synthetic_engine
from tests.redis_topologies import Cluster, SentinelGroup, command, eventually
from tests.test_ratelimit import SECRET, keys_file, post
from tests.test_ratelimit_slow_redis import TPD, Books

REPLICAS = 4
# Every stream of the load reserves its prompt token and 2000 more and uses 301 (the synthetic
# engine's 300 tokens): a reservation left unrefunded shows at once in the daily bucket.
MAX_TOKENS, USED = 2000, 301


@dataclass
class Topology:
    """One Redis topology as the limiter sees it, with a way to kill the node behind `acme`."""

    mode: str
    url: str
    admin: Any
    fail: Callable[[], Awaitable[None]]
    failed_over: Callable[[], Awaitable[bool]]


@pytest.fixture(params=["cluster", "sentinel"])
async def topology(request: pytest.FixtureRequest, short_tmp: str) -> AsyncIterator[Topology]:
    if request.param == "cluster":
        cluster = Cluster(short_tmp, masters=3, replicas=1)
        try:
            await cluster.form()
            slot = int(await command(cluster.nodes[0], "CLUSTER", "KEYSLOT", "{acme}"))
            owner = cluster.owner(slot)

            async def kill_owner() -> None:
                cluster.kill(owner)

            async def taken_over() -> bool:
                return await cluster.serving(slot) not in (None, owner)

            admin = RedisCluster.from_url(cluster.url)
            yield Topology("cluster", cluster.url, admin, kill_owner, taken_over)
            await admin.aclose()
        finally:
            await cluster.stop()
        return
    group = SentinelGroup(short_tmp)
    try:
        await group.form()
        first = group.master_port

        async def kill_master() -> None:
            group.kill_master()

        async def promoted() -> bool:
            return await group.master_port_now() not in (None, first)

        sentinel = group.client()
        admin = sentinel.master_for(group.NAME)
        yield Topology("sentinel", group.url, admin, kill_master, promoted)
        await admin.aclose()
        for node in sentinel.sentinels:
            await node.aclose()
    finally:
        await group.stop()


async def replicas(
    serve: ServerFactory, topology: Topology, keys: Path, policy: str = "fail_open"
) -> list[TestServer]:
    """Four servers, each with its own limiter and Redis connections, as separate hosts have."""
    servers = []
    for _ in range(REPLICAS):
        limiter = RedisLimiter(
            connect(topology.mode, topology.url, SentinelGroup.NAME),
            timeout_seconds=0.5,
            lease_seconds=5,
        )
        engine = synthetic_engine(
            first_token_seconds="0", token_interval_seconds="0.01", completion_tokens="300"
        )
        servers.append(
            await serve(
                engine,
                keys=KeyStore(keys),
                limiter=limiter,
                **{"engine.kind": "synthetic", "ratelimit.failure_policy": policy},
            )
        )
    return servers


# Three keys, one limit each, and the burst each gets: (limits, request, requests, limit).
BURSTS: dict[str, tuple[dict[str, int], dict[str, Any], int, int]] = {
    "rpm": ({"rpm": 5}, {}, 12, 5),
    # 1 prompt token + 3099: two fit in 6200.
    "tpm": ({"tpm": 6200}, {"max_tokens": 3099}, 8, 2),
    # Streams of 300 tokens at 100 a second outlast the burst.
    "concurrency": ({"concurrency": 3}, {"stream": True, "max_tokens": 300}, 12, 3),
}


async def test_limits_hold_exactly_across_four_replicas(
    serve: ServerFactory, short_tmp: str, topology: Topology
) -> None:
    keys = Path(short_tmp) / "keys.toml"
    write_keys(
        keys,
        {
            name: KeyEntry(name=name, sha256=hash_secret(f"sk-{name}"), **limits)
            for name, (limits, *_) in BURSTS.items()
        },
    )
    servers = await replicas(serve, topology, keys)
    # Every burst at once, each dealt round the replicas.
    bursts = {
        name: [post(servers[i % REPLICAS], secret=f"sk-{name}", **request) for i in range(count)]
        for name, (_, request, count, _) in BURSTS.items()
    }
    answers = await asyncio.gather(*(asyncio.gather(*burst) for burst in bursts.values()))
    admitted = {
        name: sum(1 for status, _, _ in results if status == 200)
        for name, results in zip(bursts, answers, strict=True)
    }
    statuses = {status for results in answers for status, _, _ in results}
    assert statuses == {200, 429}
    assert admitted == {name: limit for name, (*_, limit) in BURSTS.items()}
    print(f"\n{topology.mode}: admitted {admitted} across {REPLICAS} replicas")


@dataclass
class Load:
    """Streams sent in a loop round the replicas, each with what became of it."""

    servers: list[TestServer]
    outcomes: list[tuple[float, int, str]] = field(default_factory=list)
    hung: int = 0
    # The longest a request waited for its answer to begin (its admission and first token).
    longest_answer: float = 0.0
    running: bool = True

    async def worker(self, first: int) -> None:
        index = first
        async with aiohttp.ClientSession() as session:
            while self.running:
                server = self.servers[index % len(self.servers)]
                index += 1
                try:
                    outcome = await asyncio.wait_for(self._stream(session, server), 20)
                except TimeoutError:
                    self.hung += 1
                    continue
                self.outcomes.append((time.monotonic(), *outcome))
                if outcome[0] != 200:
                    await asyncio.sleep(0.05)  # a refusal is instant: do not spin on it

    async def _stream(self, session: aiohttp.ClientSession, server: TestServer) -> tuple[int, str]:
        body = {"model": "synthetic", "prompt": "hi", "max_tokens": MAX_TOKENS, "stream": True}
        headers = {"Authorization": f"Bearer {SECRET}"}
        sent = time.monotonic()
        async with session.post(
            server.make_url("/v1/completions"), json=body, headers=headers
        ) as response:
            self.longest_answer = max(self.longest_answer, time.monotonic() - sent)
            if response.status == 200:
                await response.read()
                return 200, ""
            error = await response.json()
            return response.status, str(error["error"]["code"])


async def exact(servers: list[TestServer]) -> bool:
    """Whether the key's 2 streams at once hold on every replica: with 2 streams open, each
    replica refuses a third."""
    async with aiohttp.ClientSession() as session:
        body = {"model": "synthetic", "prompt": "hi", "max_tokens": 300, "stream": True}
        headers = {"Authorization": f"Bearer {SECRET}"}
        url = [s.make_url("/v1/completions") for s in servers]
        held = [await session.post(url[i], json=body, headers=headers) for i in (0, 1)]
        try:
            if any(r.status != 200 for r in held):
                return False
            statuses = [(await post(server))[0] for server in servers]
            return statuses == [429] * len(servers)
        finally:
            for response in held:
                response.close()


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
async def test_a_failover_under_streaming_load(
    serve: ServerFactory, short_tmp: str, topology: Topology, policy: str
) -> None:
    # Replicas with the key's books replaced 16 streams; the lease is 5 s.
    servers = await replicas(serve, topology, keys_file(short_tmp, concurrency=2, tpd=TPD), policy)
    books = Books(topology.admin)
    load = Load(servers)
    workers = [asyncio.create_task(load.worker(i)) for i in range(4)]
    try:
        assert await eventually(lambda: len(load.outcomes) >= 8, 30)
        killed = time.monotonic()
        await topology.fail()
        assert await eventually(topology.failed_over, 30)
        failed_over = time.monotonic()
        assert await eventually(
            lambda: any(t > failed_over and s == 200 for t, s, _ in load.outcomes), 30
        )
    finally:
        load.running = False
        await asyncio.gather(*workers)
    # The books balance: no lease left, and nothing charged beyond what the streams used.
    admitted = sum(1 for _, s, _ in load.outcomes if s == 200)
    assert await eventually(books.leases_are)
    assert await books.tokens_left() >= TPD - admitted * USED - 1
    assert await eventually(lambda: exact(servers), 30)
    exact_again = time.monotonic()

    during = [(s, code) for t, s, code in load.outcomes if t > killed]
    # Nothing hangs: with a 0.5 s limit on each Redis call, a generous bound on a loaded machine.
    assert load.hung == 0 and load.longest_answer < 10
    errors = sum(x.app[SERVICE].limits.backend_errors for x in servers)
    refused = sum(1 for _, code in during if code == "rate_limiter_unavailable")
    # Each policy does what it says while Redis has no master for the key: open admits
    # unchecked and refuses nothing more than the limits do; closed refuses with a 503.
    assert errors >= 1
    if policy == "fail_open":
        assert {s for s, _ in during} <= {200, 429}
    else:
        assert refused >= 1
        assert {(s, c) for s, c in during if s not in (200, 429)} <= {
            (503, "rate_limiter_unavailable")
        }
    assert await eventually(books.leases_are)
    print(
        f"\n{topology.mode} {policy}: {len(during)} requests after the kill, {refused} refused "
        f"(503), {errors} admission checks without Redis; failover {failed_over - killed:.1f} s "
        f"after the kill, limits exact {exact_again - failed_over:.1f} s after the failover; "
        f"longest wait for an answer {load.longest_answer:.2f} s"
    )


@pytest.mark.parametrize(("policy", "expected"), [("fail_open", 200), ("fail_closed", 503)])
async def test_a_cluster_with_no_node_reachable_follows_the_policy(
    serve: ServerFactory, short_tmp: str, policy: str, expected: int
) -> None:
    # redis-py says so with RedisClusterException, which is not a RedisError: it once escaped
    # the limiter as a 500.
    limiter = RedisLimiter(
        connect("cluster", f"redis://127.0.0.1:{free_port()}/0", None),
        timeout_seconds=0.5,
        lease_seconds=5,
    )
    server = await serve(
        synthetic_engine(first_token_seconds="0", token_interval_seconds="0"),
        keys=KeyStore(keys_file(short_tmp, concurrency=2, tpd=TPD)),
        limiter=limiter,
        **{"engine.kind": "synthetic", "ratelimit.failure_policy": policy},
    )
    status, _, body = await post(server)
    assert status == expected, body
    if policy == "fail_closed":
        assert body["error"]["code"] == "rate_limiter_unavailable"
    assert server.app[SERVICE].limits.backend_errors >= 1
