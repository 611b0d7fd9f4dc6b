"""Fair scheduling between keys (issue 17), measured against its targets in one run.

  flood     key `heavy` keeps 24 streams of 200 tokens in flight while key `light` sends short
            requests one at a time: the light key's TTFT beside its TTFT alone, and the total
            tokens/s, fair against first-come-first-served (--scheduler-policy fifo);
  equal     two weight-1 keys with 12 streams each: their weighted service, fair and fifo;
  weights   a weight-2 key and a weight-1 key with 12 streams each, fair and fifo;
  long      8 streams with distinct ~300-token prompts arriving together, llmserve against
            llama.cpp's llama-server: inter-token p99, TTFT p50, tokens/s;
  noreg     1 and 8 streams of short prompts, llmserve against llama-server;
  steps     the long-prompts load at several llamacpp.step_tokens, to choose its default;
  spare     the flood at llamacpp.spare_slots 0, 1 and 2: the light key's TTFT.

Servers get the same model, threads, slots and context per slot (peers.py's commands and
Server, imported); the llmserve ones share a keys file written here with the project's key code,
one key per tenant with its weight. Every measurement is `llmserve bench`'s client (bench/).
Writes JSON and a chart, prints a markdown table of the targets; progress goes to stderr.

    scripts/benchmarks/build_llama_server.sh
    .venv/bin/python scripts/benchmarks/fairness.py --json docs/benchmarks/fairness.json \\
        --chart docs/benchmarks/fairness.png
    .venv/bin/python scripts/benchmarks/fairness.py --quick --only flood,long   # a check
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from llmserve.bench.load import RequestResult, Target, run_level
from llmserve.bench.report import summarize
from llmserve.bench.tenant_report import ServiceWeights, summarize_tenants
from llmserve.bench.tenants import TenantSpec, run_tenants
from llmserve.server.keys import KeyEntry, created_now, hash_secret, new_secret, write_keys
from llmserve.server.model_files import bundled_gguf

_spec = importlib.util.spec_from_file_location("peers", Path(__file__).with_name("peers.py"))
assert _spec is not None and _spec.loader is not None
peers = importlib.util.module_from_spec(_spec)
sys.modules["peers"] = peers
_spec.loader.exec_module(peers)

SCENARIOS = ("flood", "equal", "weights", "long", "noreg", "steps", "spare")
# Tenant -> the weight its key has on the servers.
WEIGHTS = {"heavy": 1.0, "light": 1.0, "a": 1.0, "b": 1.0, "w2": 2.0, "w1": 1.0}
LLAMA_SERVER = "llama-server (C++)"


def progress(message: str) -> None:
    print(f"[fairness] {message}", file=sys.stderr, flush=True)


def write_keys_file(directory: Path) -> tuple[Path, dict[str, str]]:
    """A keys file with one key per tenant and its weight; the secrets by tenant."""
    secrets = {name: new_secret() for name in WEIGHTS}
    path = directory / "keys.toml"
    write_keys(
        path,
        {
            name: KeyEntry(
                name=name,
                sha256=hash_secret(secrets[name]),
                created=created_now(),
                weight=WEIGHTS[name],
            )
            for name in WEIGHTS
        },
    )
    return path, secrets


class Bench:
    """The servers of the run, started when first needed, and the scenarios measured on them."""

    def __init__(self, args: argparse.Namespace, keys_file: Path, secrets: dict[str, str]) -> None:
        self.args = args
        self.keys_file = keys_file
        self.secrets = secrets
        self.model = bundled_gguf()
        self.servers: dict[str, Any] = {}
        self.commands: dict[str, list[str]] = {}
        self.template = Target(
            base_url="",
            model="",
            endpoint="chat",
            api_key=None,
            prompt_words=64,
            max_tokens=128,
            ignore_eos=True,
            timeout_seconds=600,
        )

    async def server(self, name: str, **settings: object) -> Any:
        """llmserve with these config fields (`scheduler_policy="fifo"`), or llama-server."""
        label = name + "".join(f" {k}={v}" for k, v in settings.items())
        if label not in self.servers:
            command = peers.commands(self.args, self.model)[name]
            if name == "llmserve":
                command = [*command, "--auth-keys-file", str(self.keys_file)]
                for field, value in settings.items():
                    command += [f"--{field.replace('_', '-')}", str(value)]
            server = peers.Server(label, command, self.secrets["a"])
            progress(f"starting {label}")
            await server.start()
            self.commands[label] = server.command
            # One request first, as peers.py does: the first pays for warming the model up.
            await run_level(self.target(server, "a"), 1, 1, lambda: None)
            self.servers[label] = server
        return self.servers[label]

    async def stop(self, server: Any) -> None:
        await server.stop()
        self.servers = {k: v for k, v in self.servers.items() if v is not server}

    async def stop_all(self) -> None:
        for server in list(self.servers.values()):
            await self.stop(server)

    def target(self, server: Any, tenant: str, **shape: int) -> Target:
        return replace(
            self.template,
            base_url=server.base,
            model=server.model,
            api_key=self.secrets[tenant],
            **shape,  # type: ignore[arg-type]
        )

    def spec(self, tenant: str, concurrency: int, **shape: int) -> TenantSpec:
        return TenantSpec(
            name=tenant,
            concurrency=concurrency,
            api_key=self.secrets[tenant],
            weight=WEIGHTS[tenant],
            **shape,
        )

    async def tenants(
        self, server: Any, specs: list[TenantSpec], seconds: float | None = None
    ) -> dict[str, Any]:
        """A multi-tenant run, as `llmserve bench --tenant` reports it."""
        duration = seconds if seconds is not None else self.args.duration
        results, wall = await run_tenants(
            self.target(server, specs[0].name), specs, duration, lambda _: None
        )
        run = summarize_tenants(results, wall, ServiceWeights())
        return {**run, "tenants": {row["tenant"]: row for row in run["tenants"]}}

    async def bursts(self, servers: list[Any], shape: dict[str, int], streams: int) -> list[Any]:
        """`streams` requests arriving together, --rounds times, the servers taking turns each
        round so the machine's noise falls on them alike; each server's streams pooled."""
        pooled: list[tuple[list[RequestResult], float]] = [([], 0.0) for _ in servers]
        for round_index in range(self.args.rounds):
            turn = round_index % len(servers)
            for index in [*range(turn, len(servers)), *range(turn)]:
                results, wall = await run_level(
                    self.target(servers[index], "a", **shape), streams, streams, lambda: None
                )
                pooled[index] = (pooled[index][0] + results, pooled[index][1] + wall)
        return [summarize(streams, results, wall) for results, wall in pooled]


FLOOD_HEAVY = {"prompt_words": 64, "max_tokens": 200}
LIGHT = {"prompt_words": 16, "max_tokens": 32}
LONG = {"prompt_words": 300, "max_tokens": 128}
SHORT = {"prompt_words": 64, "max_tokens": 128}


async def flood(bench: Bench, server: Any) -> dict[str, Any]:
    return await bench.tenants(
        server, [bench.spec("heavy", 24, **FLOOD_HEAVY), bench.spec("light", 1, **LIGHT)]
    )


async def scenario_flood(bench: Bench) -> dict[str, Any]:
    fair = await bench.server("llmserve")
    fifo = await bench.server("llmserve", scheduler_policy="fifo")
    alone = await bench.tenants(fair, [bench.spec("light", 1, **LIGHT)])
    return {
        "light_alone": alone,
        "fair": await flood(bench, fair),
        "fifo": await flood(bench, fifo),
    }


async def two_keys(bench: Bench, names: tuple[str, str]) -> dict[str, Any]:
    specs = [bench.spec(name, 12, **FLOOD_HEAVY) for name in names]
    return {
        policy: await bench.tenants(await bench.server("llmserve", **settings), specs)
        for policy, settings in (("fair", {}), ("fifo", {"scheduler_policy": "fifo"}))
    }


async def scenario_long(bench: Bench) -> dict[str, Any]:
    servers = [await bench.server("llmserve"), await bench.server(LLAMA_SERVER)]
    ours, theirs = await bench.bursts(servers, LONG, 8)
    return {"llmserve": ours, "llama-server": theirs}


async def scenario_noreg(bench: Bench) -> dict[str, Any]:
    servers = [await bench.server("llmserve"), await bench.server(LLAMA_SERVER)]
    levels: dict[str, Any] = {}
    for streams in (1, 8):
        ours, theirs = await bench.bursts(servers, SHORT, streams)
        levels[str(streams)] = {"llmserve": ours, "llama-server": theirs}
    return levels


async def scenario_steps(bench: Bench) -> dict[str, Any]:
    sweep: dict[str, Any] = {}
    for step in bench.args.step_tokens:
        server = await bench.server("llmserve", llamacpp_step_tokens=step)
        (sweep[str(step)],) = await bench.bursts([server], LONG, 8)
        await bench.stop(server)
    return sweep


async def scenario_spare(bench: Bench) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    for spare in (0, 1, 2):
        server = await bench.server("llmserve", llamacpp_spare_slots=spare)
        runs[str(spare)] = await flood(bench, server)
        await bench.stop(server)
    return runs


SCENARIO_RUNS: dict[str, Callable[[Bench], Any]] = {
    "flood": scenario_flood,
    "equal": lambda bench: two_keys(bench, ("a", "b")),
    "weights": lambda bench: two_keys(bench, ("w2", "w1")),
    "long": scenario_long,
    "noreg": scenario_noreg,
    "steps": scenario_steps,
    "spare": scenario_spare,
}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if not numerator or not denominator else round(numerator / denominator, 3)


def light_wait(run: dict[str, Any]) -> float:
    """The light key's TTFT p95 in a flood run; if a light request was still waiting for its
    first token at the end, at least that long (its wait is a floor of its TTFT)."""
    light = run["tenants"]["light"]
    return float(max(light["ttft_ms_p95"] or 0, light["unanswered_wait_ms_max"] or 0))


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue that this run measured: the figure, what is required, met."""
    rows: list[dict[str, Any]] = []

    def add(name: str, value: float | None, required: str, met: bool) -> None:
        rows.append({"target": name, "value": value, "required": required, "met": met})

    if flood := results.get("flood"):
        alone = flood["light_alone"]["tenants"]["light"]["ttft_ms_p95"]
        for policy in ("fair", "fifo"):
            ratio = _ratio(light_wait(flood[policy]), alone)
            add(
                f"flood: light TTFT p95 / alone ({policy})",
                ratio,
                "<= 2",
                ratio is not None and ratio <= 2,
            )
        ratio = _ratio(flood["fair"]["tokens_per_second"], flood["fifo"]["tokens_per_second"])
        add("flood: tokens/s fair / fifo", ratio, ">= 0.97", ratio is not None and ratio >= 0.97)
    for name, (first, second), goal in (("equal", ("a", "b"), 1.0), ("weights", ("w2", "w1"), 2.0)):
        if runs := results.get(name):
            for policy in ("fair", "fifo"):
                tenants = runs[policy]["tenants"]
                ratio = _ratio(tenants[first]["service"], tenants[second]["service"])
                met = ratio is not None and abs(ratio / goal - 1) <= 0.1
                add(f"{name}: service {first} / {second} ({policy})", ratio, f"{goal} ± 10%", met)
    if long := results.get("long"):
        for key, required, goal, at_most in (
            ("inter_token_ms_p99", "<= 0.35", 0.35, True),
            ("ttft_ms_p50", "<= 1.0", 1.0, True),
            ("aggregate_tokens_per_second", ">= 1.0", 1.0, False),
        ):
            ratio = _ratio(long["llmserve"][key], long["llama-server"][key])
            met = ratio is not None and (ratio <= goal if at_most else ratio >= goal)
            add(f"long prompts: {key} / llama-server", ratio, required, met)
    if noreg := results.get("noreg"):
        for streams, goal in (("1", 0.95), ("8", 1.0)):
            pair = noreg[streams]
            ratio = _ratio(
                pair["llmserve"]["aggregate_tokens_per_second"],
                pair["llama-server"]["aggregate_tokens_per_second"],
            )
            add(
                f"{streams} stream(s): tokens/s / llama-server",
                ratio,
                f">= {goal}",
                ratio is not None and ratio >= goal,
            )
    return rows


