"""The diarize runtime with the real GE2E encoder (Resemblyzer's weights as ONNX, pulled into
the store from the catalog folder): its embeddings against Resemblyzer's own on torch, real
speech, conversations of espeak-ng voices scored by DER, and an engine running `diarize` tasks
straight off NATS, killed mid-task."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import threading
import uuid

import numpy as np
import pytest
from faster_whisper.audio import decode_audio

from actors.diarize import linkage
from actors.diarize.actor import DiarizeActor
from actors.diarize.ge2e import WEIGHTS
from bench.conversations import THREE_VOICES, TWO_VOICES, conversation, der, recordings
from dalston.catalog import Catalog
from dalston.config import load_settings
from dalston.contracts import (
    Diarization,
    DiarizeOptions,
    ModelRef,
    Segment,
    TaskEvent,
    TranscribeOptions,
    decode,
    encode,
    task_subject,
)
from dalston.pcm import DTYPE, SAMPLE_RATE
from dalston.pull import pull
from dalston.sdk import TaskFailed
from dalston.speakers import assign_speakers
from dalston.store import ModelStore
from dalston.services.task_objects import TaskObjects
from tests.stack import AUDIO, TestStack, heartbeat, wait_for
from tests.task_records import running_task

MODEL = "resemblyzer-ge2e"
MAX_DER = 0.15
# Issue 18's targets on real speech: DER without the speaker count, and with it.
MAX_DER_FOUND, MAX_DER_GIVEN = 0.20, 0.15
# The real recordings' overlap floors (tests/data/conversations/README.md): the least DER a
# diarizer that gives each instant one speaker can reach. A target under its floor is not asked.
FLOORS = {"call_2spk": 0.08, "ami_2spk_a": 0.05, "ami_2spk_b": 0.08, "ami_3spk_a": 0.18, "ami_3spk_b": 0.14,
          "ami_4spk_a": 0.26, "ami_4spk_b": 0.51, "ami_2spk_c": 0.00, "ami_3spk_c": 0.12, "read_3spk": 0.00}
# Where the GE2E diarizer falls short today (bench/diarization.py has the numbers): strict, so
# that a fix shows here.
SHORT = {
    "ami_2spk_a": "count right, but DER 0.24 (Silero misses 0.14 of the speech, confusion 0.10)",
    "ami_2spk_b": "count right, but DER 0.16 with the count (Silero misses 0.13 of the speech)",
    "ami_3spk_a": "count right, but DER 0.32 (Silero misses 0.18 of the speech, confusion 0.11)",
    "ami_3spk_b": "counts 2 speakers (3): the other two have 3-4 s of speech each",
    "ami_4spk_a": "counts 1 speaker (4): Silero finds a third of its 11 s of speech (the rest is quiet, "
                  "muffled talk)",
    "ami_4spk_b": "counts 1 speaker (4): half of its speech is overlapped",
    "ami_2spk_c": "counts 1 speaker (2): MEE067 says 1.2 s of 30, one window (DER 0.07 found, 0.29 given)",
    "ami_3spk_c": "counts 1 speaker (3): MEO082 3.2 s and FEE085 1.6 s beside FEE083's 26 s, none of their "
                  "windows apart (DER 0.15 found, 0.47 given)",
}


@pytest.fixture(scope="module")
def ge2e_path(tmp_path_factory):
    catalog = Catalog.load()
    store = ModelStore(tmp_path_factory.mktemp("models"))
    path = pull(catalog.model(MODEL), catalog.runtime("diarize"), store)
    assert (path / WEIGHTS).stat().st_size == catalog.model(MODEL).size_bytes
    return path


@pytest.fixture(scope="module")
def ge2e(ge2e_path):
    actor = DiarizeActor(load_settings({}))
    handle = actor.load(MODEL, ge2e_path)
    yield handle
    actor.unload(handle)


def diarize(handle, audio: np.ndarray, **counts):
    return handle.diarize(audio, DiarizeOptions(**counts), threading.Event())


@pytest.mark.parametrize("rate", [1.25, 4.0])
def test_embeddings_equal_resemblyzers_on_torch(ge2e, rate):
    """The ONNX graph and the numpy mel frames against Resemblyzer's own (torch, librosa, the
    original pretrained.pt), on real speech: the windows, their embeddings and the pooled one."""
    from resemblyzer import VoiceEncoder  # the `diarize` extra, which the tests install
    reference = VoiceEncoder("cpu", verbose=False)
    for name in ("dialogue.wav", "speaker1.wav", "speaker2.wav"):
        audio = decode_audio(str(AUDIO / name))
        expected, expected_windows, expected_slices = reference.embed_utterance(audio, True, rate)
        embedding, windows, slices = ge2e.encoder.embed_utterance(audio, True, rate)
        assert slices == expected_slices and len(slices) > 1
        assert np.abs(windows - expected_windows).max() < 1e-4
        assert np.abs(embedding - expected).max() < 1e-4


def test_the_runtime_diarizes_without_torch_scipy_or_librosa(ge2e_path):
    """What the default install lacks: the GE2E path loads none of it (a fresh interpreter)."""
    code = ("import sys, threading; from pathlib import Path; from faster_whisper.audio import decode_audio;"
            "from actors.diarize.actor import DiarizeActor; from dalston.config import load_settings;"
            "from dalston.contracts import DiarizeOptions;"
            f"h = DiarizeActor(load_settings({{}})).load('{MODEL}', Path({str(ge2e_path)!r}));"
            f"print(h.diarize(decode_audio({str(AUDIO / 'dialogue.wav')!r}), DiarizeOptions(), threading.Event())[0]);"
            "print(sorted({'torch', 'scipy', 'librosa', 'resemblyzer'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["['SPEAKER_0', 'SPEAKER_1']", "[]"]


def test_linkage_is_scipys():
    """The numpy average linkage and flat clusters make scipy's partitions."""
    from scipy.cluster import hierarchy
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 40))
        centres = rng.normal(size=(int(rng.integers(1, 5)), 16))
        points = centres[rng.integers(0, len(centres), n)] + rng.normal(scale=0.5, size=(n, 16))
        ours, theirs = linkage.linkage(points), hierarchy.linkage(points, method="average", metric="cosine")
        assert np.allclose(ours[:, 2], np.sort(theirs[:, 2]))
        cuts = [(t, "distance") for t in (0.1, 0.2, 0.5)] + [(k, "maxclust") for k in range(1, n + 2)]
        for t, criterion in cuts:
            a, b = linkage.fcluster(ours, t, criterion), hierarchy.fcluster(theirs, t, criterion)
            assert len(set(zip(a, b))) == len(set(a)) == len(set(b)), (t, criterion)


