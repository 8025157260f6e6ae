"""Personal data said in a transcript, masked as [REDACTED] (the redact stage, `redact=pii`).

Rules, not a model, so what is masked can be read here and tested:
- an e-mail address, written (`ann@example.com`) or said (`ann at example dot com`);
- a run of digits, written or said one by one ("four five six seven"), counted across the
  words that follow each other in a sentence: masked when it is a phone number (7-15 digits),
  a card number (16-19 digits that pass the Luhn check), or four or more digits said one by
  one (a PIN, an account or a code).
Ordinary numbers stay: a year ("in 2019"), a count ("three people"), an amount ("1,500",
"$20", "3.5").

Words keep their times, so every format of the transcript masks the same spans.
"""

from __future__ import annotations

import re

import msgspec

from dalston.contracts import Segment, Transcript, Word

MASK = "[REDACTED]"
SPOKEN_DIGITS = {"zero": "0", "oh": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9"}
MIN_SPOKEN_DIGITS = 4  # digits said (or written) one by one
PHONE_DIGITS = range(7, 16)
CARD_DIGITS = range(16, 20)
TOP_LEVEL_DOMAINS = {"com", "org", "net", "edu", "gov", "io", "co", "uk", "de", "fr", "info", "me"}

_EMAIL = re.compile(r"^[\w.+-]+@[\w-]+(\.[\w-]+)+$")
_TRAILING = re.compile(r"[.,;:?!]+$")
# Written digits as a phone or card is written: groups joined by - . ( ) or a leading +; a
# group may lead with its joiner, as Whisper's words split `555-234-5678` into `555` `-234` `-5678`.
_DIGITS = re.compile(r"^[+\-.]?\(?\d[\d\-().]*$")
_AMOUNT = re.compile(r"^\d+\.\d+$")  # a decimal, not a dotted phone number (those have two dots)


def _bare(token: str) -> str:
    return _TRAILING.sub("", token.strip()).strip("\"'").lower()


def _digits(token: str) -> str | None:
    """The digits a word stands for; None for other words."""
    bare = _bare(token)
    if bare in SPOKEN_DIGITS:
        return SPOKEN_DIGITS[bare]
    if _DIGITS.match(bare) and not _AMOUNT.match(bare):
        return re.sub(r"\D", "", bare)
    return None


def _ends_run(token: str, digits: str) -> bool:
    """A full stop ends a run of digits, and so does a comma after a number (`2019, 2020`);
    digits said one by one are often written with commas between (`4, 5, 6, 7`)."""
    trailing = _TRAILING.search(token.strip())
    return trailing is not None and (trailing.group() != "," or len(digits) > 1)


def luhn(digits: str) -> bool:
    total = 0
    for i, digit in enumerate(reversed(digits)):
        value = int(digit) * (2 if i % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def _is_sensitive_run(digits: str, one_by_one: int) -> bool:
    return (len(digits) in PHONE_DIGITS or (len(digits) in CARD_DIGITS and luhn(digits))
            or one_by_one >= MIN_SPOKEN_DIGITS)


def sensitive(tokens: list[str]) -> list[bool]:
    """Which of a sentence's words (in order, as said) are personal data."""
    masked = [bool(_EMAIL.match(_bare(t))) for t in tokens]
    bare = [_bare(t) for t in tokens]
    for i, word in enumerate(bare):  # said: "<name> at <domain> [dot <part>]* dot <tld>"
        if word == "at" and i > 0:
            for j in range(i + 2, min(i + 8, len(bare) - 1)):
                if bare[j] == "dot" and bare[j + 1] in TOP_LEVEL_DOMAINS:
                    masked[i - 1:j + 2] = [True] * (j + 3 - i)
    i = 0
    while i < len(tokens):
        run, digits, one_by_one = i, "", 0
        while run < len(tokens) and (found := _digits(tokens[run])) is not None:
            digits, one_by_one = digits + found, one_by_one + (len(found) == 1)
            run += 1
            if _ends_run(tokens[run - 1], found):
                break
        if run > i and _is_sensitive_run(digits, one_by_one):
            masked[i:run] = [True] * (run - i)
        i = max(run, i + 1)
    return masked


def redact_text(text: str) -> str:
    """`text` with each span of personal data one MASK (its trailing punctuation kept)."""
    parts = re.split(r"(\s+)", text)
    words, gaps = parts[::2], parts[1::2]
    masked = sensitive(words)
    out: list[str] = []
    for i, word in enumerate(words):
        if masked[i] and i + 1 < len(words) and masked[i + 1]:
            continue  # inside a span: its last word writes the mask
        out.append(_masked_word(word) if masked[i] else word)
        if i < len(gaps):
            out.append(gaps[i])
    return "".join(out)


def redact_words(words: list[Word]) -> list[Word]:
    """Each word of personal data as MASK (its spacing and trailing punctuation kept), its
    times kept."""
    masked = sensitive([w.word for w in words])
    return [msgspec.structs.replace(w, word=_masked_word(w.word)) if m else w for w, m in zip(words, masked)]


def _masked_word(word: str) -> str:
    trailing = _TRAILING.search(word.rstrip())
    return word[:len(word) - len(word.lstrip())] + MASK + (trailing.group() if trailing else "")


def redact_segment(segment: Segment) -> Segment:
    return msgspec.structs.replace(segment, text=redact_text(segment.text), words=redact_words(segment.words))


def redact(transcript: Transcript) -> Transcript:
    return msgspec.structs.replace(transcript, text=redact_text(transcript.text),
                                   segments=[redact_segment(s) for s in transcript.segments])
