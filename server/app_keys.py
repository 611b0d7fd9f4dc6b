"""Typed keys for what the aiohttp Application holds, shared by the app and its handlers."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from server.auth import AuthState
from server.serving import GenerationService
from server.state import ServerState

__all__ = ["AUTH", "OPENAPI", "SERVICE", "STATE"]

STATE = web.AppKey("state", ServerState)
AUTH = web.AppKey("auth", AuthState)
SERVICE = web.AppKey("service", GenerationService)
OPENAPI = web.AppKey("openapi", dict[str, Any])