def test_the_dialogue_has_two_speakers_one_per_sentence(ge2e):
    speakers, turns = diarize(ge2e, decode_audio(str(AUDIO / "dialogue.wav")))
    assert speakers == ["SPEAKER_0", "SPEAKER_1"]
    # The two sentences (speech at 0.0-2.46 s and 2.91-5.60 s, a pause between).
    sentences = assign_speakers([Segment(start=0.0, end=2.46, text="That was hilarious, ..."),
                                 Segment(start=2.91, end=5.6, text="What do you mean? ...")], turns)
    assert [s.speaker for s in sentences] == ["SPEAKER_0", "SPEAKER_1"]


def test_one_speaker_is_one_speaker(ge2e):
    speakers, turns = diarize(ge2e, decode_audio(str(AUDIO / "speaker1.wav")))
    assert speakers == ["SPEAKER_0"] and len(turns) == 1


def test_silence_has_no_speakers(ge2e):
    assert diarize(ge2e, np.zeros(3 * SAMPLE_RATE, dtype=np.float32)) == ([], [])


@pytest.mark.parametrize("voices, seed", [(TWO_VOICES, 0), (TWO_VOICES, 1), (THREE_VOICES, 0), (THREE_VOICES, 1)])
def test_conversations_of_synthetic_voices(ge2e, voices, seed):
    talk = conversation(voices, turns=10, seed=seed)
    counted, turns = diarize(ge2e, talk.audio)
    assert len(counted) == len(voices)
    assert der(talk.turns, turns) <= MAX_DER
    _, told = diarize(ge2e, talk.audio, num_speakers=len(voices))
    assert der(talk.turns, told) <= MAX_DER


@pytest.fixture(scope="module")
def real_conversations():
    return {talk.name: talk for talk in recordings()}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=SHORT[name]))
                                  if name in SHORT else name for name in FLOORS])
def test_real_conversations(ge2e, real_conversations, name):
    """Real people (tests/data/conversations): the count found is right, and DER is within the
    targets wherever the recording's overlap floor leaves room for them."""
    talk = real_conversations[name]
    counted, turns = diarize(ge2e, talk.audio)
    assert len(counted) == len(talk.speakers)
    if FLOORS[name] < MAX_DER_FOUND:
        assert der(talk.turns, turns) <= MAX_DER_FOUND
    if FLOORS[name] < MAX_DER_GIVEN:
        _, told = diarize(ge2e, talk.audio, num_speakers=len(talk.speakers))
        assert der(talk.turns, told) <= MAX_DER_GIVEN


def test_speaker_bounds_are_obeyed(ge2e):
    talk = conversation(TWO_VOICES, turns=6)
    assert len(diarize(ge2e, talk.audio, min_speakers=3)[0]) == 3
    assert len(diarize(ge2e, talk.audio, max_speakers=1)[0]) == 1
    assert len(diarize(ge2e, talk.audio, min_speakers=1, max_speakers=4)[0]) == 2


