"""Loading and freeing models, in processes of their own because failures here end a process.

SIGTERM while the model is still loading ends the process at once, whatever the engine: a large
model can take minutes to load, and systemd (or an operator) stopping the server meanwhile must
not wait for that. The load is made endless inside a real `llmserve serve` process by a small
launcher that wraps the engine's own loading call, then the process gets SIGTERM. And a llamacpp
engine freed before another must not take the other down.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.conftest import Process
from tests.exllamav2_double.model_dir import write_model_dir

# Runs `llmserve` with the engine's model loading blocked forever, as a very slow load would be.
LAUNCHERS = {
    "llamacpp": """
import sys, threading
from llmserve.server.engines.llamacpp import engine as llamacpp

real_model = llamacpp.LlamaModel

def endless_load(path, shape, progress):
    # llama.cpp reports progress while it reads the file: this report never returns.
    return real_model(path, shape, lambda fraction: threading.Event().wait())

llamacpp.LlamaModel = endless_load
""",
    "exllamav2": """
import sys, threading
import pytest
from tests import exllamav2_double
from tests.exllamav2_double.generator.dynamic import ExLlamaV2DynamicGenerator

exllamav2_double.install(pytest.MonkeyPatch())
# The generator is built last in the load; the gate is never opened.
ExLlamaV2DynamicGenerator.construction_gate = threading.Event()
""",
}
RUN = """
from llmserve.server.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("engine", ["llamacpp", "exllamav2"])
async def test_sigterm_during_a_model_load_exits_without_waiting_for_it(
    engine: str, tmp_path: Path, short_tmp: str
) -> None:
    flags = ["--engine", engine, "--sidecar-spawn", "false", "--sidecar-events", "false"]
    if engine == "exllamav2":
        flags += ["--exllamav2-model-dir", str(write_model_dir(tmp_path / "model"))]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        LAUNCHERS[engine] + RUN,
        *("serve", "--port", "0", "--sidecar-socket-path", f"{short_tmp}/ev.sock", *flags),
        stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("LLMSERVE_")},
        cwd=Path(__file__).parent.parent,
    )
    server = Process(proc)
    try:
        await server.wait_for_line(
            f"loading .* with {'ExLlamaV2' if engine == 'exllamav2' else 'llama.cpp'}"
        )
        proc.send_signal(signal.SIGTERM)
        # The load never ends, so a process that waits for it never exits: the bound fails it.
        assert await server.finish(seconds=60) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    log = "".join(server.log)
    assert "stopped while the model was loading" in log
    assert "Traceback" not in log


async def test_a_llamacpp_engine_outlives_another_one_closed_before_it() -> None:
    # llama.cpp's log callback is global: when it belonged to the model closed first, the
    # other model's close logged through freed memory and the process died (bus error).
    script = """
import asyncio, gc
from llmserve.server.config import load_config
from llmserve.server.engines import create_engine

config = load_config(environ={}, overrides={"llamacpp.context_per_sequence": "256"})
first, second = create_engine(config), create_engine(config)
asyncio.run(first.load())
asyncio.run(second.load())
asyncio.run(second.close())
del second
gc.collect()
asyncio.run(first.close())
print("both closed")
"""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=Path(__file__).parent.parent,
        env={k: v for k, v in os.environ.items() if not k.startswith("LLMSERVE_")},
    )
    stdout, _ = await proc.communicate()
    assert (proc.returncode, stdout.decode().strip()) == (0, "both closed")
