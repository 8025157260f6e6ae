"""`dalston models [list|pull|rm|import]`: the catalog and this machine's model store.

`pull`, `rm` and `import` work on the local store (DALSTON_MODELS_DIR) with the same code as
the gateway and engines; the list comes from the gateway when one answers, else from the store.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import msgspec

from dalston.catalog import Catalog, ModelSpec, UnknownModel, is_model_id
from dalston.cli.client import add_server_option, probe
from dalston.cli.output import CliError, StatusLine, add_json_option, bar, print_json, table
from dalston.config import Settings
from dalston.contracts import PullProgress
from dalston.formatting import install_status, size
from dalston.model_state import ModelState
from dalston.store import IncompleteModel, InvalidModelId, ModelStore, store_dir_of


def register(commands) -> None:
    models = commands.add_parser("models", help="list, pull, remove or import models")
    add_server_option(models)
    add_json_option(models)
    models.set_defaults(func=_list)
    actions = models.add_subparsers(dest="action", metavar="ACTION")
    listing = actions.add_parser("list", help="the catalog: installed where, loaded where")
    listing.set_defaults(func=_list)
    pull = actions.add_parser("pull", help="download a model into the local store")
    pull.add_argument("id", metavar="ID")
    pull.add_argument("--force", action="store_true", help="download again even if installed")
    pull.set_defaults(func=_pull)
    remove = actions.add_parser("rm", help="remove a model from the local store")
    remove.add_argument("id", metavar="ID")
    remove.add_argument("--force", action="store_true", help="even while an engine has it loaded")
    remove.set_defaults(func=_remove)
    imported = actions.add_parser("import", help="install a model from a folder or a .nemo file")
    imported.add_argument("id", metavar="ID")
    imported.add_argument("path", type=Path, metavar="PATH")
    imported.set_defaults(func=_import)
    for action in (listing, pull, remove, imported):
        add_server_option(action, default=argparse.SUPPRESS)
        add_json_option(action, default=argparse.SUPPRESS)


def _list(args, settings: Settings) -> int:
    client = probe(args, settings)
    entries = client.get("/v1/models")["data"] if client else _local_entries(settings)
    if args.json:
        print_json(entries)
        return 0
    print(table(["id", "runtime", "languages", "size", "installed", "loaded on"], [
        (e["id"], e["runtime"], ",".join(e.get("languages") or []) or "any", size(e.get("size_bytes")),
         _install_status(e), ",".join(e.get("loaded_on") or []) or "-") for e in entries]))
    return 0


def _install_status(entry: dict[str, Any]) -> str:
    pull = msgspec.convert(entry["pull"], PullProgress) if entry.get("pull") else None
    return install_status(bool(entry.get("installed")), pull)


def _local_entries(settings: Settings) -> list[dict[str, Any]]:
    """The gateway's model objects, as far as this machine knows without it."""
    catalog, store = Catalog.from_settings(settings), ModelStore(settings.models_path)
    return [ModelState.of(m, catalog.runtime(m.runtime), store).openai_object() for m in catalog.models.values()]


def _model(catalog: Catalog, model_id: str) -> ModelSpec:
    # Checked before anything touches the file system; a bad id is a usage error (exit 2).
    if not is_model_id(model_id):
        raise CliError(f"invalid model id {model_id!r}: use an id of `dalston models`", code=2)
    try:
        return catalog.model(model_id)
    except UnknownModel as exc:
        raise CliError(str(exc), code=2) from None


def _pull(args, settings: Settings) -> int:
    from dalston.pull import PullError, pull

    catalog = Catalog.from_settings(settings)
    model = _model(catalog, args.id)
    with StatusLine() as line:
        def show(progress: PullProgress) -> None:
            line.show(f"{model.id} {progress.status} {bar(progress.completed_bytes, progress.total_bytes)}"
                      f"  {progress.source}")

        try:
            path = pull(model, catalog.runtime(model.runtime), ModelStore(settings.models_path), show,
                        force=args.force)
        except PullError as exc:
            raise CliError(str(exc)) from None
    _done(args, {"id": model.id, "status": "installed", "path": str(path)}, f"{model.id} installed in {path}")
    return 0


def _remove(args, settings: Settings) -> int:
    catalog = Catalog.from_settings(settings)
    model = _model(catalog, args.id)
    client = probe(args, settings)
    if client and not args.force:
        engines = client.get(f"/v1/models/{model.id}").get("loaded_on") or []
        if engines:
            raise CliError(f"{model.id} is loaded on {', '.join(engines)}; "
                           "remove it anyway with --force")
    store_dir = store_dir_of(catalog.runtime(model.runtime))
    if not ModelStore(settings.models_path).remove(store_dir, model.runtime_model_id):
        raise CliError(f"{model.id} is not installed in {settings.models_path}")
    _done(args, {"id": model.id, "deleted": True}, f"{model.id} removed")
    return 0


def _import(args, settings: Settings) -> int:
    catalog = Catalog.from_settings(settings)
    model = _model(catalog, args.id)
    try:
        path = ModelStore(settings.models_path).import_path(model, catalog.runtime(model.runtime), args.path)
    except (FileNotFoundError, IncompleteModel, InvalidModelId) as exc:
        raise CliError(f"cannot import {model.id}: {exc}") from None
    _done(args, {"id": model.id, "status": "installed", "path": str(path)}, f"{model.id} imported into {path}")
    return 0


def _done(args, answer: dict[str, Any], text: str) -> None:
    if args.json:
        print_json(answer)
    else:
        print(text)
