"""API keys: key names, SHA-256 hashes of their secrets, model lists, limits, scheduling
weights and lifetimes.

The secret itself is shown once, when `llmserve keys create` makes it, and never stored. A key
is found by the hash of the presented secret and confirmed with a constant-time comparison. A
key may expire, and while it is being rotated it has a second (previous) secret that is accepted
until a given time. `KeyTable` is the lookup every store shares; `KeyStore` fills it from the TOML
keys file, re-read when it changes or on SIGHUP, and notes last use beside it (never in it).
Requests already running keep the entry they started with, so a reload never drops a stream,
and a revoked key is refused from the next request on.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import time
import tomllib
from abc import ABC, abstractmethod
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import tomli_w
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from llmserve.server.ratelimit.kinds import KINDS

__all__ = [
    "KeyEntry",
    "KeyExpired",
    "KeyFileError",
    "KeyStore",
    "KeyTable",
    "hash_secret",
    "invalid_fields",
    "new_secret",
    "read_usage",
    "used_now",
]

log = logging.getLogger("llmserve.keys")

Limit = Annotated[int, Field(ge=1)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
_USAGE_WRITE_SECONDS = 60.0
_DEFAULT_WEIGHT = 1.0
# A bound, so that a typo (1e9 for 1.9) cannot hand one key the whole server for good.
_MAX_WEIGHT = 1000.0
# Below this a counter divided by the weight would overflow; 1000:1 is the widest ratio anyway.
_MIN_WEIGHT = 0.001
_HEADER = (
    "# llmserve API keys: names, SHA-256 hashes of the secrets, models and limits.\n"
    "# The secrets were shown once, when each key was created. Keep this file mode 600.\n"
)


class KeyFileError(Exception):
    """The keys file is missing, unreadable, invalid, or readable by others."""


class KeyExpired(Exception):
    """A known secret presented after its key (or, mid-rotation, that secret) expired."""

    def __init__(self, at: datetime) -> None:
        super().__init__(f"expired at {at.isoformat()}")
        self.at = at


class KeyEntry(BaseModel):
    """One key. In the file (and to the constructor) each limit is a field of its own, named
    as in `kinds.KINDS` (`rpm = 60`); here they are gathered in `limits`, absent: unlimited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    sha256: Sha256
    created: str | None = None
    expires: AwareDatetime | None = Field(None, description="Refused from then on.")
    previous_sha256: Sha256 | None = Field(
        None, description="The secret being rotated out, accepted until previous_expires."
    )
    previous_expires: AwareDatetime | None = None
    models: list[str] | None = Field(None, description="Models this key may use (None: all).")
    # Strict: a boolean or a string ("2") is a mistake in the file, not a number to coerce.
    weight: float = Field(
        _DEFAULT_WEIGHT,
        strict=True,
        ge=_MIN_WEIGHT,
        le=_MAX_WEIGHT,
        allow_inf_nan=False,
        description="Share of the server when keys compete: weight 2 gets twice weight 1's.",
    )
    limits: dict[str, Limit] = Field(default_factory=dict, description="Limit kind -> limit.")

    @model_validator(mode="before")
    @classmethod
    def _gather_limits(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if "limits" in data:
            raise ValueError("each limit is a field of its own, such as rpm = 60")
        names = {k.name for k in KINDS}
        limits = {n: v for n, v in data.items() if n in names and v is not None}
        return {**{n: v for n, v in data.items() if n not in names}, "limits": limits}

    @model_serializer(mode="wrap")
    def _stored_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The fields as the file and Redis hold them: each limit a field, the default weight
        left out."""
        fields: dict[str, Any] = handler(self)
        limits = fields.pop("limits", None) or {}
        # An absent weight reads as the default, so leaving it out keeps the files and Redis
        # entries of keys that never had one exactly as they were.
        if self.weight == _DEFAULT_WEIGHT:
            fields.pop("weight", None)
        return {**fields, **{k.name: limits[k.name] for k in KINDS if k.name in limits}}

    @model_validator(mode="after")
    def _rotation_ends(self) -> KeyEntry:
        if (self.previous_sha256 is None) != (self.previous_expires is None):
            raise ValueError("previous_sha256 and previous_expires go together")
        return self

    def limit(self, name: str) -> int | None:
        """The key's limit of that kind; None: unlimited."""
        return self.limits.get(name)

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models


def invalid_fields(exc: ValidationError) -> str:
    """What is wrong with an entry, field by field, without the input: it might hold a secret."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in exc.errors())


def new_secret() -> str:
    """`sk-` and 256 bits of randomness."""
    return "sk-" + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def read_keys(path: Path) -> dict[str, KeyEntry]:
    """Name -> entry, after checking that nobody but the owner can read the file."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise KeyFileError(f"keys file not found: {path}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"keys file {path} is open to other users (mode {stat.filemode(mode)}); "
            f"run: chmod 600 {path}"
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise KeyFileError(f"cannot read keys file {path}: {exc}") from None
    entries: dict[str, KeyEntry] = {}
    for name, fields in (data.get("keys") or {}).items():
        try:
            entries[name] = KeyEntry.model_validate({**fields, "name": name})
        except ValidationError as exc:
            reason = invalid_fields(exc)
            raise KeyFileError(f"keys file {path}: key {name!r} is invalid: {reason}") from None
        except TypeError:
            raise KeyFileError(f"keys file {path}: key {name!r} is not a table") from None
    return entries


def write_keys(path: Path, entries: dict[str, KeyEntry]) -> None:
    """Replace the file atomically, created with mode 600."""
    body = {
        "keys": {
            name: entry.model_dump(exclude={"name"}, exclude_none=True)
            for name, entry in sorted(entries.items())
        }
    }
    _replace(path, _HEADER + tomli_w.dumps(body))


def _replace(path: Path, text: str) -> None:
    """Write `path` atomically, created with mode 600."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    os.replace(temporary, path)


def usage_path(keys_file: Path) -> Path:
    """Where servers note when each key of a keys file was last used (never the file itself,
    which is the operator's)."""
    return keys_file.with_name(f"{keys_file.name}.last-used.json")


def read_usage(keys_file: Path) -> dict[str, str]:
    """Name -> last use; empty if nothing was recorded or the record is unreadable."""
    try:
        data = json.loads(usage_path(keys_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(name): str(when) for name, when in data.items()}


def _add_usage(keys_file: Path, names: set[str], stamp: str) -> None:
    _replace(
        usage_path(keys_file),
        json.dumps({**read_usage(keys_file), **dict.fromkeys(names, stamp)}, sort_keys=True),
    )


def created_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def used_now() -> str:
    """Last use, to the minute: coarse on purpose (one write a minute per server at most)."""
    return datetime.now(UTC).isoformat(timespec="minutes")


class _Secret(NamedTuple):
    sha256: str
    entry: KeyEntry
    ends: datetime | None


class KeyTable(ABC):
    """The keys in effect, looked up by the hash of a presented secret, wherever they come from.

    Last use is noted in memory per request (a set insertion, never I/O) and written out by the
    store at most once every _USAGE_WRITE_SECONDS, off the request path.
    """

    def __init__(self) -> None:
        self._by_hash: dict[str, _Secret] = {}
        self.used: set[str] = set()
        self._usage_due = time.monotonic() + _USAGE_WRITE_SECONDS

    def __len__(self) -> int:
        return len({secret.entry.name for secret in self._by_hash.values()})

    def replace(self, entries: dict[str, KeyEntry]) -> None:
        by_hash: dict[str, _Secret] = {}
        for entry in entries.values():
            by_hash[entry.sha256] = _Secret(entry.sha256, entry, entry.expires)
            if entry.previous_sha256 is not None and entry.previous_expires is not None:
                # The old secret never outlives the key itself.
                ends = min(d for d in (entry.previous_expires, entry.expires) if d is not None)
                by_hash.setdefault(
                    entry.previous_sha256, _Secret(entry.previous_sha256, entry, ends)
                )
        self._by_hash = by_hash

    @abstractmethod
    async def watch(self, seconds: float) -> None:
        """Keep the table current until cancelled, re-reading at least every `seconds`."""

    @abstractmethod
    def reload(self) -> bool:
        """Re-read now (SIGHUP); False if the keys loaded before are kept."""

    @abstractmethod
    async def _write_usage(self, names: set[str], stamp: str) -> None:
        """Record that these keys were used at `stamp`; a failure is logged, never raised."""

    async def record_usage(self, *, now: bool = False) -> None:
        """Write out the keys used since the last write, if one is due (or `now`)."""
        if not self.used or not (now or time.monotonic() >= self._usage_due):
            return
        used, self.used = self.used, set()
        self._usage_due = time.monotonic() + _USAGE_WRITE_SECONDS
        await self._write_usage(used, used_now())

    def stale_seconds(self) -> float | None:
        """Seconds since the store was last read successfully, when it could not be since."""
        return None

    def authenticate(self, secret: str, now: datetime | None = None) -> KeyEntry | None:
        """The key of that secret; None if there is none; KeyExpired if it is past its time."""
        digest = hash_secret(secret)
        found = self._by_hash.get(digest)
        if found is None or not hmac.compare_digest(found.sha256, digest):
            return None
        if found.ends is not None and (now or datetime.now(UTC)) >= found.ends:
            raise KeyExpired(found.ends)
        self.used.add(found.entry.name)
        return found.entry


class KeyStore(KeyTable):
    """The keys of the TOML keys file."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._signature: tuple[int, int] | None = None
        self._usage_failing = False
        self.load()

    def load(self) -> None:
        self.replace(read_keys(self.path))
        self._signature = self._file_signature()

    def _file_signature(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed; a broken file keeps the keys already loaded."""
        if self._file_signature() == self._signature:
            return False
        return self.reload()

    async def watch(self, seconds: float) -> None:
        # A changed file is noticed within `seconds`; SIGHUP reloads at once.
        try:
            while True:
                await asyncio.sleep(seconds)
                self.reload_if_changed()
                await self.record_usage()
        finally:
            await self.record_usage(now=True)

    async def _write_usage(self, names: set[str], stamp: str) -> None:
        try:
            await asyncio.to_thread(_add_usage, self.path, names, stamp)
        except OSError as exc:
            # Said once: a read-only directory (a sandboxed unit's /etc) stays read-only.
            if not self._usage_failing:
                log.warning(
                    "cannot record when API keys were last used in %s (%s); `llmserve keys "
                    "list` shows no last use until it can",
                    usage_path(self.path),
                    exc.strerror or exc,
                )
            self._usage_failing = True
        else:
            self._usage_failing = False

    def reload(self) -> bool:
        try:
            self.load()
        except KeyFileError as exc:
            log.error("keeping the %d keys loaded before: %s", len(self), exc)
            self._signature = self._file_signature()
            return False
        log.info("reloaded %d API keys from %s", len(self), self.path)
        return True
