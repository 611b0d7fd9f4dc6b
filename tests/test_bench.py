"""`llmserve bench` against real servers: the numbers it reports add up, and it notices errors
and streams that end early; with --tenant, each key's share and Jain's index add up too."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from llmserve.bench.tenant_report import jain_index
from llmserve.bench.tenants import TenantError, parse_tenant
from llmserve.server.keys import KeyEntry, hash_secret, new_secret, write_keys
from tests.conftest import Process, start, start_synthetic_server

TOKENS = 20


async def bench(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmserve.server.cli",
        "bench",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_a_sweep_reports_every_level_and_writes_json_and_a_chart(
    tmp_path: Path, processes: list[Process]
):
    _, base = await start_synthetic_server(
        processes,
        *("--synthetic-completion-tokens", "1000", "--synthetic-token-interval-seconds", "0.005"),
        "--sidecar-spawn",
        "false",
    )
    results, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    code, out, err = await bench(
        *("--url", f"{base}/v1", "--concurrency", "1,4", "--requests", "8"),
        *("--max-tokens", str(TOKENS), "--json", str(results), "--chart", str(chart)),
        *("--temperature", "0.7"),
    )
    assert code == 0, err
    assert "concurrency 4" in err and "8/8" in err
    run = json.loads(results.read_text())
    assert run["model"] == "synthetic" and run["url"] == base
    assert run["temperature"] == 0.7
    for level, expected in zip(run["levels"], (1, 4), strict=True):
        assert level["concurrency"] == expected
        assert (level["ok"], level["errors"], level["truncated"]) == (8, 0, 0)
        assert level["completion_tokens"] == 8 * TOKENS
        assert 0 < level["ttft_ms_p50"] <= level["ttft_ms_p95"] <= level["ttft_ms_p99"]
        assert 0 < level["inter_token_ms_p50"] <= level["inter_token_ms_p99"]
        assert level["aggregate_tokens_per_second"] > 0
    assert "tok/s" in out.splitlines()[0]
    assert chart.read_bytes().startswith(b"\x89PNG")


async def cut_short(request: web.Request) -> web.StreamResponse:
    """Two tokens, then the connection ends without a finish reason or [DONE]."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for word in ("one", "two"):
        chunk: dict[str, Any] = {"choices": [{"index": 0, "delta": {"content": word}}]}
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
    return response


async def refuse(request: web.Request) -> web.Response:
    return web.json_response({"error": {"message": "no"}}, status=401)


async def test_errors_and_truncated_streams_are_counted(tmp_path: Path):
    app = web.Application()
    app.router.add_post("/v1/chat/completions", cut_short)
    app.router.add_post("/v1/completions", refuse)
    async with TestServer(app) as server:
        base = str(server.make_url("")).rstrip("/")
        results = tmp_path / "bench.json"
        common = ("--url", base, "--model", "m", "--concurrency", "2", "--requests", "4")
        code, _, err = await bench(*common, "--warmup", "0", "--json", str(results))
        level = json.loads(results.read_text())["levels"][0]
        assert code == 0, err
        assert (level["ok"], level["truncated"], level["completion_tokens"]) == (4, 4, 8)

        code, _, _ = await bench(*common, "--endpoint", "completions", "--json", str(results))
        level = json.loads(results.read_text())["levels"][0]
        assert code == 1
        assert (level["ok"], level["errors"]) == (0, 4)
        assert level["error_samples"] == ['{"error": {"message": "no"}}']


def keys_file(path: Path, weights: dict[str, float]) -> dict[str, str]:
    """A keys file with these keys and weights; their secrets, as environment variables."""
    secrets = {name: new_secret() for name in weights}
    write_keys(
        path,
        {
            name: KeyEntry(name=name, sha256=hash_secret(secrets[name]), weight=weight)
            for name, weight in weights.items()
        },
    )
    return {f"KEY_{name.upper()}": secret for name, secret in secrets.items()}


