"""The `dalston` command. Each module of this package registers one group of subcommands."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from dalston.cli.output import CliError, error
from dalston.config import ConfigError, load_settings

# Each module has `register(subparsers)`; a subcommand sets `func(args, settings) -> int`. A
# command imports its own module alone: a `dalston serve` process (every service) would otherwise
# pay for what `listen` and `engines` import (NumPy, PyAV, websockets, a NATS client).
COMMANDS = {"up": "service", "down": "service", "serve": "service", "schemas": "service",
            "transcribe": "transcribe", "listen": "listen", "jobs": "jobs", "models": "models",
            "status": "status", "dashboard": "dashboard", "keys": "keys", "engines": "engines",
            "health": "health"}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of `command` alone, or of every command (for --help, or a command not known)."""
    parser = argparse.ArgumentParser(prog="dalston", description="Self-hosted speech-to-text on NATS.")
    commands = parser.add_subparsers(dest="command", required=True)
    names = [COMMANDS[command]] if command in COMMANDS else dict.fromkeys(COMMANDS.values())
    for name in names:
        importlib.import_module(f"dalston.cli.{name}").register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    # SIGPIPE stays ignored (Python's default): with SIG_DFL a client that closes its socket
    # early would kill `dalston serve`. A closed stdout is a BrokenPipeError instead, below.
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"dalston: {exc}", file=sys.stderr)
        return 2
    try:
        return args.func(args, settings)
    except CliError as exc:
        error(exc.message)
        return exc.code
    except BrokenPipeError:
        # `dalston models | head` ends quietly, as shell tools do; stdout is pointed at
        # /dev/null so the interpreter's final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
