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


def _measure(handle, talks, given: bool) -> tuple[float, float, int]:
    """(real-time factor, worst DER, conversations whose speaker count came out right)."""
    seconds = audio = 0.0
    ders, right = [], 0
    for voices, talk in talks:
        options = DiarizeOptions(num_speakers=len(voices)) if given else DiarizeOptions()
        started = time.perf_counter()
        speakers, turns = handle.diarize(talk.audio, options, threading.Event())
        seconds += time.perf_counter() - started
        audio += len(talk.audio) / SAMPLE_RATE
        ders.append(der(talk.turns, turns))
        right += len(speakers) == len(voices)
    return seconds / audio, max(ders), right


def run(root: Path) -> list[str]:
    catalog = Catalog.load()
    path = pull(catalog.model(MODEL), catalog.runtime("diarize"), ModelStore(root / "models"))
    handle = DiarizeActor(load_settings({})).load(MODEL, path)
    talks = [(voices, conversation(voices, turns=TURNS, seed=seed))
             for voices in (TWO_VOICES, THREE_VOICES) for seed in SEEDS]
    minutes = sum(len(t.audio) for _, t in talks) / SAMPLE_RATE / 60
    lines = []
    chosen = ge2e.EMBED_RATE
    for rate in (chosen, 4.0):
        ge2e.EMBED_RATE = rate
        for given in (False, True):
            rtf, worst, right = _measure(handle, talks, given)
            lines.append(
                f"diarize  {len(talks)} conversations ({minutes:.1f} min, 2 and 3 voices), {rate:.2f} windows/s, "
                f"count {'given' if given else 'found'}: RTF {rtf:.3f}, worst DER {worst:.3f} (target <= 0.15), "
                f"count right {right}/{len(talks)}")
    ge2e.EMBED_RATE = chosen
    loads = []
    for _ in range(3):
        started = time.perf_counter()
        DiarizeActor(load_settings({})).load(MODEL, path).unload()
        loads.append(time.perf_counter() - started)
    lines.append(f"diarize  load (with warm-up): {statistics.median(loads):.2f} s")
    return lines
