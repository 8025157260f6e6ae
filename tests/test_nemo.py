"""The NeMo runtime in a running system: a tiny CTC model and a tiny Parakeet-TDT-shaped one
swapped through the gateway, NeMo and faster-whisper jobs side by side, and broken `.nemo`
archives failing their job alone."""

from __future__ import annotations

import importlib
import os
import shutil

import httpx
import msgspec
import numpy as np
import pytest

from dalston.catalog import Catalog, CatalogError
from dalston.config import load_settings
from dalston.pcm import SAMPLE_RATE
from dalston.resources import data_dir
from dalston.store import ModelStore
from tests.stack import AUDIO, DIALOGUE_WORDS, TestStack, heartbeat, submit, wait_for, wait_job, words

if os.environ.get("DALSTON_SKIP_NEMO") == "1":
    pytest.importorskip("nemo.collections.asr")
# Otherwise a missing nemo_toolkit is an error here, not a skip: CI installs it. NeMo is
# imported by the tests that use it, not at collection: its import costs seconds of CPU, and
# every pytest-xdist worker collects every file.


def nemo_actor():
    return importlib.import_module("actors.nemo.actor")


def nemo_models():
    return importlib.import_module("tests.nemo_models")


# Test model id -> its `.nemo` of `nemo_models.build_set`, served as runtime model `test/<name>`.
TINY = {"nemo-tiny-a": "tiny-a", "nemo-tiny-b": "tiny-b"}
BROKEN = {"nemo-corrupt": "corrupt", "nemo-not-asr": "not-asr"}


def letters(model: str) -> set[str]:
    """The letters the tiny model can write (its vocabulary): which model made a transcript."""
    return set({"nemo-tiny-a": nemo_models().LABELS_A, "nemo-tiny-b": nemo_models().LABELS_B}[model])


def _catalog_with(root, files) -> Catalog:
    """The bundled catalog plus one model per test `.nemo`, written under `root`."""
    shutil.copytree(data_dir("catalog"), root)
    for model_id, name in {**TINY, **BROKEN}.items():
        (root / "models" / f"{model_id}.yaml").write_bytes(msgspec.yaml.encode({
            "id": model_id, "runtime": "nemo", "runtime_model_id": f"test/{name}",
            "name": f"Test {model_id}", "size_bytes": files[name].stat().st_size,
            "sources": [{"local": {"path": str(files[name])}}]}))
    return Catalog.load(root)


@pytest.fixture(scope="module")
def nemo_stack(tmp_path_factory):
    """NATS, the pipeline, a nemo engine and a faster-whisper engine, on a catalog that knows
    the test models; the working ones imported into the store, the broken ones left for the
    engine to pull from their local source."""
    root = tmp_path_factory.mktemp("nemo")
    files = nemo_models().build_set(root / "built")
    catalog = _catalog_with(root / "catalog", files)
    system = TestStack(root, DALSTON_CATALOG_DIR=str(root / "catalog"))
    store = ModelStore(system.settings.models_path)
    for model_id, name in TINY.items():
        store.import_path(catalog.model(model_id), catalog.runtime("nemo"), files[name])
    system.start_nats()
    system.start_pipeline()
    system.start_engine("nemo", DALSTON_MAX_LOADED_MODELS="1")  # one slot: every switch a swap
    system.start_engine("faster-whisper", "fw")
    system.wait_engines("audio-prepare", "merge", "nemo", "fw", timeout=120)
    yield system
    system.close()


