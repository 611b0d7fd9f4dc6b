"""Debian's real nginx for the tests of the shipped nginx snippets (scripts/nginx/): check the
configuration with `nginx -t`, run it in the foreground, wait until it accepts connections."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path


@contextlib.asynccontextmanager
async def running_nginx(config: Path, port: int) -> AsyncIterator[None]:
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    assert binary, "nginx is missing: scripts/setup --test installs Debian's package"
    check = await asyncio.create_subprocess_exec(
        binary, "-t", "-c", str(config), stderr=asyncio.subprocess.PIPE
    )
    _, errors = await check.communicate()
    assert check.returncode == 0, errors.decode()
    nginx = await asyncio.create_subprocess_exec(
        binary, "-c", str(config), stderr=asyncio.subprocess.DEVNULL
    )
    try:
        for _ in range(500):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                await writer.wait_closed()
                break
            except OSError:
                await asyncio.sleep(0.01)
        yield
    finally:
        nginx.terminate()
        await nginx.wait()
