"""The wire format between the server and the sidecar: msgpack datagrams of numbered events.

One datagram is a msgpack array `[VERSION, instance_id, dropped, events...]`, where `dropped` is
how many events the sender has discarded so far (its buffer overflowed) and each event is a map
with at least `seq` (per-instance, from 1, no gaps unless events were lost), `kind` and `ts`
(wall-clock seconds). Events are packed once, when they are created, so a datagram is the
concatenation of already-packed events behind a small header.

Event kinds and their fields (durations are nanoseconds, from the server's monotonic clock):

- `start`: rid, key, model, endpoint, stream, prompt_tokens, queue_ns
- `first`: rid, ttft_ns (request received to first content byte written)
- `gaps`: rid, gaps_us (inter-token gaps in microseconds, in order)
- `end`: rid, key, model, endpoint, stream, status (ok, error, cancelled, rate_limited),
  http_status, finish_reason, error_type, error, cancel_reason (client_disconnect,
  client_stalled, shutdown), prompt_tokens, completion_tokens, cached_tokens, e2e_ns, ttft_ns,
  queue_ns, prefill_ns, decode_ns, gen_ns (first to last token as the client saw them)
- `load`: model, engine, source, load_s, memory_bytes, loaded
- `state`: model, running, waiting, kv_usage, ready, draining
- `ratelimit`: rid, key, limit, allowed
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

__all__ = [
    "ERROR_STATUSES",
    "KINDS",
    "MAX_DATAGRAM_BYTES",
    "VERSION",
    "Datagram",
    "DecodeError",
    "decode_datagram",
    "encode_datagram",
    "pack_event",
]

VERSION = 1
# `end` statuses that count as failed requests (errors, and the error rows of /stats).
ERROR_STATUSES = frozenset({"error", "overloaded", "invalid_request"})
KINDS = frozenset({"start", "first", "gaps", "end", "load", "state", "ratelimit"})
# Linux accepts larger Unix datagrams, but below 64 KiB every default socket buffer takes one.
MAX_DATAGRAM_BYTES = 60_000

_ARRAY16 = 0xDC
_ARRAY32 = 0xDD


class DecodeError(ValueError):
    """A datagram that is not a well-formed batch of events."""


@dataclass(frozen=True, slots=True)
class Datagram:
    instance: str
    dropped: int
    events: list[dict[str, Any]]


def pack_event(event: dict[str, Any]) -> bytes:
    return msgpack.packb(event, use_bin_type=True)


def _array_header(length: int) -> bytes:
    if length < 16:
        return bytes([0x90 | length])
    if length < 1 << 16:
        return bytes([_ARRAY16]) + length.to_bytes(2, "big")
    return bytes([_ARRAY32]) + length.to_bytes(4, "big")


def encode_datagram(instance: str, dropped: int, packed_events: list[bytes]) -> bytes:
    header = msgpack.packb(VERSION) + msgpack.packb(instance) + msgpack.packb(dropped)
    return _array_header(3 + len(packed_events)) + header + b"".join(packed_events)


def decode_datagram(data: bytes) -> Datagram:
    try:
        items = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise DecodeError(f"not msgpack: {exc}") from None
    if not isinstance(items, list) or len(items) < 3 or items[0] != VERSION:
        raise DecodeError("not a version-1 event batch")
    instance, dropped, events = items[0 + 1], items[2], items[3:]
    if not isinstance(instance, str) or not isinstance(dropped, int):
        raise DecodeError("bad batch header")
    for event in events:
        if (
            not isinstance(event, dict)
            or not isinstance(event.get("seq"), int)
            or event.get("kind") not in KINDS
        ):
            raise DecodeError("bad event")
    return Datagram(instance, dropped, events)
