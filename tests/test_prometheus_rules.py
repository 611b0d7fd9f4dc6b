"""The Prometheus configuration and rules shipped in prometheus/ load, their promtool unit tests
pass, every alert is tested inside its pending window, and the scrape configuration discovers only
the targets it means to."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = sorted((ROOT / "prometheus" / "rules").glob("*.yml"))
RULE_TESTS = sorted((ROOT / "prometheus" / "tests").glob("*.yml"))
ALERTS = [
    rule
    for group in yaml.safe_load((ROOT / "prometheus/rules/alerts.yml").read_text())["groups"]
    for rule in group["rules"]
]
ALERT_TESTS = yaml.safe_load((ROOT / "prometheus/tests/alerts_test.yml").read_text())["tests"]
# Only this host's sidecar and node_exporter: a central Prometheus lists other hosts in targets/.
INTENDED_TARGETS = {
    "llmserve-sidecar": {"127.0.0.1:8001"},
    "llmserve-sidecar-fleet": set(),
    "node": {"127.0.0.1:9100"},
    "node-fleet": set(),
}


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: scripts/setup --test installs Debian's prometheus"
    return subprocess.run(
        [binary, *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


def minutes(duration: str) -> float:
    """A Prometheus duration such as 1h2m or 90s, in minutes."""
    units = {"d": 1440.0, "h": 60.0, "m": 1.0, "s": 1 / 60}
    parts = re.findall(r"(\d+)(d|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(int(n) * units[u] for n, u in parts)


def discovered(config: Path, job: str) -> set[str]:
    # promtool waits out its whole timeout (30 s by default); file_sd answers at once.
    result = promtool(
        "check", "service-discovery", "--timeout=3s", str(config), job, cwd=config.parent
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return {target["labels"]["instance"] for target in json.loads(result.stdout or "[]")}


@pytest.mark.parametrize("rules", RULES, ids=[r.name for r in RULES])
def test_rules_are_valid(rules: Path) -> None:
    result = promtool("check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("case", RULE_TESTS, ids=[t.name for t in RULE_TESTS])
def test_rule_unit_tests_pass(case: Path) -> None:
    result = promtool("test", "rules", str(case))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rules_file_has_a_unit_test() -> None:
    tested = {t.name.removesuffix("_test.yml") for t in RULE_TESTS}
    assert {r.stem for r in RULES} <= tested


def test_prometheus_config_is_valid() -> None:
    result = promtool("check", "config", str(ROOT / "prometheus" / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("job", INTENDED_TARGETS)
def test_service_discovery_finds_only_the_intended_targets(job: str) -> None:
    assert discovered(ROOT / "prometheus" / "prometheus.yml", job) == INTENDED_TARGETS[job]


def test_the_target_examples_are_read_once_copied_where_the_docs_say(tmp_path: Path) -> None:
    config = tmp_path / "prometheus"
    shutil.copytree(ROOT / "prometheus", config)
    for example in (config / "targets").glob("*.example"):
        shutil.copy(example, example.with_suffix(""))
    assert discovered(config / "prometheus.yml", "llmserve-sidecar-fleet") == {
        "gpu-host-1:8001",
        "gpu-host-1:8011",
        "gpu-host-2:8001",
    }
    assert discovered(config / "prometheus.yml", "node-fleet") == {
        "gpu-host-1:9100",
        "gpu-host-2:9100",
    }


def test_every_alert_has_a_runbook_entry_reached_through_the_configured_base() -> None:
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    anchors = {line[3:].strip().lower() for line in runbook.splitlines() if line.startswith("## ")}
    for rule in ALERTS:
        base, anchor = rule["annotations"]["runbook_url"].split("#")
        assert base == "{{ $externalLabels.runbook_base }}", rule["alert"]
        assert anchor == rule["alert"].lower() and anchor in anchors
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"].endswith(".")
    config = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    assert config["global"]["external_labels"]["runbook_base"].startswith("https://")


def quiet_then_firing(rule: dict[str, Any], case: dict[str, Any]) -> bool:
    """Whether one test case sees `rule` quiet at some time and firing less than its `for:`
    later. Firing at T2 means the condition held since T2 - for at the latest, so at the earlier
    time it already held and the alert was pending: the quiet side seen inside the window."""
    own = {k: str(v) for k, v in rule.get("labels", {}).items()}

    def fires(check: dict[str, Any]) -> bool:
        return any(
            own.items() <= {k: str(v) for k, v in alert["exp_labels"].items()}.items()
            for alert in check.get("exp_alerts") or []
        )

    checks = [c for c in case.get("alert_rule_test", []) if c["alertname"] == rule["alert"]]
    pending = minutes(rule["for"])
    return any(
        not fires(quiet) and fires(firing) and 0 < firing_at - quiet_at < pending
        for quiet in checks
        for firing in checks
        for quiet_at, firing_at in [(minutes(quiet["eval_time"]), minutes(firing["eval_time"]))]
    )


@pytest.mark.parametrize(
    "rule",
    [r for r in ALERTS if "for" in r],
    ids=[f"{r['alert']}{r['labels'].get('long', '')}" for r in ALERTS if "for" in r],
)
def test_every_alert_is_seen_quiet_inside_its_pending_window(rule: dict[str, Any]) -> None:
    assert any(quiet_then_firing(rule, case) for case in ALERT_TESTS), (
        f"{rule['alert']} {rule.get('labels')}: no test sees it quiet while its condition has "
        f"held for less than {rule['for']}, then firing"
    )


@pytest.mark.parametrize("alert", sorted({r["alert"] for r in ALERTS}))
def test_every_alert_has_a_quiet_case_and_a_firing_case(alert: str) -> None:
    checks = [
        check
        for case in ALERT_TESTS
        for check in case.get("alert_rule_test", [])
        if check["alertname"] == alert
    ]
    assert any(not c.get("exp_alerts") for c in checks), f"{alert}: never tested quiet"
    assert any(c.get("exp_alerts") for c in checks), f"{alert}: never tested firing"


def test_the_central_prometheus_of_the_deployment_guide_scrapes_only_the_listed_hosts(
    tmp_path: Path,
) -> None:
    guide = (ROOT / "docs" / "deployment.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", guide, re.S) if "scrape_configs" in b]
    central = yaml.safe_load(textwrap.dedent(block))["scrape_configs"]
    token = tmp_path / "llmserve-sidecar-token"
    token.write_text("test-token\n")
    for job in central:
        if "authorization" in job:
            job["authorization"]["credentials_file"] = str(token)
    config_dir = tmp_path / "prometheus"
    shutil.copytree(ROOT / "prometheus", config_dir)
    config = yaml.safe_load((config_dir / "prometheus.yml").read_text())
    config["scrape_configs"] = central
    (config_dir / "prometheus.yml").write_text(yaml.safe_dump(config))
    for example in (config_dir / "targets").glob("*.example"):
        shutil.copy(example, example.with_suffix(""))
    checked = promtool("check", "config", str(config_dir / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert [job["job_name"] for job in central] == ["llmserve-sidecar-fleet", "node-fleet"]
    assert discovered(config_dir / "prometheus.yml", "llmserve-sidecar-fleet") == {
        "gpu-host-1:8001",
        "gpu-host-1:8011",
        "gpu-host-2:8001",
    }
