"""`llmserve keys`: create, list, change, rotate and revoke API keys, in the keys file or Redis.

`create` and `rotate` print the new secret once; only its SHA-256 is stored. `import` copies a
keys file into the chosen store and `export` writes the store out as a keys file. A running
server picks up every change within `auth.reload_seconds` (from Redis, within a moment of the
change notice; from the file, at once on SIGHUP).
"""

from __future__ import annotations

import argparse
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from pydantic import ValidationError
from redis.exceptions import RedisError

from llmserve.server.config import Config
from llmserve.server.keys import (
    KeyEntry,
    KeyFileError,
    created_now,
    hash_secret,
    invalid_fields,
    new_secret,
    read_keys,
    read_usage,
    write_keys,
)
from llmserve.server.keys_redis import RedisKeysAdmin
from llmserve.server.ratelimit.kinds import KINDS

__all__ = ["add_keys_parser", "run_keys_command"]

_SPAN = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class _Keys(Protocol):
    """A place keys are kept: the file or Redis."""

    def read(self) -> dict[str, KeyEntry]: ...
    def put(self, entry: KeyEntry) -> None: ...
    def delete(self, name: str) -> None: ...
    def last_used(self) -> dict[str, str]: ...
    def close(self) -> None: ...


class _FileKeys:
    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, KeyEntry]:
        return read_keys(self.path) if self.path.exists() else {}

    def put(self, entry: KeyEntry) -> None:
        write_keys(self.path, {**self.read(), entry.name: entry})

    def delete(self, name: str) -> None:
        entries = self.read()
        del entries[name]
        write_keys(self.path, entries)

    def last_used(self) -> dict[str, str]:
        return read_usage(self.path)

    def close(self) -> None:
        pass


def _limit(value: str) -> int | None:
    if value.lower() in ("none", "unlimited", "0"):
        return None
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError("a limit is a positive number, or none")
    return number


def _when(value: str) -> datetime | None:
    """An ISO 8601 time (UTC unless it says otherwise), a span from now (30d, 12h, 45m, 90s),
    `now`, or `never`."""
    text = value.strip().lower()
    if text in ("never", "none"):
        return None
    now = datetime.now(UTC).replace(microsecond=0)
    if text == "now":
        return now
    span = _SPAN.match(text)
    if span:
        return now + timedelta(**{_UNITS[span[2]]: int(span[1])})
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            "give an ISO 8601 time (2027-01-31T00:00Z), a span such as 30d, 12h, 45m, or never"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def add_keys_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser("keys", help="create, list, change, rotate and revoke API keys")
    keys.add_argument("--file", help="the keys file (default: auth.keys_file from the config)")
    keys.add_argument("--config", help="TOML configuration file, for the auth settings")
    keys.add_argument(
        "--store", choices=("file", "redis"), help="where the keys are (default: auth.store)"
    )
    keys.add_argument(
        "--redis-url",
        help="Redis of the keys (default: auth.redis_url, else ratelimit.redis_url; prefer "
        "LLMSERVE_AUTH_REDIS_URL for a URL with a password, which ps would show)",
    )
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="make a key and print its secret once")
    change = actions.add_parser("set", help="change a key's limits, models, weight or expiry")
    for parser in (create, change):
        parser.add_argument("name")
        for kind in KINDS:
            # Absent flags stay out of the namespace, so `set` changes only what it is given.
            parser.add_argument(
                f"--{kind.name}",
                type=_limit,
                metavar="N",
                default=argparse.SUPPRESS,
                help=f"{kind.meaning}; none for unlimited",
            )
        parser.add_argument(
            "--models",
            default=argparse.SUPPRESS,
            help="comma-separated models this key may use; empty for all",
        )
        parser.add_argument(
            "--weight",
            # Parsed only as a number here: KeyEntry says what is out of range, as for the file.
            type=float,
            metavar="W",
            default=argparse.SUPPRESS,
            help="share of the server when keys compete: a weight-2 key gets twice a weight-1 "
            "key's (default 1, at most 1000)",
        )
        parser.add_argument(
            "--expires",
            type=_when,
            metavar="WHEN",
            default=argparse.SUPPRESS,
            help="refuse the key from then on: an ISO 8601 time, a span (30d, 12h), or never",
        )
    rotate = actions.add_parser(
        "rotate", help="give a key a new secret (printed once); the old one works until --overlap"
    )
    rotate.add_argument("name")
    rotate.add_argument(
        "--overlap",
        type=_when,
        metavar="WHEN",
        required=True,
        help="when the old secret stops working: an ISO 8601 time, a span (7d, 24h), or now",
    )
    actions.add_parser(
        "list", help="list keys: limits, models, weight, created, expires, last used"
    )
    revoke = actions.add_parser("revoke", help="delete a key; it is refused from then on")
    revoke.add_argument("name")
    import_ = actions.add_parser("import", help="copy every key of a keys file into the store")
    import_.add_argument("source", help="a keys file")
    export = actions.add_parser("export", help="write every key of the store to a keys file")
    export.add_argument("target", help="the keys file to write (mode 600)")


