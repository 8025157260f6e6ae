"""Speech of known text, made with espeak-ng: long recordings for the tests and the benchmarks
(which share it, so both measure the same thing)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

# Harvard sentences (IEEE 1969, lists 1 and 2): phonetically balanced, public domain.
HARVARD = [
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "Large size in stockings is hard to sell.",
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.",
    "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.",
    "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.",
    "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.",
    "The girl at the booth sold fifty bonds.",
]


def lecture(tmp_dir: Path, seconds: float, voice: str = "en-us", pause: float = 1.0) -> tuple[Path, str]:
    """About `seconds` of the Harvard sentences read over and over by espeak-ng's `voice`,
    with `pause` seconds between sentences: (the WAV file, the text it says)."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise FileNotFoundError("espeak-ng is not installed")
    # espeak-ng's default rate reads a Harvard sentence in about 2.0 s.
    count = max(1, round(seconds / (2.0 + pause)))
    sentences = [HARVARD[n % len(HARVARD)] for n in range(count)]
    brk = f'<break time="{int(pause * 1000)}ms"/>'
    ssml = f"<speak>{brk.join(sentences)}</speak>"
    digest = hashlib.sha1(f"{voice}\0{ssml}".encode()).hexdigest()[:8]
    dst = Path(tmp_dir) / f"lecture-{voice}-{digest}.wav"
    if not dst.exists():
        subprocess.run([espeak, "-m", "-v", voice, "-w", str(dst), ssml], check=True,
                       capture_output=True, timeout=300)
    return dst, " ".join(sentences)


def words(text: str) -> list[str]:
    """Lower-case words without punctuation, for comparing transcripts."""
    return "".join(c.lower() if c.isalnum() or c in " '" else " " for c in text).split()


def word_edits(reference: list[str], hypothesis: list[str]) -> int:
    """Word-level Levenshtein distance."""
    row = list(range(len(hypothesis) + 1))
    for i, word in enumerate(reference, 1):
        previous, row[0] = row[0], i
        for j, other in enumerate(hypothesis, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (word != other))
    return row[-1]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level edit distance over the reference's length."""
    ref = words(reference)
    return word_edits(ref, words(hypothesis)) / max(1, len(ref))
