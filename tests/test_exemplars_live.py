"""From a point on a latency panel to the request's log line, for real: Debian's Prometheus with
exemplar storage scrapes a loaded `llmserve serve`, and every exemplar it returns names a request
whose log line agrees with the exemplar's bucket; a request sent with a `traceparent` is found by
its trace id both in an exemplar and in its log line."""

from __future__ import annotations

import asyncio
import bisect
import json
import math
import time
from pathlib import Path
from typing import Any

import aiohttp

from llmserve.sidecar.metrics import TTFT_BUCKETS
from tests.conftest import Process, free_port, start_synthetic_server
from tests.test_prometheus_live import Prometheus

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TTFT = "llm_time_to_first_token_seconds_bucket"
INTER_TOKEN = "llm_inter_token_latency_seconds_bucket"
BODY = {"model": "synthetic", "stream": True, "messages": [{"role": "user", "content": "hello"}]}


def request_log(path: Path) -> dict[str, dict[str, Any]]:
    """request id -> its log line."""
    if not path.exists():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {line["request_id"]: line for line in lines if line.get("msg") == "request finished"}


async def chat(session: aiohttp.ClientSession, base: str, headers: dict[str, str]) -> str:
    async with session.post(f"{base}/v1/chat/completions", json=BODY, headers=headers) as response:
        assert response.status == 200
        await response.read()
        return response.headers["x-request-id"]


def lower_edge(le: float) -> float:
    """The TTFT bucket below `le`'s upper edge."""
    index = bisect.bisect_left(TTFT_BUCKETS, le)
    return TTFT_BUCKETS[index - 1] if index > 0 else -math.inf


async def test_exemplars_lead_from_a_bucket_to_the_request_log_line(
    tmp_path: Path, short_tmp: str, processes: list[Process]
) -> None:
    sidecar_port = free_port()
    log_file = tmp_path / "requests.log"
    _, base = await start_synthetic_server(
        processes,
        # Two streams at a time: the rest queue, so first tokens spread over several buckets.
        *("--synthetic-parallel", "2", "--server-max-waiting", "100"),
        *("--synthetic-token-interval-seconds", "0.01", "--synthetic-completion-tokens", "8"),
        *("--sidecar-port", str(sidecar_port), "--sidecar-log-file", str(log_file)),
        *("--sidecar-socket-path", f"{short_tmp}/ev.sock"),
    )
    prometheus = Prometheus(tmp_path, [sidecar_port])
    await prometheus.start()
    started = time.time() - 1
    traceparent = f"00-{TRACE_ID}-b7ad6b7169203331-01"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                await asyncio.gather(*(chat(session, base, {}) for _ in range(12)))
                await asyncio.sleep(1.5)
            # Alone and last, so it is the latest exemplar of its buckets when next scraped.
            traced = await chat(session, base, {"traceparent": traceparent})
            for _ in range(60):
                await asyncio.sleep(1)
                now = time.time()
                ttft = await prometheus.exemplars(session, TTFT, started, now)
                gaps = await prometheus.exemplars(session, INTER_TOKEN, started, now)
                exemplars = [e for series in ttft for e in series["exemplars"]]
                if any(e["labels"].get("trace_id") == TRACE_ID for e in exemplars) and gaps:
                    break
    finally:
        await prometheus.stop()

    assert ttft and gaps, "Prometheus stored no exemplars of the TTFT and inter-token histograms"
    logged = request_log(log_file)
    assert logged[traced]["trace_id"] == TRACE_ID
    assert logged[traced]["span_id"] not in (None, "b7ad6b7169203331")
    checked = 0
    for series in ttft:
        le = float(series["seriesLabels"]["le"])
        for exemplar in series["exemplars"]:
            line = logged[exemplar["labels"]["request_id"]]
            assert lower_edge(le) < line["ttft_s"] <= le, f"{line} in the bucket le={le}"
            assert exemplar["labels"].get("trace_id") == line["trace_id"]
            checked += 1
    buckets = {series["seriesLabels"]["le"] for series in ttft}
    assert checked >= 2 and len(buckets) >= 2, f"exemplars in buckets {buckets}"
    for series in gaps:
        for exemplar in series["exemplars"]:
            assert exemplar["labels"]["request_id"] in logged
    traced_exemplars = [
        exemplar
        for series in ttft
        for exemplar in series["exemplars"]
        if exemplar["labels"].get("trace_id") == TRACE_ID
    ]
    assert traced_exemplars and all(e["labels"]["request_id"] == traced for e in traced_exemplars)