def test_a_folder_of_neither_kind_is_an_invalid_model(tmp_path):
    with pytest.raises(TaskFailed) as caught:
        DiarizeActor(load_settings({})).load("nothing", tmp_path)
    assert caught.value.code == "invalid_model" and WEIGHTS in caught.value.message


@pytest.mark.skipif(importlib.util.find_spec("pyannote.audio") is not None, reason="pyannote.audio is installed")
def test_a_pyannote_pipeline_without_pyannote_says_which_extra(tmp_path):
    (tmp_path / "config.yaml").write_text("pipeline: {name: pyannote.audio.pipelines.SpeakerDiarization}\n")
    with pytest.raises(TaskFailed) as caught:
        DiarizeActor(load_settings({})).load("pyannote/speaker-diarization-community-1", tmp_path)
    assert caught.value.code == "invalid_model" and "`pyannote` extra" in caught.value.message


# --- the runtime in an engine ------------------------------------------------------------------


@pytest.fixture(scope="module")
def diarize_stack(tmp_path_factory):
    """NATS and two diarize engines; nothing else (tasks are published straight to NATS)."""
    system = TestStack(tmp_path_factory.mktemp("diarize"))
    system.start_nats()
    for name in ("dz-a", "dz-b"):
        system.start_engine("diarize", name)
    yield system
    system.close()


async def live(bus, *engines: str) -> None:
    async def idle():
        for engine in engines:
            try:
                if (await heartbeat(bus, "diarize", engine)).status != "idle":
                    return False
            except Exception:  # noqa: BLE001 - no beat yet
                return False
        return True
    await wait_for(idle, 120, 0.5)


async def run_task(bus, audio: np.ndarray, options: TranscribeOptions, on_started=None) -> list[TaskEvent]:
    """Store prepared audio, publish a diarize task for it, and collect its events until it ends."""
    job_id = uuid.uuid4().hex
    audio_object = await bus.artifacts.put(f"jobs/{job_id}/prepare/ch0/00000.f32", audio.astype(DTYPE).tobytes())
    events = await bus.js.subscribe(f"events.task.{job_id}")
    # The job's record, whose grant the engine presents for the task's objects (the
    # orchestrator's answers, here without the rest of the orchestrator).
    record, task = running_task(job_id, audio_object, "diarize-0", "diarize", options=options,
                                models={"diarize": ModelRef(model=MODEL, runtime="diarize", runtime_model_id=MODEL)})
    await bus.jobs.create(record)
    objects = TaskObjects(bus)
    await objects.start()
    try:
        await bus.task_consumers.ensure("diarize", MODEL)
        await bus.js.publish(task_subject("diarize", MODEL), encode(task))
        seen = []
        while not seen or seen[-1].kind == "started":
            seen.append(decode((await events.next_msg(timeout=180)).data, TaskEvent))
            if seen[-1].kind == "started" and on_started is not None:
                on_started(seen[-1])
    finally:
        await objects.stop()
    await events.unsubscribe()
    return seen


async def test_an_engine_diarizes_a_task_and_writes_the_turns(diarize_stack):
    bus = await diarize_stack.bus()
    try:
        await live(bus, "dz-a", "dz-b")
        talk = conversation(THREE_VOICES, turns=8, seed=2)
        options = TranscribeOptions(diarize=DiarizeOptions(max_speakers=5))
        *_, ended = await run_task(bus, talk.audio, options)
        assert ended.kind == "completed", ended.failure
        result = decode(await bus.artifacts.read(ended.outputs[0]), Diarization)
        assert result.model == MODEL and result.duration == pytest.approx(len(talk.audio) / SAMPLE_RATE)
        assert len(result.speakers) == 3 and der(talk.turns, result.turns) <= MAX_DER
        beat = await heartbeat(bus, "diarize", ended.engine)
        assert [m.model for m in beat.loaded_models] == [MODEL] and MODEL in beat.models_on_disk
    finally:
        await bus.close()


async def test_a_killed_diarize_engine_hands_its_task_to_another(diarize_stack):
    bus = await diarize_stack.bus()
    try:
        await live(bus, "dz-a", "dz-b")
        talk = conversation(TWO_VOICES, turns=12, seed=3)
        victims = []

        def kill(event: TaskEvent) -> None:
            # As it starts: before its model is loaded, or while it diarizes.
            if not victims:
                victims.append(event.engine)
                diarize_stack.processes[event.engine].send_signal(signal.SIGKILL)

        events = await run_task(bus, talk.audio, TranscribeOptions(), on_started=kill)
        assert events[-1].kind == "completed", events[-1].failure
        assert events[-1].engine != victims[0]
        result = decode(await bus.artifacts.read(events[-1].outputs[0]), Diarization)
        assert len(result.speakers) == 2 and der(talk.turns, result.turns) <= MAX_DER
    finally:
        await bus.close()
        for victim in victims:
            diarize_stack.processes.pop(victim).wait()
            diarize_stack.start_engine("diarize", victim)
