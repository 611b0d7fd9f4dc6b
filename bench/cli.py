"""The `llmserve bench` subcommand: arguments, the concurrency sweep, progress and output."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from llmserve.bench.load import Target, run_level
from llmserve.bench.report import summarize, table, write_chart, write_json

__all__ = ["add_bench_parser", "run_bench"]


def add_bench_parser(commands: Any) -> None:
    bench = commands.add_parser(
        "bench",
        help="load-test any OpenAI-compatible streaming endpoint",
        description="Sweep concurrency levels of streaming requests against BASE_URL and report "
        "throughput, TTFT, inter-token and end-to-end latency, errors and truncated streams.",
    )
    bench.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    bench.add_argument("--model", help="model id (default: the first one /v1/models lists)")
    bench.add_argument(
        "--api-key",
        default=os.environ.get("LLMSERVE_BENCH_API_KEY"),
        help="sent as a bearer token (env LLMSERVE_BENCH_API_KEY)",
    )
    bench.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    bench.add_argument(
        "--concurrency", default="1,2,4,8", help="comma-separated levels (default 1,2,4,8)"
    )
    bench.add_argument(
        "--requests", type=int, help="requests per level (default: 4 x the level, at least 8)"
    )
    bench.add_argument("--prompt-words", type=int, default=64, help="prompt length (~tokens)")
    bench.add_argument("--max-tokens", type=int, default=128, help="tokens to generate")
    bench.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="let generations stop at end-of-sequence (default: ask for exactly --max-tokens)",
    )
    bench.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (default: greedy)"
    )
    bench.add_argument("--timeout", type=float, default=600, help="seconds per request")
    bench.add_argument(
        "--ramp-seconds",
        type=float,
        default=0.0,
        help="start each level's streams evenly over this time (for thousands of streams)",
    )
    bench.add_argument("--warmup", type=int, default=1, help="requests sent first, not counted")
    bench.add_argument("--json", type=Path, help="write the results here")
    bench.add_argument("--chart", type=Path, help="write a PNG chart here (needs matplotlib)")
    bench.add_argument("--label", default="", help="name of this run in the JSON and chart")


def run_bench(args: argparse.Namespace) -> int:
    try:
        levels = [int(level) for level in args.concurrency.split(",")]
    except ValueError:
        print("llmserve bench: --concurrency takes numbers such as 1,4,8", file=sys.stderr)
        return 2
    if any(level < 1 for level in levels):
        print("llmserve bench: concurrency levels must be at least 1", file=sys.stderr)
        return 2
    if args.chart and importlib.util.find_spec("matplotlib") is None:
        print("llmserve bench: --chart needs matplotlib: pip install '.[bench]'", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_sweep(args, levels))
    except (aiohttp.ClientError, OSError) as exc:
        print(f"llmserve bench: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1


async def _sweep(args: argparse.Namespace, levels: list[int]) -> int:
    base = args.url.rstrip("/").removesuffix("/v1")
    model = args.model or await _first_model(base, args.api_key)
    target = Target(
        base_url=base,
        model=model,
        endpoint=args.endpoint,
        api_key=args.api_key,
        prompt_words=args.prompt_words,
        max_tokens=args.max_tokens,
        ignore_eos=args.ignore_eos,
        timeout_seconds=args.timeout,
        temperature=args.temperature,
    )
    _say(f"{base} model {model}: {args.prompt_words}-word prompts, {args.max_tokens} tokens each")
    if args.warmup:
        await run_level(target, 1, args.warmup, lambda: None)
    results = []
    for level in levels:
        count = args.requests or max(8, 4 * level)
        bar = _ProgressBar(f"concurrency {level}", count)
        outcome, wall = await run_level(
            target, level, count, bar.advance, ramp_seconds=args.ramp_seconds
        )
        bar.close()
        results.append(summarize(level, outcome, wall))
    print(table(results))
    run = {
        "label": args.label or base,
        "url": base,
        "model": model,
        "endpoint": args.endpoint,
        "prompt_words": args.prompt_words,
        "max_tokens": args.max_tokens,
        "ignore_eos": args.ignore_eos,
        "temperature": args.temperature,
        "levels": results,
    }
    if args.json:
        write_json(args.json, run)
        _say(f"results: {args.json}")
    if args.chart:
        write_chart(args.chart, {run["label"]: results}, f"llmserve bench: {model}")
        _say(f"chart: {args.chart}")
    return 1 if any(level["ok"] == 0 for level in results) else 0


async def _first_model(base: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/v1/models", headers=headers) as response:
            response.raise_for_status()
            return str((await response.json())["data"][0]["id"])


def _say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class _ProgressBar:
    """One line on stderr, redrawn at most ten times a second."""

    def __init__(self, label: str, total: int) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self._drawn = 0.0
        self._draw()

    def advance(self) -> None:
        self.done += 1
        if self.done == self.total or time.monotonic() - self._drawn >= 0.1:
            self._draw()

    def close(self) -> None:
        self._draw()
        print(file=sys.stderr, flush=True)

    def _draw(self) -> None:
        self._drawn = time.monotonic()
        filled = 30 * self.done // max(1, self.total)
        elapsed = self._drawn - self.started
        print(
            f"\r[bench] {self.label:>16} [{'#' * filled}{'.' * (30 - filled)}] "
            f"{self.done}/{self.total} {elapsed:5.1f}s",
            end="",
            file=sys.stderr,
            flush=True,
        )
