"""The distribution as a user installs it: one `llmserve` namespace, and the process boundaries.

The wheel is built from this checkout and installed into a fresh virtual environment (its
dependencies come from the development environment, so nothing is downloaded); `llmserve serve`
and `llmserve keys` then run from there, outside the repository, so the checkout's folders cannot
stand in for what was installed.
"""

from __future__ import annotations

import ast
import asyncio
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

import llmserve.server
from tests.conftest import Process, free_port

ROOT = Path(__file__).resolve().parent.parent


def _build_wheel(out: Path) -> Path:
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"),
            *("--no-build-isolation", "--wheel-dir", str(out), str(ROOT)),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("llmserve-*.whl")
    return wheel


def _fresh_install(wheel: Path, where: Path) -> Path:
    """A new venv with the wheel in it; the development venv's site-packages supply the rest."""
    venv.create(where, with_pip=True)
    python = where / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # A plain path line: the development venv's own .pth files (its editable llmserve) stay off.
    Path(purelib, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )
    return where / "bin" / "llmserve"


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    keys: Path
    secret: str


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The wheel, a fresh venv holding it, and a keys file made by its `llmserve keys`."""
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(tmp / "dist")
    llmserve = _fresh_install(wheel, tmp / "venv")
    keys = tmp / "keys.toml"
    created = subprocess.run(
        [llmserve, "keys", "--file", keys, "create", "acme"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp,
        env=_env(),
    )
    return Installed(wheel, tmp / "venv", keys, created.stdout.split()[0])


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LLMSERVE_")}


def test_the_wheel_holds_one_namespace(installed: Installed):
    names = zipfile.ZipFile(installed.wheel).namelist()
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"llmserve"}
    packages = {name.split("/")[1] for name in names if name.count("/") > 1}
    assert packages == {"server", "sidecar", "shared", "bench"}
    assert "llmserve/sidecar/static/index.html" in names
    assert installed.secret.startswith("sk-")
    located = subprocess.run(
        [installed.venv / "bin" / "python", "-c", "import llmserve.server as s; print(s.__file__)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=installed.venv,
    ).stdout
    assert located.startswith(str(installed.venv)), located


async def test_the_installed_llmserve_serves_with_its_key(installed: Installed, short_tmp: str):
    proc = await asyncio.create_subprocess_exec(
        installed.venv / "bin" / "llmserve",
        *("serve", "--port", "0", "--engine", "synthetic"),
        *("--auth-keys-file", str(installed.keys), "--sidecar-port", str(free_port())),
        *("--sidecar-socket-path", f"{short_tmp}/ev.sock"),
        stderr=asyncio.subprocess.PIPE,
        cwd=short_tmp,
        env=_env(),
    )
    server = Process(proc)
    try:
        port = (await server.wait_for_line(r"listening on http://127\.0\.0\.1:(\d+)"))[1]
        await server.wait_for_line("ready: ")
        body = {"model": "synthetic", "max_tokens": 4, "prompt": "hi"}
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"http://127.0.0.1:{port}/v1/completions",
                json=body,
                headers={"Authorization": f"Bearer {installed.secret}"},
            ) as response:
                assert response.status == 200
                assert (await response.json())["usage"]["completion_tokens"] == 4
    finally:
        proc.terminate()
        assert await server.finish() == 0


def test_the_development_install_is_the_checkout():
    """`scripts/setup` installs in editable mode: the namespace resolves to these folders."""
    assert Path(llmserve.server.__file__).resolve() == ROOT / "server" / "__init__.py"


def _imports(folder: str) -> dict[str, set[str]]:
    """Each module of `folder` -> the llmserve modules it imports."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / folder).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[str(path.relative_to(ROOT))] = {n for n in names if n.startswith("llmserve.")}
    return found


def test_the_processes_meet_only_in_the_shared_module():
    """The server never imports the sidecar's process code, nor the sidecar the server's.

    The server reads the sidecar's configuration section (to hand it to the sidecar child), and
    the one console script dispatches `llmserve sidecar` to the sidecar's entry point.
    """
    allowed = {"llmserve.sidecar.settings"}
    for module, names in _imports("server").items():
        sidecar = {n for n in names if n.startswith("llmserve.sidecar")}
        if module == "server/cli.py":
            sidecar -= {"llmserve.sidecar.runner"}
        assert sidecar <= allowed, (module, sidecar)
    for module, names in _imports("sidecar").items():
        assert not {n for n in names if n.startswith("llmserve.server")}, module
    for module, names in _imports("shared").items():
        assert all(n.startswith("llmserve.shared") for n in names), (module, names)
