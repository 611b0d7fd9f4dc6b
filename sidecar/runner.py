"""Run the sidecar: bind the event socket, serve /metrics, /stats and /health, log requests.

`llmserve serve` starts this as its child; `llmserve sidecar` runs it alone (under systemd, or
beside a server started with sidecar.spawn = false).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import struct
import sys
import termios

import uvloop
from aiohttp import web

from llmserve.shared.child_process import PARENT_PID_ENV
from llmserve.shared.jsonlog import configure_logging
from llmserve.shared.systemd_notify import SystemdNotifier
from llmserve.shared.undelivered import take_count
from llmserve.sidecar.app import build_sidecar_app
from llmserve.sidecar.gpu import register_gpu_metrics
from llmserve.sidecar.ingest import open_event_socket
from llmserve.sidecar.loki import LokiPusher
from llmserve.sidecar.metrics import Metrics
from llmserve.sidecar.recorder import Recorder
from llmserve.sidecar.request_log import RequestLog
from llmserve.sidecar.settings import SidecarSettings
from llmserve.sidecar.stats import RollingStats

__all__ = ["run"]

log = logging.getLogger("llmserve.sidecar")

SERVICE = "llmserve"
# Set by `llmserve serve` for the sidecar it starts, whose stdin is then its lifeline (see
# server.supervisor); not a setting, so not LLMSERVE_-prefixed.
# On the way out, datagrams already queued in the socket are read first, for up to this long
# (at niceness 10 on a saturated machine the loop may get little CPU).
_DRAIN_LIMIT_SECONDS = 5.0


def _watch_lifeline(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Stop when stdin, the server's pipe, closes: the server is done, or gone (kill -9 too)."""

    def readable() -> None:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(0)
            log.info("the server closed the sidecar's lifeline; stopping")
            stop.set()

    os.set_blocking(0, False)
    loop.add_reader(0, readable)


def _queued_bytes(transport: asyncio.DatagramTransport) -> int:
    """The size of the next datagram waiting in the event socket (0: none)."""
    sock = transport.get_extra_info("socket")
    answer = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", answer)[0])


async def _read_queued(transport: asyncio.DatagramTransport) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _DRAIN_LIMIT_SECONDS
    # Nothing signals "socket empty": look while the loop reads it.
    while _queued_bytes(transport) and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)


def run(settings: SidecarSettings, *, server_port: int, log_level: str = "info") -> int:
    """`server_port` is the configured port of the server it serves (names the event socket)."""
    configure_logging(
        f"{SERVICE}-sidecar",
        log_level,
        stream=sys.stdout,
        file=settings.log_file,
        rotation=settings.log_file_rotation,
        retention=settings.log_file_retention,
    )
    _lower_priority(settings.nice)
    return uvloop.run(_serve(settings, settings.resolved_socket_path(server_port)))


def _lower_priority(nice: int) -> None:
    """Run at niceness `nice`, below the server: on a saturated machine the request path keeps
    its CPU and the sidecar catches up from its socket buffer and the server's event buffer.

    Under systemd the unit's Nice= has done it already (its filter denies setpriority, which is
    in @resources), so nothing is asked of the kernel then; a refusal is a warning, not a crash.
    """
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) < nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as exc:
        log.warning("cannot lower the sidecar's CPU priority to nice %d: %s", nice, exc)


async def _serve(settings: SidecarSettings, socket_path: str) -> int:
    metrics = Metrics()
    register_gpu_metrics(metrics.registry)
    loki = None
    if settings.loki_url:
        loki = LokiPusher(
            settings.loki_url,
            metrics,
            service=SERVICE,
            env=settings.loki_env,
            max_buffered=settings.loki_buffer_lines,
        )
        loki.start()
    recorder = Recorder(
        metrics, RollingStats(), RequestLog(SERVICE, loki), max_keys=settings.max_keys
    )
    try:
        transport = await open_event_socket(socket_path, recorder)
    except OSError as exc:
        log.error("cannot bind the event socket %s: %s", socket_path, exc)
        return 1
    undelivered = take_count(socket_path)
    if undelivered:
        recorder.lost += undelivered
        metrics.events_lost.inc(undelivered)
        log.warning("a server exited with %d events it could not deliver: lost", undelivered)
    token = settings.token.get_secret_value() if settings.token else None
    runner = web.AppRunner(build_sidecar_app(recorder, token=token), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", settings.host, settings.port, exc)
        transport.close()
        await runner.cleanup()
        return 1
    host, port = runner.addresses[0][:2]
    log.info(
        "sidecar listening on http://%s:%s (status page /, /metrics, /stats, /health%s); "
        "events on %s%s",
        host,
        port,
        ", token required" if token else "",
        socket_path,
        f"; pushing logs to {settings.loki_url}" if loki else "",
    )

    systemd = SystemdNotifier()
    systemd.ready(f"metrics on {host}:{port}, events on {socket_path}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if PARENT_PID_ENV in os.environ:
        # The server's drain still sends events: a signal to the process group waits for it.
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, log.info, "stop signal: stopping with the server")
        _watch_lifeline(loop, stop)
    else:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    systemd.stopping("stopping")
    await _read_queued(transport)
    transport.close()
    if loki is not None:
        await loki.stop()
    await runner.cleanup()
    log.info("sidecar stopped after %d finished requests", recorder.finished_requests)
    return 0
