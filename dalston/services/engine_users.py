"""The NATS users of a deployment's engines: who they are, and which task queues each may take.

An engine's user may take tasks only from its runtime's queues, which the catalog names (one per
model of the runtime, as the admin step makes them: dalston/services/layout.py), so the users'
config is made with the catalog: `dalston up` makes its own at each start;
compose's, nats/users.conf, is this module's output for compose's engine services and those added
with `dalston engines add --compose`:

    python -m dalston.services.engine_users > nats/users.conf

(again after the catalog, DALSTON_CATALOG_DIR, gains a model). Engines added by `dalston engines
add` are kept in a file of name -> {runtime[, password]}: in DALSTON_HOME for `dalston up` (with
its password, 0600), and nats/engines.json for compose (whose passwords are in .env).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dalston.bus.credentials import write_private
from dalston.bus.permissions import COMPOSE_ENGINES, users_config
from dalston.catalog import Catalog
from dalston.config import load_settings
from dalston.contracts import task_consumer
from dalston.resources import data_dir
from dalston.services.layout import task_queues

# `dalston up`'s added engines, in DALSTON_HOME; compose's, beside nats/users.conf.
ADDED_ENGINES_FILE = "engines.json"


def runtime_queues(catalog: Catalog) -> dict[str, list[str]]:
    """Each runtime's task queues (TASKS consumers): one per model of it, and one for no model."""
    queues: dict[str, list[str]] = {}
    for runtime, runtime_model_id in task_queues(catalog):
        queues.setdefault(runtime, []).append(task_consumer(runtime, runtime_model_id))
    return queues


def added_engines(path: Path) -> dict[str, dict[str, str]]:
    """The engines `dalston engines add` kept in `path` (none where it is missing)."""
    try:
        added = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    if not isinstance(added, dict) or not all(
            isinstance(entry, dict) and isinstance(entry.get("runtime"), str) for entry in added.values()):
        raise ValueError(f"{path} is not a list of added engines (name -> runtime)")
    return added


def add_engine(path: Path, name: str, entry: dict[str, str]) -> None:
    write_private(path, {**added_engines(path), name: entry})


def compose_users_config(catalog: Catalog, nats_dir: Path) -> str:
    """nats/users.conf: compose's engine services, and the engines added for compose."""
    added = {name: entry["runtime"] for name, entry in added_engines(nats_dir / ADDED_ENGINES_FILE).items()}
    return users_config({**COMPOSE_ENGINES, **added}, runtime_queues(catalog))


if __name__ == "__main__":
    sys.stdout.write(compose_users_config(Catalog.from_settings(load_settings()), data_dir("nats")))
