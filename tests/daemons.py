"""Debian's Prometheus and Alertmanager binaries for the live tests, each on a free loopback port.

Both take the same flags for where they listen and how much they log, and both answer
`/-/ready` once they serve, so one launcher starts either and waits until it can be asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path

import aiohttp

from tests.conftest import free_port


class Daemon:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: asyncio.subprocess.Process | None = None

    async def launch(self, binary: str, package: str, *args: str) -> None:
        """Run `binary` (from Debian's `package`) with `args`, and wait until it is ready."""
        path = shutil.which(binary)
        assert path, f"{binary} is missing: scripts/setup --test installs Debian's {package}"
        self.proc = await asyncio.create_subprocess_exec(
            path,
            *args,
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        async with aiohttp.ClientSession() as session:
            for _ in range(600):
                assert self.proc.returncode is None, f"{binary} exited with {self.proc.returncode}"
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{self.url}/-/ready") as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise AssertionError(f"{binary} did not become ready in a minute")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
