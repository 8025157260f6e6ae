"""A transcript in ElevenLabs' speech-to-text shape (what the `elevenlabs` SDK parses): words
with `spacing` between them, speaker ids, log-probabilities, character timings, one transcript
per channel, and the additional export formats."""

from __future__ import annotations

import math
from typing import Any

import msgspec

from dalston.contracts import Segment, Transcript
from dalston.transcript import render

GRANULARITIES = ("none", "word", "character")
# ElevenLabs' additional_formats Dalston exports -> (file extension, media type).
EXPORTS: dict[str, tuple[str, str]] = {
    "srt": ("srt", "application/x-subrip"),
    "txt": ("txt", "text/plain"),
    "segmented_json": ("json", "application/json"),
}
# Whisper's ISO 639-1 codes (and its `jw`) -> ISO 639-3, which ElevenLabs reports.
ISO_639_3: dict[str, str] = {
    "af": "afr", "am": "amh", "ar": "ara", "as": "asm", "az": "aze", "ba": "bak", "be": "bel",
    "bg": "bul", "bn": "ben", "bo": "bod", "br": "bre", "bs": "bos", "ca": "cat", "cs": "ces",
    "cy": "cym", "da": "dan", "de": "deu", "el": "ell", "en": "eng", "es": "spa", "et": "est",
    "eu": "eus", "fa": "fas", "fi": "fin", "fo": "fao", "fr": "fra", "gl": "glg", "gu": "guj",
    "ha": "hau", "haw": "haw", "he": "heb", "hi": "hin", "hr": "hrv", "ht": "hat", "hu": "hun",
    "hy": "hye", "id": "ind", "is": "isl", "it": "ita", "ja": "jpn", "jw": "jav", "ka": "kat",
    "kk": "kaz", "km": "khm", "kn": "kan", "ko": "kor", "la": "lat", "lb": "ltz", "ln": "lin",
    "lo": "lao", "lt": "lit", "lv": "lav", "mg": "mlg", "mi": "mri", "mk": "mkd", "ml": "mal",
    "mn": "mon", "mr": "mar", "ms": "msa", "mt": "mlt", "my": "mya", "ne": "nep", "nl": "nld",
    "nn": "nno", "no": "nor", "oc": "oci", "pa": "pan", "pl": "pol", "ps": "pus", "pt": "por",
    "ro": "ron", "ru": "rus", "sa": "san", "sd": "snd", "si": "sin", "sk": "slk", "sl": "slv",
    "sn": "sna", "so": "som", "sq": "sqi", "sr": "srp", "su": "sun", "sv": "swe", "sw": "swa",
    "ta": "tam", "te": "tel", "tg": "tgk", "th": "tha", "tk": "tuk", "tl": "tgl", "tr": "tur",
    "tt": "tat", "uk": "ukr", "ur": "urd", "uz": "uzb", "vi": "vie", "yi": "yid", "yo": "yor",
    "yue": "yue", "zh": "zho",
}
# The least positive normal float32: engines compute probabilities in it.
MIN_PROBABILITY = 1.1754944e-38
_ISO_639_1 = {three: one for one, three in ISO_639_3.items()}
_json = msgspec.json.Encoder()


def whisper_language(code: str) -> str:
    """An ISO 639-1 or 639-3 code as Whisper's (639-1, where it has one)."""
    return _ISO_639_1.get(code.lower(), code)


