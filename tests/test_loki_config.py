"""The Loki and Alloy configurations say what DESIGN.md decided. No Loki or Alloy binary is
available here, so they are checked as data, not run."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_loki_config_uses_tsdb_v13_structured_metadata_and_retention():
    config = yaml.safe_load((ROOT / "loki" / "loki.yaml").read_text())
    (schema,) = config["schema_config"]["configs"]
    assert (schema["store"], schema["schema"], schema["object_store"]) == (
        "tsdb",
        "v13",
        "filesystem",
    )
    assert schema["index"]["period"] == "24h"
    assert config["limits_config"]["allow_structured_metadata"] is True
    assert config["limits_config"]["retention_period"]
    assert config["compactor"]["retention_enabled"] is True
    assert "filesystem" in config["common"]["storage"]


def test_alloy_configs_keep_labels_low_and_ids_as_metadata():
    for name in ("config.alloy", "config-file-tail.alloy"):
        text = (ROOT / "loki" / name).read_text()
        assert "stage.structured_metadata" in text and "request_id" in text
        labels = text.split("stage.labels", 1)[1].split("}", 2)[0]
        assert "level" in labels and "request_id" not in labels and "key" not in labels
        assert '"service_name"' in text or "service_name =" in text
