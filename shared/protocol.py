"""The wire format between the server and the sidecar: one typed definition per event kind, used
by the sender to pack and bound each event and by the receiver to validate it.

One datagram is a msgpack array, the `Header` below, whose last element is the array of events;
each event is a map with `kind` (its tag), `seq` (per server instance, from 1) and `ts` (wall
clock) beside the fields of its kind. Events are packed once, when they are created, so a
datagram is already-packed events behind a small header. Free text and lists have bounds: the
sender cuts what is longer (text ends in `TRUNCATED`), the receiver refuses what is longer, and
an event that still cannot be packed, or is too large for a datagram alone, is never sent (the
sender counts it). Durations are nanoseconds of the server's monotonic clock. docs/metrics.md
carries a description generated from these definitions (`python -m llmserve.shared.protocol_doc`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, ClassVar

import msgspec

__all__ = [
    "ERROR_STATUSES",
    "EVENT_TYPES",
    "HEADER_BYTES",
    "MAX_DATAGRAM_BYTES",
    "MAX_EVENT_BYTES",
    "MAX_GAPS",
    "STEP_SECONDS_BOUNDS",
    "STEP_TOKEN_BOUNDS",
    "TRUNCATED",
    "VERSION",
    "AnyEvent",
    "Datagram",
    "DecodeError",
    "End",
    "Event",
    "First",
    "Gaps",
    "Header",
    "Load",
    "Malformed",
    "RateLimit",
    "RequestEvent",
    "Start",
    "State",
    "Unsendable",
    "decode_datagram",
    "encode_datagram",
    "pack_event",
]

VERSION = 2
# `end` statuses that count as failed requests (errors, and the error rows of /stats).
ERROR_STATUSES = frozenset({"error", "overloaded", "invalid_request"})
# Linux accepts larger Unix datagrams, but below 64 KiB every default socket buffer takes one.
MAX_DATAGRAM_BYTES = 60_000
# The header of a datagram is at most this large (a 16-character instance and four counters).
HEADER_BYTES = 64
# One event must fit in a datagram on its own.
MAX_EVENT_BYTES = MAX_DATAGRAM_BYTES - HEADER_BYTES
# Inter-token gaps per `gaps` event (at most 9 bytes each).
MAX_GAPS = 1024
TRUNCATED = "...[truncated]"
# The bounds of the engine's decode-step histograms (server.scheduler.StepStats, a test holds
# them equal): the sidecar knows them, so a `state` event carries only the counts.
STEP_TOKEN_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
STEP_SECONDS_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

Name = Annotated[str, msgspec.Meta(max_length=256)]
Text = Annotated[str, msgspec.Meta(max_length=2048)]
GapList = Annotated[list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(max_length=MAX_GAPS)]
LimitState = Annotated[dict[Name, tuple[float, float]], msgspec.Meta(max_length=16)]
# W3C trace context ids as lowercase hex; the sender drops (to null) a value that does not match.
TraceId = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{32}$")]
SpanId = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{16}$")]
Ratio = Annotated[float, msgspec.Meta(ge=0, le=1)]
# Sums of tokens or seconds: finite, and far above anything a server reaches.
Amount = Annotated[float, msgspec.Meta(ge=0, le=1e15)]
# Cumulative bucket counts: one per bound and one for +Inf (room for a few more bounds).
BucketCounts = Annotated[list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(max_length=32)]


class DecodeError(ValueError):
    """A datagram that is not a well-formed batch of events."""


class Unsendable(ValueError):
    """An event that cannot be packed, or is too large for a datagram even alone."""


class Event(msgspec.Struct, tag_field="kind", kw_only=True):
    """What every event carries; the sender sets both fields as it queues the event."""

    seq: int = 0
    ts: float = 0.0

    # Filled in below for each kind: its bounded text fields, its bounded list fields and its
    # text fields that must match a pattern.
    text_bounds: ClassVar[tuple[tuple[str, int], ...]] = ()
    list_bounds: ClassVar[tuple[tuple[str, int], ...]] = ()
    patterns: ClassVar[tuple[tuple[str, re.Pattern[str]], ...]] = ()


class RequestEvent(Event):
    """`req` is the server's own serial for the request (unique per server instance), which
    ties the request's events together; `rid` is the x-request-id, which clients choose and may
    share."""

    req: int
    rid: Name
    key: Name
    model: Name
    endpoint: Name
    stream: bool


class Start(RequestEvent, tag="start"):
    """A request was admitted and is about to run. `trace_id` and `span_id` are its W3C trace
    context (the caller's trace, the server's span for the request), null when it came without a
    valid `traceparent`; `end` repeats them."""

    prompt_tokens: int
    queue_ns: int
    trace_id: TraceId | None = None
    span_id: SpanId | None = None


class First(Event, tag="first"):
    """The first content byte was written: request received to then."""

    req: int
    ttft_ns: int


class Gaps(Event, tag="gaps"):
    """Inter-token gaps in microseconds, in order."""

    req: int
    gaps_us: GapList


class End(RequestEvent, tag="end"):
    """A request ended, however it ended. `status` is ok, error, invalid_request, overloaded,
    rate_limited or cancelled; `cancel_reason` client_disconnect, client_stalled or shutdown;
    `gen_ns` is first to last token as the client saw them; `service` is what the fair scheduler
    charged the key: prompt tokens read (not cached) and tokens generated, each weighted."""

    status: Name
    http_status: int
    finish_reason: Name | None
    error_type: Name | None
    error: Text | None
    cancel_reason: Name | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    e2e_ns: int
    ttft_ns: int | None
    queue_ns: int | None
    prefill_ns: int | None
    decode_ns: int | None
    gen_ns: int
    trace_id: TraceId | None = None
    span_id: SpanId | None = None
    service: Amount = 0.0


class Load(Event, tag="load"):
    """The served model, repeated every second so that a restarted sidecar learns it."""

    model: Name
    engine: Name
    source: Text
    load_s: float
    memory_bytes: int
    loaded: bool


class State(Event, tag="state"):
    """The server's state, every second. `fairness` is Jain's index over the last minute of
    service per unit of key weight, among the keys that had a request waiting; null when fewer
    than two did. `step_tokens` and `step_seconds` are the cumulative counts of every decode
    step's size and duration since the server started, one per bound of
    `llm_scheduler_step_tokens` and `llm_scheduler_step_seconds` and one for +Inf; the `_sum`
    fields are their totals."""

    model: Name
    running: int
    waiting: int
    kv_usage: float
    ready: bool
    draining: bool
    # Seconds since the shared key store was last read, while it cannot be; None: current.
    keys_stale_s: float | None = None
    fairness: Ratio | None = None
    step_tokens: BucketCounts = []
    step_tokens_sum: Amount = 0.0
    step_seconds: BucketCounts = []
    step_seconds_sum: Amount = 0.0


class RateLimit(Event, tag="ratelimit"):
    """A per-key limit decision; `state` maps each limit to [limit, remaining]."""

    rid: Name
    key: Name
    limit: Name
    allowed: bool
    backend_error: bool = False
    state: LimitState = {}


EVENT_TYPES: dict[str, type[Event]] = {
    cls.__struct_config__.tag: cls  # type: ignore[misc]
    for cls in (Start, First, Gaps, End, Load, State, RateLimit)
}
AnyEvent = Start | First | Gaps | End | Load | State | RateLimit


class Header(msgspec.Struct, array_like=True):
    """`dropped` counts events the server discarded because its buffer was full,
    `unsendable` those that could never be sent, both since it started; the `_reported` pair is
    what the last datagram it delivered said, so a sidecar that starts later counts only what no
    earlier sidecar was told. `events` are the packed events, in order."""

    version: int
    instance: Name
    dropped: int
    unsendable: int
    dropped_reported: int
    unsendable_reported: int
    events: list[msgspec.Raw]


def _bound_of(field_type: msgspec.inspect.Type) -> tuple[str, int | str | None]:
    if isinstance(field_type, msgspec.inspect.UnionType):
        bounded = [_bound_of(member) for member in field_type.types]
        return next(((kind, limit) for kind, limit in bounded if limit is not None), ("", None))
    if isinstance(field_type, msgspec.inspect.StrType):
        if field_type.pattern is not None:
            return "pattern", field_type.pattern
        return "text", field_type.max_length
    if isinstance(field_type, msgspec.inspect.ListType):
        return "list", field_type.max_length
    return "", None


def _find_bounds(cls: type[Event]) -> None:
    """Note on the class which of its fields are bounded text, which bounded lists and which
    patterned text, so that the sender cuts and drops by the same rules the receiver checks."""
    bounds: dict[str, list[tuple[str, int]]] = {"text": [], "list": []}
    patterns: list[tuple[str, re.Pattern[str]]] = []
    for field in msgspec.inspect.type_info(cls).fields:  # type: ignore[attr-defined]
        kind, limit = _bound_of(field.type)
        if isinstance(limit, str):
            patterns.append((field.name, re.compile(limit)))
        elif limit is not None:
            bounds[kind].append((field.name, limit))
    cls.text_bounds, cls.list_bounds = tuple(bounds["text"]), tuple(bounds["list"])
    cls.patterns = tuple(patterns)


for _cls in EVENT_TYPES.values():
    _find_bounds(_cls)

_encoder = msgspec.msgpack.Encoder()
_header_decoder = msgspec.msgpack.Decoder(Header)
_event_decoder = msgspec.msgpack.Decoder(AnyEvent)


class _Numbered(msgspec.Struct):
    seq: int


_seq_decoder = msgspec.msgpack.Decoder(_Numbered)


def _cut(event: Event) -> None:
    for name, limit in event.text_bounds:
        value = getattr(event, name)
        if value is not None and len(value) > limit:
            setattr(event, name, value[: limit - len(TRUNCATED)] + TRUNCATED)
    for name, limit in event.list_bounds:
        value = getattr(event, name)
        if len(value) > limit:
            setattr(event, name, value[:limit])
    # An id that does not match its pattern says nothing; the event goes without it.
    for name, pattern in event.patterns:
        value = getattr(event, name)
        if value is not None and not (isinstance(value, str) and pattern.fullmatch(value)):
            setattr(event, name, None)


def _valid_utf8(text: str) -> str:
    # Lone surrogates (from surrogateescape'd bytes or a JSON "\ud800") become U+FFFD.
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _replace_surrogates(event: Event) -> None:
    for name, _ in event.text_bounds:
        value = getattr(event, name)
        if value is not None:
            setattr(event, name, _valid_utf8(value))
    if isinstance(event, RateLimit):
        event.state = {_valid_utf8(name): value for name, value in event.state.items()}


def pack_event(event: Event) -> bytes:
    """The event's bytes, its text and lists cut to their bounds first. Raises Unsendable."""
    _cut(event)
    try:
        try:
            packed = _encoder.encode(event)
        except UnicodeEncodeError:
            _replace_surrogates(event)
            _cut(event)  # a replaced surrogate may be longer than what it replaced
            packed = _encoder.encode(event)
    except (TypeError, ValueError, OverflowError) as exc:
        raise Unsendable(f"{type(event).__name__} event cannot be packed: {exc}") from None
    if len(packed) > MAX_EVENT_BYTES:
        raise Unsendable(f"{type(event).__name__} event of {len(packed)} bytes")
    return packed


