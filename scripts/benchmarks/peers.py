"""llmserve beside what its users would run instead, on the bundled SmolLM2 model, in one run.

  (a) the llamacpp engine called in this process: the floor for our serving overhead;
  (b) llama-cpp-python's own OpenAI server (`python -m llama_cpp.server`);
  (c) llama.cpp's C++ `llama-server` (scripts/benchmarks/build_llama_server.sh builds it from the
      llama.cpp that llama-cpp-python vendors), with --parallel matching the concurrency;
  and llmserve itself, with its sidecar on, as shipped.

All servers get the same model, threads, slots and context per slot, and are started together
and measured in turn, level by level and round by round, so the noise of this shared machine
falls on all of them alike. Every HTTP measurement is `llmserve bench`'s (bench/), the same
client for everyone. Writes JSON (--json) and a chart (--chart); progress goes to stderr.

    scripts/benchmarks/build_llama_server.sh
    .venv/bin/python scripts/benchmarks/peers.py --json docs/benchmarks/peers.json \\
        --chart docs/benchmarks/peers.png
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from llmserve.bench.load import Target, run_level
from llmserve.bench.report import summarize, table, write_chart
from llmserve.server.model_files import bundled_gguf

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "serving_overhead", Path(__file__).with_name("serving_overhead.py")
)
assert _spec is not None and _spec.loader is not None
serving_overhead = importlib.util.module_from_spec(_spec)
sys.modules["serving_overhead"] = serving_overhead  # dataclasses look their module up there
_spec.loader.exec_module(serving_overhead)


def progress(message: str) -> None:
    print(f"[peers] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def commands(args: argparse.Namespace, model: Path) -> dict[str, list[str]]:
    slots, threads, context = str(args.slots), str(args.threads), str(args.context)
    python = sys.executable
    return {
        "llmserve": [
            *(
                python,
                "-m",
                "llmserve.server.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "{port}",
            ),
            *("--llamacpp-parallel", slots, "--llamacpp-threads", threads),
            *("--llamacpp-context-per-sequence", context, "--sidecar-port", "{port2}"),
        ],
        "llama-server (C++)": [
            str(ROOT / ".bench" / "llama-server"),
            *("-m", str(model), "--host", "127.0.0.1", "--port", "{port}"),
            *("--parallel", slots, "--threads", threads, "--threads-batch", threads),
            *("--ctx-size", str(args.slots * args.context), "--cont-batching"),
        ],
        "llama-cpp-python server": [
            *(python, "-m", "llama_cpp.server", "--model", str(model)),
            *("--host", "127.0.0.1", "--port", "{port}"),
            *("--n_ctx", context, "--n_threads", threads, "--n_threads_batch", threads),
        ],
    }


class Server:
    def __init__(self, name: str, template: list[str], api_key: str | None = None) -> None:
        self.name = name
        self.template = template
        # For a server with keys, whose /v1/models answers only a key.
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.command: list[str] = []
        self.base = ""
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        port = free_port()
        self.command = [
            part.replace("{port}", str(port)).replace("{port2}", str(free_port()))
            for part in self.template
        ]
        self.base = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSERVE_")}
        self.proc = await asyncio.create_subprocess_exec(
            *self.command,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        async with aiohttp.ClientSession(headers=self.headers) as session:
            for _ in range(1200):
                try:
                    async with session.get(f"{self.base}/v1/models") as response:
                        if response.status == 200:
                            body = await response.json()
                            self.model = str(body["data"][0]["id"])
                            return
                except aiohttp.ClientError:
                    pass
                if self.proc.returncode is not None:
                    raise SystemExit(f"{self.name} exited: {' '.join(self.command)}")
                await asyncio.sleep(0.1)
        raise SystemExit(f"{self.name} did not start")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


class InProcess:
    """(a): the same engine settings, driven directly, with the same prompt the client sends."""

    name = "(a) engine in-process"

    def __init__(self, args: argparse.Namespace, target: Target) -> None:
        from llmserve.server.config import load_config
        from llmserve.server.engines import create_engine

        overrides = {
            "llamacpp.parallel": str(args.slots),
            "llamacpp.threads": str(args.threads),
            "llamacpp.context_per_sequence": str(args.context),
        }
        self.engine = create_engine(load_config(environ={}, overrides=overrides))
        self.target = target

    async def start(self) -> None:
        await self.engine.load()

    def prompt(self) -> list[int]:
        """The client's prompt, new each time like the servers', so no prefix cache answers it."""
        text = self.engine.chat_template.render(self.target.body()["messages"])
        return self.engine.tokenize(text, add_special=True)

    async def level(self, concurrency: int, requests: int) -> dict[str, Any]:
        started = time.perf_counter()
        timings: list[Any] = []
        for first in range(0, requests, concurrency):
            batch = min(concurrency, requests - first)
            timings += await asyncio.gather(
                *(
                    serving_overhead.in_process_stream(
                        self.engine, self.prompt(), self.target.max_tokens, self.target.temperature
                    )
                    for _ in range(batch)
                )
            )
        wall = time.perf_counter() - started
        return {
            "concurrency": concurrency,
            "requests": requests,
            "ok": len(timings),
            "errors": 0,
            "truncated": sum(1 for t in timings if t.tokens != self.target.max_tokens),
            "completion_tokens": sum(t.tokens for t in timings),
            "aggregate_tokens_per_second": round(sum(t.tokens for t in timings) / wall, 2),
            "per_stream_tokens_per_second_p50": round(
                statistics.median(t.decode_tokens_per_second for t in timings), 2
            ),
            "ttft_ms_p50": round(statistics.median(t.ttft for t in timings) * 1000, 2),
        }

    async def stop(self) -> None:
        await self.engine.close()


def median_by_throughput(levels: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(levels, key=lambda level: level["aggregate_tokens_per_second"])
    return ordered[len(ordered) // 2]


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    model = bundled_gguf()
    template = Target(
        base_url="",
        model="",
        endpoint="chat",
        api_key=None,
        prompt_words=args.prompt_words,
        max_tokens=args.max_tokens,
        ignore_eos=True,
        timeout_seconds=600,
        temperature=args.temperature,
    )
    servers = [
        Server(name, cmd)
        for name, cmd in commands(args, model).items()
        if not args.only or name in args.only
    ]
    in_process = InProcess(args, template)
    hung: dict[str, int] = {}
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {
        name: {level: [] for level in args.concurrency}
        for name in [in_process.name, *(s.name for s in servers)]
    }
    await in_process.start()
    try:
        for round_index in range(args.rounds):
            # Fresh servers each round: state one keeps between requests (prompt caches held in
            # RAM, say) cannot build up over the run, and a server that hangs costs one round.
            for server in servers:
                await server.start()
            targets = {
                s.name: Target(**{**template.__dict__, "base_url": s.base, "model": s.model})
                for s in servers
            }
            for target in targets.values():
                await run_level(target, 1, 1, lambda: None)
            for level in args.concurrency:
                requests = level * args.requests_per_slot
                order = list(targets.items())
                order = order[round_index % len(order) :] + order[: round_index % len(order)]
                for name, target in order:
                    try:
                        results, wall = await asyncio.wait_for(
                            run_level(target, level, requests, lambda: None), args.level_timeout
                        )
                    except TimeoutError:
                        progress(f"{name} did not finish concurrency {level} in time")
                        hung[name] = hung.get(name, 0) + 1
                        continue
                    runs[name][level].append(summarize(level, results, wall))
                runs[in_process.name][level].append(await in_process.level(level, requests))
                progress(f"round {round_index + 1}/{args.rounds}, concurrency {level}: done")
            for server in servers:
                await server.stop()
    finally:
        for server in servers:
            await server.stop()
        await in_process.stop()
    return {
        "machine": f"{os.cpu_count()} cores",
        "model": model.name,
        "settings": {
            "slots": args.slots,
            "threads": args.threads,
            "context_per_slot": args.context,
            "prompt_words": args.prompt_words,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "rounds": args.rounds,
            "requests_per_level": {
                level: level * args.requests_per_slot for level in args.concurrency
            },
        },
        "commands": {s.name: s.command for s in servers},
        "results": {
            name: [
                median_by_throughput(levels[level]) for level in args.concurrency if levels[level]
            ]
            for name, levels in runs.items()
        },
        "rounds": runs,
        "levels_not_finished": hung,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8]
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--level-timeout", type=float, default=300, help="seconds per level")
    parser.add_argument("--requests-per-slot", type=int, default=3)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--prompt-words", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument(
        "--only",
        type=lambda s: s.split(","),
        default=[],
        help="servers to run, by name, comma-separated (default: all; the engine always runs)",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--chart", type=Path)
    args = parser.parse_args()
    report = asyncio.run(measure(args))
    for name, levels in report["results"].items():
        print(f"\n{name}")
        if "ttft_ms_p95" in levels[0]:
            print(table(levels))
        else:
            print(json.dumps(levels, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.chart:
        write_chart(args.chart, report["results"], f"SmolLM2-135M Q4_1 on {report['machine']}")


if __name__ == "__main__":
    main()
