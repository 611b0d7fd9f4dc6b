"""The server's side of the event socket: numbered, batched, never blocking, never raising.

`emit()` packs an event and queues it; everything emitted within 50 ms goes out together, in as
few datagrams as fit. If the sidecar is down, restarting or slow
(its socket is full), events wait in a bounded buffer and go out in order once it is back; when
the buffer is full the oldest are dropped and counted, and the count rides along in every
datagram so the sidecar knows.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
import uuid
from collections import deque
from typing import Any

from sidecar.protocol import MAX_DATAGRAM_BYTES, encode_datagram, pack_event

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
        self.sent = 0
        self._seq = 0
        self._buffer: deque[bytes] = deque()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._scheduled = False
        self._connected = True
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def emit(self, kind: str, **fields: Any) -> None:
        """Queue one event; returns at once whatever the sidecar is doing."""
        self._seq += 1
        fields["seq"] = self._seq
        fields["kind"] = kind
        fields["ts"] = time.time()
        if len(self._buffer) >= self.max_buffered:
            self._buffer.popleft()
            self.dropped += 1
        self._buffer.append(pack_event(fields))
        if not self._scheduled:
            self._scheduled = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_later(_BATCH_SECONDS, self._flush)

    def flush_now(self) -> bool:
        """Try to send everything buffered (at shutdown); True if nothing is left."""
        self._flush()
        return not self._buffer

    def close(self) -> None:
        self._sock.close()

    def _flush(self) -> None:
        self._scheduled = False
        buffer = self._buffer
        while buffer:
            batch, size = [], 64
            for packed in itertools.islice(buffer, 0, None):
                if batch and size + len(packed) > MAX_DATAGRAM_BYTES:
                    break
                batch.append(packed)
                size += len(packed)
            try:
                self._sock.sendto(
                    encode_datagram(self.instance, self.dropped, batch), self.socket_path
                )
            except OSError as exc:
                self._sidecar_away(exc)
                return
            for _ in batch:
                buffer.popleft()
            self.sent += len(batch)
        if not self._connected:
            self._connected = True
            log.info("event socket %s accepts events again", self.socket_path)

    def _sidecar_away(self, exc: OSError) -> None:
        # Refused or missing: no sidecar is listening. Would block: it is behind. Either way
        # the events stay buffered and a timer tries again.
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
