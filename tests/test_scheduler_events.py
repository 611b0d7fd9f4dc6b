"""The fair scheduler's observability, event by event: the `state` and `end` fields that carry it,
bounded like the rest of the protocol, and what the sidecar makes of them (metrics, /stats)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from llmserve.server.scheduler import StepStats
from llmserve.shared.protocol import (
    STEP_SECONDS_BOUNDS,
    STEP_TOKEN_BOUNDS,
    Malformed,
    State,
    decode_datagram,
    encode_datagram,
    pack_event,
)
from llmserve.sidecar.server_histograms import CumulativeCounts
from llmserve.sidecar.stats import RollingStats
from tests.test_sidecar_events import datagram, end_event, recorder

TOKEN_BUCKETS = len(STEP_TOKEN_BOUNDS) + 1
SECOND_BUCKETS = len(STEP_SECONDS_BOUNDS) + 1


def state_event(seq: int, **fields: Any) -> dict[str, Any]:
    return {
        "seq": seq, "kind": "state", "ts": 0.0, "model": "m", "running": 0, "waiting": 0,
        "kv_usage": 0.0, "ready": True, "draining": False, **fields,
    }  # fmt: skip


def steps(tokens: list[int], seconds: list[int], tokens_sum: float, seconds_sum: float) -> dict:
    return {
        "step_tokens": tokens,
        "step_tokens_sum": tokens_sum,
        "step_seconds": seconds,
        "step_seconds_sum": seconds_sum,
    }


def test_the_sidecar_knows_the_bounds_the_engines_count_steps_with() -> None:
    assert StepStats.TOKEN_BOUNDS == STEP_TOKEN_BOUNDS
    assert StepStats.SECONDS_BOUNDS == STEP_SECONDS_BOUNDS


def test_a_state_from_a_server_before_the_scheduler_still_decodes() -> None:
    (event,) = decode_datagram(datagram("a", 0, [state_event(1)])).events
    assert isinstance(event, State)
    assert event.fairness is None and event.step_tokens == [] and event.step_tokens_sum == 0


@pytest.mark.parametrize(
    "fields",
    [
        {"fairness": 1.5},
        {"fairness": -0.1},
        {"fairness": math.nan},
        {"step_tokens": [1, -2]},
        {"step_tokens": [1] * 33},
        {"step_tokens_sum": math.inf},
        {"step_seconds_sum": -1.0},
        {"step_seconds": ["1"]},
    ],
)
def test_hostile_state_fields_spoil_only_their_event(fields: dict[str, Any]) -> None:
    events = [state_event(1, **fields), end_event(2, "next")]
    decoded = decode_datagram(datagram("a", 0, events)).events
    assert isinstance(decoded[0], Malformed) and decoded[0].seq == 1
    assert not isinstance(decoded[1], Malformed)


@pytest.mark.parametrize("service", [-1.0, math.inf, math.nan, 1e16])
def test_an_end_with_a_service_out_of_bounds_is_malformed(service: float) -> None:
    (event,) = decode_datagram(datagram("a", 0, [{**end_event(1, "x"), "service": service}])).events
    assert isinstance(event, Malformed)


def test_the_sender_cuts_overlong_step_counts_and_the_sidecar_ignores_them() -> None:
    event = State(
        model="m", running=0, waiting=0, kv_usage=0.0, ready=True, draining=False,
        step_tokens=list(range(100)), step_tokens_sum=5.0,
    )  # fmt: skip
    (decoded,) = decode_datagram(encode_datagram("a", [pack_event(event)])).events
    assert isinstance(decoded, State) and len(decoded.step_tokens) == 32
    counts = CumulativeCounts(TOKEN_BUCKETS, from_start=True)
    assert counts.added(decoded.step_tokens, decoded.step_tokens_sum) is None


def test_cumulative_counts_become_what_each_report_added() -> None:
    counts = CumulativeCounts(3, from_start=True)
    assert counts.added([1, 3, 4], 9.0) == ([1, 2, 1], 9.0)
    assert counts.added([1, 3, 4], 9.0) == ([0, 0, 0], 0.0)
    assert counts.added([2, 5, 7], 20.0) == ([1, 1, 1], 11.0)
    # Not cumulative, or the wrong length: no server's; nothing counted, the last report stands.
    assert counts.added([5, 1, 7], 30.0) is None
    assert counts.added([2, 5], 30.0) is None
    assert counts.added([3, 6, 8], 25.0) == ([1, 0, 0], 5.0)
    # A bucket that shrinks cannot be one server's: counted again from the next report.
    assert counts.added([0, 6, 8], 25.0) is None
    assert counts.added([1, 7, 9], 26.0) == ([1, 0, 0], 1.0)


def test_a_sidecar_meeting_a_server_mid_life_counts_from_its_first_report() -> None:
    counts = CumulativeCounts(2, from_start=False)
    assert counts.added([100, 200], 1000.0) is None
    assert counts.added([101, 202], 1010.0) == ([1, 1], 10.0)


def sample(rec: Any, name: str, **labels: str) -> float | None:
    value: float | None = rec.metrics.registry.get_sample_value(name, labels)
    return value


def test_state_reports_become_the_fairness_gauge_and_step_histograms() -> None:
    rec, _ = recorder()
    tokens = [0] * TOKEN_BUCKETS
    seconds = [0] * SECOND_BUCKETS
    rec.handle(decode_datagram(datagram("a", 0, [state_event(1, **steps(tokens, seconds, 0, 0))])))
    assert math.isnan(sample(rec, "llm_scheduler_fairness_index", model="m") or 0.0)
    # Series exist from the first report, at zero, as counters should.
    assert sample(rec, "llm_scheduler_step_tokens_count", model="m") == 0
    # Three steps: 1 token, 8 tokens, 8 tokens; 4 ms, 20 ms and 20 ms.
    tokens = [1, 1, 1, 3, *[3] * (TOKEN_BUCKETS - 4)]
    seconds = [1, 1, 3, *[3] * (SECOND_BUCKETS - 3)]
    later = state_event(2, fairness=0.75, **steps(tokens, seconds, 17.0, 0.044))
    rec.handle(decode_datagram(datagram("a", 0, [later])))
    assert sample(rec, "llm_scheduler_fairness_index", model="m") == 0.75
    assert sample(rec, "llm_scheduler_step_tokens_bucket", model="m", le="1.0") == 1
    assert sample(rec, "llm_scheduler_step_tokens_bucket", model="m", le="4.0") == 1
    assert sample(rec, "llm_scheduler_step_tokens_bucket", model="m", le="8.0") == 3
    assert sample(rec, "llm_scheduler_step_tokens_bucket", model="m", le="+Inf") == 3
    assert sample(rec, "llm_scheduler_step_tokens_sum", model="m") == 17
    assert sample(rec, "llm_scheduler_step_seconds_bucket", model="m", le="0.025") == 3
    assert sample(rec, "llm_scheduler_step_seconds_sum", model="m") == pytest.approx(0.044)
    # A second server (or a restart) counts on top; one met mid-life counts from its first report.
    restarted = state_event(1, **steps(tokens, seconds, 17.0, 0.044))
    met_late = state_event(50, **steps([9] * TOKEN_BUCKETS, [9] * SECOND_BUCKETS, 90.0, 1.0))
    rec.handle(decode_datagram(datagram("b", 0, [restarted])))
    rec.handle(decode_datagram(datagram("c", 0, [met_late])))
    assert sample(rec, "llm_scheduler_step_tokens_count", model="m") == 6
    assert sample(rec, "llm_scheduler_step_tokens_sum", model="m") == 34


def test_per_key_service_and_queue_wait_stay_within_the_key_bound() -> None:
    rec, _ = recorder(max_keys=1)
    events = [
        {**end_event(1, "a", key="first"), "service": 11.0, "queue_ns": 2 * 10**9},
        {**end_event(2, "b", key="second"), "service": 7.0, "queue_ns": 5 * 10**8},
        {**end_event(3, "c", key="third"), "service": 1.0, "queue_ns": -(10**9)},
        # Refused before it queued: no wait to count, and no series of its own.
        {**end_event(4, "d", key="first", status="rate_limited"), "queue_ns": None},
    ]
    rec.handle(decode_datagram(datagram("a", 0, events)))
    assert sample(rec, "llm_key_service_tokens_total", key="first") == 11
    assert sample(rec, "llm_key_service_tokens_total", key="other") == 8
    assert sample(rec, "llm_key_queue_seconds_total", key="first") == 2
    # A negative wait (a broken clock, a hostile sender) counts as none; it never raises.
    assert sample(rec, "llm_key_queue_seconds_total", key="other") == 0.5
    assert rec.malformed == 0


def test_stats_give_each_key_its_share_of_the_service() -> None:
    stats = RollingStats(clock=lambda: 1000.0)
    stats.finished("m", "acme", "ok", 10, 10, 30.0)
    stats.finished("m", "globex", "ok", 10, 5, 10.0)
    stats.finished("m", "initech", "rate_limited", 0, 0, 0.0)
    keys = stats.snapshot()["keys"]
    assert {name: keys[name]["1m"]["service_share"] for name in keys} == {
        "acme": 0.75,
        "globex": 0.25,
        "initech": 0.0,
    }
    assert keys["acme"]["5m"]["service_tokens"] == 30
    # Listing fewer keys changes no share: the whole is every key's service.
    assert stats.snapshot(max_keys=1)["keys"]["acme"]["1m"]["service_share"] == 0.75


def test_stats_give_no_share_when_nothing_was_served() -> None:
    stats = RollingStats(clock=lambda: 1000.0)
    stats.finished("m", "acme", "invalid_request", 0, 0, 0.0)
    assert stats.snapshot()["keys"]["acme"]["1m"]["service_share"] is None
