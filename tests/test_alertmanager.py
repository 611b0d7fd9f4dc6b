"""alertmanager/alertmanager.yml routes, groups and inhibits llmserve's alerts as documented, and a
real Prometheus and Alertmanager deliver the down alert of a replica that dies.

amtool checks the shipped file itself: its syntax, and the receiver each alert of
prometheus/rules/alerts.yml reaches. The live tests run Debian's prometheus-alertmanager with a
copy of the shipped file that differs only in its receivers' URLs (a webhook in this test) and
in seconds-long group timings; Prometheus gets copies of the shipped rules whose `for:` are
seconds, so a real outage is noticed within the test.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import Process, free_port, start, start_synthetic_server
from tests.daemons import Daemon
from tests.test_docker_compose import mounts, services
from tests.test_prometheus_live import (
    RULE_FILES,
    SHIPPED_CONFIG,
    Prometheus,
    chat,
    rules,
    wait_until_all_answer,
)

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "alertmanager" / "alertmanager.yml"
RECEIVER_OF_SEVERITY = {"critical": "page", "warning": "ticket", "info": "dashboards-only"}
DOWN_ALERTS = {"LlmserveServerDown", "LlmserveSidecarDown"}


def amtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("amtool")
    assert binary, (
        "amtool is missing: scripts/setup --test installs Debian's prometheus-alertmanager"
    )
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, check=False)


def inhibited_names() -> set[str]:
    """Every alert name the shipped inhibit rules silence while a down alert fires."""
    names = set()
    for rule in yaml.safe_load(CONFIG.read_text())["inhibit_rules"]:
        for matcher in rule["target_matchers"]:
            if found := re.fullmatch(r'alertname=~?"([^"]+)"', matcher):
                names |= set(found[1].split("|"))
    return names


def test_shipped_config_passes_amtool() -> None:
    checked = amtool("check-config", str(CONFIG))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_alert_reaches_the_receiver_of_its_severity() -> None:
    for alert in rules("alert"):
        severity = alert["labels"]["severity"]
        labels = [f"{name}={value}" for name, value in alert["labels"].items()]
        routed = amtool(
            *("config", "routes", "test", f"--config.file={CONFIG}"),
            f"--verify.receivers={RECEIVER_OF_SEVERITY[severity]}",
            *(f"alertname={alert['alert']}", "instance=10.0.0.1:8001", *labels),
        )
        assert routed.returncode == 0, f"{alert['alert']} ({severity}): {routed.stdout}"


def test_inhibit_rules_name_latency_and_throughput_alerts_that_exist() -> None:
    """A misspelt name in an inhibit rule silences nothing, and nothing says so."""
    alert_names = {alert["alert"] for alert in rules("alert")}
    inhibited = inhibited_names()
    assert inhibited <= alert_names, inhibited - alert_names
    assert {"LlmserveTimeToFirstTokenHigh", "LlmserveSlowStreams", "LlmserveQueueBacklog"} <= (
        inhibited
    )
    assert not inhibited & DOWN_ALERTS


def test_compose_runs_the_alertmanager_that_prometheus_sends_to() -> None:
    alertmanager = services()["alertmanager"]
    assert mounts(alertmanager)["/etc/alertmanager"] == "alertmanager"
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in alertmanager["command"]
    (listen,) = (a for a in alertmanager["command"] if a.startswith("--web.listen-address="))
    (target,) = SHIPPED_CONFIG["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert listen == f"--web.listen-address={target}" and target.startswith("127.0.0.1:")
    # One Alertmanager: no gossip port open to the network.
    assert "--cluster.listen-address=" in alertmanager["command"]


class Webhook:
    """The receiving end of every receiver: keeps each notification with when it arrived."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        self.arrived = asyncio.Condition()
        self.url = ""

    async def receive(self, request: web.Request) -> web.Response:
        notification = await request.json()
        notification["arrived"] = time.monotonic()
        async with self.arrived:
            self.notifications.append(notification)
            self.arrived.notify_all()
        return web.Response()

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], seconds: float = 180
    ) -> dict[str, Any]:
        """The first notification that satisfies `predicate`, waiting for it if need be."""

        def found() -> list[dict[str, Any]]:
            return [n for n in self.notifications if predicate(n)]

        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(found), seconds)
        return found()[0]


def alerts_in(notification: dict[str, Any], status: str = "firing") -> set[str]:
    return {a["labels"]["alertname"] for a in notification["alerts"] if a["status"] == status}


