"""The sidecar's HTTP side: /metrics for Prometheus, /stats for people and scripts, / (the status
page that draws /stats), /health."""

from __future__ import annotations

import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_TYPE

from llmserve.sidecar.access import bearer_token_middleware
from llmserve.sidecar.recorder import Recorder
from llmserve.sidecar.status_page import status_page_routes

__all__ = ["RECORDER", "build_sidecar_app"]

RECORDER = web.AppKey("recorder", Recorder)
# The status page shows 50; a scrape of every key's summaries is a 9 MB answer at 10,000 keys.
DEFAULT_STATS_KEYS = 100
STARTED = web.AppKey("started", float)


def _quality(parameters: list[str]) -> float:
    """A media range's q (1 when absent); an unreadable one counts as not wanted."""
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "q":
            try:
                quality = float(value.strip())
            except ValueError:
                return 0.0
            return quality if 0 <= quality <= 1 else 0.0
    return 1.0


def wants_openmetrics(accept: str) -> bool:
    """Whether a scraper's Accept header prefers OpenMetrics (of any version: Prometheus offers
    1.0.0 and 0.0.1, and the answer says it is 1.0.0) to everything else it accepts.

    prometheus_client's choose_encoder raises on a version it cannot read, and the header is
    anyone's to write, so it is read here."""
    best_openmetrics, best_other = 0.0, 0.0
    for media_range in accept.split(","):
        media_type, *parameters = media_range.split(";")
        quality = _quality(parameters)
        if media_type.strip().lower() == "application/openmetrics-text":
            best_openmetrics = max(best_openmetrics, quality)
        else:
            best_other = max(best_other, quality)
    return best_openmetrics > 0 and best_openmetrics >= best_other


async def metrics(request: web.Request) -> web.Response:
    # Only OpenMetrics carries exemplars; every other scraper gets the text format as before.
    openmetrics = wants_openmetrics(request.headers.get("Accept", ""))
    body = await request.app[RECORDER].metrics.registry.exposition(openmetrics=openmetrics)
    content_type = OPENMETRICS_TYPE if openmetrics else CONTENT_TYPE_LATEST
    response = web.Response(body=body, headers={"Content-Type": content_type})
    # Prometheus asks for gzip: at 10,000 keys the 6 MB answer shrinks many times over. aiohttp
    # compresses a body this size on a worker thread, so ingestion goes on meanwhile.
    response.enable_compression()
    return response


async def stats(request: web.Request) -> web.Response:
    """?keys=N (default 100): the N busiest keys of the last 5 minutes; ?keys=all: all."""
    recorder = request.app[RECORDER]
    wanted = request.query.get("keys", str(DEFAULT_STATS_KEYS))
    if wanted != "all" and not (wanted.isdigit() and int(wanted) > 0):
        raise web.HTTPBadRequest(
            text='{"error": {"message": "keys must be a positive number or \'all\'", '
            '"type": "invalid_request_error", "param": "keys", "code": "invalid_value"}}',
            content_type="application/json",
        )
    snapshot = recorder.stats.snapshot(None if wanted == "all" else int(wanted))
    for name, entry in snapshot["keys"].items():
        if name in recorder.limit_use:
            entry["limits"] = recorder.limit_use[name]
    snapshot["servers"] = recorder.server_states()
    snapshot["recent_problems"] = recorder.recent.entries()
    snapshot["sidecar"] = {
        "uptime_seconds": round(time.monotonic() - request.app[STARTED], 3),
        "events_received": recorder.received,
        "events_lost": recorder.lost,
        "events_malformed": recorder.malformed,
        "requests_finished": recorder.finished_requests,
        "servers": len(recorder.instances),
        "servers_reporting": recorder.servers_reporting(),
    }
    return web.json_response(snapshot)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build_sidecar_app(recorder: Recorder, *, token: str | None = None) -> web.Application:
    """`token`: when set, /metrics and /stats need it as a bearer token (see sidecar.access)."""
    app = web.Application(middlewares=[bearer_token_middleware(token)] if token else [])
    app[RECORDER] = recorder
    app[STARTED] = time.monotonic()
    app.add_routes(
        [web.get("/metrics", metrics), web.get("/stats", stats), web.get("/health", health)]
    )
    app.add_routes(status_page_routes())
    return app