def markdown(report: dict[str, Any]) -> str:
    lines = ["| target | measured | required | met |", "|---|---:|---|---|"]
    lines += [
        f"| {row['target']} | {row['value']} | {row['required']} | "
        f"{'yes' if row['met'] else '**no**'} |"
        for row in report["targets"]
    ]
    results = report["results"]
    if "steps" in results:
        lines += [
            "",
            "| step_tokens | ITL p99 ms | TTFT p50 ms | tokens/s |",
            "|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {step} | {run['inter_token_ms_p99']} | {run['ttft_ms_p50']} | "
            f"{run['aggregate_tokens_per_second']} |"
            for step, run in results["steps"].items()
        ]
    if "spare" in results:
        lines += [
            "",
            "| spare_slots | light TTFT p50 ms | p95 ms | tokens/s |",
            "|---:|---:|---:|---:|",
        ]
        for spare, run in results["spare"].items():
            light = run["tenants"]["light"]
            lines.append(
                f"| {spare} | {light['ttft_ms_p50']} | {light['ttft_ms_p95']} | "
                f"{run['tokens_per_second']} |"
            )
    return "\n".join(lines)


def write_chart(path: Path, results: dict[str, Any]) -> None:
    """One panel per scenario measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [name for name in SCENARIOS if name in results]
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    figure, grid = plt.subplots(rows, columns, figsize=(4.2 * columns, 4 * rows), squeeze=False)
    for axes in grid.flat[len(panels) :]:
        axes.set_visible(False)
    for axes, name in zip(grid.flat, panels, strict=False):
        data = results[name]
        if name in ("flood", "spare"):
            runs = (
                {"alone": data["light_alone"], "fair": data["fair"], "fifo": data["fifo"]}
                if name == "flood"
                else {f"spare {k}": v for k, v in data.items()}
            )
            axes.bar(list(runs), [light_wait(run) for run in runs.values()])
            axes.set_yscale("log")
            axes.set_ylabel("light key TTFT p95 (ms)")
        elif name in ("equal", "weights"):
            for offset, policy in ((-0.2, "fair"), (0.2, "fifo")):
                tenants = data[policy]["tenants"]
                axes.bar(
                    [x + offset for x in range(len(tenants))],
                    [row["share_of_service"] for row in tenants.values()],
                    0.4,
                    label=policy,
                )
            axes.set_xticks(range(len(tenants)), list(tenants))
            axes.set_ylabel("share of weighted service")
            axes.legend()
        elif name == "steps":
            steps = list(data)
            axes.plot(
                steps, [r["inter_token_ms_p99"] for r in data.values()], "o-", label="ITL p99"
            )
            axes.plot(steps, [r["ttft_ms_p50"] for r in data.values()], "o-", label="TTFT p50")
            axes.set_xlabel("llamacpp.step_tokens")
            axes.set_ylabel("ms")
            axes.legend()
        else:
            pairs = (
                {"long": data} if name == "long" else {f"{k} stream": v for k, v in data.items()}
            )
            for offset, server in ((-0.2, "llmserve"), (0.2, "llama-server")):
                axes.bar(
                    [x + offset for x in range(len(pairs))],
                    [pair[server]["aggregate_tokens_per_second"] for pair in pairs.values()],
                    0.4,
                    label=server,
                )
            axes.set_xticks(range(len(pairs)), list(pairs))
            axes.set_ylabel("tokens/s")
            axes.legend()
        axes.set_title(name)
        axes.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report_of(args: argparse.Namespace, bench: Bench, results: dict[str, Any]) -> dict[str, Any]:
    return {
        "machine": f"{os.cpu_count()} cores",
        "model": bench.model.name,
        "settings": {
            "slots": args.slots,
            "threads": args.threads,
            "context_per_slot": args.context,
            "duration_seconds": args.duration,
            "rounds": args.rounds,
            "weights": WEIGHTS,
            "shapes": {"flood_heavy": FLOOD_HEAVY, "light": LIGHT, "long": LONG, "short": SHORT},
        },
        "commands": bench.commands,
        "results": results,
        "targets": targets(results),
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as directory:
        keys_file, secrets = write_keys_file(Path(directory))
        bench = Bench(args, keys_file, secrets)
        results: dict[str, Any] = {}
        try:
            for name in args.only:
                progress(f"{name}: running")
                results[name] = await SCENARIO_RUNS[name](bench)
                # After each scenario, so a long run stopped part way keeps what it measured.
                if args.json:
                    args.json.write_text(
                        json.dumps(report_of(args, bench, results), indent=2) + "\n"
                    )
        finally:
            await bench.stop_all()
    return report_of(args, bench, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        type=lambda s: s.split(","),
        default=list(SCENARIOS),
        help=f"scenarios to run, comma-separated (default: all: {','.join(SCENARIOS)})",
    )
    parser.add_argument("--quick", action="store_true", help="short runs, to check the script")
    parser.add_argument("--duration", type=float, default=60, help="seconds per multi-key run")
    parser.add_argument("--rounds", type=int, default=3, help="bursts per server and load")
    parser.add_argument(
        "--step-tokens",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[32, 64, 128, 256, 512],
    )
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--chart", type=Path)
    parser.add_argument(
        "--replot", type=Path, help="measure nothing: the table and chart of this JSON report"
    )
    args = parser.parse_args()
    if unknown := set(args.only) - set(SCENARIOS):
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if args.quick:
        args.duration, args.rounds, args.step_tokens = 20, 1, [64, 256]
    if args.replot:
        report = json.loads(args.replot.read_text())
        report["targets"] = targets(report["results"])
    else:
        report = asyncio.run(measure(args))
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.chart:
        write_chart(args.chart, report["results"])


if __name__ == "__main__":
    main()