def transcribe(stack, model: str) -> dict:
    with open(AUDIO / "dialogue.wav", "rb") as audio:
        response = httpx.post(f"{stack.url}/v1/audio/transcriptions", files={"file": audio}, data={
            "model": model, "response_format": "verbose_json",
            "timestamp_granularities[]": ["word", "segment"]}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def assert_well_formed(result: dict, model: str) -> None:
    assert result["words"] and result["segments"]
    assert set(result["text"]) <= letters(model)
    for items in (result["words"], result["segments"]):
        starts = [item["start"] for item in items]
        assert starts == sorted(starts)
        assert all(0 <= item["start"] <= item["end"] <= result["duration"] for item in items)
        assert all(isinstance(item["start"], float) for item in items)


def test_the_catalog_sets_the_window_length(tmp_path):
    """Long audio goes to the model in windows of the runtime's `chunk_seconds`: contiguous,
    none longer; a catalog whose windows are too short to cut in is refused at start."""
    nemo = nemo_actor()
    actor = nemo.NemoActor(load_settings({}))
    assert actor.chunk_seconds == Catalog.load().runtime("nemo").chunk_seconds
    audio = np.random.default_rng(0).standard_normal(SAMPLE_RATE * (2 * actor.chunk_seconds + 10))
    windows = list(nemo._windows(audio.astype(np.float32), actor.chunk_seconds))
    assert len(windows) == 3 and windows[0][0] == 0
    assert all(start + len(w) == following for (start, w), (following, _) in zip(windows, windows[1:]))
    assert windows[-1][0] + len(windows[-1][1]) == len(audio)
    assert all(len(w) <= actor.chunk_seconds * SAMPLE_RATE for _, w in windows)

    shutil.copytree(data_dir("catalog"), tmp_path / "catalog")
    runtime = tmp_path / "catalog" / "runtimes" / "nemo.yaml"
    runtime.write_text(runtime.read_text().replace(f"chunk_seconds: {actor.chunk_seconds}",
                                                   f"chunk_seconds: {nemo.CUT_SEARCH_SECONDS}"))
    with pytest.raises(CatalogError, match="chunk_seconds"):
        nemo.NemoActor(load_settings({"DALSTON_CATALOG_DIR": str(tmp_path / "catalog")}))


def test_a_window_ends_in_the_pause_of_its_last_seconds():
    """The cut found as the chunker finds its own (`dalston.chunking.quietest`): in half a
    second of near silence, not at a 20 ms gap inside speech."""
    chunk = 20
    audio = np.random.default_rng(1).standard_normal(SAMPLE_RATE * (chunk + 15)).astype(np.float32)
    pause = slice(int((chunk - 4) * SAMPLE_RATE), int((chunk - 3.5) * SAMPLE_RATE))
    audio[pause] *= 0.05
    audio[int((chunk - 1.5) * SAMPLE_RATE):][:SAMPLE_RATE // 50] = 0  # a plosive's gap
    (first, window), _ = list(nemo_actor()._windows(audio, chunk))
    assert first == 0 and pause.start < len(window) < pause.stop


async def settled(bus, tasks_done: int):
    """The nemo engine's heartbeat once it is idle after its `tasks_done`-th task."""
    async def beat():
        hb = await heartbeat(bus, "nemo", "nemo")
        return hb if hb.tasks_done == tasks_done and hb.status == "idle" else None
    return await wait_for(beat, 30)


async def test_swapping_between_two_nemo_models(nemo_stack):
    """CTC and TDT alternately on one engine: both decode to timed words, and memory is handed
    back at every unload."""
    bus = await nemo_stack.bus()
    try:
        done = (await heartbeat(bus, "nemo", "nemo")).tasks_done
        assert_well_formed(transcribe(nemo_stack, "nemo-tiny-a"), "nemo-tiny-a")
        first = await settled(bus, done + 1)
        rss_after = {}
        for swap in range(1, 11):
            model, previous = ("nemo-tiny-b", "nemo-tiny-a") if swap % 2 else ("nemo-tiny-a", "nemo-tiny-b")
            assert_well_formed(transcribe(nemo_stack, model), model)
            hb = await settled(bus, done + 1 + swap)
            assert [m.runtime_model_id for m in hb.loaded_models] == [f"test/{TINY[model]}"]
            assert hb.model_loads == first.model_loads + swap
            assert hb.swaps == first.swaps + swap
            assert hb.last_unload.model == previous
            assert hb.last_unload.rss_before > 0 and hb.last_unload.rss_after > 0
            rss_after[swap] = hb.last_unload.rss_after
        # Memory handed back at every unload: no growth from the 2nd swap to the 10th.
        assert rss_after[10] < rss_after[2] * 1.15, rss_after
    finally:
        await bus.close()


async def test_each_runtime_gets_its_own_jobs(nemo_stack):
    jobs = {model: submit(nemo_stack, AUDIO / "dialogue.wav", model)
            for model in ("nemo-tiny-b", "faster-whisper-tiny.en", "parakeet-tdt-0.6b-v2")}
    done = {model: await wait_job(nemo_stack, job_id) for model, job_id in jobs.items()}
    engines = {model: record["tasks"]["transcribe-0"]["engine"] for model, record in done.items()}
    assert engines == {"nemo-tiny-b": "nemo", "faster-whisper-tiny.en": "fw",
                       "parakeet-tdt-0.6b-v2": "nemo"}
    assert done["nemo-tiny-b"]["status"] == done["faster-whisper-tiny.en"]["status"] == "completed"
    transcript = httpx.get(f"{nemo_stack.url}/v1/jobs/{jobs['faster-whisper-tiny.en']}/transcript",
                           params={"format": "json"}).json()
    assert words(transcript["text"]) == DIALOGUE_WORDS
    # The real Parakeet is on the Hub, which tests cannot reach: the nemo engine says so.
    parakeet = done["parakeet-tdt-0.6b-v2"]
    assert parakeet["status"] == "failed"
    assert parakeet["failure"]["code"] == "model_unavailable"
    assert "HF_HUB_OFFLINE" in parakeet["failure"]["message"]


@pytest.mark.parametrize("model, reason", [
    ("nemo-corrupt", "not a loadable NeMo archive"),
    ("nemo-not-asr", "EncDecSpeakerLabelModel, not a speech recognition model"),
])
async def test_a_broken_nemo_fails_its_job_and_the_engine_serves_on(nemo_stack, model, reason):
    record = await wait_job(nemo_stack, submit(nemo_stack, AUDIO / "dialogue.wav", model))
    assert record["status"] == "failed"
    assert record["failure"]["code"] == "invalid_model"
    assert f"test/{BROKEN[model]}" in record["failure"]["message"] and reason in record["failure"]["message"]
    assert nemo_stack.processes["nemo"].poll() is None
    assert_well_formed(transcribe(nemo_stack, "nemo-tiny-a"), "nemo-tiny-a")
