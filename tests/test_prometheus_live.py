"""A real Prometheus scrapes two real servers and sidecars under load; every query we ship answers.

promtool's unit tests prove the rules compute the right values from series we write by hand; this
proves the series the sidecar actually exports are the ones the rules and dashboards ask for, so
no recording rule stays empty and no dashboard panel shows "No data" on a working server. Two
replicas, because one Prometheus watches a fleet: the dashboards must tell them apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from llmserve.server.cli import main
from llmserve.sidecar.gpu import GPU_METRICS
from tests.conftest import Process, free_port, start_synthetic_server
from tests.daemons import Daemon

ROOT = Path(__file__).resolve().parent.parent
RULE_FILES = sorted((ROOT / "prometheus" / "rules").glob("*.yml"))
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
SHIPPED_CONFIG = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())

# What Grafana substitutes before a query reaches Prometheus: every model, key and instance, and
# a rate window that holds several of this test's 1 s scrapes.
GRAFANA_VARIABLES = {"$__rate_interval": "10s", "$model": ".*", "$key": ".*", "$instance": ".*"}


def rules(kind: str) -> list[dict[str, Any]]:
    return [
        rule
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if kind in rule
    ]


def panel_queries(*, per_instance: bool = False) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every Prometheus panel that this CPU-only host can fill; with
    `per_instance`, only the queries that draw one series per instance."""
    queries = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            if panel["datasource"]["type"] != "prometheus":
                continue
            for target in panel["targets"]:
                if per_instance and "{{instance}}" not in target["legendFormat"]:
                    continue
                expr = target["expr"]
                for variable, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(variable, value)
                # NVML is absent without an NVIDIA GPU, so the GPU panels are rightly empty here.
                if not any(name in expr for name in GPU_METRICS):
                    queries.append((f"{path.stem}: {panel['title']}", expr))
    return queries


def variable_queries(label: str | None = None) -> list[str]:
    """The series selectors behind the dashboards' label_values() variables (of one label)."""
    metrics = set()
    for path in DASHBOARDS:
        for variable in json.loads(path.read_text())["templating"]["list"]:
            if variable["type"] == "query":
                selector, name = variable["query"]["query"][len("label_values(") : -1].split(", ")
                if label in (None, name):
                    metrics.add(selector)
    return sorted(metrics)


class Prometheus(Daemon):
    """Debian's prometheus binary on a free loopback port, with llmserve's rule files."""

    def __init__(
        self,
        directory: Path,
        sidecar_ports: list[int],
        *,
        rule_files: list[Path] = RULE_FILES,
        **settings: Any,
    ) -> None:
        """`settings` go into the configuration beside the scrape job (e.g. `alerting`)."""
        super().__init__(directory)
        targets = [f"127.0.0.1:{port}" for port in sidecar_ports]
        config = {
            "global": {
                "scrape_interval": "1s",
                "evaluation_interval": "1s",
                # The runbook_base that the alerts' runbook_url is made of.
                "external_labels": SHIPPED_CONFIG["global"]["external_labels"],
            },
            # Where the exemplars are kept, as shipped.
            "storage": SHIPPED_CONFIG["storage"],
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [
                {"job_name": "llmserve-sidecar", "static_configs": [{"targets": targets}]}
            ],
            **settings,
        }
        self.config = directory / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))

    async def start(self) -> None:
        await self.launch(
            "prometheus",
            "prometheus",
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.directory / 'data'}",
            # As deployed (docs/deployment.md): exemplars are kept and can be queried.
            "--enable-feature=exemplar-storage",
        )

    async def query(self, session: aiohttp.ClientSession, expr: str) -> dict[str, Any]:
        url = f"{self.url}/api/v1/query"
        async with session.post(url, data={"query": expr}) as response:
            return dict(await response.json())

    async def exemplars(
        self, session: aiohttp.ClientSession, expr: str, start: float, end: float
    ) -> list[dict[str, Any]]:
        """/api/v1/query_exemplars: each series with the exemplars it was scraped with."""
        url = f"{self.url}/api/v1/query_exemplars"
        form = {"query": expr, "start": str(start), "end": str(end)}
        async with session.post(url, data=form) as response:
            answer = await response.json()
        assert answer["status"] == "success", f"{expr}: {answer.get('error')}"
        return list(answer["data"])

    async def label_values(
        self, session: aiohttp.ClientSession, label: str, selector: str
    ) -> list[str]:
        """What Grafana's label_values(selector, label) asks Prometheus for."""
        url = f"{self.url}/api/v1/label/{label}/values"
        async with session.get(url, params={"match[]": selector}) as response:
            answer = await response.json()
        assert answer["status"] == "success", f"{selector}: {answer.get('error')}"
        return list(answer["data"])


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
    """A bad model (404), rate limits (429), successes, overload (503) and a disconnect.

    The 404 and 429 go first, alone: a server that is full answers 503 before it looks at the
    model or the key's limits."""
    async with aiohttp.ClientSession() as session:
        statuses = [await chat(session, base, busy, model="no-such-model")]
        statuses += [await chat(session, base, throttled) for _ in range(3)]
        statuses += await asyncio.gather(*(chat(session, base, busy) for _ in range(6)))
        await cancelled_chat(session, base, busy)
        statuses += await asyncio.gather(*(chat(session, base, busy) for _ in range(3)))
    return set(statuses)


