"""The table of limit kinds against what documents it: the README's table of limits and the
metrics' `limit` label in docs/metrics.md name every kind, in the table's order."""

from __future__ import annotations

import re
from pathlib import Path

from llmserve.server.ratelimit.kinds import KINDS, kind, readme_table

ROOT = Path(__file__).resolve().parent.parent


def documented_kinds(metric: str) -> list[str]:
    """The limit kinds docs/metrics.md lists in the row of `metric`."""
    text = (ROOT / "docs" / "metrics.md").read_text()
    (row,) = [line for line in text.splitlines() if line.startswith(f"| `{metric}` |")]
    listed = re.search(r"\(((?:`[a-z]+`(?:, )?)+)\)", row)
    assert listed, f"the row of {metric} lists no limit kinds"
    return re.findall(r"`([a-z]+)`", listed[1])


def test_the_metrics_doc_names_every_kind_as_the_limit_label() -> None:
    assert documented_kinds("llm_key_rate_limited_total") == [k.name for k in KINDS]
    buckets = [k.name for k in KINDS if k.window_seconds is not None]
    assert documented_kinds("llm_key_rate_limit") == buckets


def test_the_readme_table_of_limits_is_the_table_of_kinds() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme_table() in readme, (
        "README.md's table of limits differs from server/ratelimit/kinds.py; paste:\n"
        + readme_table()
    )
    flags = ", ".join(f"`--{k.name}`" for k in KINDS)
    assert flags in readme, f"README.md should name the flags {flags}"


def test_every_kind_is_answered_in_openai_terms() -> None:
    assert len({k.name for k in KINDS}) == len(KINDS)
    # OpenAI names request and token headers only; each name belongs to one kind.
    headers = [k.header for k in KINDS if k.header is not None]
    assert sorted(headers) == ["requests", "tokens"]
    assert all(k.window_seconds is not None for k in KINDS if k.header is not None)
    assert kind("rpd").error_code == kind("tpd").error_code == "insufficient_quota"
