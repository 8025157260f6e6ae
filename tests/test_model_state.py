"""A model's state, as the gateway, the dashboard and the CLI all work it out: installed from
this machine's store, from what live engines report on disk, or from a pull that ended
installed; loaded on the engines that say they hold it."""

from __future__ import annotations

from pathlib import Path

from dalston.catalog import Catalog
from dalston.contracts import Heartbeat, LoadedModel, PullProgress
from dalston.formatting import install_status
from dalston.model_state import ModelState
from dalston.store import ModelStore

TINY = "faster-whisper-tiny.en"


def beat(engine: str, runtime: str = "faster-whisper", on_disk: tuple[str, ...] = (),
         loaded: tuple[str, ...] = ()) -> Heartbeat:
    return Heartbeat(runtime=runtime, engine=engine, host="h", status="idle", version="0",
                     models_on_disk=list(on_disk),
                     loaded_models=[LoadedModel(model=m, runtime_model_id=m, loaded_at=0, last_used=0)
                                    for m in loaded])


def state(catalog: Catalog, store: ModelStore, live=(), pull=None, model: str = TINY) -> ModelState:
    spec = catalog.model(model)
    return ModelState.of(spec, catalog.runtime(spec.runtime), store, live, pull)


def test_nothing_known_is_not_installed(catalog: Catalog, store: ModelStore) -> None:
    assert state(catalog, store) == ModelState(catalog.model(TINY), False, [], None)


def test_installed_in_this_store(catalog: Catalog, store: ModelStore, tmp_path: Path) -> None:
    source = tmp_path / "tiny"
    source.mkdir()
    for name in catalog.runtime("faster-whisper").required_files:
        (source / name).write_text("{}")
    store.import_path(catalog.model(TINY), catalog.runtime("faster-whisper"), source)
    assert state(catalog, store).installed


def test_engines_of_the_runtime_say_what_is_on_disk_and_loaded(catalog: Catalog, store: ModelStore) -> None:
    live = [beat("fw-a", on_disk=("tiny.en",), loaded=(TINY,)), beat("fw-b"),
            # Another runtime's engine that claims the same names is not listened to.
            beat("nemo", runtime="nemo", on_disk=("tiny.en",), loaded=(TINY,))]
    found = state(catalog, store, live)
    assert found.installed and found.loaded_on == ["fw-a"]
    assert not state(catalog, store, live, model="faster-whisper-base").installed


def test_a_pull_that_ended_installed_counts_one_under_way_does_not(catalog: Catalog, store: ModelStore) -> None:
    done = PullProgress(model=TINY, status="installed")
    under_way = PullProgress(model=TINY, status="downloading", completed_bytes=50, total_bytes=200)
    assert state(catalog, store, pull=done).installed
    pulling = state(catalog, store, pull=under_way)
    assert not pulling.installed and pulling.pull == under_way
    assert install_status(pulling.installed, pulling.pull) == "downloading 25%"
    assert install_status(False, PullProgress(model=TINY, status="failed")) == "pull failed"
    assert install_status(True, PullProgress(model=TINY, status="failed")) == "yes"


def test_openai_object(catalog: Catalog, store: ModelStore) -> None:
    pull = PullProgress(model=TINY, status="started", total_bytes=10)
    entry = state(catalog, store, [beat("fw-a", loaded=(TINY,))], pull).openai_object()
    assert entry["id"] == TINY and entry["object"] == "model" and entry["owned_by"] == "faster-whisper"
    assert entry["runtime_model_id"] == "tiny.en" and entry["capabilities"]["word_timestamps"] is True
    assert entry["installed"] is False and entry["loaded_on"] == ["fw-a"]
    assert entry["pull"]["status"] == "started" and entry["pull"]["total_bytes"] == 10
