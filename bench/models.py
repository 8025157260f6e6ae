"""Model management costs.

- swap: latency of a job that forces a swap (the engine holds the other model) against loading
  the model and transcribing in-process, same file. Target: ratio <= 1.10.
- affinity: model loads and makespan of mixed two-model traffic on two engines, with and
  without the preference for the model an engine already holds.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import httpx
from faster_whisper import WhisperModel

from bench import AUDIO
from dalston.loopback import LoopbackStack

TINY, BASE = "faster-whisper-tiny.en", "faster-whisper-base"
SWAP_ROUNDS = 5
MIXED_JOBS = 24


def _post(client: httpx.Client, url: str, path: Path, model: str, endpoint: str) -> httpx.Response:
    with path.open("rb") as audio:
        response = client.post(f"{url}{endpoint}", files={"file": audio}, data={"model": model})
    response.raise_for_status()
    return response


def _swap(stack: LoopbackStack, client: httpx.Client) -> str:
    path = AUDIO / "dialogue.wav"
    store = stack.settings.models_path / "faster-whisper"
    swapped, direct = [], []
    for _ in range(SWAP_ROUNDS):
        _post(client, stack.url, path, TINY, "/v1/audio/transcriptions")  # the engine holds tiny.en
        started = time.perf_counter()
        _post(client, stack.url, path, BASE, "/v1/audio/transcriptions")  # swap to base
        swapped.append(time.perf_counter() - started)
        started = time.perf_counter()
        model = WhisperModel(str(store / "base"), device="cpu", compute_type="int8")
        segments, _ = model.transcribe(str(path), beam_size=5, vad_filter=True,
                                       temperature=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
        "".join(s.text for s in segments)
        direct.append(time.perf_counter() - started)
        del model
    s, d = statistics.median(swapped), statistics.median(direct)
    return (f"swap     dialogue.wav tiny.en->base: job with swap {s * 1000:7.1f} ms, in-process "
            f"load+transcribe {d * 1000:7.1f} ms, ratio {s / d:5.2f} (target <= 1.10)")


def _mixed(stack: LoopbackStack, client: httpx.Client, prefer: bool) -> tuple[int, float]:
    names = [f"mix-{'pref' if prefer else 'any'}-{n}" for n in range(2)]
    for name in names:
        stack.start_engine("faster-whisper", name, DALSTON_PREFER_LOADED=str(prefer).lower())
    stack.wait_engines(*names)
    started = time.perf_counter()
    ids = [_post(client, stack.url, AUDIO / "speaker1.wav", TINY if n % 2 else BASE, "/v1/jobs").json()["id"]
           for n in range(MIXED_JOBS)]
    for job_id in ids:
        while client.get(f"{stack.url}/v1/jobs/{job_id}").json()["status"] not in ("completed", "failed"):
            time.sleep(0.05)
    makespan = time.perf_counter() - started
    engines = {e["engine"]: e for e in client.get(f"{stack.url}/v1/engines").json()["data"]}
    loads = sum(engines[n]["model_loads"] for n in names)
    for name in names:
        stack.stop(name)
    return loads, makespan


def run(root: Path) -> list[str]:
    stack = LoopbackStack(root, DALSTON_LOG_LEVEL="WARNING")
    stack.start_nats()
    try:
        stack.start_pipeline()
        stack.start_engine("faster-whisper", "swapper")
        stack.wait_engines("swapper")
        with httpx.Client(timeout=300) as client:
            # Both models into the store first: the swap measures loading, not downloading.
            for model in (TINY, BASE):
                client.post(f"{stack.url}/v1/models/{model}/pull", params={"stream": True}).read()
            lines = [_swap(stack, client)]
            stack.stop("swapper")
            with_pref, without = _mixed(stack, client, True), _mixed(stack, client, False)
        lines.append(
            f"affinity {MIXED_JOBS} jobs alternating tiny.en/base on 2 engines: with preference "
            f"{with_pref[0]} loads in {with_pref[1]:.1f} s, without {without[0]} loads in "
            f"{without[1]:.1f} s (loads ratio {without[0] / with_pref[0]:.1f}x, makespan ratio "
            f"{without[1] / with_pref[1]:.2f}x)")
        return lines
    finally:
        stack.close()
