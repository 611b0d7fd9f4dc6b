"""Every LogQL query we ship, in the dashboards and in the docs, parses with Grafana's own LogQL
grammar (@grafana/lezer-logql, the parser of Grafana's Loki query editor).

No Loki binary is available here, so a query Loki would reject could otherwise only be found by
an operator looking at an empty panel. scripts/setup --test installs the grammar into tests/logql
from its package-lock.json; node runs tests/logql/parse.mjs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARSER = ROOT / "tests" / "logql" / "parse.mjs"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# What Grafana puts in place of its variables before a query reaches Loki.
GRAFANA_VARIABLES = {
    "$__range": "6h",
    "$__interval": "1m",
    "$__auto": "1m",
    "$request_id": "0123abcd",
    "$model": ".*",
}
# An inline code span that is a LogQL query: a stream selector, or a function over one.
INLINE_QUERY = re.compile(r"`((?:[a-z_]+\([^`]*)?\{[a-z_]+=~?\"[^`]*)`")
FENCED_QUERY = re.compile(r"```logql\n(.*?)```", re.DOTALL)


def parse_errors(queries: list[str]) -> list[list[int]]:
    """For each query, the offsets where Grafana's LogQL parser found an error."""
    node = shutil.which("node")
    assert node, "node is missing: scripts/setup --test installs Debian's nodejs"
    assert (ROOT / "tests/logql/node_modules/@grafana/lezer-logql").is_dir(), (
        "@grafana/lezer-logql is missing: run scripts/setup --test"
    )
    result = subprocess.run(
        [node, str(PARSER)],
        input=json.dumps(queries),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return list(json.loads(result.stdout))


def substituted(query: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        query = query.replace(variable, value)
    return query


def dashboard_queries() -> list[tuple[str, str]]:
    found = []
    for path in sorted((ROOT / "grafana" / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            if panel["datasource"]["type"] == "loki":
                for target in panel["targets"]:
                    found.append((f"{path.name}: {panel['title']}", target["expr"]))
    return found


def doc_queries() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for query in INLINE_QUERY.findall(text) + FENCED_QUERY.findall(text):
            found.append((path.name, query.strip()))
    return found


def test_the_parser_rejects_a_broken_query() -> None:
    assert parse_errors(['{service_name="llmserve"} | json', '{service_name="llmserve" | json'])[
        1
    ], "the parser accepts anything: the check below would prove nothing"


@pytest.mark.parametrize("source", ["dashboards", "docs"])
def test_every_shipped_logql_query_parses(source: str) -> None:
    queries = dashboard_queries() if source == "dashboards" else doc_queries()
    assert queries, f"no LogQL found in the {source}: the extraction is broken"
    errors = parse_errors([substituted(query) for _, query in queries])
    broken = [
        f"{where}: {query} (at {at})"
        for (where, query), at in zip(queries, errors, strict=True)
        if at
    ]
    assert not broken, "\n".join(broken)
