"""The `dalston` command. Each module of this package registers one group of subcommands."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from dalston.cli import dashboard, engines, health, jobs, keys, listen, models, service, status, transcribe
from dalston.cli.output import CliError, error
from dalston.config import ConfigError, load_settings

# Each module has `register(subparsers)`; a subcommand sets `func(args, settings) -> int`.
COMMAND_MODULES = [service, transcribe, listen, jobs, models, status, dashboard, keys, engines, health]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dalston", description="Self-hosted speech-to-text on NATS.")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    # SIGPIPE stays ignored (Python's default): with SIG_DFL a client that closes its socket
    # early would kill `dalston serve`. A closed stdout is a BrokenPipeError instead, below.
    args = build_parser().parse_args(argv)
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
