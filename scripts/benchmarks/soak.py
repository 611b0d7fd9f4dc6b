"""Soak: mixed load on a real server and sidecar for a long time, watching for leaks.

Streams read to the end, streams dropped early, plain requests, a throttled key (429s), bad
bodies (400s) and a wrong key (401s), from concurrent clients, with auth, rate limits and the
sidecar on. Every few seconds it samples both processes' RSS and open file descriptors; at the
end it reports the RSS slope over the second half (after warm-up), the descriptors back at idle,
and whether every request was answered with the status it should have had.

    .venv/bin/python scripts/benchmarks/soak.py --seconds 600 --json docs/benchmarks/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

LLMSERVE = [sys.executable, "-m", "llmserve.server.cli"]
EXPECTED = {200, 400, 401, 429}


def progress(message: str) -> None:
    print(f"[soak] {message}", file=sys.stderr, flush=True)


@dataclass
class Sample:
    seconds: float
    rss_mb: float
    fds: int


@dataclass
class Watched:
    name: str
    pid: int
    samples: list[Sample] = field(default_factory=list)

    def sample(self, started: float) -> Sample:
        status = Path(f"/proc/{self.pid}/status").read_text()
        rss_kb = int(re.search(r"VmRSS:\s+(\d+) kB", status)[1])  # type: ignore[index]
        fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        sample = Sample(round(time.monotonic() - started, 1), rss_kb / 1024, fds)
        self.samples.append(sample)
        return sample


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of value against seconds, per minute."""
    if len(points) < 3:
        return 0.0
    xs, ys = zip(*points, strict=True)
    return statistics.linear_regression(xs, ys).slope * 60


