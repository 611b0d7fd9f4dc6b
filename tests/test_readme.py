"""The README documents every configuration field, and CI runs the README's test command."""

from __future__ import annotations

from pathlib import Path

from llmserve.server.config import env_var, field_names, flag

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_configuration_field_is_in_the_reference():
    for section, name in field_names():
        row = next(
            (
                line
                for line in README.splitlines()
                if line.startswith(f"| `{section}.{name}` |") and "LLMSERVE_" in line
            ),
            None,
        )
        assert row is not None, f"{section}.{name} is missing from the README"
        assert f"`{env_var(section, name)}`" in row
        assert f"`{flag(section, name)}`" in row


def test_ci_runs_the_readme_test_command():
    assert "scripts/test     # installs what it needs" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "exec scripts/test" in ci


def test_every_exported_metric_is_documented():
    from llmserve.sidecar.metrics import Metrics

    documented = (ROOT / "docs" / "metrics.md").read_text()
    for family in Metrics().registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{name}" in documented, f"{name} is not in docs/metrics.md"
