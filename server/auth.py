"""Who is asking: the API key presented with a request, checked against the key store.

`Authorization: Bearer <key>` or `x-api-key: <key>`. Without a keys file every request is the
`anonymous` key with no limits, which the runner allows only on a loopback address unless told
otherwise. No message here ever contains what the client sent.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from aiohttp import web

from llmserve.server.errors import Unauthorized
from llmserve.server.keys import KeyEntry, KeyExpired, KeyTable

__all__ = ["ANONYMOUS", "AuthState", "is_loopback"]

ANONYMOUS = KeyEntry.model_validate({"name": "anonymous", "sha256": "0" * 64})


@dataclass
class AuthState:
    store: KeyTable | None

    def authenticate(self, request: web.Request) -> KeyEntry:
        if self.store is None:
            return ANONYMOUS
        secret = _presented_secret(request)
        if secret is None:
            raise Unauthorized(
                "No API key provided. Send it as 'Authorization: Bearer <key>' or "
                "'x-api-key: <key>'.",
                code="missing_api_key",
            )
        # Keys are printable ASCII; anything else (bytes that were not UTF-8 arrive as surrogate
        # escapes) can match no key, and must not reach the hashing as text it cannot encode.
        try:
            entry = self.store.authenticate(secret) if _plain(secret) else None
        except KeyExpired as exc:
            raise Unauthorized(
                f"This API key expired at {exc.at.isoformat()}; ask for a new one.",
                code="expired_api_key",
            ) from None
        if entry is None:
            raise Unauthorized("Incorrect API key provided.", code="invalid_api_key")
        return entry


def _presented_secret(request: web.Request) -> str | None:
    authorization = request.headers.get("Authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key", "").strip() or None


def _plain(value: str) -> bool:
    return value.isascii() and value.isprintable()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