def test_jain_index():
    assert jain_index([3.0, 3.0, 3.0]) == pytest.approx(1.0)
    assert jain_index([5.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)
    assert jain_index([1.0, 2.0]) == pytest.approx(9 / 10)


def test_a_tenant_reads_its_fields_and_names_no_key_in_errors():
    spec = parse_tenant(
        "name=a,concurrency=3,key_env=K,weight=2.5,max_tokens=7,requests=4", {"K": "sk-x"}
    )
    assert (spec.name, spec.concurrency, spec.api_key, spec.weight) == ("a", 3, "sk-x", 2.5)
    assert (spec.max_tokens, spec.requests, spec.prompt_words) == (7, 4, None)
    for text, message in (
        ("name=a", "concurrency=N is required"),
        ("name=a,concurrency=0", "concurrency must be a whole number"),
        ("name=a,concurrency=1,weight=0", "weight must be a number above 0"),
        ("name=a,concurrency=1,weight=nan", "weight must be a number above 0"),
        ("name=a,concurrency=1,key_env=UNSET", "UNSET is unset"),
        ("name=a,concurrency=1,key=sk-secret,key_env=K", "not both"),
        ("name=a,concurrency=1,colour=red", "'colour' is not one of"),
        ("concurrency=1,key=sk-secret", "needs name=NAME"),
    ):
        with pytest.raises(TenantError, match=message) as caught:
            parse_tenant(text, {"K": "sk-x"})
        assert "sk-secret" not in str(caught.value)


async def test_tenants_each_get_a_report_with_their_share_and_weight(
    tmp_path: Path, processes: list[Process]
):
    path = tmp_path / "keys.toml"
    env = keys_file(path, {"heavy": 1.0, "light": 2.0})
    _, base = await start_synthetic_server(
        processes,
        *("--synthetic-token-interval-seconds", "0.005", "--auth-keys-file", str(path)),
        *("--sidecar-spawn", "false"),
    )
    results, chart = tmp_path / "tenants.json", tmp_path / "tenants.png"
    code, out, err = await bench(
        *("--url", base, "--max-tokens", str(TOKENS), "--duration", "120", "--warmup", "0"),
        *("--tenant", "name=heavy,concurrency=3,key_env=KEY_HEAVY,requests=9"),
        *(
            "--tenant",
            "name=light,concurrency=1,key_env=KEY_LIGHT,weight=2,max_tokens=5,requests=4",
        ),
        *("--json", str(results), "--chart", str(chart)),
        env=env,
    )
    assert code == 0, err
    assert env["KEY_HEAVY"] not in out + err + results.read_text()
    run = json.loads(results.read_text())
    heavy, light = run["tenants"]
    assert (heavy["tenant"], heavy["weight"], heavy["concurrency"]) == ("heavy", 1.0, 3)
    assert (light["tenant"], light["weight"], light["max_tokens"]) == ("light", 2.0, 5)
    # Each tenant stopped after its requests, long before the duration: nothing was cut.
    for row, requests, tokens in ((heavy, 9, TOKENS), (light, 4, 5)):
        assert (row["requests"], row["ok"], row["errors"], row["cut_at_end"]) == (requests,) * 2 + (
            0,
            0,
        )
        assert row["completion_tokens"] == requests * tokens
        assert 0 < row["ttft_ms_p50"] <= row["ttft_ms_p95"]
        assert 0 < row["inter_token_ms_p50"] <= row["inter_token_ms_p99"]
        # Service: 1 per prompt token (the usage's, more than the completion's) + 2 per token.
        assert row["service"] > 2 * row["completion_tokens"] + requests
    assert light["service_per_weight"] == pytest.approx(light["service"] / 2, abs=0.1)
    assert (heavy["share_of_weight"], light["share_of_weight"]) == (0.3333, 0.6667)
    assert heavy["share_of_service"] + light["share_of_service"] == pytest.approx(1, abs=2e-4)
    # The weight given in --tenant divides the service Jain's index is taken over.
    expected = jain_index([heavy["service"], light["service"] / 2])
    assert run["jain_index"] == pytest.approx(expected, abs=1e-4)
    assert run["jain_index"] != pytest.approx(jain_index([heavy["service"], light["service"]]))
    assert "Jain's index" in out and "light" in out
    assert chart.read_bytes().startswith(b"\x89PNG")


async def test_a_tenant_with_a_wrong_key_is_refused_and_a_run_ends_at_its_duration(
    tmp_path: Path, processes: list[Process]
):
    path = tmp_path / "keys.toml"
    env = keys_file(path, {"good": 1.0})
    _, base = await start_synthetic_server(
        processes,
        *("--synthetic-completion-tokens", "100000", "--auth-keys-file", str(path)),
        *("--sidecar-spawn", "false", "--synthetic-token-interval-seconds", "0.01"),
    )
    results = tmp_path / "tenants.json"
    code, _, err = await bench(
        *("--url", base, "--model", "synthetic", "--warmup", "0", "--duration", "2"),
        *("--max-tokens", "4000", "--json", str(results)),
        *("--tenant", "name=good,concurrency=2,key_env=KEY_GOOD"),
        *("--tenant", "name=bad,concurrency=1,key=sk-wrong,requests=3"),
        env=env,
    )
    assert code == 1, err
    good, bad = json.loads(results.read_text())["tenants"]
    # The good key's endless streams were cut at the end and counted as far as they got.
    assert (good["requests"], good["cut_at_end"]) == (0, 2)
    assert good["completion_tokens"] > 0 and good["share_of_service"] == 1.0
    assert (bad["requests"], bad["errors"], bad["service"]) == (3, 3, 0.0)
    assert "sk-wrong" not in json.dumps(bad["error_samples"])


async def test_tenants_on_the_llamacpp_engine(tmp_path: Path, processes: list[Process]):
    path = tmp_path / "keys.toml"
    env = keys_file(path, {"a": 1.0, "b": 1.0})
    server = await start(
        *("serve", "--port", "0", "--sidecar-spawn", "false", "--auth-keys-file", str(path)),
        *("--llamacpp-parallel", "2", "--llamacpp-context-per-sequence", "256"),
    )
    processes.append(server)
    port = (await server.wait_for_line(r"listening on http://127\.0\.0\.1:(\d+)"))[1]
    await server.wait_for_line("ready: ", 300)
    results = tmp_path / "tenants.json"
    code, _, err = await bench(
        *("--url", f"http://127.0.0.1:{port}", "--duration", "600", "--json", str(results)),
        *("--prompt-words", "8", "--max-tokens", "8", "--warmup", "0"),
        *("--tenant", "name=a,concurrency=2,key_env=KEY_A,requests=2"),
        *("--tenant", "name=b,concurrency=1,key_env=KEY_B,requests=2"),
        env=env,
    )
    assert code == 0, err
    run = json.loads(results.read_text())
    for row in run["tenants"]:
        assert (row["ok"], row["errors"], row["completion_tokens"]) == (2, 0, 16)
        assert row["service"] > 2 * 16
    assert 0.5 <= run["jain_index"] <= 1
