"""Server VAD in noise (issue 20, must-hold 3): each real recording in tests/data/conversations
is cut into turns by Silero server VAD (threshold 0.5, prefix 300 ms, silence 500 ms) clean, then
with pink noise and with babble (the sum of three other recordings) mixed in at 10 dB SNR. A
noisy file's turn count is right where it equals the clean file's (target: >= 90% of files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile

from dalston.contracts import SESSION_SAMPLE_RATE, TurnDetection
from dalston.pcm import resample, to_pcm16
from dalston.sdk.turns import Turns

CONVERSATIONS = Path(__file__).resolve().parents[1] / "tests" / "data" / "conversations"
SNR_DB = 10


def _load(path: Path) -> np.ndarray:
    samples, rate = soundfile.read(path, dtype="float32")
    return resample(samples if samples.ndim == 1 else samples.mean(axis=1), rate, SESSION_SAMPLE_RATE)


def _turns(samples: np.ndarray) -> int:
    turns = Turns(TurnDetection(threshold=0.5, prefix_padding_ms=300, silence_duration_ms=500), 60_000)
    pcm = to_pcm16(np.concatenate([samples, np.zeros(SESSION_SAMPLE_RATE, np.float32)]))
    piece = SESSION_SAMPLE_RATE // 10 * 2  # 100 ms, as a client sends it
    return sum(e.kind == "committed" for start in range(0, len(pcm), piece) for e in turns.feed(pcm[start:start + piece]))


def _mixed(speech: np.ndarray, noise: np.ndarray) -> np.ndarray:
    noise = np.resize(noise, len(speech))
    gain = np.sqrt((speech ** 2).mean() / ((noise ** 2).mean() * 10 ** (SNR_DB / 10)))
    return np.clip(speech + gain * noise, -1, 1).astype(np.float32)


def _pink(size: int, rng: np.random.Generator) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(size))
    spectrum[1:] /= np.sqrt(np.arange(1, len(spectrum)))  # 1/f power
    return np.fft.irfft(spectrum, size)


def run(root: Path) -> list[str]:
    paths = sorted(CONVERSATIONS.glob("*.flac"))
    clips = [_load(path) for path in paths]
    rng = np.random.default_rng(0)
    right = {"pink": 0, "babble": 0}
    lines = []
    for k, (path, clip) in enumerate(zip(paths, clips)):
        babble = sum(np.resize(other, len(clip)) for other in (clips[:k] + clips[k + 1:])[:3])
        clean, counts = _turns(clip), {"pink": _turns(_mixed(clip, _pink(len(clip), rng))),
                                       "babble": _turns(_mixed(clip, babble))}
        right = {kind: right[kind] + (counts[kind] == clean) for kind in right}
        lines.append(f"noisy turns, {path.name}: clean {clean}, pink {counts['pink']}, babble {counts['babble']}")
    lines += [f"noisy turns, {kind} at {SNR_DB} dB SNR: turn count right on {n}/{len(paths)} files "
              f"({n / len(paths):.0%}, target >= 90%)" for kind, n in right.items()]
    return lines


if __name__ == "__main__":
    for line in run(Path(".")):
        print(line, flush=True)
