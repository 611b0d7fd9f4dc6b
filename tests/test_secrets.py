"""No credential leaves through a side door: a real server and sidecar are used with good, wrong,
revoked, throttled, malformed and oversized credentials, then every log line, metric, stats
field, page and response they produced is searched for any of them."""

from __future__ import annotations

import asyncio
import hashlib
import signal
from pathlib import Path

import aiohttp

from llmserve.server.cli import main
from tests.conftest import LLMSERVE, Process, free_port, start_synthetic_server

SIDECAR_TOKEN = "sidecar-token-4c1b9e"


async def test_no_credential_reaches_a_log_a_metric_or_a_response(
    tmp_path: Path, short_tmp: str, processes: list[Process], capsys
):
    keys = tmp_path / "keys.toml"

    def create(name: str, *limits: str) -> str:
        assert main(["keys", "--file", str(keys), "create", name, *limits]) == 0
        return capsys.readouterr().out.split()[-1]

    good, throttled, revoked = create("acme"), create("tight", "--rpm", "1"), create("gone")
    wrong = "sk-wrong-" + "7" * 40
    oversized = "sk-huge-" + "x" * 9000
    basic = "dXNlcjpwYXNzd29yZC1zZWNyZXQ="
    secrets = [good, throttled, revoked, wrong, oversized[:40], basic, SIDECAR_TOKEN]
    secrets += [hashlib.sha256(s.encode()).hexdigest() for s in (good, throttled, revoked)]

    sidecar_port = free_port()
    socket_path = f"{short_tmp}/ev.sock"
    log_file = tmp_path / "requests.log"
    sidecar = await asyncio.create_subprocess_exec(
        *LLMSERVE,
        *("sidecar", "--sidecar-port", str(sidecar_port), "--sidecar-socket-path", socket_path),
        *("--sidecar-log-file", str(log_file), "--sidecar-token", SIDECAR_TOKEN),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    server, base = await start_synthetic_server(
        processes,
        *("--auth-keys-file", str(keys), "--sidecar-spawn", "false"),
        *("--sidecar-socket-path", socket_path, "--sidecar-token", SIDECAR_TOKEN),
        *("--synthetic-completion-tokens", "4"),
    )
    assert main(["keys", "--file", str(keys), "revoke", "gone"]) == 0
    server.proc.send_signal(signal.SIGHUP)
    await server.wait_for_line("reloaded 2 API keys")

    seen: list[str] = []
    body = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    attempts = [
        {"Authorization": f"Bearer {good}"},
        {"x-api-key": good},
        {"Authorization": f"Bearer {throttled}"},
        {"Authorization": f"Bearer {throttled}"},
        {"Authorization": f"Bearer {revoked}"},
        {"Authorization": f"Bearer {wrong}"},
        {"Authorization": f"Basic {basic}"},
        {"Authorization": wrong},
        {"x-api-key": wrong},
        {"Authorization": f"Bearer {oversized}"},
    ]
    statuses = []
    sidecar_url = f"http://127.0.0.1:{sidecar_port}"
    async with aiohttp.ClientSession() as session:
        for headers in attempts:
            for path in ("/v1/chat/completions", "/v1/nope"):
                async with session.post(f"{base}{path}", json=body, headers=headers) as response:
                    statuses.append(response.status)
                    seen.append(str(dict(response.headers)) + await response.text())
        await asyncio.sleep(0.5)
        auth = {"Authorization": f"Bearer {SIDECAR_TOKEN}"}
        for path in ("/metrics", "/stats"):
            async with session.get(f"{sidecar_url}{path}") as response:
                assert response.status == 401
                seen.append(await response.text())
            async with session.get(f"{sidecar_url}{path}", headers=auth) as response:
                assert response.status == 200
                seen.append(await response.text())
        async with session.get(f"{sidecar_url}/") as response:
            seen.append(await response.text())
    # good twice, throttled then refused, revoked, then every kind of wrong or broken credential.
    assert statuses[::2] == [200, 200, 200, 429, 401, 401, 401, 401, 401, 400], statuses

    server.proc.send_signal(signal.SIGTERM)
    assert await server.finish() == 0
    sidecar.send_signal(signal.SIGTERM)
    sidecar_out, _ = await sidecar.communicate()
    seen += server.log
    seen.append(sidecar_out.decode())
    seen.append(log_file.read_text())
    everything = "\n".join(seen)
    assert "request finished" in everything and '"key": "acme"' in everything
    for secret in secrets:
        assert secret not in everything, f"a credential leaked: {secret[:12]}..."