def _array_header(length: int) -> bytes:
    if length < 16:
        return bytes([0x90 | length])
    if length < 1 << 16:
        return b"\xdc" + length.to_bytes(2, "big")
    return b"\xdd" + length.to_bytes(4, "big")


def encode_datagram(
    instance: str,
    packed_events: list[bytes],
    *,
    counts: tuple[int, int] = (0, 0),
    reported: tuple[int, int] = (0, 0),
) -> bytes:
    """A datagram of already-packed events; `counts` and `reported` are (dropped, unsendable)."""
    events = msgspec.Raw(_array_header(len(packed_events)) + b"".join(packed_events))
    return _encoder.encode((VERSION, instance, *counts, *reported, events))


@dataclass(frozen=True, slots=True)
class Malformed:
    """An event in a well-formed datagram that does not match its kind's definition; `seq` is
    its number when that much could be read, so it is not counted as lost too."""

    seq: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class Datagram:
    header: Header
    events: list[AnyEvent | Malformed]


def _decode_event(raw: msgspec.Raw) -> AnyEvent | Malformed:
    try:
        return _event_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        try:
            seq: int | None = _seq_decoder.decode(raw).seq
        except msgspec.DecodeError:
            seq = None
        return Malformed(seq, str(exc))


def decode_datagram(data: bytes) -> Datagram:
    """Decode a datagram; each event is validated on its own. Raises DecodeError."""
    try:
        header = _header_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise DecodeError(f"not a version-{VERSION} event batch: {exc}") from None
    if header.version != VERSION:
        raise DecodeError(f"version {header.version}, expected {VERSION}")
    return Datagram(header, [_decode_event(raw) for raw in header.events])
