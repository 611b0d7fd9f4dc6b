"""docker-compose.yml is valid Compose and wires this repository's configs where each image reads
them. No Docker engine runs here, so the stack is checked by `docker-compose config` (Debian's
docker-compose validates against the Compose schema offline) and by reading it, not started."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def compose_config(**env: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is missing: scripts/setup --test installs Debian's package"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("GRAFANA_", "COMPOSE_"))}
    return subprocess.run(
        [binary, "--file", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean | env,
        check=False,
    )


def services() -> dict[str, Any]:
    result = compose_config(GRAFANA_ADMIN_PASSWORD="test-only")
    assert result.returncode == 0, result.stderr
    return dict(yaml.safe_load(result.stdout)["services"])


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> repository-relative source, for the binds of this repository's files."""
    found = {}
    for source, target in map(split_volume, service.get("volumes", [])):
        if source.startswith(str(ROOT)):
            found[target] = str(Path(source).relative_to(ROOT))
    return found


def split_volume(volume: str) -> tuple[str, str]:
    """`source:target[:mode]`, as docker-compose prints them, to (source, target)."""
    source, target = volume.split(":")[:2]
    return source, target


def named_volumes(service: dict[str, Any]) -> set[str]:
    """The container paths where a named volume (not a host path) is mounted."""
    return {t for s, t in map(split_volume, service.get("volumes", [])) if not s.startswith("/")}


def test_compose_file_is_valid_and_needs_a_grafana_password() -> None:
    assert compose_config(GRAFANA_ADMIN_PASSWORD="test-only").returncode == 0
    refused = compose_config()
    assert refused.returncode != 0 and "set GRAFANA_ADMIN_PASSWORD" in refused.stderr


def test_every_mounted_file_is_in_the_repository_and_read_where_it_is_mounted() -> None:
    stack = services()
    for name, service in stack.items():
        for target, source in mounts(service).items():
            assert (ROOT / source).exists(), f"{name}: {source} is not in the repository"
            assert target.endswith(Path(source).name) or (ROOT / source).is_dir(), (name, target)

    assert mounts(stack["prometheus"])["/etc/prometheus"] == "prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in stack["prometheus"]["command"]
    assert mounts(stack["loki"])["/etc/loki/loki.yaml"] == "loki/loki.yaml"
    assert "-config.file=/etc/loki/loki.yaml" in stack["loki"]["command"]
    assert mounts(stack["alloy"])["/etc/alloy/config.alloy"] == "loki/config.alloy"
    assert "/etc/alloy/config.alloy" in stack["alloy"]["command"]

    grafana = mounts(stack["grafana"])
    provider = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/llmserve.yml").read_text())
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert grafana[dashboards_path] == "grafana/dashboards"
    assert grafana["/etc/grafana/provisioning/datasources"] == "grafana/provisioning/datasources"


def test_prometheus_keeps_the_exemplars() -> None:
    """Prometheus 2.x drops exemplars unless the feature is on; prometheus.yml bounds them."""
    assert "--enable-feature=exemplar-storage" in services()["prometheus"]["command"]
    shipped = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    assert shipped["storage"]["exemplars"]["max_exemplars"] > 0


def test_loki_can_write_its_data_directory() -> None:
    stack = services()
    loki_config = yaml.safe_load((ROOT / "loki" / "loki.yaml").read_text())
    data_dir = loki_config["common"]["path_prefix"]
    owner = stack["loki-data-owner"]
    assert named_volumes(stack["loki"]) == named_volumes(owner) == {data_dir}
    assert owner["entrypoint"] == ["chown", "-R", "10001:10001", data_dir]
    assert stack["loki"]["depends_on"]["loki-data-owner"]["condition"] == (
        "service_completed_successfully"
    )


def test_everything_listens_on_loopback_unless_the_operator_says_otherwise() -> None:
    """Loki binds loopback in loki/loki.yaml (other hosts push through scripts/nginx/loki.conf);
    node_exporter moves to a private address for a central Prometheus with NODE_EXPORTER_ADDR."""
    stack = services()
    assert "--web.listen-address=127.0.0.1:9090" in stack["prometheus"]["command"]
    assert "--web.listen-address=127.0.0.1:9100" in stack["node-exporter"]["command"]
    loki = yaml.safe_load((ROOT / "loki" / "loki.yaml").read_text())["server"]
    assert loki["http_listen_address"] == loki["grpc_listen_address"] == "127.0.0.1"
    moved = compose_config(GRAFANA_ADMIN_PASSWORD="test-only", NODE_EXPORTER_ADDR="10.0.0.21")
    exporter = yaml.safe_load(moved.stdout)["services"]["node-exporter"]
    assert "--web.listen-address=10.0.0.21:9100" in exporter["command"]
    assert "--server.http.listen-addr=127.0.0.1:12345" in stack["alloy"]["command"]
    assert stack["grafana"]["environment"]["GF_SERVER_HTTP_ADDR"] == "127.0.0.1"
    assert all(
        service.get("network_mode") == "host" for service in stack.values() if "restart" in service
    )