def run_keys_command(args: argparse.Namespace, config: Config) -> int:
    try:
        keys = _open(args, config)
    except KeyFileError as exc:
        print(f"llmserve keys: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(args, keys)
    except KeyFileError as exc:
        print(f"llmserve keys: {exc}", file=sys.stderr)
        return 1
    except ValidationError as exc:
        # Only create and set validate, and both name the key.
        reason = invalid_fields(exc)
        print(f"llmserve keys: {args.name!r} is not a valid key: {reason}", file=sys.stderr)
        return 1
    except RedisError as exc:
        print(f"llmserve keys: Redis: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        keys.close()


def _open(args: argparse.Namespace, config: Config) -> _Keys:
    store = args.store or ("file" if args.file else config.auth.store)
    if store == "redis":
        url = args.redis_url or config.keys_redis_url()
        if not url:
            raise KeyFileError("give --redis-url or set auth.redis_url (or ratelimit.redis_url)")
        return RedisKeysAdmin(url)
    path_text = args.file or config.auth.keys_file
    if not path_text:
        raise KeyFileError("give --file or set auth.keys_file")
    return _FileKeys(Path(path_text))


def _run(args: argparse.Namespace, keys: _Keys) -> int:
    command = args.keys_command
    if command == "import":
        imported = read_keys(Path(args.source))
        for entry in imported.values():
            keys.put(entry)
        print(f"imported {len(imported)} keys from {args.source}", file=sys.stderr)
        return 0
    entries = keys.read()
    if command == "export":
        write_keys(Path(args.target), entries)
        print(f"exported {len(entries)} keys to {args.target}", file=sys.stderr)
        return 0
    if command == "list":
        used = keys.last_used()
        for entry in entries.values():
            print(_describe(entry, used.get(entry.name)))
        return 0
    name = args.name
    if command == "create":
        if name in entries:
            raise KeyFileError(f"a key named {name!r} exists; revoke it first or use `set`")
        secret = new_secret()
        fields = {"name": name, "sha256": hash_secret(secret), "created": created_now()}
        keys.put(KeyEntry.model_validate({**fields, **_changes(args)}))
        print(secret)
        print(f"created key {name!r}; the secret above is shown only now", file=sys.stderr)
        return 0
    if name not in entries:
        raise KeyFileError(f"no key named {name!r}")
    if command == "revoke":
        keys.delete(name)
        print(f"revoked key {name!r}", file=sys.stderr)
        return 0
    if command == "rotate":
        secret = new_secret()
        old = entries[name]
        rotated = {"sha256": hash_secret(secret), "previous_sha256": old.sha256}
        keys.put(old.model_copy(update={**rotated, "previous_expires": args.overlap}))
        print(secret)
        print(
            f"rotated key {name!r}: the secret above is shown only now; the old one works "
            f"until {args.overlap.isoformat()}",
            file=sys.stderr,
        )
        return 0
    changed = KeyEntry.model_validate({**entries[name].model_dump(), **_changes(args)})
    keys.put(changed)
    print(_describe(changed, None))
    return 0


def _changes(args: argparse.Namespace) -> dict[str, object]:
    """The limits, models, weight and expiry given on the command line, and only those."""
    given: dict[str, object] = {
        k.name: getattr(args, k.name) for k in KINDS if hasattr(args, k.name)
    }
    if hasattr(args, "models"):
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        given["models"] = models or None
    if hasattr(args, "weight"):
        given["weight"] = args.weight
    if hasattr(args, "expires"):
        given["expires"] = args.expires
    return given


def _describe(entry: KeyEntry, last_used: str | None) -> str:
    limits = ", ".join(f"{k.name} {entry.limit(k.name) or 'unlimited'}" for k in KINDS)
    models = ", ".join(entry.models) if entry.models else "all models"
    expires = entry.expires.isoformat() if entry.expires else "never"
    # 2, not 2.0; 0.25 in full.
    weight = int(entry.weight) if entry.weight.is_integer() else entry.weight
    text = (
        f"{entry.name}: {limits}; {models}; weight {weight}; created {entry.created or '?'}; "
        f"expires {expires}; last used {last_used or 'never'}"
    )
    if entry.previous_expires is not None:
        text += f"; previous secret valid until {entry.previous_expires.isoformat()}"
    return text
