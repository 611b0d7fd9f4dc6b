"""Typed keys for what the aiohttp Application holds, shared by the app and its handlers."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from server.serving import GenerationService
from server.state import ServerState

__all__ = ["OPENAPI", "SERVICE", "STATE"]

STATE = web.AppKey("state", ServerState)
SERVICE = web.AppKey("service", GenerationService)
OPENAPI = web.AppKey("openapi", dict[str, Any])