class Alertmanager(Daemon):
    """Debian's prometheus-alertmanager with the shipped config, sped up and sending to a URL."""

    def __init__(self, directory: Path, webhook_url: str) -> None:
        config = yaml.safe_load(CONFIG.read_text())
        for route in (config["route"], *config["route"]["routes"]):
            for timing in ("group_wait", "group_interval"):
                if timing in route:
                    route[timing] = "1s"
        for receiver in config["receivers"]:
            for hook in receiver.get("webhook_configs", []):
                hook["url"] = f"{webhook_url}/{receiver['name']}"
        super().__init__(directory)
        self.config = directory / "alertmanager.yml"
        self.config.write_text(yaml.safe_dump(config))

    async def start(self) -> None:
        await self.launch(
            "prometheus-alertmanager",
            "prometheus-alertmanager",
            f"--config.file={self.config}",
            f"--storage.path={self.directory / 'alertmanager-data'}",
            "--cluster.listen-address=",
        )

    async def post(self, *alerts: dict[str, Any]) -> None:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{self.url}/api/v2/alerts", json=list(alerts)) as response:
                assert response.status == 200, await response.text()

    async def alerts(self) -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{self.url}/api/v2/alerts") as response:
                return list(await response.json())

    async def wait_for_state(self, alertname: str) -> dict[str, Any]:
        """The status of the alert named so, once Prometheus has sent it here."""
        for _ in range(600):
            for alert in await self.alerts():
                if alert["labels"]["alertname"] == alertname:
                    return dict(alert["status"])
            await asyncio.sleep(0.1)
        raise AssertionError(f"{alertname} never reached Alertmanager")


