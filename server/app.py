"""Assemble the aiohttp Application: routes, middleware, and the shared state handlers use."""

from __future__ import annotations

from aiohttp import web

from llmserve.server import __version__
from llmserve.server.admission import AdmissionGate
from llmserve.server.app_keys import AUTH, BODY_TIMEOUT, OPENAPI, SERVICE, STATE
from llmserve.server.auth import AuthState
from llmserve.server.config import Config
from llmserve.server.engines.base import Engine
from llmserve.server.handlers import routes
from llmserve.server.keys import KeyTable
from llmserve.server.middlewares import error_middleware
from llmserve.server.openapi import build_openapi
from llmserve.server.ratelimit import Limiter, MemoryLimiter
from llmserve.server.ratelimit.admission import KeyAdmission
from llmserve.server.scheduler import FairShare, ServiceWeights
from llmserve.server.serving import GenerationService
from llmserve.server.state import ServerState
from llmserve.shared.client import EventSender

__all__ = ["build_app"]


def build_app(
    engine: Engine,
    config: Config,
    *,
    events: EventSender | None = None,
    keys: KeyTable | None = None,
    limiter: Limiter | None = None,
) -> web.Application:
    settings = config.server
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[error_middleware(settings.max_body_bytes)],
    )
    fair = config.scheduler.policy == "fair"
    gate = AdmissionGate(
        max_running=engine.parallel,
        spare_slots=engine.spare_slots if fair else 0,
        max_waiting=settings.max_waiting,
        timeout_seconds=settings.queue_timeout_seconds,
        share=FairShare(
            ServiceWeights(config.scheduler.prompt_weight, config.scheduler.generated_weight),
            fair=fair,
        ),
    )
    state = app[STATE] = ServerState(
        engine_healthy=lambda: engine.healthy, engine_failed=lambda: engine.failed
    )
    if keys is not None:
        state.keys_stale_seconds = keys.stale_seconds
    app[BODY_TIMEOUT] = settings.body_timeout_seconds
    app[AUTH] = AuthState(keys)
    limits = KeyAdmission(
        limiter or MemoryLimiter(),
        fail_open=config.ratelimit.failure_policy == "fail_open",
        events=events,
    )
    app[SERVICE] = GenerationService(
        engine,
        gate,
        limits,
        state,
        ping_seconds=settings.sse_ping_seconds,
        send_timeout_seconds=settings.send_timeout_seconds,
        max_body_bytes=settings.max_body_bytes,
        events=events,
    )

    async def close_limits(_: web.Application) -> None:
        await limits.close()

    app.on_cleanup.append(close_limits)
    app[OPENAPI] = build_openapi(__version__)
    app.add_routes(routes)
    return app
