"""The serving layer alone, with no model: llmserve on its synthetic engine against
  (d) a minimal aiohttp + uvloop SSE handler streaming the same chunks (stacks/minimal_aiohttp.py),
  (e) FastAPI + uvicorn + sse-starlette doing the same (stacks/fastapi_sse.py).

Two scenarios, each stack measured in turn, round after round:
  many:       10,000 concurrent streams at 1 token/s (20 tokens each, opened over --ramp seconds).
              llmserve runs as shipped for many customers: API keys, per-key rate limits (in
              process) and the sidecar on. Errors, truncated streams, inter-token p50/p99 as the
              client saw them, peak RSS of each process, and whether the sidecar counted every
              token the clients received.
  saturation: tokens as fast as each stack can write them, 64 streams of 256 tokens: aggregate
              tokens/s.

    .venv/bin/python scripts/benchmarks/serving_layer.py --json docs/benchmarks/serving_layer.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

from llmserve.bench.load import Target, run_level
from llmserve.bench.report import summarize

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable


def progress(message: str) -> None:
    print(f"[serving-layer] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_pid(pid: int) -> int:
    """The sidecar: `llmserve serve`'s one child process."""
    return int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) / 1024  # type: ignore[index]


class Stack:
    def __init__(self, name: str, command: list[str], api_key: str | None = None) -> None:
        self.name = name
        self.command = command
        self.api_key = api_key
        self.port = free_port()
        self.sidecar_port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: asyncio.subprocess.Process | None = None
        self.sidecar_pid: int | None = None

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSERVE_")}
        command = [
            part.replace("{port}", str(self.port)).replace("{sidecar}", str(self.sidecar_port))
            for part in self.command
        ]
        self.proc = await asyncio.create_subprocess_exec(
            *command,
            env=env,
            cwd=HERE / "stacks",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        async with aiohttp.ClientSession() as session:
            for _ in range(600):
                try:
                    async with session.get(f"{self.base}/v1/models", headers=headers) as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            else:
                raise SystemExit(f"{self.name} did not start")
        if "serve" in command:
            self.sidecar_pid = child_pid(self.proc.pid)
        assert self.proc.stderr is not None
        self.log = asyncio.get_running_loop().create_task(self.proc.stderr.read())

    async def sidecar_tokens(self) -> float | None:
        """llm_generation_tokens_total once it stops changing (events arrive in batches)."""
        if self.sidecar_pid is None:
            return None
        url = f"http://127.0.0.1:{self.sidecar_port}/metrics"
        pattern = re.compile(r"^llm_generation_tokens_total\{[^}]*\} (\S+)$", re.M)
        last = -1.0
        async with aiohttp.ClientSession() as session:
            for _ in range(40):
                try:
                    async with session.get(url) as response:
                        text = await response.text()
                except aiohttp.ClientError:
                    text = ""
                counted = sum(float(v) for v in pattern.findall(text))
                if counted == last:
                    return counted
                last = counted
                await asyncio.sleep(0.5)
        return last

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()
            self.log.cancel()


def stacks(pace: dict[str, str], key: str, keys_file: Path) -> list[Stack]:
    baseline_args = [
        *("--port", "{port}", "--tokens", pace["tokens"]),
        *("--first-token-seconds", pace["first"], "--token-interval-seconds", pace["interval"]),
    ]
    return [
        Stack("(d) aiohttp minimal", [PYTHON, "minimal_aiohttp.py", *baseline_args]),
        Stack("(e) FastAPI + sse-starlette", [PYTHON, "fastapi_sse.py", *baseline_args]),
        Stack(
            "llmserve (keys, limits, sidecar)",
            [
                *(
                    PYTHON,
                    "-m",
                    "llmserve.server.cli",
                    "serve",
                    "--engine",
                    "synthetic",
                    "--port",
                    "{port}",
                ),
                *("--synthetic-parallel", "20000", "--synthetic-completion-tokens", pace["tokens"]),
                *("--synthetic-first-token-seconds", pace["first"]),
                *("--synthetic-token-interval-seconds", pace["interval"]),
                *("--auth-keys-file", str(keys_file), "--sidecar-port", "{sidecar}"),
                *("--sidecar-socket-path", str(keys_file.parent / "ev-{port}.sock")),
                *("--server-max-waiting", "0", "--server-log-level", "warning"),
            ],
            api_key=key,
        ),
    ]


async def scenario(stack: Stack, *, streams: int, tokens: int, ramp: float) -> dict[str, Any]:
    await stack.start()
    assert stack.proc is not None
    try:
        target = Target(
            base_url=stack.base,
            model="synthetic",
            endpoint="chat",
            api_key=stack.api_key,
            prompt_words=8,
            max_tokens=tokens,
            ignore_eos=True,
            timeout_seconds=600,
        )
        results, wall = await run_level(target, streams, streams, lambda: None, ramp_seconds=ramp)
        level = summarize(streams, results, wall)
        level["server_peak_rss_mb"] = round(peak_rss_mb(stack.proc.pid), 1)
        if stack.sidecar_pid is not None:
            level["sidecar_peak_rss_mb"] = round(peak_rss_mb(stack.sidecar_pid), 1)
            level["sidecar_counted_tokens"] = await stack.sidecar_tokens()
        level["client_received_tokens"] = sum(len(r.token_times) for r in results)
        return level
    finally:
        await stack.stop()


def create_key(keys_file: Path) -> str:
    """A key whose limits are checked on every request but never reached."""
    created = subprocess.run(
        [
            *(
                PYTHON,
                "-m",
                "llmserve.server.cli",
                "keys",
                "--file",
                str(keys_file),
                "create",
                "bench",
            ),
            *("--rpm", "10000000", "--concurrency", "100000"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return created.stdout.split()[-1]


def raise_open_file_limit(streams: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < streams + 1000:
        raise SystemExit(f"open-file limit {hard} is too low for {streams} streams")


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="serving-layer-"))
    keys_file = work / "keys.toml"
    key = create_key(keys_file)
    report: dict[str, Any] = {"machine": f"{os.cpu_count()} cores", "many": {}, "saturation": {}}
    many = {"tokens": str(args.tokens), "first": "0.05", "interval": "1.0"}
    fast = {"tokens": "256", "first": "0", "interval": "0"}
    for round_index in range(args.rounds):
        for stack in stacks(fast, key, keys_file):
            level = await scenario(stack, streams=64, tokens=256, ramp=0)
            report["saturation"].setdefault(stack.name, []).append(level)
            progress(
                f"saturation round {round_index + 1}: {stack.name}: "
                f"{level['aggregate_tokens_per_second']} tokens/s"
            )
        for stack in stacks(many, key, keys_file):
            level = await scenario(stack, streams=args.streams, tokens=args.tokens, ramp=args.ramp)
            report["many"].setdefault(stack.name, []).append(level)
            progress(
                f"{args.streams} streams round {round_index + 1}: {stack.name}: "
                f"{level['errors']} errors, {level['truncated']} truncated, inter-token p99 "
                f"{level['inter_token_ms_p99']} ms, RSS {level['server_peak_rss_mb']} MB"
            )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--ramp", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    raise_open_file_limit(args.streams)
    report = asyncio.run(measure(args))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
