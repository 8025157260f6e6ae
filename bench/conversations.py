"""Conversations with known turns: spoken by espeak-ng voices, and real recordings from
tests/data/conversations (see its README); and the diarization error rate against them
(pyannote.metrics). The diarization tests and `bench/diarization.py` share them.

espeak-ng voices are much closer to each other than real people are (whole-turn GE2E
embeddings: same voice 0.87-0.94 cosine, different voices 0.69-0.84), which makes these a hard
case for telling speakers apart, if an easy one for finding speech.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
from scipy.signal import resample_poly

from dalston.contracts import SpeakerTurn
from dalston.pcm import SAMPLE_RATE

REAL = Path(__file__).resolve().parent.parent / "tests" / "data" / "conversations"
TWO_VOICES = ("en-us+m3", "en-gb+f3")
THREE_VOICES = ("en-us+m3", "en-gb+f3", "en-us+m7")
# The DER's collar, as pyannote.metrics means it: this many seconds centred on each true
# boundary are not scored (0.125 s either side).
COLLAR = 0.25

LINES = (
    "Did you see the report that came out this morning about the harbour project?",
    "I did, and honestly the numbers looked much better than I expected.",
    "The budget is still a problem though, we are running late on the second phase.",
    "Maybe we should ask the council for another extension before the summer.",
    "That would give the engineers enough time to finish the bridge.",
    "I am not sure they will agree, they said no twice already.",
    "Then we need a stronger case, with the traffic figures and the safety review.",
    "Fine, I will call the planning office tomorrow and ask for a meeting.",
    "Good, and send me the minutes afterwards so I can brief the board.",
    "Of course. Should we invite the contractors as well?",
    "Yes, but only for the second half of the meeting.",
    "Alright, I think that covers everything for today.",
)


@dataclass
class Conversation:
    audio: np.ndarray  # 16 kHz mono float32
    turns: list[SpeakerTurn]  # the truth, speakers named by voice

    @property
    def speakers(self) -> set[str]:
        return {t.speaker for t in self.turns}


@dataclass
class Recording:
    name: str
    audio: np.ndarray  # 16 kHz mono float32
    turns: list[SpeakerTurn]  # the reference turns (RTTM)
    words: list[tuple[str, str]] | None  # (speaker, text) per reference segment (STM), if any

    @property
    def speakers(self) -> set[str]:
        return {t.speaker for t in self.turns}


def recordings() -> list[Recording]:
    """The real conversations, in name order."""
    found = []
    for path in sorted(REAL.glob("*.flac")):
        audio, rate = soundfile.read(path, dtype="float32")
        assert rate == SAMPLE_RATE, path
        turns = []
        for line in path.with_suffix(".rttm").read_text().splitlines():
            fields = line.split()
            start, duration = float(fields[3]), float(fields[4])
            turns.append(SpeakerTurn(start=start, end=start + duration, speaker=fields[7]))
        stm = path.with_suffix(".stm")
        words = None
        if stm.exists():
            words = [(f[2], " ".join(f[5:])) for f in map(str.split, stm.read_text().splitlines()) if f]
        found.append(Recording(path.stem, audio, turns, words))
    return found


def speak(text: str, voice: str) -> np.ndarray:
    """`text` in espeak-ng's `voice`, 16 kHz, without the silence around it."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise FileNotFoundError("espeak-ng is not installed (scripts/system-deps installs it)")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "speech.wav"
        subprocess.run([espeak, "-v", voice, "-w", str(path), text], check=True, capture_output=True, timeout=60)
        with wave.open(str(path)) as file:
            rate = file.getframerate()
            samples = np.frombuffer(file.readframes(file.getnframes()), dtype="<i2") / 32768.0
    samples = resample_poly(samples, SAMPLE_RATE, rate).astype(np.float32)
    loud = np.flatnonzero(np.abs(samples) > 0.01)
    return samples[loud[0]:loud[-1] + 1]


def conversation(voices: tuple[str, ...], turns: int = 10, seed: int = 0,
                 pauses: tuple[float, float] = (0.2, 0.8)) -> Conversation:
    """`turns` lines, the first voices in order and then at random (never twice in a row),
    with pauses between turns drawn from `pauses` (seconds)."""
    rng = np.random.default_rng(seed)
    parts = [np.zeros(SAMPLE_RATE // 2, dtype=np.float32)]
    at = len(parts[0])
    truth = []
    speaker = None
    for n in range(turns):
        others = [v for v in range(len(voices)) if v != speaker]
        speaker = n if n < len(voices) else others[rng.integers(len(others))]
        line = speak(LINES[(n + seed) % len(LINES)], voices[speaker])
        truth.append(SpeakerTurn(start=at / SAMPLE_RATE, end=(at + len(line)) / SAMPLE_RATE,
                                 speaker=voices[speaker]))
        pause = np.zeros(int(rng.uniform(*pauses) * SAMPLE_RATE), dtype=np.float32)
        parts += [line, pause]
        at += len(line) + len(pause)
    return Conversation(np.concatenate(parts), truth)


def der(truth: list[SpeakerTurn], found: list[SpeakerTurn], collar: float = COLLAR) -> float:
    """Diarization error rate of `found` against `truth` (best speaker mapping), with
    `collar` seconds centred on each true boundary not scored."""
    from pyannote.core import Annotation, Segment
    from pyannote.metrics.diarization import DiarizationErrorRate

    def annotation(turns: list[SpeakerTurn]) -> Annotation:
        result = Annotation()
        for turn in turns:
            result[Segment(turn.start, turn.end)] = turn.speaker
        return result

    return float(DiarizationErrorRate(collar=collar)(annotation(truth), annotation(found)))
