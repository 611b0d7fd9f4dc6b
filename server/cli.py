"""The `llmserve` command: `serve` runs the server and its sidecar, `sidecar` the sidecar alone,
`keys` manages API keys and `bench` load-tests any OpenAI-compatible server.

Every configuration field is also a flag, named after its dotted path (`server.port` is
`--server-port`), with short aliases for the ones people type most.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from llmserve.bench.cli import add_bench_parser, run_bench
from llmserve.server import __version__
from llmserve.server.config import ENV_PREFIX, ConfigError, field_names, flag, load_config
from llmserve.server.keys_cli import add_keys_parser, run_keys_command
from llmserve.shared.jsonlog import close_logging, configure_logging

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
    serve = commands.add_parser(
        "serve", help="run the HTTP server and its metrics sidecar (the default command)"
    )
    _add_config_flags(serve)
    sidecar = commands.add_parser(
        "sidecar", help="run the metrics sidecar alone (for systemd or a separate host user)"
    )
    _add_config_flags(sidecar)
    add_keys_parser(commands)
    add_bench_parser(commands)
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
    if args.command is None:
        args = _parser().parse_args(["serve", *(argv if argv is not None else sys.argv[1:])])
    if args.command == "keys":
        return _keys(args)
    if args.command == "bench":
        return run_bench(args)
    overrides = {
        dotted: value for dotted, value in vars(args).items() if "." in dotted and value is not None
    }
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"llmserve: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "sidecar":
            from llmserve.sidecar.runner import run as run_sidecar

            return run_sidecar(
                config.sidecar, server_port=config.server.port, log_level=config.server.log_level
            )
        configure_logging("llmserve", config.server.log_level)
        from llmserve.server.runner import run

        return run(config, _sidecar_args(args.config, overrides))
    finally:
        # Log sinks write from a queue; let them finish before the process ends.
        close_logging()


def _keys(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"llmserve: {exc}", file=sys.stderr)
        return 2
    return run_keys_command(args, config)


def _sidecar_args(config_path: str | None, overrides: dict[str, str]) -> list[str]:
    """The child sidecar gets the same file and flags, so it sees the same settings."""
    args = ["--config", config_path] if config_path else []
    for dotted, value in overrides.items():
        section, _, name = dotted.partition(".")
        args += [flag(section, name), value]
    return args


if __name__ == "__main__":
    sys.exit(main())
