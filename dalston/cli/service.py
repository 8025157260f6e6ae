"""`dalston up`, `dalston serve`, `dalston schemas`: running Dalston itself."""

from __future__ import annotations

import sys

from dalston.config import Settings


def register(commands) -> None:
    up = commands.add_parser("up", help="run Dalston on this machine (NATS, gateway, orchestrator, engines)")
    up.add_argument("--runtimes", default="faster-whisper",
                    help="comma-separated transcription runtimes to start (default: faster-whisper)")
    up.set_defaults(func=_up)

    serve = commands.add_parser("serve", help="run one service in the foreground")
    serve.add_argument("service", choices=["gateway", "orchestrator", "engine"])
    serve.add_argument("runtime", nargs="?", help="the engine's runtime (default: DALSTON_RUNTIME)")
    serve.set_defaults(func=_serve)

    schemas = commands.add_parser("schemas", help="print the JSON schemas of every NATS message")
    schemas.set_defaults(func=_schemas)


def _up(args, settings: Settings) -> int:
    from dalston.bus.server import AlreadyRunning
    from dalston.services.up import up

    try:
        return up(settings, [r.strip() for r in args.runtimes.split(",") if r.strip()])
    except AlreadyRunning as exc:
        print(f"dalston: {exc}", file=sys.stderr)
        return 1


def _serve(args, settings: Settings) -> int:
    from dalston.services.runner import serve

    serve(args.service, settings, args.runtime)
    return 0


def _schemas(args, settings: Settings) -> int:
    import msgspec

    from dalston.contracts import json_schemas

    print(msgspec.json.format(msgspec.json.encode(json_schemas())).decode())
    return 0
