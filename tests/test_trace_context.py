"""W3C trace context over real HTTP: a valid `traceparent` is continued (same trace, a span of the
server's own) on the response and in the request's events; anything else is ignored and changes
nothing but the ids."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from llmserve.server.trace_context import continue_trace
from llmserve.shared.protocol import End, pack_event
from tests.conftest import ServerFactory, SidecarStack, synthetic_engine

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
VALID = f"00-{TRACE_ID}-{PARENT_ID}-01"
CHAT = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}

HOSTILE: dict[str, list[tuple[str, str]]] = {
    "too long for version 00": [("traceparent", VALID + "-00")],
    "8 KB": [("traceparent", VALID + "0" * 8000)],
    "version ff": [("traceparent", f"ff-{TRACE_ID}-{PARENT_ID}-01")],
    "version not hex": [("traceparent", f"0g-{TRACE_ID}-{PARENT_ID}-01")],
    "uppercase hex": [("traceparent", f"00-{TRACE_ID.upper()}-{PARENT_ID}-01")],
    "bad hex in the trace id": [("traceparent", f"00-{'z' * 32}-{PARENT_ID}-01")],
    "short trace id": [("traceparent", f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01")],
    "zero trace id": [("traceparent", f"00-{'0' * 32}-{PARENT_ID}-01")],
    "zero parent id": [("traceparent", f"00-{TRACE_ID}-{'0' * 16}-01")],
    "bad flags": [("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-x1")],
    "newline inside": [("traceparent", f"00-{TRACE_ID}\n-{PARENT_ID}-01")],
    "non-ASCII": [("traceparent", f"00-{TRACE_ID[:-1]}é-{PARENT_ID}-01")],
    "two headers": [("traceparent", VALID), ("traceparent", VALID)],
    "a hundred headers": [("traceparent", VALID)] * 100,
    "empty": [("traceparent", "")],
    "tracestate alone": [("tracestate", "vendor=value")],
}

# What an HTTP client can send: a newline would end the header.
ON_THE_WIRE = {
    name: pairs for name, pairs in HOSTILE.items() if not any("\n" in v for _, v in pairs)
}


def headers(pairs: list[tuple[str, str]]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


@pytest.mark.parametrize("pairs", HOSTILE.values(), ids=HOSTILE.keys())
def test_an_invalid_traceparent_is_no_trace(pairs: list[tuple[str, str]]) -> None:
    assert continue_trace(headers(pairs)) is None


def test_a_valid_traceparent_is_continued_with_a_new_span() -> None:
    trace = continue_trace(headers([("traceparent", VALID), ("tracestate", "a=1, b@c=2")]))
    assert trace is not None
    assert trace.trace_id == TRACE_ID and trace.flags == "01"
    assert re.fullmatch(r"[0-9a-f]{16}", trace.span_id) and trace.span_id != PARENT_ID
    assert trace.response_headers() == {
        "traceparent": f"00-{TRACE_ID}-{trace.span_id}-01",
        "tracestate": "a=1,b@c=2",
    }
    # Empty list members are allowed, and several headers make one list.
    pairs = [("traceparent", VALID), ("tracestate", "a=1,,"), ("tracestate", "b=2")]
    trace = continue_trace(headers(pairs))
    assert trace is not None and trace.tracestate == "a=1,b=2"


def test_a_later_version_is_read_as_version_00() -> None:
    trace = continue_trace(headers([("traceparent", f"cc-{TRACE_ID}-{PARENT_ID}-03-what-next")]))
    assert trace is not None
    assert trace.response_headers()["traceparent"] == f"00-{TRACE_ID}-{trace.span_id}-01"


@pytest.mark.parametrize(
    "tracestate",
    [
        "",
        "UPPER=1",
        "a=1,b",
        "a=1,a=2",
        "=1",
        "a=" + "v" * 300,
        ",".join(f"k{i}=v" for i in range(33)),
    ],
)
def test_an_invalid_tracestate_is_dropped_and_the_trace_kept(tracestate: str) -> None:
    trace = continue_trace(headers([("traceparent", VALID), ("tracestate", tracestate)]))
    assert trace is not None and trace.tracestate is None
    assert "tracestate" not in trace.response_headers()


def test_a_sender_drops_ids_that_are_not_lowercase_hex() -> None:
    """The event protocol holds the ids to their pattern at the sender, so a bad id can never
    make the sidecar refuse a request's `end` as malformed."""
    event = End(
        req=1, rid="r", key="k", model="m", endpoint="chat", stream=True, status="ok",
        http_status=200, finish_reason="stop", error_type=None, error=None, cancel_reason=None,
        prompt_tokens=1, completion_tokens=1, cached_tokens=0, e2e_ns=1, ttft_ns=1, queue_ns=0,
        prefill_ns=None, decode_ns=None, gen_ns=0, trace_id="X" * 300, span_id=PARENT_ID + "\n",
    )  # fmt: skip
    pack_event(event)
    assert event.trace_id is None and event.span_id is None


async def post(base: Any, pairs: list[tuple[str, str]]) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            base.make_url("/v1/chat/completions"), json=CHAT, headers=CIMultiDict(pairs)
        ) as response:
            await response.read()
            return response


async def test_the_response_and_the_events_carry_the_continued_trace(
    serve: ServerFactory, sidecar_stack: SidecarStack
) -> None:
    server = await serve(synthetic_engine(), events=sidecar_stack.sender())
    for stream in (False, True):
        pairs = [("traceparent", VALID), ("tracestate", "vendor=opaque")]
        async with aiohttp.ClientSession() as session:
            async with session.post(
                server.make_url("/v1/chat/completions"),
                json={**CHAT, "stream": stream},
                headers=CIMultiDict(pairs),
            ) as response:
                assert response.status == 200
                await response.read()
                returned = response.headers["traceparent"]
                assert response.headers["tracestate"] == "vendor=opaque"
        version, trace_id, span_id, flags = returned.split("-")
        assert (version, trace_id, flags) == ("00", TRACE_ID, "01") and span_id != PARENT_ID
        await sidecar_stack.wait_finished(2 if stream else 1)
        logged = sidecar_stack.finished[-1]
        assert (logged["trace_id"], logged["span_id"]) == (TRACE_ID, span_id)
        assert logged["rid"] == response.headers["x-request-id"]


async def test_a_hostile_traceparent_changes_nothing_but_the_ids(
    serve: ServerFactory, sidecar_stack: SidecarStack
) -> None:
    server = await serve(synthetic_engine(), events=sidecar_stack.sender())
    baseline = await post(server, [])
    assert baseline.status == 200 and "traceparent" not in baseline.headers
    for count, (name, pairs) in enumerate(ON_THE_WIRE.items(), start=1):
        response = await post(server, pairs)
        assert response.status == 200, name
        assert set(response.headers) == set(baseline.headers), name
        await sidecar_stack.wait_finished(count + 1)
        logged = sidecar_stack.finished[-1]
        assert logged["trace_id"] is None and logged["span_id"] is None, name
        assert logged["status"] == "ok", name
