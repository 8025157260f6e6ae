"""An engine's memory across swaps, with and without its allocator settings.

Two child processes each swap tiny.en and base ten times in-process, loading, transcribing and
unloading on worker threads as an engine does, and calling `memory.release` after each unload.
One runs on glibc's defaults; the other as engines run (`limit_malloc_arenas`, loads inside
`large_blocks_mapped`). Printed side by side: RSS right after each unload (its spread is what
creeps), RSS while base is loaded, and transcription speed. Target: spread <= 10% of the first.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

from bench import AUDIO
from dalston.catalog import Catalog
from dalston.pull import pull
from dalston.resources import data_dir
from dalston.sdk import memory
from dalston.store import ModelStore

MODELS = ("faster-whisper-tiny.en", "faster-whisper-base")
SWAPS = 10


def _child(models_dir: Path, tuned: bool) -> dict:
    from faster_whisper import WhisperModel

    if tuned:
        memory.limit_malloc_arenas()
    paths = [models_dir / "faster-whisper" / name for name in ("tiny.en", "base")]
    audio = str(AUDIO / "dialogue.wav")
    threads = ThreadPoolExecutor(4)  # as asyncio.to_thread: each step may land on another thread

    def load(path: Path) -> WhisperModel:
        with memory.large_blocks_mapped() if tuned else nullcontext():
            return WhisperModel(str(path), device="cpu", compute_type="int8")

    def transcribe(model: WhisperModel) -> float:
        started = time.perf_counter()
        segments, _ = model.transcribe(audio, beam_size=5, vad_filter=True)
        "".join(s.text for s in segments)
        return time.perf_counter() - started

    after_unload, base_loaded, seconds = [], [], []
    model = threads.submit(load, paths[0]).result()
    threads.submit(transcribe, model).result()
    for swap in range(1, SWAPS + 1):
        del model
        threads.submit(memory.release).result()
        after_unload.append(memory.rss_bytes())
        model = threads.submit(load, paths[swap % 2]).result()
        seconds.append(threads.submit(transcribe, model).result())
        if swap % 2:
            base_loaded.append(memory.rss_bytes())
    return {"after_unload": after_unload, "base_loaded": base_loaded,
            "seconds": statistics.median(seconds)}


def _measure(models_dir: Path, tuned: bool) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.memory", str(models_dir), str(int(tuned))],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def _mb(values: list[int]) -> str:
    return f"{min(values) / 1e6:4.0f}-{max(values) / 1e6:4.0f} MB"


def run(root: Path) -> list[str]:
    catalog = Catalog.load(data_dir("catalog"))
    store = ModelStore(root / "models")
    for model_id in MODELS:
        pull(catalog.model(model_id), catalog.runtime("faster-whisper"), store)
    plain, tuned = _measure(store.root, False), _measure(store.root, True)
    spread = {name: (max(r["after_unload"]) - min(r["after_unload"])) / r["after_unload"][0]
              for name, r in (("plain", plain), ("tuned", tuned))}
    return [
        f"memory   RSS after each of {SWAPS} unloads: engine settings {_mb(tuned['after_unload'])} "
        f"(spread {spread['tuned']:.0%}), glibc defaults {_mb(plain['after_unload'])} "
        f"(spread {spread['plain']:.0%}; target <= 10%)",
        f"memory   RSS with base loaded: engine settings {_mb(tuned['base_loaded'])}, glibc defaults "
        f"{_mb(plain['base_loaded'])}; transcribe time ratio {tuned['seconds'] / plain['seconds']:.2f}",
    ]


if __name__ == "__main__":
    print(json.dumps(_child(Path(sys.argv[1]), sys.argv[2] == "1")))
