"""Run the metrics sidecar as a child process and restart it, with backoff, whenever it dies.

Events sent while it is away wait in the server's buffer (shared.client), so a crash or restart
of the sidecar loses nothing within the buffer's bound and never touches a request.

The child stops when its stdin, a pipe from this process, closes: when `stop()` closes it after
the server's last events are sent, or when the server dies, even by kill -9. A SIGTERM or SIGINT
to the whole process group (systemd's default KillMode, Ctrl-C in a terminal) reaches the child
too, at the start of the server's drain; it ignores them, so it is still there to record the
drain's requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Sequence

from llmserve.shared.child_process import PARENT_PID_ENV

__all__ = ["SidecarSupervisor"]

log = logging.getLogger("llmserve.supervisor")

_FIRST_BACKOFF = 0.5
_MAX_BACKOFF = 30.0
# A child that ran this long before dying was healthy: restart it quickly again.
_HEALTHY_SECONDS = 60.0


class SidecarSupervisor:
    def __init__(self, args: Sequence[str]) -> None:
        self.argv = [sys.executable, "-m", "llmserve.server.cli", "sidecar", *args]
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._supervise())

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = _FIRST_BACKOFF
        while not self._stopping:
            started = loop.time()
            try:
                self.process = await asyncio.create_subprocess_exec(
                    *self.argv, env=self._env(), stdin=asyncio.subprocess.PIPE
                )
            except OSError as exc:
                log.error("cannot start the sidecar: %s", exc)
                code: int | None = None
            else:
                self.starts += 1
                log.info("sidecar started (pid %d)", self.process.pid)
                code = await self.process.wait()
            if self._stopping:
                return
            if loop.time() - started > _HEALTHY_SECONDS:
                backoff = _FIRST_BACKOFF
            log.warning("sidecar exited (code %s); restarting in %.1f s", code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)

    @staticmethod
    def _env() -> dict[str, str]:
        # systemd's notify socket belongs to the server: the child must not report as the unit.
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        env[PARENT_PID_ENV] = str(os.getpid())
        return env

    @property
    def running(self) -> bool:
        """A child is alive (it may still be starting)."""
        return self.process is not None and self.process.returncode is None

    async def stop(self, grace_seconds: float = 10.0) -> None:
        """Close the child's lifeline; it reads what is in its socket, stops, and is waited for.

        `grace_seconds` covers its drain and its last push to Loki (3 s at most).
        """
        self._stopping = True
        process = self.process
        if process is not None and process.returncode is None:
            assert process.stdin is not None
            process.stdin.close()
            try:
                await asyncio.wait_for(process.wait(), grace_seconds)
            except TimeoutError:
                log.warning("sidecar did not stop within %g s; killing it", grace_seconds)
                process.kill()
                await process.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
