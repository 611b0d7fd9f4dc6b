"""Engine settings llama.cpp cannot run are refused at startup, naming the field, with no abort.

Each case once reached llama.cpp: a batch smaller than `parallel` aborted the process in
`GGML_ASSERT(n_outputs_max <= cparams.n_outputs_max)` with a debugger backtrace on stderr, and a
context past the model's training context was accepted with only a warning from llama.cpp.
"""

from __future__ import annotations

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
            "must be at least llamacpp.parallel (32)",
        ),
        (
            ("--llamacpp-parallel", "17", "--llamacpp-batch-tokens", "16"),
            2,
            "must be at least llamacpp.parallel (17)",
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
):
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
