"""Schemathesis against /openapi.json of a real server with the bundled model: every operation,
every check (no 5xx, responses that match the schema, schema-valid input accepted and invalid
input refused). A failure prints the request that caused it and the seed to replay it."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from tests.conftest import Process, start

EXAMPLES_PER_OPERATION = 100


async def test_every_operation_holds_to_its_schema(tmp_path: Path, processes: list[Process]):
    server = await start("serve", "--port", "0", "--sidecar-spawn", "false")
    processes.append(server)
    port = (await server.wait_for_line(r"listening on http://127\.0\.0\.1:(\d+)"))[1]
    await server.wait_for_line("ready: ")
    binary = Path(sys.executable).with_name("schemathesis")
    assert binary.exists(), "schemathesis is missing: scripts/setup --test installs it"
    run = await asyncio.create_subprocess_exec(
        binary,
        "run",
        f"http://127.0.0.1:{port}/openapi.json",
        "--checks=all",
        f"--max-examples={EXAMPLES_PER_OPERATION}",
        "--no-color",
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(run.communicate(), 900)
    report = output.decode()
    assert run.returncode == 0, report
    assert "Tested: 6" in report, report
    assert not any('"level": "error"' in line for line in server.log), "".join(server.log)