@pytest.fixture
async def webhook(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Webhook:
    hook = Webhook()
    app = web.Application()
    app.router.add_post("/{receiver}", hook.receive)
    server = await aiohttp_server(app)
    hook.url = str(server.make_url("")).rstrip("/")
    return hook


@pytest.fixture
async def alertmanager(tmp_path: Path, webhook: Webhook) -> AsyncIterator[Alertmanager]:
    manager = Alertmanager(tmp_path, webhook.url)
    await manager.start()
    try:
        yield manager
    finally:
        await manager.stop()


def alert(name: str, severity: str, **labels: str) -> dict[str, Any]:
    return {
        "labels": {"alertname": name, "severity": severity, **labels},
        "startsAt": datetime.now(UTC).isoformat(),
    }


async def test_a_down_server_silences_latency_alerts_until_it_resolves(
    alertmanager: Alertmanager, webhook: Webhook
) -> None:
    down = alert("LlmserveServerDown", "critical", instance="a:8001")
    await alertmanager.post(down)
    await webhook.wait_for(lambda n: "LlmserveServerDown" in alerts_in(n))

    await alertmanager.post(
        alert("LlmserveTimeToFirstTokenHigh", "warning", model="m", quantile="0.95"),
        alert("LlmserveQueueBacklog", "warning", instance="a:8001", model="m"),
        alert("LlmserveQueueBacklog", "warning", instance="b:8001", model="m"),
    )
    # The other replica's backlog is not the down one's doing: it is delivered.
    other = await webhook.wait_for(lambda n: n["groupLabels"] == {"instance": "b:8001"})
    assert other["receiver"] == "ticket" and alerts_in(other) == {"LlmserveQueueBacklog"}
    states = {
        (a["labels"]["alertname"], a["labels"].get("instance")): a["status"]
        for a in await alertmanager.alerts()
    }
    for suppressed in (("LlmserveTimeToFirstTokenHigh", None), ("LlmserveQueueBacklog", "a:8001")):
        assert states[suppressed]["state"] == "suppressed", suppressed
        assert states[suppressed]["inhibitedBy"], suppressed
    assert states[("LlmserveQueueBacklog", "b:8001")]["state"] == "active"
    assert not any("LlmserveTimeToFirstTokenHigh" in alerts_in(n) for n in webhook.notifications)

    # Once the server is back, the latency alert that still fires is news again.
    await alertmanager.post(down | {"endsAt": datetime.now(UTC).isoformat()})
    latency = await webhook.wait_for(lambda n: "LlmserveTimeToFirstTokenHigh" in alerts_in(n))
    assert latency["receiver"] == "ticket"


def quick_rules(directory: Path) -> list[Path]:
    """The shipped rule files with every `for:` cut to seconds."""
    copies = []
    for path in RULE_FILES:
        content = yaml.safe_load(path.read_text())
        for group in content["groups"]:
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = "2s"
        copy = directory / path.name
        copy.write_text(yaml.safe_dump(content))
        copies.append(copy)
    return copies


async def start_replica(
    processes: list[Process], socket_path: str, *server_args: str, sidecar_port: int | None = None
) -> tuple[Process, str]:
    """A synthetic server reporting to a sidecar of its own (started too, given its port), so
    the server can die while its sidecar stays up and says so. Returns it and its base URL."""
    if sidecar_port is not None:
        sidecar = await start(
            *("sidecar", "--sidecar-port", str(sidecar_port), "--sidecar-socket-path", socket_path)
        )
        processes.append(sidecar)
    return await start_synthetic_server(
        processes, "--sidecar-spawn", "false", "--sidecar-socket-path", socket_path, *server_args
    )


async def test_a_replica_that_dies_pages_once_with_its_runbook_and_resolves(
    tmp_path: Path,
    short_tmp: str,
    processes: list[Process],
    alertmanager: Alertmanager,
    webhook: Webhook,
) -> None:
    """Replica 0 dies and comes back. Replica 1 lives, but answers its first token after 2.5 s:
    its requests, sent while replica 0 is down, make the fleet's latency alerts fire, which
    Alertmanager holds back until the down alert resolves."""
    sidecar_ports = [free_port(), free_port()]
    sockets = [f"{short_tmp}/ev{replica}.sock" for replica in range(2)]
    dying, _ = await start_replica(processes, sockets[0], sidecar_port=sidecar_ports[0])
    _, slow = await start_replica(
        processes,
        sockets[1],
        *("--synthetic-first-token-seconds", "2.5", "--synthetic-completion-tokens", "5"),
        sidecar_port=sidecar_ports[1],
    )
    instance = f"127.0.0.1:{sidecar_ports[0]}"
    sending = dict(SHIPPED_CONFIG["alerting"])
    sending["alertmanagers"] = [
        {"static_configs": [{"targets": [f"127.0.0.1:{alertmanager.port}"]}]}
    ]
    prometheus = Prometheus(
        tmp_path, sidecar_ports, rule_files=quick_rules(tmp_path), alerting=sending
    )
    await prometheus.start()
    try:
        async with aiohttp.ClientSession() as session:
            both_reporting = [("both replicas", "count(llm_servers_reporting == 1) == 2")]
            assert await wait_until_all_answer(prometheus, session, both_reporting) == []

            dying.proc.kill()
            await dying.proc.wait()
            stopped = time.monotonic()
            page = await webhook.wait_for(lambda n: "LlmserveServerDown" in alerts_in(n))
            print(f"\nserver stopped -> page at the webhook: {page['arrived'] - stopped:.1f} s")
            assert page["receiver"] == "page" and page["groupLabels"] == {"instance": instance}
            (down,) = (
                a for a in page["alerts"] if a["labels"]["alertname"] == "LlmserveServerDown"
            )
            runbook = SHIPPED_CONFIG["global"]["external_labels"]["runbook_base"]
            assert down["annotations"]["runbook_url"] == f"{runbook}#llmserveserverdown"
            assert down["labels"]["severity"] == "critical"
            assert instance in down["annotations"]["description"]

            # Twice, the second after Prometheus has the new series, so it sees them rise.
            assert {200} == set(await asyncio.gather(*(chat(session, slow, "-") for _ in range(4))))
            seen = [("TTFT series", "llm_time_to_first_token_seconds_count > 0")]
            assert await wait_until_all_answer(prometheus, session, seen) == []
            assert {200} == set(await asyncio.gather(*(chat(session, slow, "-") for _ in range(4))))
            ttft_high = 'ALERTS{alertname="LlmserveTimeToFirstTokenHigh", alertstate="firing"}'
            assert await wait_until_all_answer(prometheus, session, [("TTFT", ttft_high)]) == []
            held_back = await alertmanager.wait_for_state("LlmserveTimeToFirstTokenHigh")
            assert held_back["state"] == "suppressed" and held_back["inhibitedBy"]

            restarted = time.monotonic()
            await start_replica(processes, sockets[0])
            resolved = await webhook.wait_for(
                lambda n: "LlmserveServerDown" in alerts_in(n, "resolved")
            )
            assert resolved["groupLabels"] == {"instance": instance}
            await webhook.wait_for(lambda n: "LlmserveTimeToFirstTokenHigh" in alerts_in(n))
    finally:
        await prometheus.stop()

    pages = [n for n in webhook.notifications if "LlmserveServerDown" in alerts_in(n)]
    assert pages == [page], "the down alert was sent more than once"
    silenced = inhibited_names()
    early = [
        n for n in webhook.notifications if alerts_in(n) & silenced and n["arrived"] < restarted
    ]
    assert not early, "a latency alert was sent while the down alert fired"
    # Nothing about the replica that stayed up: its alerts are the fleet's, with no instance.
    assert {n["groupLabels"].get("instance") for n in webhook.notifications} <= {instance, None}
