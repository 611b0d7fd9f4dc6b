"""Serving overhead: the llamacpp engine called in-process vs behind `llmserve serve`.

Same model, prompt, settings and machine, one run. Reports single-stream decode tokens/s and
TTFT for both, and aggregate tokens/s at several concurrencies through the server, as a markdown
table (stdout) and JSON (--json). Progress goes to stderr.

    .venv/bin/python scripts/benchmarks/serving_overhead.py --json docs/benchmarks/overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

from llmserve.server.config import load_config
from llmserve.server.engines import create_engine
from llmserve.server.engines.base import Engine, GenerationRequest, SamplingParams

PROMPT = "Write a long story about a dragon who learns to bake bread."


@dataclass
class StreamTiming:
    ttft: float
    decode_tokens_per_second: float
    tokens: int
    seconds: float


@dataclass
class LevelResult:
    concurrency: int
    aggregate_tokens_per_second: float
    per_stream_tokens_per_second: float
    ttft_p50: float
    truncated: int


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def timing(start: float, stamps: list[float], tokens: int) -> StreamTiming:
    decode = (tokens - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return StreamTiming(stamps[0] - start, decode, tokens, stamps[-1] - start)


async def in_process_stream(
    engine: Engine, tokens: list[int], max_tokens: int, temperature: float = 0.0
) -> StreamTiming:
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=True)
    start = time.perf_counter()
    stamps: list[float] = []
    async with engine.start(GenerationRequest("bench", tokens, params)) as stream:
        async for delta in stream:
            if delta.text:
                stamps.append(time.perf_counter())
    assert stream.completion is not None
    return timing(start, stamps, stream.completion.completion_tokens)


async def server_stream(
    session: aiohttp.ClientSession, url: str, model: str, max_tokens: int
) -> StreamTiming:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    async with session.post(url, json=body) as response:
        async for line in response.content:
            # A cheap byte test per token keeps the client from competing with the engine for
            # the same cores; only the final usage chunk is parsed.
            if b'"delta":{"content":"' in line:
                stamps.append(time.perf_counter())
            elif line.startswith(b"data: {") and b'"usage":{' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    return timing(start, stamps, tokens)


def summarise(concurrency: int, wall: float, streams: list[StreamTiming], want: int) -> LevelResult:
    return LevelResult(
        concurrency=concurrency,
        aggregate_tokens_per_second=sum(s.tokens for s in streams) / wall,
        per_stream_tokens_per_second=statistics.median(s.decode_tokens_per_second for s in streams),
        ttft_p50=statistics.median(s.ttft for s in streams),
        truncated=sum(1 for s in streams if s.tokens != want),
    )


class InProcess:
    """The engine loaded in this process, driven directly."""

    def __init__(self, max_tokens: int) -> None:
        self.engine = create_engine(load_config(environ={}))
        self.max_tokens = max_tokens
        self.tokens: list[int] = []

    async def start(self) -> None:
        await self.engine.load()
        text = self.engine.chat_template.render([{"role": "user", "content": PROMPT}])
        self.tokens = self.engine.tokenize(text, add_special=True)

    async def stream(self) -> StreamTiming:
        return await in_process_stream(self.engine, self.tokens, self.max_tokens)

    async def stop(self) -> None:
        await self.engine.close()


class ThroughServer:
    """`llmserve serve` in a child process, driven over HTTP on loopback."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.url = self.model = ""

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSERVE_")}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "llmserve.server.cli",
            "serve",
            "--port",
            "0",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        assert self.proc.stderr is not None
        port = None
        while not self.model:
            line = (await self.proc.stderr.readline()).decode()
            if not line:
                raise SystemExit("server exited during startup")
            if m := re.search(r"listening on http://[\d.]+:(\d+)", line):
                port = m[1]
            if m := re.search(r"ready: .* serves model '(.+)'", line):
                self.model = m[1]
        self.log = asyncio.create_task(self.proc.stderr.read())
        self.url = f"http://127.0.0.1:{port}/v1/chat/completions"
        self.session = aiohttp.ClientSession()

    async def stream(self) -> StreamTiming:
        return await server_stream(self.session, self.url, self.model, self.max_tokens)

    async def stop(self) -> None:
        await self.session.close()
        self.proc.send_signal(signal.SIGTERM)
        await self.proc.wait()
        self.log.cancel()


