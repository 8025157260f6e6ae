"""The `dalston` command."""

from __future__ import annotations

import argparse
import sys

from dalston.config import ConfigError, load_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dalston", description="Self-hosted speech-to-text on NATS.")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run Dalston on this machine (NATS, gateway, orchestrator, engines)")
    up.add_argument("--runtimes", default="faster-whisper",
                    help="comma-separated transcription runtimes to start (default: faster-whisper)")

    serve = commands.add_parser("serve", help="run one service in the foreground")
    serve.add_argument("service", choices=["gateway", "orchestrator", "engine"])
    serve.add_argument("runtime", nargs="?", help="the engine's runtime (default: DALSTON_RUNTIME)")

    commands.add_parser("schemas", help="print the JSON schemas of every NATS message")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"dalston: {exc}", file=sys.stderr)
        return 2
    if args.command == "up":
        from dalston.bus.server import AlreadyRunning
        from dalston.services.up import up

        try:
            return up(settings, [r.strip() for r in args.runtimes.split(",") if r.strip()])
        except AlreadyRunning as exc:
            print(f"dalston: {exc}", file=sys.stderr)
            return 1
    if args.command == "serve":
        from dalston.services.runner import serve

        serve(args.service, settings, args.runtime)
        return 0
    if args.command == "schemas":
        import msgspec

        from dalston.contracts import json_schemas

        print(msgspec.json.format(msgspec.json.encode(json_schemas())).decode())
        return 0
    return 2
