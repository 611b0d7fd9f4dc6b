"""The sidecar renders its per-key families itself (sidecar.key_metrics): its /metrics must say
what prometheus_client would say of the same values (in the text format and in OpenMetrics), pass
Prometheus' own checker, and leave the event loop free to ingest events while it renders."""

from __future__ import annotations

import asyncio
import gzip
import socket
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.parser import text_string_to_metric_families

from llmserve.sidecar import key_metrics
from llmserve.sidecar.key_metrics import KeyCounter, KeyGauge, MetricsRegistry
from tests.conftest import SidecarStack
from tests.test_sidecar_events import datagram, end_event, send_raw

# Escapes, separators, spaces, non-ASCII and the empty string.
LABEL_VALUES = ["plain", 'say "hi"', "back\\slash", "two\nlines", "ключ 🔑", "", "a=b,c} x"]
# Integers, binary fractions, Go's switch to exponents (1e+06), huge and tiny values.
INCREMENTS = [1, 0.1, 0.2, 1e6, 123_456_789, 2**53, 1e-7, 7, 1e22]
GAUGE_VALUES = [-1.5, 0, 1 / 3, 12_345_678.9, 1e22, float("inf"), float("-inf"), float("nan")]
HELP = 'Help with a backslash \\ and "quotes"\nover two lines.'


def families(registry: CollectorRegistry, counter_type: Any, gauge_type: Any) -> tuple[Any, ...]:
    """The same three families from either library; the gauge's labels are not in name order."""
    return (
        counter_type("llm_test_requests", HELP, ("key", "status"), registry=registry),
        gauge_type("llm_test_limit", "A limit.", ("limit", "key"), registry=registry),
        counter_type("llm_test_unused", "Never incremented.", ("key",), registry=registry),
    )


def update(family_set: tuple[Any, ...], step: int, labels: list[str]) -> None:
    requests, limit, _ = family_set
    for i, label in enumerate(labels):
        requests.labels(label, "ok").inc(INCREMENTS[(i + step) % len(INCREMENTS)])
        limit.labels("rpm", label).set(GAUGE_VALUES[(i + step) % len(GAUGE_VALUES)])


async def test_key_families_render_exactly_what_prometheus_client_renders() -> None:
    ours, theirs = MetricsRegistry(), CollectorRegistry()
    mine = families(ours, KeyCounter, KeyGauge)
    reference = families(theirs, Counter, Gauge)
    # Every series new, then a second render with some of them changed and the rest cached.
    for step, labels in ((0, LABEL_VALUES), (1, LABEL_VALUES[::2])):
        update(mine, step, labels)
        update(reference, step, labels)
        expected = generate_latest(theirs)
        assert await ours.exposition() == expected
        # What a scraper that asks for OpenMetrics (Prometheus does) gets.
        assert await ours.exposition(openmetrics=True) == openmetrics_latest(theirs)
        # What generic readers of the registry (get_sample_value, the docs tests) see.
        assert generate_latest(ours) == expected
    series = {"key": 'say "hi"', "status": "ok"}
    value = ours.get_sample_value("llm_test_requests_total", series)
    assert value == theirs.get_sample_value("llm_test_requests_total", series)


def test_misuse_is_refused_as_prometheus_client_refuses_it():
    for counter_type, registry in ((Counter, CollectorRegistry()), (KeyCounter, MetricsRegistry())):
        counter = counter_type("llm_test", "Test.", ("key", "status"), registry=registry)
        with pytest.raises(ValueError):
            counter.labels("a", "ok").inc(-1)
        with pytest.raises(ValueError):
            counter.labels("a")


