"""The Loki and Alloy configurations say what DESIGN.md decided. No Loki or Alloy binary is
available here, so they are checked as data, not run."""

from __future__ import annotations

import re
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


def test_alloy_configs_keep_labels_low_and_ids_as_metadata() -> None:
    for name in ("config.alloy", "config-file-tail.alloy"):
        text = (ROOT / "loki" / name).read_text()
        assert "stage.structured_metadata" in text and "request_id" in text
        labels = text.split("stage.labels", 1)[1].split("}", 2)[0]
        assert "level" in labels and "request_id" not in labels and "key" not in labels
        assert '"service_name"' in text or "service_name =" in text


def journal_keep_regex() -> str:
    text = (ROOT / "loki" / "config.alloy").read_text()
    relabel = text.split('loki.relabel "journal"', 1)[1].split("\n}", 1)[0]
    (regex,) = re.findall(r'regex\s*=\s*"((?:[^"\\]|\\.)*)"', relabel)
    # An Alloy string literal: "\\." is the two characters \. in the regex.
    return str(regex.replace("\\\\", "\\"))


def test_alloy_keeps_every_llmserve_unit_the_docs_tell_operators_to_create() -> None:
    """Relabel regexes are anchored at both ends (RE2), like re.fullmatch."""
    keep = re.compile(journal_keep_regex())
    documented = set(
        re.findall(r"\bllmserve[\w-]*\.service\b", (ROOT / "docs" / "deployment.md").read_text())
    )
    shipped = {path.name for path in (ROOT / "scripts" / "systemd").glob("*.service")}
    units = documented | shipped
    assert {"llmserve-gpu1.service", "llmserve-gpu1-sidecar.service"} <= units
    for unit in units | {"llmserve-gpu7.service", "llmserve-gpu12-sidecar.service"}:
        assert keep.fullmatch(unit), unit
    for other in ("nginx.service", "llmserve-backup.service", "redis-server.service"):
        assert not keep.fullmatch(other), other


def test_loki_listens_on_loopback_and_the_push_proxy_requires_auth() -> None:
    """Loki has no authentication of its own (auth_enabled: false): other hosts reach it only
    through scripts/nginx/loki.conf, which asks for a password and passes only pushes."""
    config = yaml.safe_load((ROOT / "loki" / "loki.yaml").read_text())
    assert config["auth_enabled"] is False
    assert config["server"]["http_listen_address"] == "127.0.0.1"
    assert config["server"]["grpc_listen_address"] == "127.0.0.1"
    proxy = (ROOT / "scripts" / "nginx" / "loki.conf").read_text()
    assert "auth_basic_user_file" in proxy and "proxy_pass http://127.0.0.1:3100" in proxy
    assert "location = /loki/api/v1/push" in proxy and "ssl_certificate" in proxy
