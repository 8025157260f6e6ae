"""The model store: one directory per installed model, under one folder per runtime.

`<root>/<runtime store_dir>/<runtime_model_id with / as -->/`. A model directory appears only
by one `os.rename` of a checked staging directory (`.partial-<name>@<random>`), so a directory
under its final name is always complete; staging directories a crash left behind are removed
the next time the model's lock is taken. Every id is checked before it touches the file system.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from dalston.catalog import ModelSpec, RuntimeSpec, is_model_id, is_runtime_model_id
from dalston.logs import get_logger

log = get_logger(__name__)

_PARTIAL = ".partial-"
# Ends a model's name in staging names: `@` is outside the id alphabet, so the staging
# directories of `large-v3` can never be mistaken for those of `large-v3-turbo`.
_END = "@"
_LOCK = ".lock-"


class InvalidModelId(ValueError):
    """An id that could escape the store or is not a valid model id."""


class IncompleteModel(ValueError):
    """A directory that is not a usable model of its runtime; the message says what is wrong."""


class ModelStore:
    """Installed models of every runtime, under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        # Threads of one process wait here before the file lock, which orders processes.
        self._thread_locks: dict[Path, threading.Lock] = {}
        self._guard = threading.Lock()

    # --- paths --------------------------------------------------------------------------

    def path(self, store_dir: str, runtime_model_id: str) -> Path:
        """The directory of one model; refuses any id that could leave the store."""
        if not is_runtime_model_id(runtime_model_id):
            raise InvalidModelId(f"invalid model id {runtime_model_id!r}")
        folder = self._runtime_dir(store_dir)
        path = folder / _dir_name(runtime_model_id)
        # Belt and braces: whatever the id check lets through must still land right inside the
        # runtime's folder. Normalised, not resolved: a runtime folder symlinked elsewhere
        # by the admin is fine.
        if Path(os.path.abspath(path)).parent != Path(os.path.abspath(folder)):
            raise InvalidModelId(f"model id {runtime_model_id!r} leaves the store")
        return path

    def _runtime_dir(self, store_dir: str) -> Path:
        if not is_model_id(store_dir):
            raise InvalidModelId(f"invalid runtime store directory {store_dir!r}")
        return self.root / store_dir

    # --- queries ------------------------------------------------------------------------

    def is_installed(self, runtime: RuntimeSpec, runtime_model_id: str) -> bool:
        path = self.path(store_dir_of(runtime), runtime_model_id)
        return path.is_dir() and not _problems(path, runtime.required_files)

    def installed(self, store_dir: str, required_files: Sequence[str] = ()) -> list[str]:
        """Runtime model ids installed under `store_dir` (with `required_files`, if given)."""
        folder = self._runtime_dir(store_dir)
        if not folder.is_dir():
            return []
        # Staging (hidden) and foreign directories are skipped, not reported.
        return sorted(
            _model_id(entry.name) for entry in folder.iterdir()
            if is_runtime_model_id(_model_id(entry.name)) and entry.is_dir()
            and not _problems(entry, required_files)
        )

    def size_of(self, store_dir: str, runtime_model_id: str) -> int:
        """Bytes on disk of one installed model (0 if absent)."""
        path = self.path(store_dir, runtime_model_id)
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0

    # --- changes ------------------------------------------------------------------------

    @contextmanager
    def lock(self, store_dir: str, runtime_model_id: str) -> Iterator[None]:
        """Hold the model's lock (threads and processes), removing stale staging directories."""
        final = self.path(store_dir, runtime_model_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        with self._guard:
            thread_lock = self._thread_locks.setdefault(final, threading.Lock())
        with thread_lock, open(final.parent / f"{_LOCK}{final.name}", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                # Holding the lock, no one else is staging this model: any partial is stale.
                for stale in final.parent.glob(f"{_PARTIAL}{final.name}{_END}*"):
                    log.info("removing stale partial model", path=str(stale))
                    shutil.rmtree(stale, ignore_errors=True)
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextmanager
    def staging(self, store_dir: str, runtime_model_id: str) -> Iterator[Path]:
        """A fresh staging directory next to the model's final place; gone afterwards
        unless `commit` moved it into place. Take `lock` first."""
        final = self.path(store_dir, runtime_model_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=f"{_PARTIAL}{final.name}{_END}", dir=final.parent))
        try:
            yield staged
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def commit(self, runtime: RuntimeSpec, runtime_model_id: str, staged: Path) -> Path:
        """Check `staged` is a complete model and rename it into place, replacing any old one.

        For a runtime whose model is one file (NeMo's `model.nemo`), a lone file of the same
        kind is first given that name, so sources can ship it under its own name.
        """
        final = self.path(store_dir_of(runtime), runtime_model_id)
        _name_single_file(staged, runtime.required_files)
        problems = _problems(staged, runtime.required_files, check_json=True)
        if problems:
            raise IncompleteModel(f"{runtime_model_id}: " + "; ".join(problems))
        if final.exists():
            self._discard(final)
        os.rename(staged, final)
        log.info("model installed", runtime=runtime.id, model=runtime_model_id, path=str(final))
        return final

    def remove(self, store_dir: str, runtime_model_id: str) -> bool:
        """Delete an installed model; False if it was not there."""
        final = self.path(store_dir, runtime_model_id)
        with self.lock(store_dir, runtime_model_id):
            if not final.exists():
                return False
            self._discard(final)
        log.info("model removed", store_dir=store_dir, model=runtime_model_id)
        return True

    def import_path(self, model: ModelSpec, runtime: RuntimeSpec, src: Path) -> Path:
        """Install `model` from a local directory, or from one file for single-file runtimes
        (a `.nemo` becomes `model.nemo`); replaces an installed copy."""
        store_dir = store_dir_of(runtime)
        src = Path(src)
        if not src.exists():
            raise FileNotFoundError(f"{src}: no such file or directory")
        with self.lock(store_dir, model.runtime_model_id), \
                self.staging(store_dir, model.runtime_model_id) as staged:
            copy_into(src, staged)
            return self.commit(runtime, model.runtime_model_id, staged)

    def _discard(self, path: Path) -> None:
        # Renamed away first, so the final name disappears in one step, then deleted.
        doomed = Path(tempfile.mkdtemp(prefix=f"{_PARTIAL}{path.name}{_END}", dir=path.parent))
        os.rename(path, doomed / path.name)
        shutil.rmtree(doomed, ignore_errors=True)


def copy_into(src: Path, dest: Path) -> dict[str, int]:
    """Copy a directory's contents (or one file) into `dest`; returns each file's size."""
    if src.is_dir():
        shutil.copytree(src, dest, dirs_exist_ok=True)
        files = [f for f in src.rglob("*") if f.is_file()]
        return {f.relative_to(src).as_posix(): f.stat().st_size for f in files}
    shutil.copyfile(src, dest / src.name)
    return {src.name: src.stat().st_size}


def store_dir_of(runtime: RuntimeSpec) -> str:
    """The runtime's folder in the store; refuses runtimes that take no models."""
    if runtime.store_dir is None:
        raise InvalidModelId(f"runtime {runtime.id!r} has no models")
    return runtime.store_dir


def _dir_name(runtime_model_id: str) -> str:
    return runtime_model_id.replace("/", "--")


def _model_id(dir_name: str) -> str:
    return dir_name.replace("--", "/")


def _problems(folder: Path, required_files: Sequence[str], check_json: bool = False) -> list[str]:
    """What keeps `folder` from being a complete model: missing or empty files, bad JSON."""
    problems = []
    for name in required_files:
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size == 0:
            problems.append(f"{name} is empty")
    if check_json:
        for path in sorted(folder.glob("*.json")):
            try:
                json.loads(path.read_bytes())
            except ValueError as exc:
                problems.append(f"{path.name} is not valid JSON ({exc})")
    return problems


def _name_single_file(staged: Path, required_files: Sequence[str]) -> None:
    if len(required_files) != 1 or (staged / required_files[0]).exists():
        return
    target = staged / required_files[0]
    candidates = [f for f in staged.iterdir() if f.is_file() and f.suffix == target.suffix]
    if len(candidates) == 1:
        candidates[0].rename(target)
