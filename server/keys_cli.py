"""`llmserve keys`: create, list, change and revoke API keys in the keys file.

`create` prints the new secret once; only its SHA-256 is written. A running server picks up every
change within `auth.reload_seconds` (or at once on SIGHUP).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmserve.server.keys import (
    KeyEntry,
    KeyFileError,
    created_now,
    hash_secret,
    new_secret,
    read_keys,
    write_keys,
)
from llmserve.server.ratelimit.kinds import KINDS

__all__ = ["add_keys_parser", "run_keys_command"]


def _limit(value: str) -> int | None:
    if value.lower() in ("none", "unlimited", "0"):
        return None
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError("a limit is a positive number, or none")
    return number


def add_keys_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser("keys", help="create, list, change and revoke API keys")
    keys.add_argument("--file", help="the keys file (default: auth.keys_file from the config)")
    keys.add_argument("--config", help="TOML configuration file, for auth.keys_file")
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="make a key and print its secret once")
    change = actions.add_parser("set", help="change a key's limits or models")
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
    actions.add_parser("list", help="list keys with their limits")
    revoke = actions.add_parser("revoke", help="delete a key; it is refused from then on")
    revoke.add_argument("name")


def run_keys_command(args: argparse.Namespace, default_file: str | None) -> int:
    path_text = args.file or default_file
    if not path_text:
        print("llmserve keys: give --file or set auth.keys_file", file=sys.stderr)
        return 2
    path = Path(path_text)
    try:
        return _run(args, path)
    except KeyFileError as exc:
        print(f"llmserve keys: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, path: Path) -> int:
    entries = read_keys(path) if path.exists() else {}
    command = args.keys_command
    if command == "list":
        for entry in entries.values():
            print(_describe(entry))
        return 0
    name = args.name
    if command == "create":
        if name in entries:
            raise KeyFileError(f"a key named {name!r} exists; revoke it first or use `set`")
        secret = new_secret()
        fields = {"name": name, "sha256": hash_secret(secret), "created": created_now()}
        entries[name] = KeyEntry.model_validate({**fields, **_changes(args)})
        write_keys(path, entries)
        print(secret)
        print(f"created key {name!r}; the secret above is shown only now", file=sys.stderr)
        return 0
    if name not in entries:
        raise KeyFileError(f"no key named {name!r} in {path}")
    if command == "revoke":
        del entries[name]
        write_keys(path, entries)
        print(f"revoked key {name!r}", file=sys.stderr)
        return 0
    changed = {**entries[name].model_dump(), **_changes(args)}
    entries[name] = KeyEntry.model_validate(changed)
    write_keys(path, entries)
    print(_describe(entries[name]))
    return 0


def _changes(args: argparse.Namespace) -> dict[str, object]:
    """The limits and models given on the command line, and only those."""
    given: dict[str, object] = {
        k.name: getattr(args, k.name) for k in KINDS if hasattr(args, k.name)
    }
    if hasattr(args, "models"):
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        given["models"] = models or None
    return given


def _describe(entry: KeyEntry) -> str:
    limits = ", ".join(f"{k.name} {entry.limit(k.name) or 'unlimited'}" for k in KINDS)
    models = ", ".join(entry.models) if entry.models else "all models"
    return f"{entry.name}: {limits}; {models}; created {entry.created or '?'}"
