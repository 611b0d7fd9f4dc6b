"""The Grafana dashboards: generated from grafana/generate.py, and sound panel by panel."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmserve.sidecar.gpu import GPU_METRICS
from llmserve.sidecar.metrics import Metrics, exemplar_labels
from llmserve.sidecar.request_log import request_fields
from tests.test_logql import parse_errors
from tests.test_sidecar_events import end_fields

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("generate", ROOT / "grafana" / "generate.py")
assert spec is not None and spec.loader is not None
generate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(generate)

BOARDS = {name: json.loads(text) for name, text in generate.render().items()}
PANELS = [(name, panel) for name, board in BOARDS.items() for panel in board["panels"]]


def exported_names() -> set[str]:
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    names: set[str] = set()
    for family in Metrics().registry.collect():
        names.update(family.name + s for s in suffixes.get(family.type, [""]))
    return names | set(GPU_METRICS)


def test_committed_dashboards_are_what_the_generator_writes() -> None:
    committed = {p.name: p.read_text() for p in (ROOT / "grafana" / "dashboards").glob("*.json")}
    assert committed == generate.render(), "run: python grafana/generate.py"
    datasources = ROOT / "grafana" / "provisioning" / "datasources" / "llmserve.yml"
    assert datasources.read_text() == generate.datasources(), "run: python grafana/generate.py"


def followed(url: str, value: str) -> str:
    """The LogQL a link opens once Grafana has read the provisioning file ($$ is a literal $)
    and put `value` in place of ${__value.raw}."""
    url = url.replace("$$", "$").replace("${__value.raw}", value)
    path, _, query = url.partition("?")
    assert path == "/explore"
    panes = json.loads(urllib.parse.parse_qs(query)["panes"][0])
    (pane,) = panes.values()
    (target,) = pane["queries"]
    assert pane["datasource"] == target["datasource"]["uid"] == "llmserve-loki"
    assert pane["range"] == {"from": "${__from}", "to": "${__to}"}
    return str(target["expr"])


def test_exemplars_and_log_fields_link_to_the_request_log_lines() -> None:
    """An exemplar's request_id and trace_id, and the same fields in a log line, each open Loki
    on the log lines of that request or trace; the queries parse with Grafana's LogQL parser."""
    provisioned = yaml.safe_load(generate.datasources())["datasources"]
    prometheus, loki = provisioned
    destinations = prometheus["jsonData"]["exemplarTraceIdDestinations"]
    derived = loki["jsonData"]["derivedFields"]
    # The names are the exemplar labels the sidecar writes.
    labels = exemplar_labels("req-1", "4bf92f3577b34da6a3ce929d0e0e4736")
    assert {d["name"] for d in destinations} == {d["name"] for d in derived} == set(labels)
    line = json.dumps(
        request_fields(
            {**end_fields("req-1"), "trace_id": labels["trace_id"], "span_id": "00f067aa0ba902b7"}
        )
    )
    queries = []
    for link in [*destinations, *derived]:
        value = labels[link["name"]]
        query = followed(link["url"], value)
        assert value in query
        queries.append(query)
    for field in derived:
        assert field["matcherType"] == "regex"
        assert re.search(field["matcherRegex"], line)[1] == labels[field["name"]]  # type: ignore[index]
    assert parse_errors(queries) == [[] for _ in queries]


def test_the_latency_panels_show_exemplars() -> None:
    shown = {
        (name, panel["title"])
        for name, panel in PANELS
        if any(target.get("exemplar") for target in panel["targets"])
    }
    assert shown == {
        ("llmserve-overview.json", "Time to first token"),
        ("llmserve-overview.json", "Request duration"),
        ("llmserve-overview.json", "Inter-token latency"),
        ("llmserve-latency.json", "Time to first token (heatmap)"),
        ("llmserve-latency.json", "Inter-token latency (heatmap)"),
        ("llmserve-latency.json", "Request duration (heatmap)"),
    }


@pytest.mark.parametrize(("board", "panel"), PANELS, ids=[f"{b}:{p['title']}" for b, p in PANELS])
def test_every_panel_has_a_title_a_unit_and_a_datasource_variable(
    board: str, panel: dict[str, Any]
) -> None:
    assert panel["title"]
    assert panel["fieldConfig"]["defaults"]["unit"]
    assert panel["datasource"]["uid"] in ("${datasource}", "${loki}")
    for target in panel["targets"]:
        assert target["datasource"] == panel["datasource"]
        if panel["datasource"]["type"] == "prometheus":
            for window in re.findall(r"\brate\([^\[]*\[([^\]]+)\]", target["expr"]):
                assert window == "$__rate_interval", target["expr"]


def test_every_metric_a_dashboard_names_is_exported() -> None:
    exported = exported_names()
    for _, panel in PANELS:
        if panel["datasource"]["type"] != "prometheus":
            continue
        for target in panel["targets"]:
            for name in re.findall(r"\b((?:llm|process)_[a-z_]+)\b", target["expr"]):
                assert name in exported, f"{panel['title']}: {name}"


