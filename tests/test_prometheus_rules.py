"""The Prometheus rules shipped in prometheus/ load, and their promtool unit tests pass."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RULES = sorted((ROOT / "prometheus" / "rules").glob("*.yml"))
RULE_TESTS = sorted((ROOT / "prometheus" / "tests").glob("*.yml"))


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args], capture_output=True, text=True, timeout=120, cwd=ROOT, check=False
    )


@pytest.mark.parametrize("rules", RULES, ids=[r.name for r in RULES])
def test_rules_are_valid(rules: Path):
    result = promtool("check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("case", RULE_TESTS, ids=[t.name for t in RULE_TESTS])
def test_rule_unit_tests_pass(case: Path):
    result = promtool("test", "rules", str(case))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rules_file_has_a_unit_test():
    tested = {t.name.removesuffix("_test.yml") for t in RULE_TESTS}
    assert {r.stem for r in RULES} <= tested


def test_prometheus_config_is_valid():
    result = promtool("check", "config", str(ROOT / "prometheus" / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_runbook_entry():
    import yaml

    runbook = (ROOT / "docs" / "runbook.md").read_text()
    anchors = {line[3:].strip().lower() for line in runbook.splitlines() if line.startswith("## ")}
    alerts = yaml.safe_load((ROOT / "prometheus" / "rules" / "alerts.yml").read_text())
    for group in alerts["groups"]:
        for rule in group["rules"]:
            anchor = rule["annotations"]["runbook_url"].split("#")[1]
            assert anchor == rule["alert"].lower() and anchor in anchors
            assert rule["labels"]["severity"] in ("critical", "warning", "info")
            assert rule["annotations"]["summary"].endswith(".")
