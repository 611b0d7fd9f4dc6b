"""scripts/nginx/loki.conf in Debian's real nginx, in front of a stand-in for Loki's HTTP API.

Loki itself has no authentication and listens on loopback; this is the only way other hosts
reach it. Only the TLS listener and the addresses are swapped for loopback ones: a push needs the
password, and nothing but a push goes through.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import free_port
from tests.nginx_process import running_nginx

ROOT = Path(__file__).resolve().parent.parent
SNIPPET = ROOT / "scripts" / "nginx" / "loki.conf"
PUSH = "/loki/api/v1/push"


def runnable_config(directory: Path, port: int, loki_port: int, password: str) -> Path:
    snippet = SNIPPET.read_text()
    snippet = snippet.replace("listen 3101 ssl;", f"listen 127.0.0.1:{port};")
    snippet = re.sub(r"^\s*ssl_certificate\S* [^;]*;$", "", snippet, flags=re.M)
    assert "http://127.0.0.1:3100;" in snippet, "the snippet's Loki address moved"
    snippet = snippet.replace("http://127.0.0.1:3100;", f"http://127.0.0.1:{loki_port};")
    users = directory / "loki.htpasswd"
    digest = base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()
    users.write_text(f"alloy:{{SHA}}{digest}\n")
    snippet = snippet.replace("/etc/nginx/loki.htpasswd", str(users))
    (directory / "loki.conf").write_text(snippet)
    temp = " ".join(
        f"{kind}_temp_path {directory}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    config = directory / "nginx.conf"
    # One process as the test's own user: nginx's workers run as nobody when started by root,
    # and could not read the password file in the test's private directory.
    config.write_text(
        f"daemon off;\nmaster_process off;\npid {directory}/nginx.pid;\n"
        f"error_log {directory}/error.log;\n"
        f"events {{}}\nhttp {{\naccess_log off;\n{temp}\ninclude {directory}/loki.conf;\n}}\n"
    )
    return config


@pytest.fixture
async def proxy(tmp_path: Path) -> AsyncIterator[tuple[str, list[str]]]:
    received: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        received.append(f"{request.method} {request.path}")
        return web.Response(status=204)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    loki_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", loki_port).start()
    port = free_port()
    config = runnable_config(tmp_path, port, loki_port, "s3cret-push")
    try:
        async with running_nginx(config, port):
            yield f"http://127.0.0.1:{port}", received
    finally:
        await runner.cleanup()


async def test_only_authenticated_pushes_reach_loki(proxy: tuple[str, list[str]]) -> None:
    base, received = proxy
    good = {"Authorization": aiohttp.encode_basic_auth("alloy", "s3cret-push")}
    bad = {"Authorization": aiohttp.encode_basic_auth("alloy", "guess")}
    body = b'{"streams": []}'
    async with aiohttp.ClientSession() as session:
        for headers in ({}, bad):
            async with session.post(f"{base}{PUSH}", data=body, headers=headers) as response:
                assert response.status == 401
        for method, path in (("GET", "/loki/api/v1/query_range"), ("POST", "/loki/api/v1/delete")):
            async with session.request(method, f"{base}{path}", headers=good) as response:
                assert response.status == 403
        assert received == []
        async with session.post(f"{base}{PUSH}", data=body, headers=good) as response:
            assert response.status == 204
    assert received == [f"POST {PUSH}"]
