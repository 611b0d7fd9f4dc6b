"""The server's side of the event socket: numbered, batched, never blocking, never raising.

`send()` packs an event (bounded by its definition in shared.protocol) and queues it; everything
sent within 50 ms goes out together, in as few datagrams as fit. If the sidecar is down,
restarting or slow (its socket is full), events wait in a bounded buffer and go out in order once
it is back; when the buffer is full the oldest are dropped and counted. An event that can never
go (it cannot be packed, or the socket refuses it even alone) is dropped and counted at once, so
it never holds up the events behind it. Both counts ride along in every datagram.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import socket
import time
import uuid
from collections import deque
from typing import Any

from llmserve.shared.protocol import (
    EVENT_TYPES,
    HEADER_BYTES,
    MAX_DATAGRAM_BYTES,
    Event,
    Unsendable,
    encode_datagram,
    pack_event,
)

__all__ = ["EventSender"]

log = logging.getLogger("llmserve.events")

_RETRY_SECONDS = 0.2
# Events wait this long to share a datagram: at saturation one send (and one sidecar wake-up)
# carries hundreds of events, and metrics are still fresh to the twentieth of a second.
_BATCH_SECONDS = 0.05


class EventSender:
    def __init__(self, socket_path: str, *, max_buffered: int) -> None:
        self.socket_path = socket_path
        self.instance = uuid.uuid4().hex[:16]
        self.max_buffered = max_buffered
        self.dropped = 0
        self.unsendable = 0
        self.sent = 0
        self._seq = 0
        self._requests = itertools.count(1)
        # (dropped, unsendable) as the last delivered datagram said them.
        self._reported = (0, 0)
        self._buffer: deque[bytes] = deque()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._scheduled = False
        self._connected = True
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def next_request(self) -> int:
        """A serial for a new request, unique within this sender (request ids are not)."""
        return next(self._requests)

    def send(self, event: Event) -> None:
        """Queue one event; returns at once whatever the sidecar is doing, and never raises.
        The event is numbered and stamped, and its text and lists cut to their bounds, in place."""
        self._seq += 1
        event.seq = self._seq
        event.ts = time.time()
        try:
            packed = pack_event(event)
        except Unsendable as exc:
            # Never numbered, so the sidecar sees no gap: only the count tells of it.
            self._seq -= 1
            self._count_unsendable(str(exc))
            return
        if len(self._buffer) >= self.max_buffered:
            self._buffer.popleft()
            self.dropped += 1
        self._buffer.append(packed)
        if not self._scheduled:
            self._scheduled = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_later(_BATCH_SECONDS, self._flush)

    def emit(self, kind: str, **fields: Any) -> None:
        """`send()` for callers that give an event's kind and fields by name."""
        try:
            event = EVENT_TYPES[kind](**fields)
        except (KeyError, TypeError) as exc:
            self._count_unsendable(f"{kind!r} event: {exc!r}"[:300])
            return
        self.send(event)

    def flush_now(self) -> bool:
        """Try to send everything buffered (at shutdown); True if nothing is left."""
        self._flush()
        return not self._buffer

    def close(self) -> None:
        self._sock.close()

    def _count_unsendable(self, reason: str) -> None:
        self.unsendable += 1
        # Every event's fields are bounded, so this is a defect, not load: say so, but at a
        # rate that cannot flood the log (the 1st, 2nd, 4th, 8th... time).
        if self.unsendable & (self.unsendable - 1) == 0:
            log.error(
                "dropped an event that can never be sent (%d so far): %s", self.unsendable, reason
            )

    def _batch(self, limit: int) -> list[bytes]:
        batch: list[bytes] = []
        size = HEADER_BYTES
        for packed in self._buffer:
            if batch and size + len(packed) > limit:
                break
            batch.append(packed)
            size += len(packed)
        return batch

    def _flush(self) -> None:
        self._scheduled = False
        buffer = self._buffer
        limit = MAX_DATAGRAM_BYTES
        while buffer:
            batch = self._batch(limit)
            counts = (self.dropped, self.unsendable)
            datagram = encode_datagram(self.instance, batch, counts=counts, reported=self._reported)
            try:
                self._sock.sendto(datagram, self.socket_path)
            except OSError as exc:
                if exc.errno != errno.EMSGSIZE:
                    self._sidecar_away(exc)
                    return
                # The socket takes smaller datagrams than this one: send the batch in halves,
                # and give up on an event that is too large even alone.
                if len(batch) > 1:
                    limit = len(datagram) // 2
                else:
                    buffer.popleft()
                    self._count_unsendable(f"{len(datagram)}-byte datagram: {exc.strerror}")
                continue
            self._reported = counts
            for _ in batch:
                buffer.popleft()
            self.sent += len(batch)
        if not self._connected:
            self._connected = True
            log.info(
                "event socket %s accepts events again (%d dropped from a full buffer so far)",
                self.socket_path,
                self.dropped,
            )

    def _sidecar_away(self, exc: OSError) -> None:
        # Refused or missing: no sidecar is listening. Would block (or no buffer space): it is
        # behind. Either way the events stay buffered and a timer tries again.
        if self._connected:
            self._connected = False
            log.warning(
                "event socket %s unavailable (%s); buffering up to %d events",
                self.socket_path,
                exc.strerror or exc,
                self.max_buffered,
            )
        if not self._scheduled and self._loop is not None and not self._loop.is_closed():
            self._scheduled = True
            self._loop.call_later(_RETRY_SECONDS, self._flush)
