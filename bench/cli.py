"""The `llmserve bench` subcommand: arguments, the concurrency sweep, progress and output."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp

from llmserve.bench.load import Target, run_level
from llmserve.bench.report import summarize, table, write_chart, write_json
from llmserve.bench.tenant_report import (
    ServiceWeights,
    summarize_tenants,
    tenant_table,
    write_tenant_chart,
)
from llmserve.bench.tenants import TenantError, parse_tenant, run_tenants

__all__ = ["add_bench_parser", "run_bench"]


def add_bench_parser(commands: Any) -> None:
    bench = commands.add_parser(
        "bench",
        help="load-test any OpenAI-compatible streaming endpoint",
        description="Sweep concurrency levels of streaming requests against BASE_URL and report "
        "throughput, TTFT, inter-token and end-to-end latency, errors and truncated streams. "
        "With --tenant, run several API keys at once instead and report each one's latencies "
        "and share of service, and Jain's fairness index.",
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
    tenants = bench.add_argument_group("multi-tenant mode")
    tenants.add_argument(
        "--tenant",
        action="append",
        default=[],
        metavar="name=N,concurrency=C[,key_env=VAR][,weight=W][,...]",
        help="a key sending C streams back to back; repeat for each. Also: key=SECRET (visible "
        "to ps: prefer key_env), prompt_words, max_tokens (default: the run's), requests (stop "
        "after these), weight (the key's weight on the server, to judge its share by)",
    )
    tenants.add_argument(
        "--duration",
        type=float,
        default=60.0,
        help="seconds to run the tenants (streams still running then are cut and counted "
        "as far as they got; default 60)",
    )
    tenants.add_argument(
        "--service-weights",
        default="1,2",
        metavar="PROMPT,COMPLETION",
        help="service one prompt token and one generated token are worth (default 1,2, the "
        "server's scheduler.prompt_weight and generated_weight)",
    )
    bench.add_argument("--json", type=Path, help="write the results here")
    bench.add_argument("--chart", type=Path, help="write a PNG chart here (needs matplotlib)")
    bench.add_argument("--label", default="", help="name of this run in the JSON and chart")


def run_bench(args: argparse.Namespace) -> int:
    if args.chart and importlib.util.find_spec("matplotlib") is None:
        print("llmserve bench: --chart needs matplotlib: pip install '.[bench]'", file=sys.stderr)
        return 2
    if args.tenant:
        return _run(_tenant_run, args)
    try:
        levels = [int(level) for level in args.concurrency.split(",")]
    except ValueError:
        print("llmserve bench: --concurrency takes numbers such as 1,4,8", file=sys.stderr)
        return 2
    if any(level < 1 for level in levels):
        print("llmserve bench: concurrency levels must be at least 1", file=sys.stderr)
        return 2
    return _run(lambda a: _sweep(a, levels), args)


def _run(
    main: Callable[[argparse.Namespace], Coroutine[Any, Any, int]], args: argparse.Namespace
) -> int:
    try:
        return asyncio.run(main(args))
    except (aiohttp.ClientError, OSError) as exc:
        print(f"llmserve bench: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1


async def _target(args: argparse.Namespace, api_key: str | None) -> Target:
    """The request every stream sends, as the common flags describe it."""
    base = args.url.rstrip("/").removesuffix("/v1")
    model = args.model or await _first_model(base, api_key)
    return Target(
        base_url=base,
        model=model,
        endpoint=args.endpoint,
        api_key=api_key,
        prompt_words=args.prompt_words,
        max_tokens=args.max_tokens,
        ignore_eos=args.ignore_eos,
        timeout_seconds=args.timeout,
        temperature=args.temperature,
    )


async def _sweep(args: argparse.Namespace, levels: list[int]) -> int:
    target = await _target(args, args.api_key)
    base, model = target.base_url, target.model
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


async def _tenant_run(args: argparse.Namespace) -> int:
    try:
        specs = [parse_tenant(text) for text in args.tenant]
        prompt, completion = (float(x) for x in args.service_weights.split(","))
    except TenantError as exc:
        print(f"llmserve bench: {exc}", file=sys.stderr)
        return 2
    except ValueError:
        print("llmserve bench: --service-weights takes two numbers such as 1,2", file=sys.stderr)
        return 2
    if len({spec.name for spec in specs}) < len(specs):
        print("llmserve bench: each --tenant needs a name of its own", file=sys.stderr)
        return 2
    # Without --api-key, the models list and the warm-up use the first tenant's key.
    target = await _target(args, args.api_key or specs[0].api_key)
    _say(f"{target.base_url} model {target.model}: {len(specs)} tenants for {args.duration} s")
    if args.warmup:
        await run_level(target, 1, args.warmup, lambda: None)
    done = dict.fromkeys((spec.name for spec in specs), 0)

    def progress(name: str) -> None:
        done[name] += 1

    ticker = asyncio.create_task(_tick(done))
    try:
        tenants, wall = await run_tenants(target, specs, args.duration, progress)
    finally:
        ticker.cancel()
    print(file=sys.stderr, flush=True)
    run = {
        "label": args.label or target.base_url,
        "url": target.base_url,
        "model": target.model,
        "endpoint": args.endpoint,
        "duration_seconds": args.duration,
        "ignore_eos": args.ignore_eos,
        "temperature": args.temperature,
        **summarize_tenants(tenants, wall, ServiceWeights(prompt, completion)),
    }
    print(tenant_table(run))
    if args.json:
        write_json(args.json, run)
        _say(f"results: {args.json}")
    if args.chart:
        write_tenant_chart(args.chart, run, f"llmserve bench: {run['label']}")
        _say(f"chart: {args.chart}")
    return 1 if any(row["ok"] == 0 for row in run["tenants"]) else 0


async def _tick(done: dict[str, int]) -> None:
    """Requests finished per tenant, redrawn on one stderr line every half second."""
    started = time.monotonic()
    while True:
        counts = " ".join(f"{name} {count}" for name, count in done.items())
        elapsed = time.monotonic() - started
        print(f"\r[bench] {elapsed:6.1f}s finished: {counts}", end="", file=sys.stderr, flush=True)
        await asyncio.sleep(0.5)


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
