"""What a per-key limit check adds to each request: p50/p99 of the admission decision plus its
reconciliation, in memory and in a real Redis on loopback, one at a time and 32 at once.

Needs `redis-server` on PATH (scripts/setup --test installs it); it is started on a free port
and stopped afterwards.

    .venv/bin/python scripts/benchmarks/ratelimit_latency.py
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from llmserve.server.keys import KeyEntry, hash_secret
from llmserve.server.ratelimit import Limiter, MemoryLimiter
from llmserve.server.ratelimit.redis_limiter import RedisLimiter, connect

KEY = KeyEntry(
    name="bench",
    sha256=hash_secret("sk-bench"),
    rpm=10**9,
    tpm=10**12,
    tpd=10**12,
    concurrency=10**6,
)


def quantile(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[int(q * 100) - 1]


async def one_check(limiter: Limiter) -> float:
    """Admit and reconcile, as a request does; seconds spent in the request path."""
    start = time.perf_counter()
    decision = await limiter.admit(KEY, 100)
    elapsed = time.perf_counter() - start
    assert decision.allowed and decision.reservation is not None
    await limiter.finish(decision.reservation, 60)
    return elapsed


async def measure(limiter: Limiter, requests: int, concurrency: int) -> list[float]:
    samples: list[float] = []

    async def worker(count: int) -> None:
        for _ in range(count):
            samples.append(await one_check(limiter))

    for _ in range(200):  # warm up: connections, script cache
        await one_check(limiter)
    await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
    return samples


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (scripts/setup --test installs it)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            tempfile.mkdtemp(prefix="llms-redis-"),
        ],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(200):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return process, f"redis://127.0.0.1:{port}/0"
        time.sleep(0.01)
    raise SystemExit("redis-server did not start")


async def run(args: argparse.Namespace) -> None:
    redis_process, url = start_redis()
    rows = []
    try:
        for name, make in (
            ("memory", MemoryLimiter),
            (
                "redis",
                lambda: RedisLimiter(
                    connect("single", url, None), timeout_seconds=1.0, lease_seconds=30
                ),
            ),
        ):
            for concurrency in (1, 32):
                limiter = make()
                samples = await measure(limiter, args.requests, concurrency)
                await limiter.close()
                rows.append(
                    f"| {name} | {concurrency} | {len(samples)} | "
                    f"{quantile(samples, 0.5) * 1e6:.0f} | {quantile(samples, 0.99) * 1e6:.0f} |"
                )
                print(f"[bench] {name} at {concurrency}", file=sys.stderr, flush=True)
    finally:
        redis_process.kill()
    print("Admission check (limiter.admit, all four limits set) as a request sees it:\n")
    print("| backend | concurrent checks | samples | p50 µs | p99 µs |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6400)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
