"""API keys kept in Redis, so every replica behind a load balancer sees the same keys.

Layout: the hash `llmserve:keys` maps each key name to its entry as JSON (the SHA-256 of its
secret or secrets, never a secret), `llmserve:keys:used` maps names to when each was last used
(to the minute, written by each server at most once a minute, never per request), every change
increments `llmserve:keys:version` and is announced on the channel `llmserve:keys:changed`. A
server re-reads the whole hash when told; every `auth.reload_seconds` it reads the version (one
small GET, where re-reading 10,000 keys would hold its event loop for tens of milliseconds) and
re-reads the hash when it moved, so a lost message delays a revocation by at most that long; and
every 30 s it re-reads the hash regardless, for edits made by hand without the version. When
Redis cannot be read the server keeps the keys it read last, and says how long ago that was
(`stale_seconds`); it never falls back to accepting keys it does not know. An entry that is not
valid (written by hand, by another version, or garbage) is logged and skipped; the others load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import redis
from pydantic import ValidationError
from redis.exceptions import RedisError

from llmserve.server.keys import KeyEntry, KeyTable, invalid_fields

__all__ = [
    "CHANNEL",
    "KEYS_HASH",
    "USED_HASH",
    "VERSION",
    "RedisKeyStore",
    "RedisKeysAdmin",
    "parse_entries",
]

log = logging.getLogger("llmserve.keys")

KEYS_HASH = "llmserve:keys"
USED_HASH = "llmserve:keys:used"
VERSION = "llmserve:keys:version"
CHANNEL = "llmserve:keys:changed"
# A real entry is a few hundred bytes; anything far larger was not written by `llmserve keys`.
_MAX_ENTRY_BYTES = 16 * 1024
_READ_TIMEOUT_SECONDS = 2.0
_RESUBSCRIBE_SECONDS = 1.0


def parse_entries(raw: Mapping[bytes, bytes]) -> dict[str, KeyEntry]:
    """Name -> entry for every valid field of the keys hash; an invalid one is logged, skipped."""
    entries: dict[str, KeyEntry] = {}
    for field, value in raw.items():
        try:
            entries[field.decode("utf-8")] = _entry(field, value)
        except (UnicodeDecodeError, ValueError) as exc:
            log.error("skipping key %r in Redis %s: %s", field[:64], KEYS_HASH, _reason(exc))
    return entries


def _entry(field: bytes, value: bytes) -> KeyEntry:
    if len(value) > _MAX_ENTRY_BYTES:
        raise ValueError(f"its entry is {len(value)} bytes, over {_MAX_ENTRY_BYTES}")
    entry = KeyEntry.model_validate_json(value)
    if entry.name.encode("utf-8") != field:
        raise ValueError(f"its entry names another key, {entry.name!r}")
    return entry


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return invalid_fields(exc)
    if isinstance(exc, UnicodeDecodeError):
        return "its name is not UTF-8"
    return str(exc)


class RedisKeysAdmin:
    """What `llmserve keys` does to the keys in Redis: read them, write or delete one."""

    def __init__(self, url: str) -> None:
        # Typed loosely: redis-py types replies as bytes or str whatever the decoding.
        self.client: Any = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)

    def read(self) -> dict[str, KeyEntry]:
        return parse_entries(self.client.hgetall(KEYS_HASH))

    def last_used(self) -> dict[str, str]:
        raw: dict[bytes, bytes] = self.client.hgetall(USED_HASH)
        return {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in raw.items()}

    def put(self, entry: KeyEntry) -> None:
        with self.client.pipeline() as pipe:
            pipe.hset(KEYS_HASH, entry.name, entry.model_dump_json())
            pipe.incr(VERSION)
            pipe.publish(CHANNEL, entry.name)
            pipe.execute()

    def delete(self, name: str) -> None:
        with self.client.pipeline() as pipe:
            pipe.hdel(KEYS_HASH, name)
            pipe.hdel(USED_HASH, name)
            pipe.incr(VERSION)
            pipe.publish(CHANNEL, name)
            pipe.execute()

    def close(self) -> None:
        self.client.close()


class RedisKeyStore(KeyTable):
    """The keys in Redis, as one server sees them: re-read when announced and periodically."""

    def __init__(self, client: Any, *, full_read_seconds: float = 30.0) -> None:
        super().__init__()
        self.client = client
        self.full_read_seconds = full_read_seconds
        self._version: bytes | None = None
        self._full_read_at = -math.inf
        self._changed = asyncio.Event()
        # Until the first read succeeds the table is empty and counts as stale from startup.
        self._last_read = time.monotonic()
        self._stale = True
        self._complained = False
        self._listening = False
        # What the last read returned: an unchanged hash (the usual case) is not parsed again.
        self._raw: dict[bytes, bytes] | None = None

    def stale_seconds(self) -> float | None:
        return time.monotonic() - self._last_read if self._stale else None

    def reload(self) -> bool:
        self._changed.set()
        return True

    async def refresh(self, *, full: bool = True) -> bool:
        """Read the keys (unless `full` is False and the version has not moved); on failure keep
        the keys read before and become stale."""
        try:
            # The version first: a change made between the two reads shows in the hash now and
            # in the version next time, never in neither.
            version = await asyncio.wait_for(self.client.get(VERSION), _READ_TIMEOUT_SECONDS)
            due = time.monotonic() - self._full_read_at >= self.full_read_seconds
            if full or due or version != self._version:
                raw = await asyncio.wait_for(self.client.hgetall(KEYS_HASH), _READ_TIMEOUT_SECONDS)
                self._full_read_at = time.monotonic()
                if raw != self._raw:
                    self.replace(parse_entries(raw))
                    self._raw = raw
            self._version = version
        except (RedisError, OSError, TimeoutError) as exc:
            if not self._complained:
                log.error(
                    "cannot read the API keys from Redis (%s); serving the %d keys read before "
                    "until it answers, and no others",
                    type(exc).__name__,
                    len(self),
                )
            self._stale = self._complained = True
            return False
        if self._stale:
            log.info("read %d API keys from Redis", len(self))
        self._stale = self._complained = False
        self._last_read = time.monotonic()
        return True

    async def watch(self, seconds: float) -> None:
        listener = asyncio.create_task(self._listen())
        try:
            await self._poll(seconds)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            # A stopping server records the uses of its last minute.
            await self.record_usage(now=True)

    async def _poll(self, seconds: float) -> None:
        notified = True
        while True:
            await self.refresh(full=notified)
            await self.record_usage()
            try:
                await asyncio.wait_for(self._changed.wait(), seconds)
                notified = True
            except TimeoutError:
                notified = False
            self._changed.clear()

    async def _listen(self) -> None:
        """Turn change messages into re-reads; a lost subscription is renewed, then re-read."""
        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                self._listening = True
                # Whatever changed while unsubscribed was missed: read it all again.
                self._changed.set()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                    if message is not None:
                        self._changed.set()
            except (RedisError, OSError) as exc:
                # Once per outage: the re-read every auth.reload_seconds keeps the keys current.
                if self._listening:
                    log.warning(
                        "API key change notices from Redis interrupted (%s)", type(exc).__name__
                    )
                self._listening = False
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(_RESUBSCRIBE_SECONDS)

    async def _write_usage(self, names: set[str], stamp: str) -> None:
        try:
            await asyncio.wait_for(
                self.client.hset(USED_HASH, mapping=dict.fromkeys(names, stamp)),
                _READ_TIMEOUT_SECONDS,
            )
        except (RedisError, OSError, TimeoutError):
            # Not worth a retry loop: these keys are noted again at their next use.
            log.warning("could not record the last use of %d API keys in Redis", len(names))