def speech_to_text(transcript: Transcript, *, granularity: str = "word", multichannel: bool = False,
                   formats: tuple[str, ...] = (), transcription_id: str | None = None) -> dict[str, Any]:
    """ElevenLabs' SpeechToTextChunkResponseModel, or with `multichannel` its
    MultichannelSpeechToTextResponseModel: one transcript per channel, in channel order.
    `granularity` is `timestamps_granularity`; `formats` the additional_formats to export."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown timestamps_granularity {granularity!r}")
    common = {"transcription_id": transcription_id, "audio_duration_secs": transcript.duration}
    if not multichannel:
        return {**_chunk(transcript, granularity, formats, None), **common}
    channels = [_channel(transcript, channel) for channel in range(transcript.channels)]
    return {"transcripts": [_chunk(part, granularity, formats, channel) for channel, part in enumerate(channels)],
            **common}


def _channel(transcript: Transcript, channel: int) -> Transcript:
    """The part of `transcript` spoken on `channel` (all of it when there is one channel)."""
    segments = [s for s in transcript.segments if (s.channel or 0) == channel]
    return msgspec.structs.replace(transcript, segments=segments, channels=1,
                                   text=" ".join(text for s in segments if (text := s.text.strip())))


def _chunk(transcript: Transcript, granularity: str, formats: tuple[str, ...],
           channel: int | None) -> dict[str, Any]:
    language = transcript.language
    result: dict[str, Any] = {
        "language_code": ISO_639_3.get(language, language) if language else "und",
        "language_probability": transcript.language_probability or 0.0,
        "text": transcript.text,
        "words": scribe_words(transcript.segments, granularity, channel),
    }
    if channel is not None:
        result["channel_index"] = channel
    if formats:
        result["additional_formats"] = [export(transcript, fmt) for fmt in formats]
    return result


def scribe_words(segments: list[Segment], granularity: str, channel: int | None) -> list[dict[str, Any]]:
    """Words, and a `spacing` between each two; without timestamps where none were asked for
    (or the engine gave none)."""
    timed = granularity != "none"
    result: list[dict[str, Any]] = []
    for segment in segments:
        speaker = _speaker_id(segment)
        # A segment without word timings (none asked for) still has its words, untimed.
        words = [(w.word.strip(), w.start, w.end, _logprob(w.logprob, w.probability), _speaker_id(w) or speaker)
                 for w in segment.words] or \
                [(text, None, None, 0.0, speaker) for text in segment.text.split()]
        for text, start, end, logprob, word_speaker in words:
            if not text:
                continue
            if not timed:
                start = end = None
            if result:
                result.append(_word(" ", result[-1]["end"], start, "spacing", word_speaker, 0.0, channel))
            word = _word(text, start, end, "word", word_speaker, logprob, channel)
            if granularity == "character":
                word["characters"] = _characters(text, start, end)
            result.append(word)
    return result


def _word(text: str, start: float | None, end: float | None, kind: str, speaker: str | None,
          logprob: float, channel: int | None) -> dict[str, Any]:
    word = {"text": text, "start": _seconds(start), "end": _seconds(end), "type": kind,
            "speaker_id": speaker, "logprob": logprob}
    if channel is not None:
        word["channel_index"] = channel
    return word


def _characters(text: str, start: float | None, end: float | None) -> list[dict[str, Any]]:
    """Each character of a word, its span an equal share of the word's: engines time words,
    not characters."""
    if start is None or end is None:
        return [{"text": c, "start": None, "end": None} for c in text]
    step = (end - start) / len(text)
    return [{"text": c, "start": _seconds(start + i * step), "end": _seconds(start + (i + 1) * step)}
            for i, c in enumerate(text)]


def _speaker_id(part: Any) -> str | None:
    """ElevenLabs' `speaker_0` for Dalston's `SPEAKER_0`, where the diarize stage set one (its
    `speaker`, on segments and words)."""
    speaker = getattr(part, "speaker", None)
    return speaker.lower() if speaker else None


def _logprob(logprob: float | None, probability: float) -> float:
    """The word's log-probability: the engine's, else from its probability (0 where it gave
    neither, as probability defaults to 1; a probability of 0 as the least a float32 holds,
    since JSON has no -infinity)."""
    if logprob is not None:
        return logprob
    return math.log(max(probability, MIN_PROBABILITY))


def _seconds(t: float | None) -> float | None:
    return None if t is None else round(t, 3)


def export(transcript: Transcript, fmt: str) -> dict[str, Any]:
    """One of ElevenLabs' additional_formats (AdditionalFormatResponseModel)."""
    extension, media_type = EXPORTS[fmt]
    if fmt == "srt":
        content = str(render(transcript, "srt")[0])
    elif fmt == "txt":
        content = "\n".join(text for s in transcript.segments if (text := s.text.strip())) + "\n"
    else:
        content = _json.encode({"segments": [
            {"text": s.text.strip(), "start": _seconds(s.start), "end": _seconds(s.end),
             "speaker_id": _speaker_id(s), "words": scribe_words([s], "word", None)}
            for s in transcript.segments]}).decode()
    return {"requested_format": fmt, "file_extension": extension, "content_type": media_type,
            "is_base64_encoded": False, "content": content}
