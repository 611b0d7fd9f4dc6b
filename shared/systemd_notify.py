"""systemd's notify protocol without extra packages: READY, STOPPING and the watchdog ping.

Both units use it (the server imports it from here, beside the sidecar's client).

Under `Type=notify` systemd passes a datagram socket in $NOTIFY_SOCKET (a path, or an abstract
name starting with "@") and, with `WatchdogSec=`, the interval in $WATCHDOG_USEC. Outside
systemd both are absent and every call here does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

__all__ = ["SystemdNotifier"]

log = logging.getLogger("llmserve.systemd")


class SystemdNotifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        watchdog_usec = int(env.get("WATCHDOG_USEC", "0") or 0)
        # Ping at half the interval, as sd_watchdog_enabled(3) advises.
        self.watchdog_seconds = watchdog_usec / 2e6 if watchdog_usec > 0 else 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, message: str) -> None:
        if not self._address:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(message.encode(), self._address)
            except OSError as exc:
                log.warning("systemd notify failed: %s", exc)

    def ready(self, status: str) -> None:
        self.notify(f"READY=1\nSTATUS={status}")
        if self.watchdog_seconds and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watchdog())

    def stopping(self, status: str) -> None:
        if self._task is not None:
            self._task.cancel()
        self.notify(f"STOPPING=1\nSTATUS={status}")

    async def _watchdog(self) -> None:
        # The ping comes from the event loop itself, so a loop that hangs stops pinging and
        # systemd restarts the service.
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                self.notify("WATCHDOG=1")
                await asyncio.sleep(self.watchdog_seconds)
