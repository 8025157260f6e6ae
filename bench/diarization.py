"""Diarization with the GE2E model (`resemblyzer-ge2e`), in-process: real-time factor and DER
(0.25 s collar) on conversations of two and three espeak-ng voices, with the speaker count
found and given; at the chosen window rate for pooled embeddings and at 4 windows/s.
Targets: DER <= 0.15, the speaker count right, RTF well under transcription's."""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

from actors.diarize import ge2e
from actors.diarize.actor import DiarizeActor
from bench.conversations import THREE_VOICES, TWO_VOICES, conversation, der
from dalston.catalog import Catalog
from dalston.config import load_settings
from dalston.contracts import DiarizeOptions
from dalston.pcm import SAMPLE_RATE
from dalston.pull import pull
from dalston.store import ModelStore

MODEL = "resemblyzer-ge2e"
SEEDS = range(3)
TURNS = 20
REPEATS = 2


def _diarize(handle, audio, options: DiarizeOptions, rate: float) -> tuple[float, list[str], list]:
    """Seconds taken (the best of REPEATS), speakers and turns, at `rate` windows a second."""
    ge2e.EMBED_RATE = rate
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        speakers, turns = handle.diarize(audio, options, threading.Event())
        times.append(time.perf_counter() - started)
    return min(times), speakers, turns


def run(root: Path) -> list[str]:
    catalog = Catalog.load()
    path = pull(catalog.model(MODEL), catalog.runtime("diarize"), ModelStore(root / "models"))
    handle = DiarizeActor(load_settings({})).load(MODEL, path)
    talks = [(voices, conversation(voices, turns=TURNS, seed=seed))
             for voices in (TWO_VOICES, THREE_VOICES) for seed in SEEDS]
    seconds = sum(len(t.audio) for _, t in talks) / SAMPLE_RATE
    chosen = ge2e.EMBED_RATE
    lines = []
    try:
        for given in (False, True):
            # Both rates on each conversation back to back, so a busy machine slows both alike.
            spent, worst, right = {chosen: 0.0, 4.0: 0.0}, {chosen: 0.0, 4.0: 0.0}, {chosen: 0, 4.0: 0}
            for voices, talk in talks:
                options = DiarizeOptions(num_speakers=len(voices)) if given else DiarizeOptions()
                for rate in spent:
                    took, speakers, turns = _diarize(handle, talk.audio, options, rate)
                    spent[rate] += took
                    worst[rate] = max(worst[rate], der(talk.turns, turns))
                    right[rate] += len(speakers) == len(voices)
            for rate in spent:
                lines.append(
                    f"diarize  {len(talks)} conversations ({seconds / 60:.1f} min, 2 and 3 voices), {rate:.2f} windows/s, "
                    f"count {'given' if given else 'found'}: RTF {spent[rate] / seconds:.3f}, worst DER "
                    f"{worst[rate]:.3f} (target <= 0.15), count right {right[rate]}/{len(talks)}")
    finally:
        ge2e.EMBED_RATE = chosen
    loads = []
    for _ in range(3):
        started = time.perf_counter()
        DiarizeActor(load_settings({})).load(MODEL, path).unload()
        loads.append(time.perf_counter() - started)
    lines.append(f"diarize  load with warm-up, in a process that loaded it before: {statistics.median(loads):.2f} s")
    return lines
