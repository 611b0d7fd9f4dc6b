"""Exemplars: asked for OpenMetrics, the sidecar's latency histograms name a request (and its trace)
that fell in each bucket; the text format every other scraper gets is what it was."""

from __future__ import annotations

import math

import aiohttp
import msgspec
from multidict import CIMultiDict
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from llmserve.shared.protocol import (
    End,
    Event,
    First,
    Gaps,
    Start,
    decode_datagram,
    encode_datagram,
    pack_event,
)
from llmserve.sidecar.recorder import Recorder
from llmserve.sidecar.request_log import request_fields
from tests.conftest import ServerFactory, SidecarStack, synthetic_engine
from tests.test_sidecar_events import end_fields, recorder

# What Debian's Prometheus 2.42 sends when it scrapes.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
# OpenMetrics bounds the label names and values of one exemplar to 128 characters together.
EXEMPLAR_MAX_CHARS = 128
TRACED = {
    "llm_time_to_first_token_seconds",
    "llm_inter_token_latency_seconds",
    "llm_request_duration_seconds",
    "llm_request_queue_time_seconds",
}


def exemplars(text: str) -> dict[str, list[tuple[float, float, dict[str, str], float]]]:
    """Histogram name -> (lower edge, upper edge, exemplar labels, exemplar value) of each bucket
    that has an exemplar; parsing checks the exposition is valid OpenMetrics."""
    found: dict[str, list[tuple[float, float, dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        lower = -math.inf
        for sample in family.samples:
            if not sample.name.endswith("_bucket"):
                continue
            upper = float(sample.labels["le"])
            if sample.exemplar is not None:
                entry = (lower, upper, sample.exemplar.labels, sample.exemplar.value)
                found.setdefault(family.name, []).append(entry)
            lower = -math.inf if upper == math.inf else upper
    return found


async def scrape(stack: SidecarStack, accept: str | None) -> tuple[str, str]:
    headers = {"Accept": accept} if accept is not None else {}
    async with aiohttp.ClientSession() as session:
        async with session.get(stack.http.make_url("/metrics"), headers=headers) as response:
            assert response.status == 200
            return response.headers["Content-Type"], await response.text()


async def test_the_latency_histograms_name_a_request_and_its_trace(
    serve: ServerFactory, sidecar_stack: SidecarStack
) -> None:
    server = await serve(
        synthetic_engine(token_interval_seconds="0.005", completion_tokens="5"),
        events=sidecar_stack.sender(),
    )
    traceparent = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
    body = {"model": "synthetic", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    labelled = []
    async with aiohttp.ClientSession() as session:
        for pairs in ([], [("traceparent", traceparent)]):
            url = server.make_url("/v1/chat/completions")
            async with session.post(url, json=body, headers=CIMultiDict(pairs)) as response:
                assert response.status == 200
                await response.read()
                labelled.append({"request_id": response.headers["x-request-id"]})
    labelled[1]["trace_id"] = TRACE_ID
    await sidecar_stack.wait_finished(2)

    content_type, text = await scrape(sidecar_stack, PROMETHEUS_ACCEPT)
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert text.endswith("# EOF\n")
    found = exemplars(text)
    assert set(found) == TRACED, "exemplars on exactly the four latency histograms"
    for name, entries in found.items():
        for lower, upper, labels, value in entries:
            assert lower < value <= upper, f"{name}: {value} outside ({lower}, {upper}]"
            # The request's id and the caller's trace, never the key's name or anything else.
            assert labels in labelled, name
        # Each bucket keeps its latest request: the traced one, sent last, is in every family.
        assert labelled[1] in [labels for _, _, labels, _ in entries], name


def end_struct(rid: str, **fields: object) -> End:
    """A request's `end` event, with `fields` changed."""
    return msgspec.convert({**end_fields(rid), **fields}, End)


def feed(events: list[Event]) -> Recorder:
    """A recorder that has received `events` as one datagram."""
    rec, _ = recorder()
    for seq, event in enumerate(events, start=1):
        event.seq = seq
    rec.handle(decode_datagram(encode_datagram("test", [pack_event(e) for e in events])))
    return rec


def request_events(rid: str, trace_id: str | None) -> list[Event]:
    """One request's start, first token, gaps and end."""
    start = Start(
        req=1, rid=rid, key="acme", model="m", endpoint="chat", stream=True, prompt_tokens=3,
        queue_ns=2 * 10**6, trace_id=trace_id,
    )  # fmt: skip
    end = end_struct(rid, req=1, trace_id=trace_id)
    gaps = Gaps(req=1, gaps_us=[5000, 20_000, 20_000, 3_000_000])
    return [start, First(req=1, ttft_ns=10**7), gaps, end]


async def test_the_text_format_is_what_it_was() -> None:
    """The text format has no exemplars: the same requests render the same bytes with or without
    ids and traces (the process_* series of the sidecar itself aside)."""

    async def text(rec: Recorder) -> list[str]:
        body = (await rec.metrics.registry.exposition()).decode()
        return [line for line in body.splitlines() if not line.startswith("process_")]

    traced = await text(feed(request_events("a-request", TRACE_ID)))
    assert traced == await text(feed(request_events("", None)))
    assert not any(" # {" in line for line in traced)


async def test_exemplar_labels_are_bounded_and_escaped() -> None:
    """A request id is the caller's text: however long or odd, the exemplar keeps to
    OpenMetrics' 128 characters and the exposition stays valid."""
    hostile = 'id "quoted" \\ back\nslash, ключ 🔑 ' + "x" * 200
    for trace_id in (TRACE_ID, None):
        text = (
            await feed(request_events(hostile, trace_id)).metrics.registry.exposition(
                openmetrics=True
            )
        ).decode()
        found = exemplars(text)
        assert set(found) == TRACED
        for entries in found.values():
            for _, _, labels, _ in entries:
                assert sum(len(name) + len(value) for name, value in labels.items()) == (
                    EXEMPLAR_MAX_CHARS
                )
                assert hostile.startswith(labels["request_id"])
                assert labels.get("trace_id") == trace_id


def test_the_log_line_carries_the_trace_ids() -> None:
    end = end_struct("r", trace_id=TRACE_ID, span_id="00f067aa0ba902b7")
    fields = request_fields(msgspec.structs.asdict(end))
    assert (fields["request_id"], fields["trace_id"], fields["span_id"]) == (
        "r",
        TRACE_ID,
        "00f067aa0ba902b7",
    )
    untraced = request_fields(msgspec.structs.asdict(end_struct("r")))
    assert untraced["trace_id"] is None and untraced["span_id"] is None


async def test_any_accept_header_gets_an_answer_never_an_error(
    sidecar_stack: SidecarStack,
) -> None:
    """The Accept header is the scraper's to write: whatever it says, /metrics answers, in
    OpenMetrics only when that is what the scraper prefers."""
    openmetrics = [
        PROMETHEUS_ACCEPT,
        "application/openmetrics-text",
        "application/openmetrics-text; version=abc",
        "application/openmetrics-text;version=0.0.1",
        "APPLICATION/OPENMETRICS-TEXT;version=1.0.0;escaping=nonsense",
    ]
    text = [
        None,
        "",
        "*/*",
        "text/plain;version=x.y",
        "text/plain, application/openmetrics-text;q=0.5",
        "application/openmetrics-text;q=0",
        "application/openmetrics-text;q=banana",
        ";;;,,,=;q",
        "x" * 7000,
    ]
    for accept in openmetrics + text:
        content_type, body = await scrape(sidecar_stack, accept)
        wanted = accept in openmetrics
        assert content_type.startswith("application/openmetrics-text") == wanted, accept
        assert body.endswith("# EOF\n") == wanted, accept
