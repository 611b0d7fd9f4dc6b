"""The `llmserve` command: `serve` runs the server (more subcommands arrive with their features).

Every configuration field is also a flag, named after its dotted path (`server.port` is
`--server-port`), with short aliases for the ones people type most.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from server import __version__
from server.config import ENV_PREFIX, ConfigError, field_names, flag, load_config

__all__ = ["main"]

_ALIASES = {
    "server.host": "--host",
    "server.port": "--port",
    "engine.kind": "--engine",
    "engine.model_id": "--model-id",
    "llamacpp.model_path": "--model",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmserve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"llmserve {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the HTTP server (the default command)")
    _add_config_flags(serve)
    return parser


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=os.environ.get(f"{ENV_PREFIX}CONFIG"),
        help=f"TOML configuration file (env {ENV_PREFIX}CONFIG)",
    )
    for section, name in field_names():
        dotted = f"{section}.{name}"
        names = [flag(section, name)]
        if dotted in _ALIASES:
            names.insert(0, _ALIASES[dotted])
        parser.add_argument(*names, dest=dotted, metavar="VALUE", help=f"sets {dotted}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "serve"
    if command == "serve":
        return _serve(args)
    raise AssertionError(command)


def _serve(args: argparse.Namespace) -> int:
    overrides = {
        dotted: value for dotted, value in vars(args).items() if "." in dotted and value is not None
    }
    try:
        config = load_config(getattr(args, "config", None), overrides=overrides)
    except ConfigError as exc:
        print(f"llmserve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from server.runner import run

    return run(config)


if __name__ == "__main__":
    sys.exit(main())
