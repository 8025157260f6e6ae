"""A job that asks who spoke against the same job without, through the whole system with the
default model (faster-whisper-base): diarize runs beside transcription on an engine of its own,
so the diarized job should take little longer. Target: ratio <= 1.3."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import httpx
import soundfile

from bench.conversations import TWO_VOICES, conversation, der
from dalston.contracts import SpeakerTurn
from dalston.loopback import LoopbackStack
from dalston.pcm import SAMPLE_RATE

MODEL = "faster-whisper-base"
ROUNDS = 3


def _job(client: httpx.Client, url: str, path: Path, diarize: bool) -> tuple[float, dict]:
    started = time.perf_counter()
    with path.open("rb") as audio:
        response = client.post(f"{url}/v1/audio/transcriptions", files={"file": audio},
                               data={"model": MODEL, "response_format": "verbose_json",
                                     "timestamp_granularities[]": "word",
                                     **({"diarize": "true"} if diarize else {})})
    response.raise_for_status()
    return time.perf_counter() - started, response.json()


def run(root: Path) -> list[str]:
    talk = conversation(TWO_VOICES, turns=16, seed=0)
    path = root / "conversation.wav"
    soundfile.write(path, talk.audio, SAMPLE_RATE)
    duration = len(talk.audio) / SAMPLE_RATE
    stack = LoopbackStack(root, DALSTON_LOG_LEVEL="WARNING", DALSTON_DEFAULT_MODEL=MODEL,
                          DALSTON_CPU_THREADS="1")
    stack.start_nats()
    try:
        stack.start_pipeline()
        stack.start_engine("faster-whisper", "fw", DALSTON_PRELOAD_MODEL=MODEL)
        stack.start_engine("diarize", "dz", DALSTON_PRELOAD_MODEL="resemblyzer-ge2e")
        stack.wait_engines("audio-prepare", "merge", "fw", "dz", timeout=300)
        plain, diarized = [], []
        with httpx.Client(timeout=600) as client:
            _job(client, stack.url, path, False), _job(client, stack.url, path, True)  # warm both
            for _ in range(ROUNDS):  # interleaved, so drift hits both sides alike
                plain.append(_job(client, stack.url, path, False)[0])
                seconds, answer = _job(client, stack.url, path, True)
                diarized.append(seconds)
        found = [SpeakerTurn(start=s["start"], end=s["end"], speaker=s["speaker"]) for s in answer["segments"]]
        p, d = statistics.median(plain), statistics.median(diarized)
        return [f"diarized job {duration:.0f} s of two voices, {MODEL}, 1 thread each: without "
                f"{p:5.2f} s, with diarization {d:5.2f} s, ratio {d / p:4.2f} (target <= 1.3); "
                f"speakers {len({t.speaker for t in found})}, DER of the words' speakers "
                f"{der(talk.turns, found):.3f}"]
    finally:
        stack.close()
