"""Events a server could not deliver before it exited, handed to the next sidecar as a count.

A server that stops while its sidecar is away (down, restarting) is left with events nobody
will read, and no later event will show the gap in its sequence numbers. So it leaves their
number in a file beside the event socket, and the next sidecar to bind that socket counts them
as lost (llm_sidecar_events_lost_total, which LlmserveEventsLost watches) and logs it.
Both processes use this module; it is written once, at the server's exit, never on the
request path.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

__all__ = ["leave_count", "take_count"]

log = logging.getLogger("llmserve.events")


def _path(socket_path: str) -> Path:
    return Path(f"{socket_path}.undelivered")


def _read(path: Path) -> int:
    try:
        return max(0, int(path.read_text(encoding="ascii").strip()))
    except (OSError, ValueError, UnicodeDecodeError):
        return 0


def leave_count(socket_path: str, count: int) -> None:
    """Add `count` to what the next sidecar on `socket_path` will find."""
    path = _path(socket_path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(f"{_read(path) + count}\n")
        os.replace(temporary, path)
    except OSError as exc:
        log.warning("cannot leave the count of undelivered events in %s: %s", path, exc)


def take_count(socket_path: str) -> int:
    """What servers left for this socket (0: nothing), removed so that it is counted once."""
    path = _path(socket_path)
    count = _read(path)
    with contextlib.suppress(OSError):
        path.unlink()
    return count
