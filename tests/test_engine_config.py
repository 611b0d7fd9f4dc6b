"""Engine settings llama.cpp cannot run are refused at startup, naming the field, with no abort.

Each case once reached llama.cpp: a batch smaller than `parallel` aborted the process in
`GGML_ASSERT(n_outputs_max <= cparams.n_outputs_max)` with a debugger backtrace on stderr, and a
context past the model's training context was accepted with only a warning from llama.cpp.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.conftest import Process, start

# None of these answers may look like a crash.
CRASH_MARKS = ("GGML_ASSERT", "Traceback", "Aborted", "backtrace")


@pytest.mark.parametrize(
    ("flags", "code", "expected"),
    [
        (
            ("--llamacpp-parallel", "32", "--llamacpp-batch-tokens", "16"),
            2,
            "llamacpp.batch_tokens = '16' (from flag --llamacpp-batch-tokens): Value error, "
            "must be at least llamacpp.parallel + llamacpp.spare_slots (34)",
        ),
        (
            ("--llamacpp-parallel", "15", "--llamacpp-batch-tokens", "16"),
            2,
            "must be at least llamacpp.parallel + llamacpp.spare_slots (17)",
        ),
        (
            ("--llamacpp-parallel", "255", "--llamacpp-batch-tokens", "512"),
            2,
            "llamacpp.parallel + llamacpp.spare_slots (255 + 2) must be at most 256",
        ),
        (("--llamacpp-threads", "-1"), 2, "llamacpp.threads = '-1' (from flag"),
        (("--llamacpp-parallel", "0"), 2, "llamacpp.parallel = '0' (from flag"),
        (("--llamacpp-parallel", "257"), 2, "llamacpp.parallel = '257' (from flag"),
        (
            ("--llamacpp-context-per-sequence", "16384"),
            1,
            "llamacpp.context_per_sequence = 16384 is more than the 8192 tokens",
        ),
    ],
)
async def test_settings_the_engine_cannot_run_stop_startup_naming_the_field(
    processes: list[Process], short_tmp: str, flags: tuple[str, ...], code: int, expected: str
) -> None:
    server = await start(
        "serve",
        *("--port", "0", "--sidecar-spawn", "false", "--sidecar-events", "false"),
        *("--sidecar-socket-path", f"{short_tmp}/ev.sock"),
        *flags,
    )
    processes.append(server)
    # A server that accepted the setting would be serving now, not exiting: the wait then fails.
    assert await server.finish(seconds=120) == code
    log = "".join(server.log)
    assert expected in log
    assert not [mark for mark in CRASH_MARKS if mark in log], log


async def test_a_context_smaller_than_the_batch_is_served_not_aborted(
    processes: list[Process], short_tmp: str
) -> None:
    # llama.cpp lowers n_batch to a small whole context (3 x 100 tokens here); prompts that
    # fill every sequence at once used to exceed it and abort in GGML_ASSERT(n_tokens_all <=
    # cparams.n_batch).
    server = await start(
        "serve",
        *("--port", "0", "--sidecar-spawn", "false", "--sidecar-events", "false"),
        *("--sidecar-socket-path", f"{short_tmp}/ev.sock"),
        *("--llamacpp-context-per-sequence", "100", "--llamacpp-parallel", "3"),
    )
    processes.append(server)
    port = (await server.wait_for_line(r"listening on http://127\.0\.0\.1:(\d+)"))[1]
    await server.wait_for_line("ready: ")
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/v1/models") as models:
            entry = (await models.json())["data"][0]
        context = entry["context_length"]

        async def fill_a_sequence(i: int) -> int:
            body = {
                "model": entry["id"],
                "prompt": [1 + (i * 7 + j) % 1000 for j in range(context - 3)],
                "max_tokens": 3,
                "ignore_eos": True,
            }
            async with session.post(f"{base}/v1/completions", json=body) as response:
                return response.status

        assert await asyncio.gather(*(fill_a_sequence(i) for i in range(3))) == [200, 200, 200]
    assert server.proc.returncode is None
