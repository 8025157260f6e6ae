"""`dalston engines`: the live engines; `dalston engines add NAME
--runtime R`: a NATS user for an engine that runs elsewhere (another machine, another account),
with a password made here, and the environment it runs with.

Without `--compose`, the user goes into DALSTON_HOME, which `dalston up` lets in from its next
start; with `--compose DIR`, into that compose project: nats/engines.json and nats/users.conf
(made again), its password appended to DIR/.env, which the nats service reads."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from dalston.bus.credentials import new_password
from dalston.bus.permissions import COMPOSE_ENGINES, engine_user, password_variable
from dalston.catalog import Catalog, UnknownRuntime
from dalston.cli.client import add_server_option, connect
from dalston.cli.output import CliError, add_json_option, print_json, table
from dalston.config import Settings
from dalston.formatting import ago, size
from dalston.services.engine_users import ADDED_ENGINES_FILE, add_engine, compose_users_config

# One subject token, short enough for a readable user name.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}\Z")


def register(commands) -> None:
    engines = commands.add_parser("engines", help="live engines: status, loaded models, memory; "
                                  "`add`: a NATS user for an engine that runs elsewhere")
    add_server_option(engines)
    add_json_option(engines)
    engines.set_defaults(func=_list)
    actions = engines.add_subparsers(dest="action", metavar="ACTION")
    add = actions.add_parser("add", help="a new engine user; prints the environment the engine needs")
    add.add_argument("name", metavar="NAME", help="the engine's name: its user is engine-NAME")
    add.add_argument("--runtime", required=True, metavar="RUNTIME",
                     help="the runtime it runs (see the catalog)")
    add.add_argument("--compose", type=Path, metavar="DIR",
                     help="for the compose project in DIR (its nats/ and .env), not for `dalston up`")
    add.set_defaults(func=_add)


def _list(args, settings: Settings) -> int:
    beats = connect(args, settings).get("/v1/engines")["data"]
    if args.json:
        print_json(beats)
    else:
        print(_engine_table(beats))
    return 0


def _engine_table(beats: list[dict[str, Any]]) -> str:
    return table(["engine", "runtime", "status", "loaded", "device", "memory", "tasks", "last seen"], [
        (b["engine"], b["runtime"], b["status"],
         ",".join(m["model"] for m in b.get("loaded_models", [])) or "-", b.get("device", "cpu"),
         size(b.get("rss_bytes")), b.get("tasks_done", 0), ago(b.get("sent_at")))
        for b in beats])


def _add(args, settings: Settings) -> int:
    if not _NAME.match(args.name):
        raise CliError(f"engine name {args.name!r}: letters, digits, '-' and '_' (at most 63), "
                       "a letter or digit first")
    catalog = Catalog.from_settings(settings)
    try:
        catalog.runtime(args.runtime)
    except UnknownRuntime as exc:
        raise CliError(str(exc)) from None
    user, password = engine_user(args.name), new_password()
    if args.compose is None:
        # `up` names its own engines after their runtime (faster-whisper-0, merge, ...), with a
        # password of each run's: an added engine of such a name would be locked out.
        if re.fullmatch(rf"({'|'.join(map(re.escape, catalog.runtimes))})(-\d+)?", args.name):
            raise CliError(f"{args.name} is a name of `dalston up`'s own engines; choose another")
        add_engine(settings.home / ADDED_ENGINES_FILE, args.name,
                   {"runtime": args.runtime, "password": password})
        url = settings.nats_url or f"nats://127.0.0.1:{settings.nats_port}"
        note = f"{user} added to {settings.home}: `dalston up` lets it in from its next start"
    else:
        _add_to_compose(args.compose, args.name, args.runtime, user, password, catalog)
        url = "nats://<this host>:4222"
        note = (f"{user} added to {args.compose / 'nats/users.conf'} and its password to "
                f"{args.compose / '.env'}: `docker compose up -d --force-recreate nats` lets it in "
                "(publish NATS's port 4222 for engines on other machines)")
    print(note, file=sys.stderr)
    for name, value in (("DALSTON_NATS_URL", url), ("DALSTON_NATS_USER", user),
                        ("DALSTON_NATS_PASSWORD", password), ("DALSTON_RUNTIME", args.runtime)):
        print(f"{name}={value}")
    return 0


def _add_to_compose(project: Path, name: str, runtime: str, user: str, password: str,
                    catalog: Catalog) -> None:
    nats, env = project / "nats", project / ".env"
    if not (nats / "accounts.conf").is_file() or not env.is_file():
        raise CliError(f"{project} is not a compose project of Dalston's (no nats/accounts.conf or .env)")
    if name in COMPOSE_ENGINES:
        raise CliError(f"{name} is one of compose.yaml's engine services; choose another name")
    variable = password_variable(user)
    lines = [line for line in env.read_text().splitlines() if not line.startswith(f"{variable}=")]
    add_engine(nats / ADDED_ENGINES_FILE, name, {"runtime": runtime})
    (nats / "users.conf").write_text(compose_users_config(catalog, nats))
    env.write_text("\n".join([*lines, f"{variable}={password}", ""]))
