"""Sidecar cost and capacity, with the synthetic engine (no model, so the serving path is the
bottleneck).

1. Saturation: two `llmserve serve` processes, one with events and the sidecar on, one with both
   off, driven in alternating rounds by concurrent streaming clients; aggregate tokens/s of each.
2. Ingest: `llmserve sidecar` alone, fed inter-token gap events as fast as a blocking socket
   allows; token events it applied per second, and whether any were lost.

    .venv/bin/python scripts/benchmarks/sidecar_overhead.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import statistics
import sys
import tempfile
import time

import aiohttp

from llmserve.shared.protocol import Gaps, encode_datagram, pack_event


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    """Start `llmserve ARGS`; wait until it is ready and return it with its HTTP port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSERVE_")}
    # The server logs on stderr, the sidecar on stdout; read that one, discard the other.
    sidecar = args[0] == "sidecar"
    pipe, devnull = asyncio.subprocess.PIPE, asyncio.subprocess.DEVNULL
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmserve.server.cli",
        *args,
        env=env,
        stdout=pipe if sidecar else devnull,
        stderr=devnull if sidecar else pipe,
    )
    log = proc.stdout if sidecar else proc.stderr
    assert log is not None
    port, line = "", ""
    while not port or not (sidecar or "ready: " in line):
        line = (await log.readline()).decode()
        if not line:
            raise SystemExit(f"llmserve {args[0]} exited during startup")
        if m := re.search(r"listening on http://[\d.]+:(\d+)", line):
            port = m[1]
    asyncio.get_running_loop().create_task(log.read())
    return proc, port


async def one_stream(session: aiohttp.ClientSession, url: str) -> int:
    body = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    tokens = 0
    async with session.post(url, json=body) as response:
        async for line in response.content:
            if b'"delta":{"content":"' in line and b'"content":""' not in line:
                tokens += 1
    return tokens


async def saturation(args: argparse.Namespace) -> list[str]:
    tmp = tempfile.mkdtemp(prefix="llms-bench-")
    common = [
        "serve",
        "--port",
        "0",
        "--engine",
        "synthetic",
        "--synthetic-first-token-seconds",
        "0",
        "--synthetic-token-interval-seconds",
        "0",
        "--synthetic-completion-tokens",
        str(args.tokens),
        "--server-max-waiting",
        "100000",
    ]
    on = await start(
        *common, "--sidecar-port", str(free_port()), "--sidecar-socket-path", f"{tmp}/ev.sock"
    )
    off = await start(*common, "--sidecar-spawn", "false", "--sidecar-events", "false")
    rates: dict[str, list[float]] = {"on": [], "off": []}
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=args.concurrency)
        ) as session:
            for round_ in range(args.rounds):
                for name, (_, port) in (("on", on), ("off", off)):
                    url = f"http://127.0.0.1:{port}/v1/chat/completions"
                    begin = time.perf_counter()
                    counts = await asyncio.gather(
                        *(one_stream(session, url) for _ in range(args.concurrency))
                    )
                    rates[name].append(sum(counts) / (time.perf_counter() - begin))
                progress(f"saturation round {round_ + 1}/{args.rounds}")
    finally:
        for proc, _ in (on, off):
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
    on_rate, off_rate = statistics.median(rates["on"]), statistics.median(rates["off"])
    return [
        f"Saturation: {args.concurrency} concurrent streams of {args.tokens} tokens, synthetic "
        f"engine with no delay, median of {args.rounds} alternating rounds, {os.cpu_count()} cores "
        "(client, server and sidecar share them).",
        "",
        "| sidecar | aggregate tokens/s |",
        "|---|---|",
        f"| on (events + sidecar process) | {on_rate:.0f} |",
        f"| off (no events, no sidecar) | {off_rate:.0f} |",
        f"| on / off | {on_rate / off_rate:.3f} |",
    ]


def blast(path: str, seconds: float, gaps_per_event: int, events_per_datagram: int) -> int:
    """Send gap events with a blocking socket for `seconds`; returns token events sent."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    seq = 0
    sent = 0
    gaps = [20_000] * gaps_per_event
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        events = []
        for _ in range(events_per_datagram):
            seq += 1
            events.append(pack_event(Gaps(seq=seq, ts=time.time(), req=1, gaps_us=gaps)))
        sock.sendto(encode_datagram("bench", events), path)
        sent += gaps_per_event * events_per_datagram
    sock.close()
    return sent


async def metric(port: str, name: str) -> float:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            text = await response.text()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


async def ingest(args: argparse.Namespace) -> list[str]:
    tmp = tempfile.mkdtemp(prefix="llms-bench-")
    path = f"{tmp}/ev.sock"
    proc, port = await start("sidecar", "--sidecar-port", "0", "--sidecar-socket-path", path)
    try:
        await asyncio.sleep(0.5)
        begin = time.perf_counter()
        sent = await asyncio.to_thread(blast, path, args.ingest_seconds, 64, 40)
        name = "llm_inter_token_latency_seconds_count"
        # The sidecar has no "caught up" signal but its own counter: poll it.
        while await metric(port, name) < sent and time.perf_counter() - begin < 120:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        elapsed = time.perf_counter() - begin
        applied = await metric(port, name)
        lost = await metric(port, "llm_sidecar_events_lost_total")
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
    return [
        f"Ingest: one sender, blocking Unix datagram socket, {args.ingest_seconds:g} s of gap "
        "events (64 gaps per event, 40 events per datagram).",
        "",
        "| token events sent | applied | lost events | seconds to apply all | token events/s |",
        "|---|---|---|---|---|",
        f"| {sent} | {applied:.0f} | {lost:.0f} | {elapsed:.2f} | {applied / elapsed:.0f} |",
    ]


async def main_async(args: argparse.Namespace) -> None:
    lines = [] if args.skip_saturation else await saturation(args) + [""]
    lines += await ingest(args)
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ingest-seconds", type=float, default=5.0)
    parser.add_argument("--skip-saturation", action="store_true")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