async def promtool_check(text: str) -> None:
    promtool = await asyncio.create_subprocess_exec(
        "promtool",
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(promtool.communicate(text.encode()), 30)
    assert promtool.returncode == 0, output.decode()


WEIRD_KEY = 'team "a"\\b\nc'


def key_events(count: int) -> list[dict[str, object]]:
    """For each key a limit decision (every fifth refused) and a request (every third failed)."""
    events: list[dict[str, object]] = []
    for i in range(count):
        key = WEIRD_KEY if i == 0 else f"k{i:03d}"
        events.append(
            {
                "seq": len(events) + 1, "kind": "ratelimit", "ts": 0.0, "rid": f"r{i}",
                "key": key, "limit": "rpm", "allowed": i % 5 != 0, "backend_error": False,
                "state": {"rpm": [600, 600 - i / 7], "tpm": [100_000, 99_000 - i]},
            }
        )  # fmt: skip
        event = end_event(len(events) + 1, f"r{i}", key=key, status="error" if i % 3 else "ok")
        event["error_type"] = "engine_error"
        events.append(event)
    return events


async def test_sidecar_metrics_with_many_keys_parse_match_and_pass_promtool(
    sidecar_stack: SidecarStack, monkeypatch: pytest.MonkeyPatch
):
    # Chunks of 7 series: every family spans many chunks, and their ends fall mid-family.
    monkeypatch.setattr(key_metrics, "CHUNK_SERIES", 7)
    keys = 150  # the sidecar tracks 100; the other 50 share `other`
    events = key_events(keys)
    for start in range(0, len(events), 50):
        await send_raw(sidecar_stack.socket_path, datagram("many", 0, events[start : start + 50]))
    await sidecar_stack.wait_finished(keys)

    text = await sidecar_stack.metrics_text()
    await promtool_check(text)
    # Line for line what prometheus_client writes of the same registry; process_* move on.
    library = generate_latest(sidecar_stack.recorder.metrics.registry).decode()
    assert sorted(line for line in text.splitlines() if not line.startswith("process_")) == sorted(
        line for line in library.splitlines() if not line.startswith("process_")
    )

    parsed = {family.name: family for family in text_string_to_metric_families(text)}
    requests = {
        (s.labels["key"], s.labels["status"]): s.value for s in parsed["llm_key_requests"].samples
    }
    assert len({key for key, _ in requests}) == 101
    assert sum(requests.values()) == keys
    assert requests[(WEIRD_KEY, "ok")] == 1
    assert sum(v for (key, _), v in requests.items() if key == "other") == 50
    errors = {
        (s.labels["key"], s.labels["type"]): s.value for s in parsed["llm_key_errors"].samples
    }
    assert errors[("k001", "engine_error")] == 1
    assert sum(errors.values()) == sum(1 for i in range(keys) if i % 3)
    refused = {s.labels["key"]: s.value for s in parsed["llm_key_rate_limited"].samples}
    assert refused == {WEIRD_KEY: 1, **{f"k{i:03d}": 1 for i in range(5, 100, 5)}, "other": 10}
    remaining = {
        (s.labels["key"], s.labels["limit"]): s.value
        for s in parsed["llm_key_rate_limit_remaining"].samples
    }
    assert remaining[("k007", "rpm")] == 599
    assert remaining[("k008", "tpm")] == 98_992
    assert remaining[("other", "rpm")] == 600 - 149 / 7


async def test_events_are_ingested_while_metrics_render(sidecar_stack: SidecarStack):
    events = key_events(100)
    for start in range(0, len(events), 50):
        await send_raw(sidecar_stack.socket_path, datagram("many", 0, events[start : start + 50]))
    await sidecar_stack.wait_finished(100)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(
            datagram("late", 0, [end_event(1, "late", key="k001")]), sidecar_stack.socket_path
        )
    # The datagram waits in the socket until the event loop next runs: only the render's own
    # pauses let it, so it is handled before the render returns only if the render pauses.
    text = (await sidecar_stack.recorder.metrics.registry.exposition()).decode()
    assert sidecar_stack.finished[-1]["rid"] == "late"
    assert text.count("llm_key_requests_total{") == 100


async def test_metrics_are_gzipped_for_a_scraper_that_asks(sidecar_stack: SidecarStack):
    events = key_events(100)
    await send_raw(sidecar_stack.socket_path, datagram("gzip", 0, events))
    await sidecar_stack.wait_finished(100)
    plain = await sidecar_stack.metrics_text()
    url = sidecar_stack.http.make_url("/metrics")
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        # Prometheus' scraper asks for exactly this.
        async with session.get(url, headers={"Accept-Encoding": "gzip"}) as response:
            assert response.headers["Content-Encoding"] == "gzip"
            packed = await response.read()
        async with session.get(url, headers={"Accept-Encoding": "identity"}) as response:
            assert "Content-Encoding" not in response.headers
            unpacked = await response.read()
    assert len(packed) * 5 < len(unpacked)
    strip = [
        line for line in gzip.decompress(packed).decode().splitlines() if "process_" not in line
    ]
    assert strip == [line for line in plain.splitlines() if "process_" not in line]
