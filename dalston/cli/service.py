"""`dalston up`, `dalston down`, `dalston serve`, `dalston schemas`: running Dalston itself."""

from __future__ import annotations

import os
import signal
import sys
import time

from dalston.config import ConfigError, Settings

# `up` stops its services, then NATS: give it as long as it gives them.
DOWN_TIMEOUT = 60.0


def register(commands) -> None:
    up = commands.add_parser("up", help="run Dalston on this machine (NATS, gateway, orchestrator, engines)")
    up.add_argument("--runtimes", default="faster-whisper",
                    help="comma-separated transcription runtimes to start (default: faster-whisper)")
    up.set_defaults(func=_up)

    down = commands.add_parser("down", help="stop the `dalston up` of this machine (DALSTON_HOME)")
    down.set_defaults(func=_down)

    serve = commands.add_parser("serve", help="run one service in the foreground")
    serve.add_argument("service", choices=["gateway", "orchestrator", "webhooks", "wyoming", "engine", "layout"])
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


def _down(args, settings: Settings) -> int:
    from dalston.bus.server import HomeLock

    lock = HomeLock(settings.home)
    pid = lock.holder()
    if pid is None:
        print(f"Dalston is not running on {settings.home}", file=sys.stderr)
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + DOWN_TIMEOUT
    while lock.holder() is not None or _alive(pid):
        if time.monotonic() > deadline:
            print(f"dalston: pid {pid} still running after {DOWN_TIMEOUT:.0f} s", file=sys.stderr)
            return 1
        time.sleep(0.2)
    print(f"Dalston stopped (pid {pid})", file=sys.stderr)
    return 0


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _serve(args, settings: Settings) -> int:
    from dalston.services.runner import serve

    try:
        serve(args.service, settings, args.runtime)
    except ConfigError as exc:  # a service that must not start as configured says why
        print(f"dalston: {exc}", file=sys.stderr)
        return 2
    return 0


def _schemas(args, settings: Settings) -> int:
    import msgspec

    from dalston.contracts import json_schemas

    print(msgspec.json.format(msgspec.json.encode(json_schemas())).decode())
    return 0