@dataclass
class Fleet:
    """A live Prometheus over replicas, and the `instance` label of each replica's sidecar."""

    prometheus: Prometheus
    instances: list[str]
    statuses: set[int]


@pytest.fixture
async def loaded_stack(
    tmp_path: Path, short_tmp: str, processes: list[Process], capsys: pytest.CaptureFixture[str]
) -> AsyncIterator[Fleet]:
    keys = tmp_path / "keys.toml"
    secrets = []
    for name, rpm in (("busy", "10000"), ("throttled", "2")):
        assert main(["keys", "--file", str(keys), "create", name, "--rpm", rpm]) == 0
        secrets.append(capsys.readouterr().out.split()[-1])
    sidecar_ports = [free_port(), free_port()]
    bases = []
    for replica, sidecar_port in enumerate(sidecar_ports):
        _, base = await start_synthetic_server(
            processes,
            *("--auth-keys-file", str(keys)),
            *("--synthetic-parallel", "4", "--server-max-waiting", "0"),
            *("--synthetic-token-interval-seconds", "0.02", "--synthetic-completion-tokens", "10"),
            *("--sidecar-port", str(sidecar_port)),
            *("--sidecar-socket-path", f"{short_tmp}/ev{replica}.sock"),
        )
        bases.append(base)
    prometheus = Prometheus(tmp_path, sidecar_ports)
    await prometheus.start()
    try:
        # Load before and after Prometheus's first scrapes, so counters are seen rising.
        statuses: set[int] = set()
        for _ in range(2):
            for base in bases:
                statuses |= await mixed_load(base, *secrets)
            await asyncio.sleep(3)
        yield Fleet(prometheus, [f"127.0.0.1:{port}" for port in sidecar_ports], statuses)
    finally:
        await prometheus.stop()


async def test_every_rule_and_panel_returns_data_from_a_live_server(loaded_stack: Fleet) -> None:
    prometheus = loaded_stack.prometheus
    assert {200, 404, 429, 503} <= loaded_stack.statuses
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


async def test_the_dashboards_tell_the_replicas_apart(loaded_stack: Fleet) -> None:
    """The instance variable offers every replica, and each per-instance panel draws each one."""
    prometheus, instances = loaded_stack.prometheus, set(loaded_stack.instances)
    per_instance = panel_queries(per_instance=True)
    assert len(per_instance) >= 2 and variable_queries("instance")
    async with aiohttp.ClientSession() as session:
        assert await wait_until_all_answer(prometheus, session, per_instance) == []
        for selector in variable_queries("instance"):
            assert set(await prometheus.label_values(session, "instance", selector)) == instances
        for name, expr in per_instance:
            answer = await prometheus.query(session, expr)
            drawn = {series["metric"].get("instance") for series in answer["data"]["result"]}
            assert drawn == instances, f"{name}: {expr} draws {drawn}"
