"""Diarization with the default models (resemblyzer-ge2e beside faster-whisper-base), one row per
recording: the real conversations of tests/data/conversations and espeak-ng conversations.

- DER (0.25 s collar) without the speaker count and with it, and whether the count found is
  right: the GE2E diarizer in-process. Targets: count right, DER <= 0.20 found, <= 0.15 given,
  except where the recording's overlap floor (tests/data/conversations/README.md) is above that.
- Wall time of a job without and with `diarize=true` through the whole system (diarize runs
  beside transcription on an engine of its own), and their ratio. Target: <= 1.3.
- WER and cpWER (bench/wer.py) where the words are known (`<name>.stm`).
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

import httpx
import soundfile

from actors.diarize.actor import DiarizeActor
from bench.conversations import THREE_VOICES, TWO_VOICES, Recording, conversation, der, recordings
from bench.wer import cpwer, wer
from dalston.catalog import Catalog
from dalston.config import load_settings
from dalston.contracts import DiarizeOptions
from dalston.loopback import LoopbackStack
from dalston.pcm import SAMPLE_RATE
from dalston.pull import pull
from dalston.store import ModelStore

DIARIZER = "resemblyzer-ge2e"
MODEL = "faster-whisper-base"
ROUNDS = 2


def synthetic() -> list[Recording]:
    return [Recording(f"espeak_{len(voices)}voices_{seed}", talk.audio, talk.turns, None)
            for voices in (TWO_VOICES, THREE_VOICES) for seed in range(2)
            for talk in [conversation(voices, turns=10, seed=seed)]]


def _diarization_rows(root: Path, talks: list[Recording]) -> dict[str, str]:
    catalog = Catalog.load()
    path = pull(catalog.model(DIARIZER), catalog.runtime("diarize"), ModelStore(root / "models"))
    actor = DiarizeActor(load_settings({}))
    handle = actor.load(DIARIZER, path)
    rows = {}
    try:
        for talk in talks:
            count = len(talk.speakers)
            started = time.perf_counter()
            found, turns = handle.diarize(talk.audio, DiarizeOptions(), threading.Event())
            seconds = time.perf_counter() - started
            _, told = handle.diarize(talk.audio, DiarizeOptions(num_speakers=count), threading.Event())
            rows[talk.name] = (f"{talk.name:22s} {len(talk.audio) / SAMPLE_RATE:4.0f} s  speakers {count} "
                               f"found {len(found)} {'right' if len(found) == count else 'WRONG'}  DER found "
                               f"{der(talk.turns, turns):.3f} given {der(talk.turns, told):.3f}  RTF "
                               f"{seconds * SAMPLE_RATE / len(talk.audio):.3f}")
    finally:
        actor.unload(handle)
    return rows


def _job(client: httpx.Client, url: str, path: Path, diarize: bool) -> tuple[float, dict]:
    started = time.perf_counter()
    with path.open("rb") as audio:
        response = client.post(f"{url}/v1/audio/transcriptions", files={"file": audio},
                               data={"model": MODEL, "response_format": "verbose_json",
                                     "timestamp_granularities[]": "word",
                                     **({"diarize": "true"} if diarize else {})})
    response.raise_for_status()
    return time.perf_counter() - started, response.json()


def _job_columns(root: Path, talks: list[Recording]) -> dict[str, str]:
    stack = LoopbackStack(root, DALSTON_LOG_LEVEL="WARNING", DALSTON_DEFAULT_MODEL=MODEL,
                          DALSTON_CPU_THREADS="1")
    stack.start_nats()
    columns = {}
    try:
        stack.start_pipeline()
        stack.start_engine("faster-whisper", "fw", DALSTON_PRELOAD_MODEL=MODEL)
        stack.start_engine("diarize", "dz", DALSTON_PRELOAD_MODEL=DIARIZER)
        stack.wait_engines("audio-prepare", "merge", "fw", "dz", timeout=300)
        with httpx.Client(timeout=600) as client:
            for talk in talks:
                path = root / f"{talk.name}.wav"
                soundfile.write(path, talk.audio, SAMPLE_RATE)
                if not columns:  # the first job of each kind loads what it needs
                    _job(client, stack.url, path, False), _job(client, stack.url, path, True)
                plain, diarized = [], []
                for _ in range(ROUNDS):  # interleaved, so drift hits both sides alike
                    seconds, answer = _job(client, stack.url, path, False)
                    plain.append(seconds)
                    seconds, answer = _job(client, stack.url, path, True)
                    diarized.append(seconds)
                p, d = statistics.median(plain), statistics.median(diarized)
                column = f"  job {p:5.2f} s, diarized {d:5.2f} s, ratio {d / p:4.2f}"
                if talk.words:
                    said = [(s.get("speaker") or "", s["text"]) for s in answer["segments"]]
                    column += f"  WER {wer(talk.words, said):.3f} cpWER {cpwer(talk.words, said):.3f}"
                columns[talk.name] = column
    finally:
        stack.close()
    return columns


def run(root: Path) -> list[str]:
    talks = recordings() + synthetic()
    rows = _diarization_rows(root, talks)
    columns = _job_columns(root, talks)
    return ([f"diarization: default models ({DIARIZER}, {MODEL} 1 thread); targets: count right, DER found "
             f"<= 0.20, given <= 0.15 (where the overlap floor allows), ratio <= 1.3"]
            + [rows[t.name] + columns.get(t.name, "") for t in talks])
