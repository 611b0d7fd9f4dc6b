"""Real Redis topologies on loopback for the limiter's tests: a Cluster and a Sentinel group.

Both run Debian's `redis-server` (Sentinel is the same binary with `--sentinel`), so the
limiter's Cluster and Sentinel modes are tested against the real redirections and failovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as redis
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel

SLOTS = 16384
# Nothing on disk, and a replica's first copy of its master sent at once rather than after the
# 5 s Redis waits for more replicas to share it.
VOLATILE = ("--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0")


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


async def command(node: redis.Redis, *args: object) -> Any:
    return await node.execute_command(*args)  # type: ignore[no-untyped-call, unused-ignore]


async def pings(node: redis.Redis) -> bool:
    try:
        return bool(await node.ping())
    except (redis.ConnectionError, redis.ResponseError):
        return False


def free_ports(count: int) -> list[int]:
    """Loopback ports free right now, all different (held open together while chosen)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def redis_binary() -> str:
    binary = shutil.which("redis-server")
    assert binary, "redis-server is missing: scripts/setup --test installs it"
    return binary


def start(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [redis_binary(), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


class Cluster:
    """Real redis-server nodes in cluster mode: `masters` share the slots evenly, and each has
    `replicas` replicas that take over its slots when it dies (node timeout 1 s)."""

    def __init__(self, directory: str, masters: int = 2, replicas: int = 0) -> None:
        count = masters * (1 + replicas)
        self.masters, self.replicas = masters, replicas
        # Each node's cluster bus gets a port of its own: the default, port + 10000, may not
        # exist for an ephemeral port.
        ports = free_ports(2 * count)
        self.ports, self.buses = ports[:count], ports[count:]
        self.processes = [
            start(
                *("--port", str(port), "--bind", "127.0.0.1", "--dir", directory),
                *(*VOLATILE, "--cluster-enabled", "yes"),
                *("--cluster-port", str(bus), "--cluster-config-file", f"nodes-{port}.conf"),
                *("--cluster-node-timeout", "1000"),
            )
            for port, bus in zip(self.ports, self.buses, strict=True)
        ]
        self.nodes = [redis.Redis(port=port) for port in self.ports]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def first_slot(self, master: int) -> int:
        return master * SLOTS // self.masters

    async def form(self) -> None:
        for node in self.nodes:
            assert await eventually(functools.partial(pings, node))
        for master in range(self.masters):
            last = self.first_slot(master + 1) - 1
            await command(
                self.nodes[master], "CLUSTER", "ADDSLOTSRANGE", self.first_slot(master), last
            )
        for port, bus in zip(self.ports[1:], self.buses[1:], strict=True):
            await command(self.nodes[0], "CLUSTER", "MEET", "127.0.0.1", port, bus)
        count = len(self.nodes)

        async def met() -> bool:
            infos = [await command(node, "CLUSTER", "INFO") for node in self.nodes]
            return all(f"known_nodes:{count}".encode() in i for i in infos)

        assert await eventually(met)
        # Node i beyond the masters replicates master i % masters.
        for index in range(self.masters, count):
            master_id = await command(self.nodes[index % self.masters], "CLUSTER", "MYID")
            await command(self.nodes[index], "CLUSTER", "REPLICATE", master_id)
        assert await eventually(self.settled, 30), "the Cluster did not settle"

    async def settled(self) -> bool:
        """Whether the live nodes agree on one whole Cluster: each says `cluster_state:ok` with
        every slot served, each holds the same map (who serves which slots, who replicates
        whom, which nodes have failed), every dead node is marked failed in it, and every live
        replica is attached to its master. A client that meets a Cluster short of this may be
        sent round a node that no longer serves the slot, or to one still marked failing."""
        live = [i for i, process in enumerate(self.processes) if process.poll() is None]
        try:
            infos = [(await command(self.nodes[i], "CLUSTER", "INFO")).decode() for i in live]
            views = [_view(await command(self.nodes[i], "CLUSTER", "NODES")) for i in live]
            roles = [await command(self.nodes[i], "ROLE") for i in live]
        except redis.RedisError:
            return False
        whole = f"cluster_slots_ok:{SLOTS}"
        if not all("cluster_state:ok" in info and whole in info for info in infos):
            return False
        if any(view != views[0] for view in views):
            return False
        dead = {self.ports[i] for i in range(len(self.nodes)) if i not in live}
        health = {port: ("failed" if port in dead else "ok") for port in self.ports}
        if {port: state for port, (_, state, _) in views[0].items()} != health:
            return False
        replicas = [role for role in roles if role[0] == b"slave"]
        return all(role[3] == b"connected" for role in replicas) and (
            bool(dead) or len(replicas) == self.masters * self.replicas
        )

    def owner(self, slot: int) -> int:
        """The index of the master that served `slot` when the cluster formed."""
        return slot * self.masters // SLOTS

    async def move(self, slot: int, source: int, target: int) -> None:
        """Migrate a slot with its keys, as redis-cli --cluster reshard does."""
        src, dst = self.nodes[source], self.nodes[target]
        src_id = await command(src, "CLUSTER", "MYID")
        dst_id = await command(dst, "CLUSTER", "MYID")
        await command(dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        await command(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        keys = await command(src, "CLUSTER", "GETKEYSINSLOT", slot, 100)
        port = self.ports[target]
        await command(src, "MIGRATE", "127.0.0.1", port, "", 0, 5000, "KEYS", *keys)
        for node in (dst, src):
            await command(node, "CLUSTER", "SETSLOT", slot, "NODE", dst_id)

    def kill(self, index: int) -> None:
        stop(self.processes[index])

    async def serving(self, slot: int) -> int | None:
        """The index of the live master that serves `slot` now, by its own word."""
        for index, node in enumerate(self.nodes):
            if self.processes[index].poll() is None and await _serves(node, slot):
                return index
        return None

    async def stop(self) -> None:
        for node in self.nodes:
            await node.aclose()
        for process in self.processes:
            stop(process)


# A node's port -> its role (with its master's id for a replica), its health as this node sees
# it ("ok", "failing": suspected by this node alone, "failed": agreed), and its slot ranges.
View = dict[int, tuple[str, str, tuple[str, ...]]]


def _view(nodes: bytes) -> View:
    """The Cluster as one node's CLUSTER NODES describes it, without what only that node sees
    (which line is itself, its pings and its links)."""
    view: View = {}
    for line in nodes.decode().splitlines():
        _, address, flags, master, _, _, _, _, *slots = line.split()
        port = int(address.split("@")[0].rpartition(":")[2])
        roles = set(flags.split(","))
        role = "master" if "master" in roles else f"replica of {master}"
        health = "failed" if "fail" in roles else "failing" if "fail?" in roles else "ok"
        view[port] = (role, health, tuple(slots))
    return view


async def _role(port: int) -> Any:
    node = redis.Redis(port=port)
    try:
        return await command(node, "ROLE")
    finally:
        await node.aclose()


async def _serves(node: redis.Redis, slot: int) -> bool:
    for line in (await command(node, "CLUSTER", "NODES")).decode().splitlines():
        fields = line.split()
        if "myself" not in fields[2] or "master" not in fields[2]:
            continue
        for part in fields[8:]:
            first, _, last = part.partition("-")
            if first.isdigit() and int(first) <= slot <= int(last or first):
                return True
    return False


class SentinelGroup:
    """A master and one replica watched by three Sentinels (quorum 2, down after 1 s)."""

    NAME = "mymaster"

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self.master_port, self.replica_port, *self.sentinel_ports = free_ports(5)
        common = ("--bind", "127.0.0.1", *VOLATILE, "--dir", directory)
        self.servers = [
            start("--port", str(self.master_port), *common),
            start(
                *("--port", str(self.replica_port), *common),
                *("--replicaof", "127.0.0.1", str(self.master_port)),
            ),
        ]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    def _sentinel_config(self, port: int) -> Path:
        # Sentinel rewrites its configuration file as the group changes: one each, writable.
        path = self.directory / f"sentinel-{port}.conf"
        path.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n"
            f"sentinel monitor {self.NAME} 127.0.0.1 {self.master_port} 2\n"
            f"sentinel down-after-milliseconds {self.NAME} 1000\n"
            f"sentinel failover-timeout {self.NAME} 2000\n"
        )
        return path

    @property
    def url(self) -> str:
        return "sentinel://" + ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    async def form(self) -> None:
        async def attached() -> bool:
            with contextlib.suppress(redis.RedisError):
                role = await _role(self.replica_port)
                return role[0] == b"slave" and role[3] == b"connected"
            return False

        # Sentinels learn of replicas from the master's INFO, every 10 s but on first contact:
        # started once the replica is attached, they know it at once.
        assert await eventually(attached)
        self.sentinels = [
            start(str(self._sentinel_config(port)), "--sentinel") for port in self.sentinel_ports
        ]
        assert await eventually(self.settled, 30), "the Sentinel group did not settle"

    async def settled(self) -> bool:
        """Whether the group agrees on one live master: every Sentinel names it, sees it up, and
        knows the other two Sentinels and every live replica, up; the master says it is one, and
        every live replica is attached to it. Short of this a failover cannot be agreed, or a
        client may be sent to a master that is about to be replaced."""
        ports = (self.master_port, self.replica_port)
        live = {port for port, p in zip(ports, self.servers, strict=True) if p.poll() is None}
        sentinels = [redis.Redis(port=port) for port in self.sentinel_ports]
        try:
            masters = [await s.sentinel_master(self.NAME) for s in sentinels]
            known = [await s.sentinel_slaves(self.NAME) for s in sentinels]
            master = masters[0]["port"]
            if master not in live or any(
                m["port"] != master or m["is_sdown"] or m["num-other-sentinels"] != 2
                for m in masters
            ):
                return False
            replicas = live - {master}
            if any({r["port"] for r in seen if not r["is_sdown"]} != replicas for seen in known):
                return False
            roles = {port: await _role(port) for port in live}
        except (redis.RedisError, KeyError):
            return False
        finally:
            for node in sentinels:
                await node.aclose()
        return roles.pop(master)[0] == b"master" and all(
            role[0] == b"slave" and int(role[2]) == master and role[3] == b"connected"
            for role in roles.values()
        )

    def client(self) -> Sentinel:
        return Sentinel([("127.0.0.1", port) for port in self.sentinel_ports])

    async def master_port_now(self) -> int | None:
        """The master's port by the Sentinels' word, None while they agree on none."""
        sentinel = self.client()
        try:
            _, port = await sentinel.discover_master(self.NAME)
            return int(port)
        except MasterNotFoundError:
            return None
        finally:
            for node in sentinel.sentinels:
                await node.aclose()

    async def promoted(self) -> bool:
        """Whether the Sentinels name a master other than the first."""
        return await self.master_port_now() not in (None, self.master_port)

    def kill_master(self) -> None:
        stop(self.servers[0])

    async def stop(self) -> None:
        for process in [*self.sentinels, *self.servers]:
            stop(process)
