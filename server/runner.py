"""Run the server: uvloop, listen, load the model, serve, and drain on SIGTERM.

The socket opens before the model loads, so /health answers (and /ready says "loading") while a
large model is still coming in. On SIGTERM or SIGINT readiness goes to 503, new generations are
refused, streams in flight get up to `drain_timeout_seconds` to finish, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from pathlib import Path

import uvloop
from aiohttp import web

from llmserve.server.app import build_app
from llmserve.server.app_keys import SERVICE, STATE
from llmserve.server.auth import is_loopback
from llmserve.server.config import Config
from llmserve.server.engines import EngineError, create_engine
from llmserve.server.engines.base import Engine, ModelInfo
from llmserve.server.http_protocol import AppRunner
from llmserve.server.keys import KeyFileError, KeyStore, KeyTable
from llmserve.server.keys_redis import RedisKeyStore
from llmserve.server.ratelimit import Limiter, MemoryLimiter
from llmserve.server.ratelimit.redis_limiter import RedisLimiter, connect
from llmserve.server.state_reporter import StateReporter
from llmserve.server.supervisor import SidecarSupervisor
from llmserve.shared.client import EventSender
from llmserve.shared.systemd_notify import SystemdNotifier
from llmserve.shared.undelivered import leave_count

__all__ = ["run"]

log = logging.getLogger("llmserve")

# At exit, how long undelivered events wait for a sidecar: any sidecar, and our own child.
_PATIENCE_SECONDS = 2.0
_CHILD_PATIENCE_SECONDS = 15.0


def run(config: Config, sidecar_args: Sequence[str] = ()) -> int:
    """Serve until a stop signal; the return value is the process exit code.

    `sidecar_args` are the command-line settings handed to the sidecar child, if one is run.
    """
    return uvloop.run(_serve(config, sidecar_args))


class _StoppedWhileLoading(Exception):
    """A stop signal came before the model finished loading."""


async def _serve(config: Config, sidecar_args: Sequence[str]) -> int:
    try:
        keys = _load_keys(config)
        engine = create_engine(config)
    except (KeyFileError, EngineError) as exc:
        log.error("%s", exc)
        return 1
    events = _event_sender(config)
    supervisor = SidecarSupervisor(sidecar_args) if config.sidecar.spawn else None
    if supervisor is not None:
        supervisor.start()
        log.info(
            "status page: http://%s:%d/ (the sidecar's; also /metrics and /stats)",
            config.sidecar.host,
            config.sidecar.port,
        )
    limiter = _limiter(config)
    try:
        return await _serve_http(config, engine, events, keys, limiter)
    except _StoppedWhileLoading:
        # The load goes on in its daemon thread (engines load there), which exit does not wait for.
        return 0
    finally:
        await _finish_events(events, supervisor)
        if supervisor is not None:
            await supervisor.stop()


def _load_keys(config: Config) -> KeyTable | None:
    """The key store, or None to serve unauthenticated, which needs a loopback address."""
    host = config.server.host
    if config.auth.store == "redis":
        url = config.keys_redis_url()
        if url is None:
            raise KeyFileError(
                'auth.store = "redis" needs auth.redis_url (or ratelimit.redis_url) to be set'
            )
        settings = config.ratelimit
        log.info(
            "authentication on: API keys in Redis (%s), re-read every %g s and on each change",
            without_credentials(url),
            config.auth.reload_seconds,
        )
        return RedisKeyStore(connect(settings.redis_mode, url, settings.redis_sentinel_master))
    if config.auth.keys_file:
        keys = KeyStore(Path(config.auth.keys_file))
        log.info("authentication on: %d API keys from %s", len(keys), config.auth.keys_file)
        if not keys:
            log.warning(
                "no API keys in %s yet: every request gets 401 until one is created "
                "(llmserve keys --file %s create NAME; the file is re-read by itself)",
                config.auth.keys_file,
                config.auth.keys_file,
            )
        return keys
    if not is_loopback(host) and not config.auth.allow_unauthenticated:
        raise KeyFileError(
            f"refusing to serve without API keys on {host}, which is not a loopback address: "
            "set auth.keys_file (see `llmserve keys create`), or auth.allow_unauthenticated = "
            "true to accept anyone"
        )
    log.warning("authentication off: no auth.keys_file, so anyone who can reach %s may call", host)
    return None


def _limiter(config: Config) -> Limiter:
    settings = config.ratelimit
    if settings.redis_url is None:
        log.info("per-key limits are kept in this process (no ratelimit.redis_url)")
        return MemoryLimiter()
    client = connect(settings.redis_mode, settings.redis_url, settings.redis_sentinel_master)
    log.info(
        "per-key limits shared through Redis (%s, %s), %s when it is unreachable",
        settings.redis_mode,
        without_credentials(settings.redis_url),
        settings.failure_policy,
    )
    return RedisLimiter(
        client, timeout_seconds=settings.timeout_seconds, lease_seconds=settings.lease_seconds
    )


def without_credentials(url: str) -> str:
    """The Redis URL as it may be logged: whatever precedes the host's "@" is masked."""
    scheme, sep, rest = url.partition("://")
    _, at, host = rest.rpartition("@")
    return f"{scheme}{sep}***@{host}" if at else url


