"""/metrics with 10,000 active API keys: how long a scrape takes, how big it is, and the
sidecar's memory.

A real `llmserve sidecar` receives, through the server's own event sender, what 10,000 customers
would cause: for each key a rate-limit decision from the real per-key admission (so every key
has its limit gauges) and a finished streaming request (so every key has its usage counters).
Then /metrics and /stats are fetched several times and timed. Then every key makes one more
request and /metrics is fetched once more while /health is polled: the slowest /health answer
is how long a scrape stops the sidecar's event loop, and so its event ingestion, at a stretch.
With --openmetrics every request carries a trace context and every scrape asks for OpenMetrics
as Prometheus does, so the latency histograms come with their exemplars.

    .venv/bin/python scripts/benchmarks/key_cardinality.py --json docs/benchmarks/keys.json
    .venv/bin/python scripts/benchmarks/key_cardinality.py --openmetrics \
        --json docs/benchmarks/keys_exemplars.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from llmserve.server.engines.base import Completion
from llmserve.server.keys import KeyEntry
from llmserve.server.ratelimit import MemoryLimiter
from llmserve.server.ratelimit.admission import KeyAdmission
from llmserve.server.telemetry import RequestTelemetry
from llmserve.server.trace_context import TraceContext
from llmserve.shared.client import EventSender


def progress(message: str) -> None:
    print(f"[keys] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mb(pid: int) -> tuple[float, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    current, peak = (
        int(re.search(rf"{field}:\s+(\d+) kB", status)[1]) / 1024  # type: ignore[index]
        for field in ("VmRSS", "VmHWM")
    )
    return round(current, 1), round(peak, 1)


# What Prometheus asks for when it scrapes.
OPENMETRICS_ACCEPT = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"


async def customers(
    sender: EventSender, admission: KeyAdmission, keys: int, round_: int, *, traced: bool
) -> None:
    for i in range(keys):
        entry = KeyEntry.model_validate(
            {"name": f"customer-{i:05d}", "sha256": "0" * 64, "rpm": 600, "tpm": 100_000}
        )
        rid = f"bench-{round_}-{i}"
        # The request's own limits, then its token reservation, as the server charges them.
        request = await admission.admit_request(entry, rid)
        reservation = await admission.admit_tokens(entry, 120, rid)
        telemetry = RequestTelemetry(
            sender,
            request_id=rid,
            key=entry.name,
            model="bench-model",
            endpoint="chat",
            received_ns=time.monotonic_ns(),
        )
        if traced:
            telemetry.trace = TraceContext(f"{round_:016x}{i:016x}", f"{i:016x}", "01", None)
        telemetry.started(stream=True, prompt_tokens=20, queue_ns=1000)
        for _ in range(10):
            telemetry.written(1)
        telemetry.finished("ok", 200, completion=Completion("length", 20, 10))
        admission.finish(request, 0)
        admission.finish(reservation, 30)
        if i % 200 == 0:
            # Let the sender flush: the sidecar reads as fast as we write.
            await asyncio.sleep(0.01)


async def finished_requests(session: aiohttp.ClientSession, base: str) -> int:
    async with session.get(f"{base}/stats") as response:
        return int((await response.json())["sidecar"]["requests_finished"])


async def timed_get(
    session: aiohttp.ClientSession, url: str, accept: str = "*/*"
) -> tuple[float, int]:
    """Seconds to the whole answer, and its size as sent: gzip, as Prometheus asks for it."""
    started = time.perf_counter()
    headers = {"Accept-Encoding": "gzip", "Accept": accept}
    async with session.get(url, headers=headers) as response:
        body = await response.read()
    return time.perf_counter() - started, len(body)


async def all_finished(session: aiohttp.ClientSession, base: str, count: int) -> None:
    for _ in range(600):
        if await finished_requests(session, base) >= count:
            return
        await asyncio.sleep(0.2)


async def longest_health_during_scrape(
    session: aiohttp.ClientSession, base: str, accept: str
) -> float:
    scrape = asyncio.create_task(timed_get(session, f"{base}/metrics", accept))
    longest = 0.0
    while not scrape.done():
        seconds, _ = await timed_get(session, f"{base}/health")
        longest = max(longest, seconds)
    await scrape
    return longest


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    work = tempfile.mkdtemp(prefix="llms-keys-")
    port = free_port()
    socket_path = f"{work}/ev.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSERVE_")}
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "llmserve.server.cli", "sidecar", "--sidecar-port", str(port)),
        *("--sidecar-socket-path", socket_path, "--sidecar-max-keys", str(args.keys)),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            for _ in range(200):
                try:
                    await finished_requests(session, base)
                    break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
            idle_rss = rss_mb(proc.pid)
            sender = EventSender(socket_path, max_buffered=1_000_000)
            admission = KeyAdmission(MemoryLimiter(), fail_open=True, events=sender)
            progress(f"{args.keys} keys: one limit decision and one request each")
            accept = OPENMETRICS_ACCEPT if args.openmetrics else "*/*"
            await customers(sender, admission, args.keys, 1, traced=args.openmetrics)
            await all_finished(session, base, args.keys)
            metrics = [
                await timed_get(session, f"{base}/metrics", accept) for _ in range(args.scrapes)
            ]
            stats = [await timed_get(session, f"{base}/stats") for _ in range(args.scrapes)]
            progress("every key again, then a scrape while /health is polled")
            await customers(sender, admission, args.keys, 2, traced=args.openmetrics)
            await all_finished(session, base, 2 * args.keys)
            sender.close()
            health_max = await longest_health_during_scrape(session, base, accept)
            async with session.get(
                f"{base}/metrics", headers={"Accept-Encoding": "identity", "Accept": accept}
            ) as response:
                text = await response.text()
            loaded_rss = rss_mb(proc.pid)
    finally:
        proc.terminate()
        await proc.wait()
    keys_seen = len(set(re.findall(r'key="(customer-\d+)"', text)))
    return {
        "keys": args.keys,
        "openmetrics": args.openmetrics,
        "exemplars": text.count(" # {"),
        "keys_in_metrics": keys_seen,
        "series": sum(1 for line in text.splitlines() if line and not line.startswith("#")),
        "metrics_bytes": len(text.encode()),
        "metrics_gzip_bytes": metrics[0][1],
        # The first scrape after the keys arrived: every series is new since the last one.
        "metrics_seconds_first": round(metrics[0][0], 3),
        "metrics_seconds_median": round(statistics.median(t for t, _ in metrics), 3),
        "metrics_seconds_max": round(max(t for t, _ in metrics), 3),
        "health_seconds_max_during_metrics": round(health_max, 3),
        "stats_seconds_median": round(statistics.median(t for t, _ in stats), 3),
        "stats_bytes": stats[0][1],
        "sidecar_rss_mb_idle": idle_rss[0],
        "sidecar_rss_mb_with_keys": loaded_rss[0],
        "sidecar_rss_mb_peak": loaded_rss[1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--scrapes", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--openmetrics", action="store_true", help="traced requests, OpenMetrics scrapes"
    )
    args = parser.parse_args()
    report = asyncio.run(measure(args))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
