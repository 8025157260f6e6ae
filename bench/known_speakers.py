"""How alike GE2E finds a voice's clip and a speaker's turns, on the real conversations of
tests/data/conversations: the evidence for `known_speakers.MATCH_THRESHOLD`.

Each reference turn of 1.5-10 s (overlapped speech cut out) plays a known speaker's clip; it is
compared, as the diarize engine compares, with the pooled embedding of each speaker's *other*
turns: its own speaker's (same), another speaker's of the same recording (other), and the
speakers of the other recordings (stranger; AMI participants who recur are not strangers).
Clips and pooled turns are brought to one level first, as the engine does (`levelled`).
Also turn against turn. Prints quantiles of each, and how many would be named wrongly or
missed at a few thresholds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile

from actors.diarize.ge2e import WEIGHTS
from actors.diarize.ge2e_encoder import Ge2eEncoder, levelled
from actors.diarize.known_speakers import EMBED_RATE, MATCH_THRESHOLD, embed_voice
from dalston.pcm import SAMPLE_RATE

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "conversations"
MODEL = Path(__file__).resolve().parent.parent / "catalog" / "weights" / "resemblyzer-ge2e" / WEIGHTS
MIN_CLIP, MAX_CLIP = 1.5, 10.0
THRESHOLDS = (0.65, 0.70, 0.72, 0.75, 0.78, 0.80, 0.85)


def _turns(rttm: Path) -> list[tuple[float, float, str]]:
    rows = [line.split() for line in rttm.read_text().splitlines() if line.strip()]
    return [(float(r[3]), float(r[3]) + float(r[4]), r[7]) for r in rows]


def _alone(turn: tuple[float, float, str], turns: list[tuple[float, float, str]], rate: int) -> np.ndarray:
    """A mask, in samples of the recording, of where `turn`'s speaker talks alone in it."""
    start, end, speaker = turn
    mask = np.zeros(int(end * rate) - int(start * rate), dtype=bool)
    mask[:] = True
    for a, b, other in turns:
        if other != speaker and a < end and b > start:
            mask[max(0, int((a - start) * rate)):max(0, int((b - start) * rate))] = False
    return mask


def _speech(audio: np.ndarray, turn, turns) -> np.ndarray:
    start, end, _ = turn
    piece = audio[int(start * SAMPLE_RATE):int(end * SAMPLE_RATE)]
    return piece[_alone(turn, turns, SAMPLE_RATE)[:len(piece)]]


def run(root: Path) -> list[str]:
    lines = []
    encoder = Ge2eEncoder(MODEL)
    clips = []  # (recording, speaker, turn index, embedding)
    pooled = {}  # (recording, speaker, left-out turn index or None) -> embedding
    for rttm in sorted(DATA.glob("*.rttm")):
        audio, rate = soundfile.read(rttm.with_suffix(".flac"), dtype="float32")
        assert rate == SAMPLE_RATE
        turns = _turns(rttm)
        speech = [_speech(audio, t, turns) for t in turns]
        for i, (turn, clip) in enumerate(zip(turns, speech)):
            if MIN_CLIP <= len(clip) / SAMPLE_RATE <= MAX_CLIP:
                clips.append((rttm.stem, turn[2], i, embed_voice(encoder, clip)))
        for speaker in {t[2] for t in turns}:
            own = [i for i, t in enumerate(turns) if t[2] == speaker and len(speech[i])]
            for left_out in [None, *own]:
                rest = [speech[i] for i in own if i != left_out]
                if sum(map(len, rest)) >= SAMPLE_RATE:
                    pooled[rttm.stem, speaker, left_out] = encoder.embed_utterance(
                        levelled(np.concatenate(rest)), rate=EMBED_RATE)
    same, other, stranger, turn_same, turn_other = [], [], [], [], []
    for recording, speaker, index, clip in clips:
        for (rec, spk, left_out), voice in pooled.items():
            score = float(clip @ voice)
            if rec == recording and spk == speaker and left_out == index:
                same.append(score)
            elif rec == recording and spk != speaker and left_out is None:
                other.append(score)
            elif rec != recording and spk != speaker and left_out is None:
                stranger.append(score)
    for i, (rec_a, spk_a, _, a) in enumerate(clips):
        for rec_b, spk_b, _, b in clips[i + 1:]:
            if rec_a == rec_b:
                (turn_same if spk_a == spk_b else turn_other).append(float(a @ b))
    lines.append(f"{len(clips)} clips of {MIN_CLIP}-{MAX_CLIP} s; threshold now {MATCH_THRESHOLD}")
    lines.append(f"{'clip vs':<28} {'n':>5} {'min':>6} {'p5':>6} {'p50':>6} {'p95':>6} {'max':>6}")
    for name, values in [("own speaker's other turns", same), ("another speaker, same rec.", other),
                         ("a stranger (other rec.)", stranger), ("turn vs turn, same speaker", turn_same),
                         ("turn vs turn, other speaker", turn_other)]:
        q = np.quantile(values, [0, 0.05, 0.5, 0.95, 1])
        lines.append(f"{name:<28} {len(values):>5} " + " ".join(f"{v:6.3f}" for v in q))
    # As the engine decides: a clip names the speaker of the recording most like it, if at or
    # above the threshold. Its own recording: right, wrong or missed; another one: named anyone.
    lines.append("a clip names the most alike speaker of a recording, at or above the threshold:")
    for threshold in THRESHOLDS:
        right = wrong = missed = accepted = 0
        for recording, speaker, index, clip in clips:
            own = {spk: voice for (rec, spk, left_out), voice in pooled.items()
                   if rec == recording and (left_out == index if spk == speaker else left_out is None)}
            if speaker in own:
                best = max(own, key=lambda s: float(clip @ own[s]))
                if float(clip @ own[best]) < threshold:
                    missed += 1
                elif best == speaker:
                    right += 1
                else:
                    wrong += 1
            for rec in {r for r, _, _ in pooled} - {recording}:
                scores = [float(clip @ v) for (r, s, left_out), v in pooled.items()
                          if r == rec and left_out is None and s != speaker]
                accepted += max(scores) >= threshold
        strangers = len(clips) * (len({r for r, _, _ in pooled}) - 1)
        lines.append(f"  {threshold:.2f}: own recording right {right}, wrong {wrong}, missed {missed}; "
              f"other recordings named someone {accepted}/{strangers}")
    return lines