def _event_sender(config: Config) -> EventSender | None:
    if not config.sidecar.events:
        log.info("per-request events are off (sidecar.events = false)")
        return None
    path = config.sidecar.resolved_socket_path(config.server.port)
    log.info("sending per-request events to %s", path)
    return EventSender(path, max_buffered=config.sidecar.buffer_events)


async def _finish_events(events: EventSender | None, child: SidecarSupervisor | None) -> None:
    """Give a sidecar that is restarting a moment to take the last events; our own child, while
    it is alive (it may still be starting on a loaded machine), up to _CHILD_PATIENCE_SECONDS."""
    if events is None:
        return
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not events.flush_now():
        waited = loop.time() - started
        if waited >= _PATIENCE_SECONDS and not (
            child is not None and child.running and waited < _CHILD_PATIENCE_SECONDS
        ):
            break
        await asyncio.sleep(0.1)
    if events.buffered:
        log.warning(
            "%d events could not be delivered before exit; the next sidecar on %s counts them "
            "as lost",
            events.buffered,
            events.socket_path,
        )
        leave_count(events.socket_path, events.buffered)
    events.close()


async def _serve_http(
    config: Config,
    engine: Engine,
    events: EventSender | None,
    keys: KeyTable | None,
    limiter: Limiter,
) -> int:
    app = build_app(engine, config, events=events, keys=keys, limiter=limiter)
    state = app[STATE]
    settings = config.server
    # Cancel a handler when its client disconnects: that is what stops a non-streaming
    # generation nobody will read. The idle timer also runs from connection start, so a
    # client that never completes its headers is let go too.
    runner = AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        keepalive_timeout=settings.idle_timeout_seconds,
    )
    await runner.setup()
    # A backlog of 2048 (aiohttp's default is 128) absorbs bursts of new streams, as uvicorn's does.
    site = web.TCPSite(runner, settings.host, settings.port, shutdown_timeout=1.0, backlog=2048)
    try:
        await site.start()
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", settings.host, settings.port, exc)
        await runner.cleanup()
        return 1
    host, port = runner.addresses[0][:2]
    log.info("listening on http://%s:%s (engine %s)", host, port, config.engine.kind)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    watcher = None
    if keys is not None:
        loop.add_signal_handler(signal.SIGHUP, keys.reload)
        watcher = asyncio.create_task(keys.watch(config.auth.reload_seconds))

    load = asyncio.create_task(engine.load())
    await asyncio.wait([load, asyncio.create_task(stop.wait())], return_when="FIRST_COMPLETED")
    if not load.done():
        load.cancel()
        log.info("stopped while the model was loading; not waiting for the load to finish")
        await runner.cleanup()
        raise _StoppedWhileLoading
    try:
        info = load.result()
    except EngineError as exc:
        log.error("model load failed: %s", exc)
        await runner.cleanup()
        return 1
    _log_loaded(info)
    state.loaded = True
    log.info("ready: http://%s:%s/v1 serves model %r", host, port, info.model_id)
    systemd = SystemdNotifier()
    systemd.ready(f"serving {info.model_id} on {host}:{port}")
    reporter = StateReporter(events, engine, app[SERVICE].gate, state)
    reporter.loaded(info)
    reporter.start()

    await stop.wait()
    systemd.stopping(f"draining {state.in_flight} requests")
    if watcher is not None:
        watcher.cancel()
    state.draining = True
    log.info(
        "draining: %d requests in flight, up to %g s",
        state.in_flight,
        settings.drain_timeout_seconds,
    )
    if not await state.wait_idle(settings.drain_timeout_seconds):
        log.warning("drain timeout: stopping %d requests still in flight", state.in_flight)
    # Closing the engine ends what is left; those streams get an in-band error event, and
    # the runner gives their handlers a moment to write it before closing connections.
    await engine.close()
    await runner.cleanup()
    await reporter.stop(info)
    log.info("stopped")
    return 0


def _log_loaded(info: ModelInfo) -> None:
    details = ", ".join(f"{k}={v}" for k, v in info.details.items())
    log.info(
        "loaded model %r (%s) with engine %s from %s in %.2f s; context %d tokens per request, "
        "%d requests at once%s",
        info.model_id,
        info.description,
        info.engine,
        info.source,
        info.load_seconds,
        info.context_length,
        info.parallel,
        f"; {details}" if details else "",
    )
