"""Configuration layering (file < env < flags) and errors that name the field and its source."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmserve.server.config import ConfigError, load_config


def test_defaults_are_the_embedded_setup():
    config = load_config(environ={})
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8000)
    assert config.engine.kind == "llamacpp"
    assert config.llamacpp.model_path is None
    assert config.server.max_body_bytes == 1 << 20


def test_file_then_env_then_flags(tmp_path: Path):
    path = tmp_path / "llmserve.toml"
    path.write_text('[server]\nport = 9000\nhost = "0.0.0.0"\n[llamacpp]\nparallel = 4\n')
    config = load_config(
        str(path),
        environ={"LLMSERVE_SERVER_PORT": "9100", "LLMSERVE_LLAMACPP_PARALLEL": "2"},
        overrides={"llamacpp.parallel": "3"},
    )
    assert config.server.host == "0.0.0.0"
    assert config.server.port == 9100
    assert config.llamacpp.parallel == 3


@pytest.mark.parametrize(
    ("environ", "overrides", "toml", "expected"),
    [
        (
            {"LLMSERVE_LLAMACPP_PARALLEL": "0"},
            {},
            None,
            "llamacpp.parallel = '0' (from env LLMSERVE_LLAMACPP_PARALLEL)",
        ),
        ({}, {"server.port": "http"}, None, "server.port = 'http' (from flag --server-port)"),
        ({}, {}, "[server]\nport = 70000\n", "server.port = 70000 (from config file"),
        ({}, {}, "[server]\nprot = 1\n", "server.prot"),
        ({}, {}, "[engine]\nkind = 'vllm'\n", "engine.kind = 'vllm'"),
        ({"LLMSERVE_SERVER_PROT": "1"}, {}, None, "LLMSERVE_SERVER_PROT"),
        ({}, {}, "server = 1\n", "[server] must be a table"),
        ({}, {}, "[server\n", "not valid TOML"),
        (
            {},
            {},
            "[llamacpp]\nparallel = 32\nbatch_tokens = 16\n",
            "llamacpp.batch_tokens = 16 (from config file",
        ),
    ],
)
def test_bad_values_name_the_field(
    tmp_path: Path,
    environ: dict[str, str],
    overrides: dict[str, str],
    toml: str | None,
    expected: str,
):
    path = None
    if toml is not None:
        path = tmp_path / "bad.toml"
        path.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path) if path else None, environ=environ, overrides=overrides)
    assert expected in str(caught.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/llmserve.toml", environ={})


def test_event_socket_defaults_per_server_port(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from llmserve.sidecar.settings import SidecarSettings, default_socket_path

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_socket_path(8000) == str(tmp_path / "llmserve" / "events-8000.sock")
    assert default_socket_path(8000) != default_socket_path(8010)
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_socket_path(8000).endswith("/events-8000.sock")
    explicit = SidecarSettings(socket_path="/run/x.sock")
    assert explicit.resolved_socket_path(8000) == "/run/x.sock"
