"""scripts/install, staged with --destdir: it builds a working venv, a private configuration and
keys file (empty without --first-key, so the server starts and refuses everyone rather than
failing to start), and the units; a later run adds the first key, and another upgrades without
touching configuration or keys.

The staged server is started from the staged venv with the staged configuration, so what the
installer writes is proven to serve, not only to exist. (A real install creates a system user
and starts systemd units, which a test suite must not do to the machine it runs on.)
"""

from __future__ import annotations

import asyncio
import signal
import stat
import subprocess
import tomllib
from pathlib import Path

import aiohttp

from tests.conftest import Process, free_port

ROOT = Path(__file__).resolve().parent.parent


def install(destdir: Path, *args: str) -> str:
    result = subprocess.run(
        [str(ROOT / "scripts" / "install"), "--destdir", str(destdir), *args],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def serve_staged(destdir: Path, processes: list[Process]) -> Process:
    """The staged server, with the staged configuration, from the staged venv, once ready."""
    conf = destdir / "etc" / "llmserve"
    llmserve = destdir / "opt" / "llmserve" / ".venv" / "bin" / "llmserve"
    # The staged config names its final keys path; point it at the staged file instead.
    proc = await asyncio.create_subprocess_exec(
        str(llmserve),
        *("serve", "--config", str(conf / "llmserve.toml")),
        *("--auth-keys-file", str(conf / "keys.toml"), "--sidecar-spawn", "false"),
        stderr=asyncio.subprocess.PIPE,
    )
    server = Process(proc)
    processes.append(server)
    await server.wait_for_line("ready: ")
    return server


async def test_staged_install_serves_with_its_key_and_survives_a_reinstall(
    tmp_path: Path, processes: list[Process]
) -> None:
    port = free_port()
    # Without --first-key the keys file still exists: the server starts and answers 401.
    first = install(tmp_path, "--port", str(port))
    assert "no API keys yet" in first and "sk-" not in first
    conf = tmp_path / "etc" / "llmserve"
    assert mode(conf / "keys.toml") == 0o600
    url = f"http://127.0.0.1:{port}/v1/completions"
    body = {"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": "Hello", "max_tokens": 4}
    server = await serve_staged(tmp_path, processes)
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body) as response:
            assert response.status == 401
    server.proc.send_signal(signal.SIGTERM)
    assert await server.finish() == 0
    assert any("no API keys in" in line for line in server.log)

    output = install(tmp_path, "--first-key", "acme", "--port", "1")
    secret = next(line for line in output.splitlines() if line.startswith("sk-"))
    assert mode(conf) == 0o700
    assert mode(conf / "llmserve.toml") == 0o600 and mode(conf / "keys.toml") == 0o600
    config = tomllib.loads((conf / "llmserve.toml").read_text())
    assert config["server"] == {"host": "127.0.0.1", "port": port}
    assert config["auth"]["keys_file"] == "/etc/llmserve/keys.toml"
    assert secret not in (conf / "keys.toml").read_text()
    units = tmp_path / "etc" / "systemd" / "system"
    for unit in ("llmserve.service", "llmserve-sidecar.service"):
        assert (units / unit).read_text() == (ROOT / "scripts" / "systemd" / unit).read_text()
    assert "ExecStart=/opt/llmserve/.venv/bin/llmserve " in (units / "llmserve.service").read_text()

    await serve_staged(tmp_path, processes)
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body) as response:
            assert response.status == 401
        headers = {"Authorization": f"Bearer {secret}"}
        async with session.post(url, json=body, headers=headers) as response:
            assert response.status == 200
            assert (await response.json())["usage"]["completion_tokens"] == 4

    before = {p.name: p.read_text() for p in conf.iterdir()}
    again = install(tmp_path, "--first-key", "acme", "--port", "1")
    assert "keeping" in again and "sk-" not in again
    assert {p.name: p.read_text() for p in conf.iterdir()} == before
