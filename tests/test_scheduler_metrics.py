"""The fair scheduler seen from outside, over real HTTP: the real llama.cpp engine and the bundled
model serve two keys at once through more requests than it has slots, the server's state reporter
runs on its own clock, and the sidecar's /metrics and /stats must show each key's service and
queue wait, the decode-step histograms and the fairness index."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from llmserve.server.app_keys import SERVICE, STATE
from llmserve.server.engines.base import Engine
from llmserve.server.keys import KeyEntry, KeyStore, hash_secret, write_keys
from llmserve.server.state_reporter import StateReporter
from llmserve.shared.protocol import STEP_TOKEN_BOUNDS
from tests.conftest import ServerFactory, SidecarStack
from tests.test_metrics_exposition import promtool_check

SECRETS = {"alpha": "sk-fair-alpha-1c9e", "beta": "sk-fair-beta-7a02"}
# More than the engine's 8 slots and 2 spare ones from each key: both keys have to wait.
PER_KEY = 12
# Long enough that every request is still running when the last of them arrives, even on a
# loaded machine: otherwise a key might never wait, and the index has nothing to judge.
MAX_TOKENS = 48


async def chat(session: aiohttp.ClientSession, server: TestServer, model: str, key: str) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Count from one to ten."}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {SECRETS[key]}"}
    async with session.post(
        server.make_url("/v1/chat/completions"), json=body, headers=headers
    ) as response:
        assert response.status == 200, await response.text()
        await response.read()


def value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def test_two_keys_show_their_service_queue_wait_steps_and_fairness(
    serve: ServerFactory, llama_engine: Engine, sidecar_stack: SidecarStack, short_tmp: str
) -> None:
    keys = Path(short_tmp) / "keys.toml"
    write_keys(
        keys,
        {name: KeyEntry(name=name, sha256=hash_secret(s)) for name, s in SECRETS.items()},
    )
    server = await serve(llama_engine, events=sidecar_stack.sender(), keys=KeyStore(keys))
    service, app = server.app[SERVICE], server.app
    reporter = StateReporter(service.events, llama_engine, service.gate, app[STATE])
    model = llama_engine.info.model_id
    reporter.start()
    try:
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(
                *(chat(session, server, model, key) for _ in range(PER_KEY) for key in SECRETS)
            )
        done = time.monotonic()
        await sidecar_stack.wait_finished(2 * PER_KEY, seconds=30)
        # A report whose tick came after the last request ended: its fairness counts all of it.
        instance = next(iter(sidecar_stack.recorder.instances.values()))
        for _ in range(500):
            if instance.last_state > done:
                break
            await asyncio.sleep(0.01)
        assert instance.last_state > done, "no state report after the requests ended"
    finally:
        await reporter.stop(llama_engine.info)
    samples = await sidecar_stack.samples()
    finished = sidecar_stack.finished

    # Each request's service is what the engine charged its key: prompt tokens read, and twice
    # the tokens generated; the per-key counters add them up.
    for event in finished:
        read = event["prompt_tokens"] - event["cached_tokens"]
        assert event["service"] == read + 2 * event["completion_tokens"] > 0
    for key in SECRETS:
        charged = sum(e["service"] for e in finished if e["key"] == key)
        assert value(samples, "llm_key_service_tokens_total", key=key) == charged
        waited = sum(e["queue_ns"] for e in finished if e["key"] == key) / 1e9
        counted = value(samples, "llm_key_queue_seconds_total", key=key)
        assert counted is not None and math.isclose(counted, waited, rel_tol=1e-9)
        assert counted > 0, f"{key} never waited"
    tenants = {tenant.name: tenant for tenant in service.gate.share.tenants}
    assert {key: tenants[key].service for key in SECRETS} == {
        key: value(samples, "llm_key_service_tokens_total", key=key) for key in SECRETS
    }

    # The step histograms are the engine's own counts: this sidecar saw the server's first
    # report, so it counts every step the (session-wide) engine ever made, these requests' too.
    tokens = llama_engine.steps.tokens.snapshot()
    seconds = llama_engine.steps.seconds.snapshot()
    les = [str(float(bound)) for bound in STEP_TOKEN_BOUNDS] + ["+Inf"]
    drawn = [value(samples, "llm_scheduler_step_tokens_bucket", model=model, le=le) for le in les]
    assert drawn == list(tokens.counts)
    assert value(samples, "llm_scheduler_step_tokens_sum", model=model) == tokens.total
    assert value(samples, "llm_scheduler_step_seconds_count", model=model) == seconds.counts[-1]
    generated = sum(e["completion_tokens"] for e in finished)
    assert tokens.total >= generated and seconds.counts[-1] > 0

    # Both keys waited and got about the same service: Jain's index near 1 (0.5 is one of two
    # getting everything).
    fairness = value(samples, "llm_scheduler_fairness_index", model=model)
    assert fairness is not None and 0.9 <= fairness <= 1.0
    await promtool_check(await sidecar_stack.metrics_text())

    async with aiohttp.ClientSession() as session:
        async with session.get(sidecar_stack.http.make_url("/stats")) as response:
            stats = await response.json()
    shares = [stats["keys"][key]["1m"]["service_share"] for key in SECRETS]
    assert math.isclose(sum(shares), 1.0, abs_tol=1e-3)
    assert all(0.3 < share < 0.7 for share in shares), shares
