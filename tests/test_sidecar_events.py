"""The event socket: ordered delivery after an outage, counted overflow and loss, bad input."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import msgspec
import pytest

from llmserve.server.telemetry import RequestTelemetry
from llmserve.shared.client import EventSender
from llmserve.shared.protocol import decode_datagram, encode_datagram
from llmserve.sidecar.ingest import open_event_socket
from llmserve.sidecar.metrics import Metrics
from llmserve.sidecar.recorder import KeyNames, Recorder
from llmserve.sidecar.stats import RollingStats, quantile
from tests.conftest import SidecarStack


def end_event(seq: int, rid: str, key: str = "acme", status: str = "ok") -> dict[str, object]:
    return {
        "seq": seq, "kind": "end", "ts": 0.0, "req": seq, "rid": rid, "key": key, "model": "m",
        "endpoint": "chat", "stream": True, "status": status, "http_status": 200,
        "finish_reason": "stop", "error_type": None, "error": None, "cancel_reason": None,
        "prompt_tokens": 3, "completion_tokens": 4, "cached_tokens": 0, "e2e_ns": 10**8,
        "ttft_ns": 10**7, "queue_ns": 0, "prefill_ns": 10**6, "decode_ns": 10**7,
        "gen_ns": 3 * 10**7,
    }  # fmt: skip


def end_fields(rid: str) -> dict[str, object]:
    """What the server passes to emit(): the event without the fields emit() adds."""
    return {k: v for k, v in end_event(0, rid).items() if k not in ("seq", "kind", "ts")}


def recorder(max_keys: int = 100) -> tuple[Recorder, list[dict[str, object]]]:
    finished: list[dict[str, object]] = []
    return Recorder(Metrics(), RollingStats(), finished.append, max_keys=max_keys), finished


def datagram(instance: str, dropped: int, events: list[dict[str, object]]) -> bytes:
    """A datagram of these events as they are, valid or not."""
    return encode_datagram(
        instance, [msgspec.msgpack.encode(e) for e in events], counts=(dropped, 0)
    )


async def send_raw(path: str, data: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(data, path)
    await asyncio.sleep(0.05)


async def start_sidecar_late(
    sender: EventSender, path: str, expect: int
) -> tuple[Recorder, list[dict[str, object]]]:
    """Bind a sidecar at `path` after events were emitted; wait until `expect` requests end."""
    rec, finished = recorder()
    transport = await open_event_socket(path, rec)
    try:
        for _ in range(100):
            if len(finished) == expect:
                break
            await asyncio.sleep(0.02)
    finally:
        transport.close()
    return rec, finished


async def test_events_wait_for_a_late_sidecar_and_arrive_in_order(short_tmp: str):
    path = f"{short_tmp}/late.sock"
    sender = EventSender(path, max_buffered=10_000)
    for i in range(300):
        sender.emit("end", **end_fields(f"r{i}"))
    await asyncio.sleep(0.05)
    assert sender.buffered == 300 and sender.sent == 0

    rec, finished = await start_sidecar_late(sender, path, 300)
    sender.close()
    assert [e["rid"] for e in finished] == [f"r{i}" for i in range(300)]
    assert rec.lost == 0 and sender.buffered == 0


async def test_overflow_is_dropped_oldest_first_and_counted(short_tmp: str):
    path = f"{short_tmp}/full.sock"
    sender = EventSender(path, max_buffered=1000)
    for i in range(1500):
        sender.emit("end", **end_fields(f"r{i}"))
    assert sender.dropped == 500

    rec, finished = await start_sidecar_late(sender, path, 1000)
    sender.close()
    assert finished[0]["rid"] == "r500" and finished[-1]["rid"] == "r1499"
    assert rec.metrics.registry.get_sample_value("llm_sidecar_server_overflow_events_total") == 500
    assert rec.lost == 0


def test_gaps_are_lost_repeats_ignored_and_overflow_not_counted_twice():
    rec, finished = recorder()
    rec.handle(decode_datagram(datagram("a", 0, [end_event(1, "x"), end_event(2, "y")])))
    rec.handle(decode_datagram(datagram("a", 0, [end_event(2, "y"), end_event(5, "z")])))
    assert [e["rid"] for e in finished] == ["x", "y", "z"]
    assert rec.lost == 2
    # The server dropped 3 events (seq 6-8) from its buffer: overflow, not lost on the way.
    rec.handle(decode_datagram(datagram("a", 3, [end_event(9, "w")])))
    assert rec.lost == 2
    assert rec.metrics.registry.get_sample_value("llm_sidecar_server_overflow_events_total") == 3
    # Another server instance numbers its own events.
    rec.handle(decode_datagram(datagram("b", 0, [end_event(1, "v")])))
    assert rec.lost == 2 and len(finished) == 5


async def test_malformed_datagrams_are_counted_not_fatal(sidecar_stack: SidecarStack) -> None:
    await send_raw(sidecar_stack.socket_path, b"\xc1 not msgpack")
    await send_raw(sidecar_stack.socket_path, datagram("a", 0, [{"seq": 1, "kind": "bogus"}]))
    await send_raw(sidecar_stack.socket_path, datagram("a", 0, [{"seq": 2, "kind": "end"}]))
    # Each event is checked against its kind's definition on its own: a field of the wrong type
    # or past its bound spoils that event only, and its number still counts as received.
    wrong_type = {**end_event(3, "bad"), "prompt_tokens": "three"}
    too_long = {**end_event(4, "long"), "error": "x" * 5000}
    events = [wrong_type, too_long, end_event(5, "ok")]
    await send_raw(sidecar_stack.socket_path, datagram("a", 0, events))
    assert sidecar_stack.recorder.malformed == 5
    assert sidecar_stack.recorder.lost == 0
    assert [e["rid"] for e in sidecar_stack.finished] == ["ok"]


def test_key_series_are_bounded():
    keys = KeyNames(max_keys=2)
    assert [keys.label(k) for k in ("a", "b", "c", "a", "d")] == ["a", "b", "other", "a", "other"]
    rec, _ = recorder(max_keys=1)
    rec.handle(decode_datagram(datagram("a", 0, [end_event(1, "x", key="first")])))
    rec.handle(decode_datagram(datagram("a", 0, [end_event(2, "y", key="second")])))
    value = rec.metrics.registry.get_sample_value
    assert value("llm_key_requests_total", {"key": "first", "status": "ok"}) == 1
    assert value("llm_key_requests_total", {"key": "other", "status": "ok"}) == 1


def test_quantiles_interpolate_like_histogram_quantile():
    edges = (0.1, 0.2, 0.4)
    assert quantile({}, edges, 0.5) is None
    # 10 observations in (0.1, 0.2]: the median is halfway through that bucket.
    assert quantile({1: 10}, edges, 0.5) == pytest.approx(0.15)
    assert quantile({0: 5, 3: 5}, edges, 0.95) == 0.4


async def test_stats_lists_the_busiest_keys_unless_asked_for_all(sidecar_stack: SidecarStack):
    # Keys make 1 to 7 requests each, and k140 to k149 ten more: they are the ten busiest.
    events, seq = [], 0
    for number in range(150):
        for _ in range(1 + number % 7 + (number >= 140) * 10):
            seq += 1
            events.append(end_event(seq, f"r{seq}", key=f"k{number:03d}"))
    for start in range(0, len(events), 100):
        sidecar_stack.recorder.handle(
            decode_datagram(datagram("instance", 0, events[start : start + 100]))
        )
    url = sidecar_stack.http.make_url("/stats")
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            default = (await response.json())["keys"]
        async with session.get(url, params={"keys": "all"}) as response:
            every = (await response.json())["keys"]
        async with session.get(url, params={"keys": "10"}) as response:
            top = (await response.json())["keys"]
        async with session.get(url, params={"keys": "-1"}) as response:
            assert response.status == 400
            assert (await response.json())["error"]["param"] == "keys"
    assert (len(default), len(every)) == (100, 150)
    assert set(top) == {f"k{number}" for number in range(140, 150)}


async def test_a_restarted_sidecar_does_not_count_old_overflow_again(short_tmp: str) -> None:
    path = f"{short_tmp}/restart.sock"
    sender = EventSender(path, max_buffered=10)
    for i in range(15):
        sender.emit("end", **end_fields(f"r{i}"))
    first, _ = await start_sidecar_late(sender, path, 10)
    overflow = "llm_sidecar_server_overflow_events_total"
    assert first.metrics.registry.get_sample_value(overflow) == 5

    # The five were counted by the sidecar that saw them go; its successor must not count them.
    sender.emit("end", **end_fields("after-restart"))
    second, finished = await start_sidecar_late(sender, path, 1)
    sender.close()
    assert [e["rid"] for e in finished] == ["after-restart"]
    assert second.metrics.registry.get_sample_value(overflow) == 0
    assert second.lost == 0


async def test_an_oversized_field_is_cut_and_later_events_still_flow(
    sidecar_stack: SidecarStack,
) -> None:
    sender = sidecar_stack.sender()
    sender.emit("end", **{**end_fields("huge"), "error": "x" * 300_000, "key": "k" * 300_000})
    sender.emit("end", **end_fields("after"))
    await sidecar_stack.wait_finished(2)
    huge, after = sidecar_stack.finished
    assert (huge["rid"], after["rid"]) == ("huge", "after")
    assert huge["error"].startswith("xxxx") and len(huge["error"]) <= 2048
    assert huge["key"].startswith("kkkk") and len(huge["key"]) <= 256
    assert sender.buffered == 0
    sender.close()


async def test_text_that_is_not_utf8_never_raises_into_the_request_path(
    sidecar_stack: SidecarStack,
) -> None:
    sender = sidecar_stack.sender()
    # What surrogateescape makes of bytes that are not UTF-8, and a lone surrogate.
    name = b"caf\xe9".decode("utf-8", "surrogateescape")
    sender.emit("end", **{**end_fields("odd"), "key": name, "error": "bad \ud800 text"})
    sender.emit("end", **end_fields("after"))
    await sidecar_stack.wait_finished(2)
    odd = sidecar_stack.finished[0]
    assert odd["key"].startswith("caf") and odd["error"].startswith("bad ")
    assert [e["rid"] for e in sidecar_stack.finished] == ["odd", "after"]
    sender.close()


async def test_a_datagram_too_large_for_the_socket_is_split(sidecar_stack: SidecarStack) -> None:
    sender = sidecar_stack.sender()
    # A socket that takes only small datagrams (as a lowered wmem_max would make it): a batch
    # that does not fit is sent in smaller pieces, not retried for ever as if the sidecar were away.
    sender._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    for i in range(100):
        sender.emit("end", **end_fields(f"r{i}"))
    await sidecar_stack.wait_finished(100)
    assert [e["rid"] for e in sidecar_stack.finished] == [f"r{i}" for i in range(100)]
    assert sidecar_stack.recorder.lost == 0
    sender.close()


async def test_an_event_that_can_never_be_sent_is_dropped_and_counted(
    sidecar_stack: SidecarStack,
) -> None:
    sender = sidecar_stack.sender()
    sender._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sender.emit("end", **end_fields("before"))
    await sidecar_stack.wait_finished(1)
    # Alone it is larger than the socket takes: it goes, counted, and the queue moves on.
    sender.emit("end", **{**end_fields("too-big"), "error": "\U0001f600" * 2000})
    sender.emit("end", **end_fields("after"))
    await sidecar_stack.wait_finished(2)
    assert [e["rid"] for e in sidecar_stack.finished] == ["before", "after"]
    samples = await sidecar_stack.samples()
    assert samples[("llm_sidecar_events_unsendable_total", ())] == 1
    assert samples[("llm_sidecar_events_lost_total", ())] == 0
    assert sender.buffered == 0
    sender.close()


async def test_a_huge_count_of_gaps_arrives_in_bounded_events(sidecar_stack: SidecarStack) -> None:
    sender = sidecar_stack.sender()
    telemetry = RequestTelemetry(
        sender, request_id="bulk", key="acme", model="m", endpoint="completions", received_ns=0
    )
    telemetry.started(stream=False, prompt_tokens=1, queue_ns=0)
    telemetry.written(1)
    telemetry.written(300_000)
    telemetry.finished("ok", 200)
    await sidecar_stack.wait_finished(1)
    samples = await sidecar_stack.samples()
    assert samples[("llm_inter_token_latency_seconds_count", (("model", "m"),))] == 300_000
    assert sidecar_stack.recorder.malformed == 0
    sender.close()
