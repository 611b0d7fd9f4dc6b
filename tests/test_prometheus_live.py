"""A real Prometheus scrapes a real server and sidecar under load, and every query we ship answers.

promtool's unit tests prove the rules compute the right values from series we write by hand; this
proves the series the sidecar actually exports are the ones the rules and dashboards ask for, so
no recording rule stays empty and no dashboard panel shows "No data" on a working server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from llmserve.server.cli import main
from llmserve.sidecar.gpu import GPU_METRICS
from tests.conftest import Process, free_port, start_synthetic_server

ROOT = Path(__file__).resolve().parent.parent
RULE_FILES = sorted((ROOT / "prometheus" / "rules").glob("*.yml"))
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))

# What Grafana substitutes before a query reaches Prometheus: every model and key, and a rate
# window that holds several of this test's 1 s scrapes.
GRAFANA_VARIABLES = {"$__rate_interval": "10s", "$model": ".*", "$key": ".*"}


def rules(kind: str) -> list[dict[str, Any]]:
    return [
        rule
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if kind in rule
    ]


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every Prometheus panel that this CPU-only host can fill."""
    queries = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            if panel["datasource"]["type"] != "prometheus":
                continue
            for target in panel["targets"]:
                expr = target["expr"]
                for variable, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(variable, value)
                # NVML is absent without an NVIDIA GPU, so the GPU panels are rightly empty here.
                if not any(name in expr for name in GPU_METRICS):
                    queries.append((f"{path.stem}: {panel['title']}", expr))
    return queries


def variable_queries() -> list[str]:
    """The metrics behind each dashboard's label_values() variables."""
    metrics = set()
    for path in DASHBOARDS:
        for variable in json.loads(path.read_text())["templating"]["list"]:
            if variable["type"] == "query":
                metrics.add(variable["query"]["query"].split("(", 1)[1].split(",", 1)[0])
    return sorted(metrics)


class Prometheus:
    """Debian's prometheus binary on a free loopback port, with llmserve's rule files."""

    def __init__(self, directory: Path, sidecar_port: int) -> None:
        self.port = free_port()
        self.directory = directory
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in RULE_FILES],
            "scrape_configs": [
                {
                    "job_name": "llmserve-sidecar",
                    "static_configs": [{"targets": [f"127.0.0.1:{sidecar_port}"]}],
                }
            ],
        }
        self.config = directory / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is missing: scripts/setup --test installs Debian's package"
        self.proc = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def query(self, session: aiohttp.ClientSession, expr: str) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query"
        async with session.post(url, data={"query": expr}) as response:
            return dict(await response.json())


async def series_count(prometheus: Prometheus, session: aiohttp.ClientSession, expr: str) -> int:
    answer = await prometheus.query(session, expr)
    assert answer["status"] == "success", f"{expr}: {answer.get('error')}"
    return len(answer["data"]["result"])


async def wait_until_all_answer(
    prometheus: Prometheus, session: aiohttp.ClientSession, queries: list[tuple[str, str]]
) -> list[str]:
    """Poll until every query returns a series, or 60 s pass; return those still empty."""
    empty = [f"{name}: {expr}" for name, expr in queries]
    for _ in range(60):
        empty = []
        for name, expr in queries:
            with contextlib.suppress(aiohttp.ClientError):
                if await series_count(prometheus, session, expr) > 0:
                    continue
            empty.append(f"{name}: {expr}")
        if not empty:
            break
        await asyncio.sleep(1)
    return empty


async def chat(
    session: aiohttp.ClientSession, base: str, secret: str, *, model: str = "synthetic"
) -> int:
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hello"}]}
    headers = {"Authorization": f"Bearer {secret}"}
    async with session.post(f"{base}/v1/chat/completions", json=body, headers=headers) as response:
        await response.read()
        return response.status


async def cancelled_chat(session: aiohttp.ClientSession, base: str, secret: str) -> None:
    body = {"model": "synthetic", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {secret}"}
    async with session.post(f"{base}/v1/chat/completions", json=body, headers=headers) as response:
        await response.content.readline()
        response.close()


async def mixed_load(base: str, busy: str, throttled: str) -> set[int]:
    """Successes, overload (503), rate limits (429), a bad model (404) and a disconnect."""
    async with aiohttp.ClientSession() as session:
        statuses = await asyncio.gather(
            *(chat(session, base, busy) for _ in range(6)),
            *(chat(session, base, throttled) for _ in range(3)),
            chat(session, base, busy, model="no-such-model"),
        )
        await cancelled_chat(session, base, busy)
        statuses += await asyncio.gather(*(chat(session, base, busy) for _ in range(3)))
    return set(statuses)


@pytest.fixture
async def loaded_stack(
    tmp_path: Path, short_tmp: str, processes: list[Process], capsys: pytest.CaptureFixture[str]
) -> AsyncIterator[tuple[Prometheus, set[int]]]:
    keys = tmp_path / "keys.toml"
    secrets = []
    for name, rpm in (("busy", "10000"), ("throttled", "2")):
        assert main(["keys", "--file", str(keys), "create", name, "--rpm", rpm]) == 0
        secrets.append(capsys.readouterr().out.split()[-1])
    sidecar_port = free_port()
    _, base = await start_synthetic_server(
        processes,
        *("--auth-keys-file", str(keys)),
        *("--synthetic-parallel", "4", "--server-max-waiting", "0"),
        *("--synthetic-token-interval-seconds", "0.02", "--synthetic-completion-tokens", "10"),
        *("--sidecar-port", str(sidecar_port), "--sidecar-socket-path", f"{short_tmp}/ev.sock"),
    )
    prometheus = Prometheus(tmp_path, sidecar_port)
    await prometheus.start()
    try:
        # Load before and after Prometheus's first scrapes, so counters are seen rising.
        statuses = await mixed_load(base, *secrets)
        await asyncio.sleep(3)
        statuses |= await mixed_load(base, *secrets)
        yield prometheus, statuses
    finally:
        await prometheus.stop()


async def test_every_rule_and_panel_returns_data_from_a_live_server(
    loaded_stack: tuple[Prometheus, set[int]],
):
    prometheus, statuses = loaded_stack
    assert {200, 404, 429, 503} <= statuses
    recorded = [(f"rule {r['record']}", r["record"]) for r in rules("record")]
    panels = panel_queries()
    variables = [(f"variable over {metric}", metric) for metric in variable_queries()]
    assert len(recorded) >= 40 and len(panels) >= 30
    async with aiohttp.ClientSession() as session:
        empty = await wait_until_all_answer(prometheus, session, recorded + panels + variables)
        assert not empty, "no data for:\n" + "\n".join(empty)
        for alert in rules("alert"):
            # Evaluates without error; whether it fires is promtool's tests' business.
            await series_count(prometheus, session, alert["expr"])