Target = InProcess | ThroughServer


async def level(target: Target, concurrency: int) -> LevelResult:
    start = time.perf_counter()
    streams = await asyncio.gather(*(target.stream() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return summarise(concurrency, wall, list(streams), target.max_tokens)


async def measure(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    """Alternate between the two targets run by run, so machine noise hits both alike."""
    targets: dict[str, Target] = {
        "in_process": InProcess(args.max_tokens),
        "server": ThroughServer(args.max_tokens),
    }
    for target in targets.values():
        await target.start()
        await target.stream()
    results: dict[str, dict[str, object]] = {
        name: {"single": [], "levels": {c: [] for c in args.concurrency}} for name in targets
    }
    try:
        for run in range(args.runs):
            for name, target in targets.items():
                results[name]["single"].append(await target.stream())  # type: ignore[attr-defined]
            progress(f"single-stream round {run + 1}/{args.runs}")
        for run in range(args.level_runs):
            for c in args.concurrency:
                for name, target in targets.items():
                    results[name]["levels"][c].append(await level(target, c))  # type: ignore[index]
                progress(f"concurrency {c}, round {run + 1}/{args.level_runs}")
    finally:
        for target in targets.values():
            await target.stop()
    results["in_process"]["prompt_tokens"] = len(targets["in_process"].tokens)  # type: ignore[union-attr]
    return results


def median_level(runs: list[LevelResult]) -> LevelResult:
    return sorted(runs, key=lambda r: r.aggregate_tokens_per_second)[len(runs) // 2]


def report(results: dict[str, dict[str, object]], args: argparse.Namespace) -> str:
    single = {
        name: (
            statistics.median(s.decode_tokens_per_second for s in data["single"]),  # type: ignore[attr-defined]
            statistics.median(s.ttft for s in data["single"]),  # type: ignore[attr-defined]
        )
        for name, data in results.items()
    }
    (local_tps, local_ttft), (server_tps, server_ttft) = single["in_process"], single["server"]
    lines = [
        f"Bundled SmolLM2-135M-Instruct Q4_1, prompt {results['in_process']['prompt_tokens']} "
        f"tokens, {args.max_tokens} tokens generated (greedy, ignore_eos), {os.cpu_count()} "
        f"cores. Single stream: median of {args.runs} runs, alternating in-process and server. "
        f"Concurrency: median of {args.level_runs} rounds.",
        "",
        "| single stream | decode tokens/s | TTFT ms |",
        "|---|---|---|",
        f"| in-process engine | {local_tps:.1f} | {local_ttft * 1000:.1f} |",
        f"| through the server | {server_tps:.1f} | {server_ttft * 1000:.1f} |",
        f"| server / in-process | {server_tps / local_tps:.3f} | {server_ttft / local_ttft:.2f} |",
        "",
        "| concurrency | where | aggregate tokens/s | x concurrency 1 | per-stream tokens/s "
        "| TTFT p50 ms | truncated |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, data in results.items():
        levels = [median_level(runs) for runs in data["levels"].values()]  # type: ignore[attr-defined]
        base = levels[0].aggregate_tokens_per_second
        for lv in levels:
            lines.append(
                f"| {lv.concurrency} | {name.replace('_', '-')} | "
                f"{lv.aggregate_tokens_per_second:.1f} | "
                f"{lv.aggregate_tokens_per_second / base:.2f} | "
                f"{lv.per_stream_tokens_per_second:.1f} | {lv.ttft_p50 * 1000:.1f} | "
                f"{lv.truncated} |"
            )
    return "\n".join(lines)


def as_json(value: object) -> object:
    if isinstance(value, StreamTiming | LevelResult):
        return asdict(value)
    if isinstance(value, dict):
        return {str(k): as_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_json(v) for v in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="single-stream runs per target")
    parser.add_argument("--level-runs", type=int, default=3, help="rounds per concurrency")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--json", help="also write the raw figures here")
    args = parser.parse_args()
    results = asyncio.run(measure(args))
    print(report(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(as_json(results), indent=2))


if __name__ == "__main__":
    main()
