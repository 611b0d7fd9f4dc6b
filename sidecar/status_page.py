"""GET / on the sidecar: a live status page for operators who have no Grafana yet.

The page is static files (sidecar/static/) that poll /stats once a second and draw it with a
small SVG module of their own, so it works offline, with no build step and no CDN. The files are
read once when the app is built and served from memory.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

__all__ = ["STATIC_DIR", "status_page_routes"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# The page draws only what it fetched from its own origin; nothing else may run or load.
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
}


def _load_assets() -> dict[str, tuple[bytes, str]]:
    return {
        path.name: (path.read_bytes(), _CONTENT_TYPES[path.suffix])
        for path in sorted(STATIC_DIR.iterdir())
        if path.suffix in _CONTENT_TYPES
    }


def status_page_routes() -> list[web.RouteDef]:
    assets = _load_assets()

    def respond(name: str) -> web.Response:
        if name not in assets:
            raise web.HTTPNotFound(text="no such file")
        body, content_type = assets[name]
        return web.Response(body=body, headers={"Content-Type": content_type, **_HEADERS})

    async def index(request: web.Request) -> web.Response:
        return respond("index.html")

    async def asset(request: web.Request) -> web.Response:
        return respond(request.match_info["name"])

    return [web.get("/", index), web.get("/static/{name}", asset)]
