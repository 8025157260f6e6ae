"""Known speakers: the GE2E embedding of a voice from a short clip, and the diarized speakers
named after the voices they match.

A speaker's voice is embedded from the audio of its own turns (after diarization, whichever way
it counted them), so naming needs nothing from the clustering. Each voice names at most one
speaker: pairs are taken most alike first, and a pair below MATCH_THRESHOLD names nobody.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from faster_whisper.vad import VadOptions, get_speech_timestamps

from actors.diarize.ge2e_encoder import Ge2eEncoder, levelled
from dalston.contracts import SpeakerTurn
from dalston.pcm import SAMPLE_RATE

# Cosine between a 1.5-10 s clip of a voice and a diarized speaker's turns, at or above which
# the speaker may be that voice. Measured on the real conversations of tests/data/conversations
# (`python -m bench.known_speakers`, levels evened as below): a clip against its own speaker's
# other turns 0.53-0.92 (5th to 95th percentile, median 0.84), against another speaker of the
# recording 0.45-0.81 (median 0.65), against a stranger 0.44-0.75 (median 0.58). They overlap, so
# the pairing (most alike first) does part of the work. At 0.75, 19 of 22 clips name the right
# speaker of their recording, none a wrong one, and 8% of strangers' clips name someone (all AMI
# voices against AMI voices, one room's sound); 0.78 would name 2 fewer right and 1% of strangers,
# 0.72 one more right and 17% of strangers: 0.75 is near where misses and false names balance.
MATCH_THRESHOLD = 0.75
# A clip and a speaker's turns are both brought to the encoder's level (`levelled`, both ways)
# before they are compared: on the conversations above, raw levels named the right speaker
# from 16 of 22 clips and a wrong one from 6.
# Windows a second for a voice's embedding (as ge2e's pooled pieces).
EMBED_RATE = 1.25
# A speaker's voice is embedded from at most this much of its speech (its longest turns):
# enough to pool many windows, and naming a long recording's speakers stays cheap.
VOICE_SECONDS = 60.0
# Clip speech: pauses this long are cut out (GE2E embeds speech; silence only dilutes it).
CLIP_VAD = VadOptions(min_silence_duration_ms=150, speech_pad_ms=30, min_speech_duration_ms=100)


def embed_voice(encoder: Ge2eEncoder, clip: np.ndarray) -> np.ndarray:
    """The unit GE2E embedding of the speech in `clip` (16 kHz float32), pauses left out."""
    regions = get_speech_timestamps(clip, CLIP_VAD)
    speech = np.concatenate([clip[r["start"]:r["end"]] for r in regions]) if regions else clip
    return encoder.embed_utterance(levelled(speech), rate=EMBED_RATE)


def speaker_voices(encoder: Ge2eEncoder, audio: np.ndarray,
                   turns: Sequence[SpeakerTurn]) -> dict[str, np.ndarray]:
    """Each speaker's unit embedding, from up to VOICE_SECONDS of its longest turns."""
    by_speaker: dict[str, list[SpeakerTurn]] = {}
    for turn in turns:
        by_speaker.setdefault(turn.speaker, []).append(turn)
    voices = {}
    for speaker, own in by_speaker.items():
        pieces, total = [], 0.0
        for turn in sorted(own, key=lambda t: t.start - t.end):
            if total >= VOICE_SECONDS:
                break
            end = min(turn.end, turn.start + VOICE_SECONDS - total)
            pieces.append(audio[int(turn.start * SAMPLE_RATE):int(end * SAMPLE_RATE)])
            total += end - turn.start
        speech = np.concatenate(pieces)
        if len(speech):
            voices[speaker] = encoder.embed_utterance(levelled(speech), rate=EMBED_RATE)
    return voices


def match(voices: dict[str, np.ndarray], known: Sequence[tuple[str, np.ndarray]],
          threshold: float = MATCH_THRESHOLD) -> dict[str, str]:
    """speaker label -> known name: the most alike (speaker, voice) pair first, each speaker and
    each known voice taken once, pairs below `threshold` never."""
    pairs = sorted(((float(np.dot(embedding, reference)), speaker, name)
                    for speaker, embedding in voices.items() for name, reference in known), reverse=True)
    names: dict[str, str] = {}
    for score, speaker, name in pairs:
        if score < threshold:
            break
        if speaker not in names and name not in names.values():
            names[speaker] = name
    return names


def renamed(speakers: list[str], turns: list[SpeakerTurn],
            names: dict[str, str]) -> tuple[list[str], list[SpeakerTurn]]:
    """`speakers` and `turns` with the matched labels replaced by their names."""
    return ([names.get(s, s) for s in speakers],
            [SpeakerTurn(start=t.start, end=t.end, speaker=names.get(t.speaker, t.speaker)) for t in turns])
