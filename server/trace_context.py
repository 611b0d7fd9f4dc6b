"""W3C trace context (https://www.w3.org/TR/trace-context/): continue the caller's trace.

A request that arrives with a valid `traceparent` keeps its trace id and gets a span id of its
own; the response carries the continued `traceparent` (and the caller's `tracestate`), and the
request's events and log line carry both ids, so a trace in the caller's system leads to this
server's log line and exemplars. Headers are the caller's to write, so anything that is not
exactly what the specification allows is ignored: the request then has no trace context, and it
is never an error. No tracer is involved (the server exports no spans), so a request without a
valid header does not start a trace of its own.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from multidict import CIMultiDictProxy

__all__ = ["TRACEPARENT", "TRACESTATE", "TraceContext", "continue_trace"]

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

# version "00" is exactly this; a later version may append "-" and more, which we drop.
_TRACEPARENT = re.compile(
    r"(?P<version>[0-9a-f]{2})-(?P<trace_id>[0-9a-f]{32})-(?P<parent_id>[0-9a-f]{16})"
    r"-(?P<flags>[0-9a-f]{2})(?P<rest>-.*)?",
    re.ASCII | re.DOTALL,
)
# The specification's longest tracestate: 32 members of up to 256 + 1 + 256 characters.
_MAX_TRACESTATE = 32 * 514
_MAX_MEMBERS = 32
_TRACESTATE_MEMBER = re.compile(
    r"(?:[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13}|[a-z][a-z0-9_\-*/]{0,255})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]",
    re.ASCII,
)


@dataclass(frozen=True, slots=True)
class TraceContext:
    """The caller's trace, continued: `span_id` is this request's own."""

    trace_id: str
    span_id: str
    flags: str
    tracestate: str | None

    def response_headers(self) -> dict[str, str]:
        headers = {TRACEPARENT: f"00-{self.trace_id}-{self.span_id}-{self.flags}"}
        if self.tracestate is not None:
            headers[TRACESTATE] = self.tracestate
        return headers


def _tracestate(values: list[str]) -> str | None:
    """The caller's tracestate, if it is valid as a whole (several headers are one list)."""
    joined = ",".join(values)
    if not joined or len(joined) > _MAX_TRACESTATE:
        return None
    members = [member.strip(" \t") for member in joined.split(",")]
    members = [member for member in members if member]
    if not members or len(members) > _MAX_MEMBERS:
        return None
    if not all(_TRACESTATE_MEMBER.fullmatch(member) for member in members):
        return None
    if len({member.partition("=")[0] for member in members}) != len(members):
        return None
    return ",".join(members)


def continue_trace(headers: CIMultiDictProxy[str]) -> TraceContext | None:
    """The request's trace context, or None when it sent no single, valid `traceparent`."""
    values = headers.getall(TRACEPARENT, [])
    if len(values) != 1:
        return None
    match = _TRACEPARENT.fullmatch(values[0].strip(" \t"))
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.group(
        "version", "trace_id", "parent_id", "flags", "rest"
    )
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    span_id = secrets.token_hex(8)
    while span_id == "0" * 16:
        span_id = secrets.token_hex(8)
    # Only the "sampled" bit is defined for version 00; a later version's other bits are dropped.
    sampled = int(flags, 16) & 1
    tracestate = _tracestate(headers.getall(TRACESTATE, []))
    return TraceContext(trace_id, span_id, f"{sampled:02x}", tracestate)