def create_key(keys: Path, name: str, *limits: str) -> str:
    out = subprocess.run(
        [*LLMSERVE, "keys", "--file", str(keys), "create", name, *limits],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()[-1]


async def start_server(args: list[str]) -> tuple[asyncio.subprocess.Process, str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSERVE_")}
    proc = await asyncio.create_subprocess_exec(
        # The sidecar child inherits stdout for its request lines: the log file has them too.
        *LLMSERVE,
        "serve",
        *args,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    port, sidecar_pid, ready = "", 0, False
    while not (port and sidecar_pid and ready):
        line = (await proc.stderr.readline()).decode()
        if not line:
            raise SystemExit("llmserve exited during startup")
        if found := re.search(r"listening on http://127\.0\.0\.1:(\d+)", line):
            port = found[1]
        if found := re.search(r"sidecar started \(pid (\d+)\)", line):
            sidecar_pid = int(found[1])
        ready = ready or "ready: " in line
    asyncio.get_running_loop().create_task(_drain(proc.stderr))
    return proc, f"http://127.0.0.1:{port}", sidecar_pid


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


class Load:
    """Clients that pick a request kind at random until the deadline."""

    def __init__(self, base: str, steady: str, throttled: str) -> None:
        self.base = base
        self.steady = steady
        self.throttled = throttled
        self.statuses: Counter[int] = Counter()
        self.kinds: Counter[str] = Counter()
        self.failures: list[str] = []

    async def client(self, session: aiohttp.ClientSession, deadline: float, seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            kind = rng.choices(
                ["stream", "dropped", "plain", "throttled", "bad", "wrong key"],
                weights=[50, 15, 15, 10, 5, 5],
            )[0]
            self.kinds[kind] += 1
            try:
                status = await self.request(session, kind, rng)
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.failures.append(f"{kind}: {type(exc).__name__}: {exc}")
                continue
            self.statuses[status] += 1
            if status not in EXPECTED:
                self.failures.append(f"{kind}: HTTP {status}")

    async def request(self, session: aiohttp.ClientSession, kind: str, rng: random.Random) -> int:
        secret = {"throttled": self.throttled, "wrong key": "sk-not-a-key"}.get(kind, self.steady)
        body: dict[str, Any] = {
            "model": "synthetic",
            "messages": [{"role": "user", "content": "soak"}],
            "stream": kind in ("stream", "dropped", "throttled"),
        }
        if kind == "bad":
            body["temperature"] = "hot"
        headers = {"Authorization": f"Bearer {secret}"}
        url = f"{self.base}/v1/chat/completions"
        async with session.post(url, json=body, headers=headers) as response:
            if kind == "dropped" and response.status == 200:
                for _ in range(rng.randint(1, 10)):
                    await response.content.readline()
                response.close()
                return response.status
            await response.read()
            return response.status


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    keys = work / "keys.toml"
    steady = create_key(keys, "steady")
    throttled = create_key(keys, "throttled", "--rpm", "30")
    log_file = work / "requests.log"
    sidecar_port = str(_free_port())
    server, base, sidecar_pid = await start_server(
        [
            *("--port", "0", "--engine", "synthetic", "--auth-keys-file", str(keys)),
            *("--synthetic-parallel", str(args.concurrency)),
            *("--synthetic-token-interval-seconds", "0.01", "--synthetic-completion-tokens", "32"),
            *("--server-idle-timeout-seconds", "2", "--sidecar-port", sidecar_port),
            *("--sidecar-socket-path", str(work / "ev.sock"), "--sidecar-log-file", str(log_file)),
        ]
    )
    sidecar_stats = f"http://127.0.0.1:{sidecar_port}/stats"
    await _wait_for(sidecar_stats)
    watched = [Watched("server", server.pid), Watched("sidecar", sidecar_pid)]
    started = time.monotonic()
    baseline = [w.sample(started) for w in watched]
    progress(f"server pid {server.pid}, sidecar pid {sidecar_pid}; {args.seconds:g} s of load")
    load = Load(base, steady, throttled)
    deadline = started + args.seconds

    async def sampler() -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(args.sample_seconds)
            server_sample, _ = (w.sample(started) for w in watched)
            done = sum(load.statuses.values())
            progress(
                f"{server_sample.seconds:6.0f} s  {done} requests  server RSS "
                f"{server_sample.rss_mb:.1f} MB, {server_sample.fds} fds"
            )

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(
            sampler(), *(load.client(session, deadline, seed) for seed in range(args.concurrency))
        )
    # Idle long enough for kept-alive connections to be closed by the server's idle timer.
    await asyncio.sleep(4)
    idle = [w.sample(started) for w in watched]
    async with aiohttp.ClientSession() as session:
        async with session.get(sidecar_stats) as response:
            sidecar = (await response.json())["sidecar"]
    server.terminate()
    await server.wait()
    logged = sum(1 for line in log_file.read_text().splitlines() if "request finished" in line)

    report: dict[str, Any] = {
        "seconds": args.seconds,
        "concurrency": args.concurrency,
        "requests": sum(load.statuses.values()),
        "requests_per_second": round(sum(load.statuses.values()) / args.seconds, 1),
        "statuses": {str(k): v for k, v in sorted(load.statuses.items())},
        "kinds": dict(load.kinds),
        "failures": load.failures[:20],
        "failure_count": len(load.failures),
        "requests_logged": logged,
        "events_lost": sidecar["events_lost"],
        "processes": {},
    }
    for w, before, after in zip(watched, baseline, idle, strict=True):
        half = [s for s in w.samples if s.seconds >= args.seconds / 2 and s is not after]
        report["processes"][w.name] = {
            "rss_mb_start": round(before.rss_mb, 1),
            "rss_mb_end": round(after.rss_mb, 1),
            "rss_mb_per_minute_second_half": round(
                slope_per_minute([(s.seconds, s.rss_mb) for s in half]), 3
            ),
            "fds_idle_before": before.fds,
            "fds_idle_after": after.fds,
            "fds_max": max(s.fds for s in w.samples),
        }
    return report


async def _wait_for(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise SystemExit(f"{url} did not answer")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--sample-seconds", type=float, default=5)
    parser.add_argument("--json", type=Path, help="write the report here too")
    args = parser.parse_args()
    report = asyncio.run(soak(args))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
