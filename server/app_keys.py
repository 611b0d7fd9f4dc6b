"""Typed keys for what the aiohttp Application holds, shared by the app and its handlers."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from llmserve.server.auth import AuthState
from llmserve.server.serving import GenerationService
from llmserve.server.state import ServerState

__all__ = ["AUTH", "BODY_TIMEOUT", "OPENAPI", "SERVICE", "STATE"]

STATE = web.AppKey("state", ServerState)
AUTH = web.AppKey("auth", AuthState)
SERVICE = web.AppKey("service", GenerationService)
OPENAPI = web.AppKey("openapi", dict[str, Any])
BODY_TIMEOUT = web.AppKey("body_timeout_seconds", float)