def test_variables_and_annotations() -> None:
    for board in BOARDS.values():
        names = [v["name"] for v in board["templating"]["list"]]
        assert names[:2] == ["datasource", "loki"]
        assert {a["name"] for a in board["annotations"]["list"]} == {
            "Model loads",
            "Sidecar restarts",
        }
    assert "key" in [v["name"] for v in BOARDS["llmserve-customers.json"]["templating"]["list"]]
    for name in ("llmserve-overview.json", "llmserve-latency.json"):
        assert "model" in [v["name"] for v in BOARDS[name]["templating"]["list"]]


def prometheus_targets(board: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [
        (panel, target)
        for panel in board["panels"]
        if panel["datasource"]["type"] == "prometheus"
        for target in panel["targets"]
    ]


@pytest.mark.parametrize(("board", "panel"), PANELS, ids=[f"{b}:{p['title']}" for b, p in PANELS])
def test_heatmaps_read_buckets_as_a_heatmap(board: str, panel: dict[str, Any]) -> None:
    """Without format=heatmap Grafana draws cumulative bucket counts, rows in text order."""
    if panel["type"] != "heatmap":
        return
    for target in panel["targets"]:
        assert target["format"] == "heatmap", target
        assert target["legendFormat"] == "{{le}}" and "sum by (le)" in target["expr"]
    assert panel["options"]["calculate"] is False


def test_every_variable_filters_some_panel_of_its_board() -> None:
    for name, board in BOARDS.items():
        exprs = " ".join(target["expr"] for panel in board["panels"] for target in panel["targets"])
        for variable in board["templating"]["list"]:
            if variable["type"] in ("query", "textbox"):
                assert f"${variable['name']}" in exprs, (
                    f"{name}: ${variable['name']} filters nothing"
                )


AGGREGATION = re.compile(r"^(?:topk\(\d+, )?(sum|max|min|avg|count)\s*(?:by \(([^)]*)\))?\s*\(")


def test_legends_name_only_labels_the_query_keeps() -> None:
    for name, board in BOARDS.items():
        for panel, target in prometheus_targets(board):
            named = set(re.findall(r"\{\{(\w+)\}\}", target["legendFormat"]))
            outer = AGGREGATION.match(target["expr"])
            if named and outer:
                kept = {label.strip() for label in (outer.group(2) or "").split(",")}
                assert named <= kept, f"{name}: {panel['title']}: {target['expr']}"


def test_per_key_panels_draw_only_the_busiest_keys() -> None:
    for name, board in BOARDS.items():
        for panel, target in prometheus_targets(board):
            if re.search(r"\bby \([^)]*\bkey\b", target["expr"]):
                assert target["expr"].startswith("topk("), f"{name}: {panel['title']}"


def test_loki_tables_per_request_are_one_instant_query_over_the_dashboard_range() -> None:
    """A range query grouped by request_id makes a series per request and per step, and Loki
    refuses it past max_query_series (500 by default) on real traffic."""
    tables = [
        target
        for _, panel in PANELS
        if panel["datasource"]["type"] == "loki"
        for target in panel["targets"]
        if "request_id" in target["expr"] and "by (" in target["expr"]
    ]
    assert tables
    for target in tables:
        assert target["queryType"] == "instant" and target["instant"] is True
        assert "[$__range]" in target["expr"] and "$__interval" not in target["expr"]


def test_sidecar_restart_annotation_marks_a_restart_after_a_long_gap(tmp_path: Path) -> None:
    """A sidecar down for five minutes is still marked when it comes back (promtool evaluates
    the annotation's query at Grafana's 60 s steps)."""
    (annotation,) = [
        a
        for a in BOARDS["llmserve-overview.json"]["annotations"]["list"]
        if a["name"] == "Sidecar restarts"
    ]
    assert annotation["step"] == "60s"
    labels = 'job="llmserve-sidecar", instance="h:8001"'
    case = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    # Up from 0 to 10m, away for five minutes, started again at 16m (960 s).
                    {
                        "series": f"process_start_time_seconds{{{labels}}}",
                        "values": "0x10 _x5 960x10",
                    },
                    {
                        "series": f"llm_sidecar_events_received_total{{{labels}}}",
                        "values": "0+100x10 _x5 0+100x10",
                    },
                ],
                "promql_expr_test": [
                    {"expr": f"count({annotation['expr']})", "eval_time": t, "exp_samples": s}
                    for t, s in (("17m", [{"labels": "{}", "value": 1}]), ("8m", []), ("25m", []))
                ],
            }
        ],
    }
    path = tmp_path / "annotation_test.yml"
    path.write_text(yaml.safe_dump(case))
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: scripts/setup --test installs Debian's prometheus"
    result = subprocess.run(
        [binary, "test", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
