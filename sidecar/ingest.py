"""Receive event datagrams on the Unix socket and hand them to the recorder.

Decoding and recording happen inline in the datagram callback: both are cheap and bounded, and
doing them in arrival order keeps the sequence accounting exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path

from llmserve.shared.protocol import DecodeError, decode_datagram
from llmserve.sidecar.recorder import Recorder

__all__ = ["open_event_socket"]

log = logging.getLogger("llmserve.sidecar")

# A large receive buffer absorbs bursts (10,000 streams finishing at once) without loss.
_RECEIVE_BUFFER_BYTES = 8 << 20


class _EventProtocol(asyncio.DatagramProtocol):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def datagram_received(self, data: bytes, addr: object) -> None:
        try:
            datagram = decode_datagram(data)
        except DecodeError as exc:
            self.recorder.count_malformed()
            log.warning("dropped a malformed event datagram (%d bytes): %s", len(data), exc)
            return
        self.recorder.handle(datagram)

    def error_received(self, exc: Exception) -> None:
        log.warning("event socket error: %s", exc)


async def open_event_socket(path: str, recorder: Recorder) -> asyncio.DatagramTransport:
    """Bind the socket at `path` (replacing a stale one) and start receiving."""
    Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER_BYTES)
    sock.bind(path)
    os.chmod(path, 0o660)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: _EventProtocol(recorder), sock=sock)
    return transport
