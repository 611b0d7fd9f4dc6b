"""The Grafana dashboards: generated from grafana/generate.py, and sound panel by panel."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest

from sidecar.gpu import GPU_METRICS
from sidecar.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("generate", ROOT / "grafana" / "generate.py")
assert spec is not None and spec.loader is not None
generate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(generate)

BOARDS = {name: json.loads(text) for name, text in generate.render().items()}
PANELS = [(name, panel) for name, board in BOARDS.items() for panel in board["panels"]]


def exported_names() -> set[str]:
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    names = set()
    for family in Metrics().registry.collect():
        names.update(family.name + s for s in suffixes.get(family.type, [""]))
    return names | set(GPU_METRICS)


def test_committed_dashboards_are_what_the_generator_writes():
    committed = {p.name: p.read_text() for p in (ROOT / "grafana" / "dashboards").glob("*.json")}
    assert committed == generate.render(), "run: python grafana/generate.py"


@pytest.mark.parametrize(("board", "panel"), PANELS, ids=[f"{b}:{p['title']}" for b, p in PANELS])
def test_every_panel_has_a_title_a_unit_and_a_datasource_variable(
    board: str, panel: dict[str, Any]
):
    assert panel["title"]
    assert panel["fieldConfig"]["defaults"]["unit"]
    assert panel["datasource"]["uid"] in ("${datasource}", "${loki}")
    for target in panel["targets"]:
        assert target["datasource"] == panel["datasource"]
        if panel["datasource"]["type"] == "prometheus":
            for window in re.findall(r"\brate\([^\[]*\[([^\]]+)\]", target["expr"]):
                assert window == "$__rate_interval", target["expr"]


def test_every_metric_a_dashboard_names_is_exported():
    exported = exported_names()
    for _, panel in PANELS:
        if panel["datasource"]["type"] != "prometheus":
            continue
        for target in panel["targets"]:
            for name in re.findall(r"\b((?:llm|process)_[a-z_]+)\b", target["expr"]):
                assert name in exported, f"{panel['title']}: {name}"


def test_variables_and_annotations():
    for board in BOARDS.values():
        names = [v["name"] for v in board["templating"]["list"]]
        assert names[:3] == ["datasource", "loki", "model"]
        assert {a["name"] for a in board["annotations"]["list"]} == {
            "Model loads",
            "Sidecar restarts",
        }
    assert "key" in [v["name"] for v in BOARDS["llmserve-customers.json"]["templating"]["list"]]
