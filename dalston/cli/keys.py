"""`dalston keys [create|list|revoke]`: the gateway's API keys, straight in NATS (DALSTON_NATS_*;
on a locked NATS, the admin user)."""

from __future__ import annotations

import asyncio

from dalston.bus.connection import connect
from dalston.cli.output import CliError, add_json_option, print_json, table
from dalston.config import Settings
from dalston.formatting import ago
from dalston.keys import KeyNameError, KeyStore


def register(commands) -> None:
    keys = commands.add_parser("keys", help="create, list or revoke the gateway's API keys")
    actions = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="a new key, printed once")
    create.add_argument("name", metavar="NAME")
    create.add_argument("--admin", action="store_true", help="may also pull and delete models")
    create.add_argument("--max-jobs", type=int, metavar="N",
                        help="jobs queued or running at once (default: half of DALSTON_MAX_QUEUED_JOBS)")
    create.add_argument("--max-sessions", type=int, metavar="N",
                        help="live sessions at once (default: half of the session slots)")
    create.set_defaults(func=_create)
    listing = actions.add_parser("list", help="names, roles and ages (never the keys)")
    add_json_option(listing)
    listing.set_defaults(func=_list)
    revoke = actions.add_parser("revoke", help="the key stops working at once")
    revoke.add_argument("name", metavar="NAME")
    revoke.set_defaults(func=_revoke)


def _with_store(settings: Settings, action):
    async def run():
        try:
            bus = await connect(settings, name="dalston-keys")
        except ConnectionError as exc:  # unreachable, or refused
            raise CliError(str(exc)) from None
        try:
            return await action(await KeyStore.open(bus))
        except KeyNameError as exc:
            raise CliError(str(exc)) from None
        finally:
            await bus.close()
    return asyncio.run(run())


def _create(args, settings: Settings) -> int:
    key = _with_store(settings, lambda store: store.create(args.name, "admin" if args.admin else "user",
                                                           max_jobs=args.max_jobs, max_sessions=args.max_sessions))
    print(key)
    return 0


def _list(args, settings: Settings) -> int:
    records = _with_store(settings, KeyStore.list)
    if args.json:
        print_json([{"name": r.name, "role": r.role, "created_at": r.created_at, "max_jobs": r.max_jobs,
                     "max_sessions": r.max_sessions} for r in records])
    else:
        print(table(["name", "role", "created", "max jobs", "max sessions"],
                    [(r.name, r.role, ago(r.created_at), _share(r.max_jobs), _share(r.max_sessions))
                     for r in records]))
    return 0


def _revoke(args, settings: Settings) -> int:
    _with_store(settings, lambda store: store.revoke(args.name))
    return 0


def _share(limit: int | None) -> str:
    return "half" if limit is None else str(limit)
