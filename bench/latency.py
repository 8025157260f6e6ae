"""OpenAI endpoint latency with the model warm, against faster-whisper called in-process on the
same file, model and settings. Target: ratio <= 1.10."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import httpx
from faster_whisper import WhisperModel

from bench import AUDIO
from dalston.loopback import LoopbackStack

FILES = ["dialogue.wav", "speaker1.wav"]
MODEL = "faster-whisper-tiny.en"
ROUNDS = 10


def _in_process(model: WhisperModel, path: Path) -> float:
    started = time.perf_counter()
    segments, _ = model.transcribe(str(path), beam_size=5, vad_filter=True,
                                   temperature=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    "".join(s.text for s in segments)
    return time.perf_counter() - started


def _over_http(client: httpx.Client, url: str, path: Path) -> float:
    started = time.perf_counter()
    with path.open("rb") as audio:
        response = client.post(f"{url}/v1/audio/transcriptions", files={"file": audio},
                               data={"model": MODEL, "response_format": "json"})
    response.raise_for_status()
    return time.perf_counter() - started


def run(root: Path) -> list[str]:
    stack = LoopbackStack(root, DALSTON_LOG_LEVEL="WARNING")
    stack.start_nats()
    try:
        stack.start_pipeline()
        stack.start_engine("faster-whisper", "fw", DALSTON_PRELOAD_MODEL=MODEL)
        stack.wait_engines("audio-prepare", "merge", "fw")
        model = WhisperModel(str(stack.settings.models_path / "faster-whisper" / "tiny.en"),
                             device="cpu", compute_type="int8")
        lines = []
        with httpx.Client(timeout=120) as client:
            for name in FILES:
                path = AUDIO / name
                _over_http(client, stack.url, path), _in_process(model, path)  # warm both
                http, local = [], []
                for _ in range(ROUNDS):  # interleaved, so drift hits both sides alike
                    http.append(_over_http(client, stack.url, path))
                    local.append(_in_process(model, path))
                h, l = statistics.median(http), statistics.median(local)
                lines.append(f"latency {name:<14} {MODEL}: endpoint {h * 1000:7.1f} ms, "
                             f"in-process {l * 1000:7.1f} ms, ratio {h / l:5.2f} (target <= 1.10)")
        return lines
    finally:
        stack.close()
