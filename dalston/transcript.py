"""Merging per-channel transcripts into one, and rendering it in OpenAI's response formats."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from dalston.contracts import ChannelTranscript, Diarization, Segment, Transcript
from dalston.speakers import assign_speakers

# response_format -> media type of the body.
FORMATS: dict[str, str] = {
    "json": "application/json",
    "text": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
    "verbose_json": "application/json",
    "diarized_json": "application/json",
}

# Whisper's language codes -> the names OpenAI's verbose_json reports.
LANGUAGE_NAMES: dict[str, str] = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian",
    "ko": "korean", "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish",
    "pl": "polish", "ca": "catalan", "nl": "dutch", "ar": "arabic", "sv": "swedish",
    "it": "italian", "id": "indonesian", "hi": "hindi", "fi": "finnish", "vi": "vietnamese",
    "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay", "cs": "czech",
    "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian",
    "la": "latin", "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak", "te": "telugu",
    "fa": "persian", "lv": "latvian", "bn": "bengali", "sr": "serbian", "az": "azerbaijani",
    "sl": "slovenian", "kn": "kannada", "et": "estonian", "mk": "macedonian", "br": "breton",
    "eu": "basque", "is": "icelandic", "hy": "armenian", "ne": "nepali", "mn": "mongolian",
    "bs": "bosnian", "kk": "kazakh", "sq": "albanian", "sw": "swahili", "gl": "galician",
    "mr": "marathi", "pa": "punjabi", "si": "sinhala", "km": "khmer", "sn": "shona",
    "yo": "yoruba", "so": "somali", "af": "afrikaans", "oc": "occitan", "ka": "georgian",
    "be": "belarusian", "tg": "tajik", "sd": "sindhi", "gu": "gujarati", "am": "amharic",
    "yi": "yiddish", "lo": "lao", "uz": "uzbek", "fo": "faroese", "ht": "haitian creole",
    "ps": "pashto", "tk": "turkmen", "nn": "nynorsk", "mt": "maltese", "sa": "sanskrit",
    "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan", "tl": "tagalog", "mg": "malagasy",
    "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala", "ha": "hausa",
    "ba": "bashkir", "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}

_json = msgspec.json.Encoder()

# Subtitle lines at most this long (characters), this many to a cue: the usual broadcast rule.
CUE_LINE_CHARS = 42
CUE_LINES = 2

# The speaker of a segment no diarization covered, where a format demands one.
UNKNOWN_SPEAKER = "unknown"


def on_recording_clock(part: ChannelTranscript, offset: float, end: float | None) -> ChannelTranscript:
    """A chunk's transcript with its times moved from the chunk's clock to the recording's, and
    kept within the chunk (a decoder's last timestamp can overshoot the audio it was given)."""
    if not offset and end is None:
        return part
    limit = end if end is not None else offset + part.duration
    return msgspec.structs.replace(part, duration=limit, segments=[
        segment_on_recording_clock(s, offset, limit) for s in part.segments])


def segment_on_recording_clock(segment: Segment, offset: float, limit: float | None) -> Segment:
    """One segment of a chunk starting at `offset` on the recording's clock, within `limit`."""
    if not offset and limit is None:
        return segment

    def moved(t: float) -> float:
        t = max(t + offset, offset)
        return t if limit is None else min(t, limit)

    return msgspec.structs.replace(
        segment, start=moved(segment.start), end=moved(segment.end),
        words=[msgspec.structs.replace(w, start=moved(w.start), end=moved(w.end)) for w in segment.words])


def merge(job_id: str, model: str, parts: list[ChannelTranscript],
          diarizations: Sequence[Diarization] = ()) -> Transcript:
    """One transcript from the channels' transcripts (one per chunk of each channel, on the
    recording's clock), segments interleaved by start time and numbered afresh. Where a channel
    was diarized, each word gets its speaker and segments split where the speaker changes; the
    speakers of a recording of several channels are named per channel (`CH1_SPEAKER_0`)."""
    parts = sorted(parts, key=lambda part: part.channel)
    multichannel = len({part.channel for part in parts}) > 1
    turns = {d.channel: d.turns for d in diarizations}
    tagged: list[Segment] = []
    for channel in sorted({part.channel for part in parts}):
        segments = sorted((s for part in parts if part.channel == channel for s in part.segments),
                          key=lambda segment: segment.start)
        if channel in turns:
            named = [msgspec.structs.replace(t, speaker=f"CH{channel}_{t.speaker}") for t in turns[channel]] \
                if multichannel else turns[channel]
            segments = assign_speakers(segments, named)
        tagged += [msgspec.structs.replace(s, channel=channel if multichannel else None) for s in segments]
    # sorted() is stable: segments starting together keep channel order.
    segments = [
        msgspec.structs.replace(segment, id=i)
        for i, segment in enumerate(sorted(tagged, key=lambda segment: segment.start))
    ]
    languages = Counter(part.language for part in parts if part.language)
    # Most common language; ties go to the lowest channel (Counter keeps first-seen order).
    language = languages.most_common(1)[0][0] if languages else None
    return Transcript(
        job_id=job_id,
        text=" ".join(text for segment in segments if (text := segment.text.strip())),
        language=language,
        language_probability=max((part.language_probability for part in parts
                                  if part.language == language and part.language_probability is not None),
                                 default=None),
        duration=max((part.duration for part in parts), default=0.0),
        channels=max(len({part.channel for part in parts}), 1),
        model=model,
        segments=segments,
    )


def render(
    transcript: Transcript, fmt: str, *, words: bool = False, segments: bool = True,
    task: str = "transcribe", logprobs: bool = False,
) -> tuple[str | bytes, str]:
    """`transcript` as OpenAI's `response_format` `fmt`: (body, media type).

    `words` and `segments` are the timestamp granularities; only verbose_json uses them.
    `task` is Whisper's (a translation is in English); `logprobs` adds each word's
    log-probability to json and verbose_json, where the engine reported them.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown response_format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    if fmt == "json":
        result: dict[str, Any] = {"text": transcript.text, "usage": _usage(transcript)}
        if logprobs:
            result.update(_logprobs(transcript))
        body: str | bytes = _json.encode(result)
    elif fmt == "text":
        # OpenAI ends its plain-text response with a newline.
        body = (_speaker_lines(transcript) if _has_speakers(transcript) else transcript.text) + "\n"
    elif fmt == "srt":
        body = "".join(
            f"{n}\n{_timestamp(start, ',')} --> {_timestamp(end, ',')}\n{text}\n\n"
            for n, (start, end, text) in enumerate(_subtitles(transcript, _label, _label), start=1)
        )
    elif fmt == "vtt":
        body = "WEBVTT\n\n" + "".join(
            f"{_timestamp(start, '.')} --> {_timestamp(end, '.')}\n{text}\n\n"
            for start, end, text in _subtitles(transcript, _voice, lambda s: "")
        )
    elif fmt == "diarized_json":
        body = _json.encode(_diarized(transcript))
    else:
        result = _verbose(transcript, words=words, segments=segments, task=task)
        if logprobs:
            result.update(_logprobs(transcript))
        body = _json.encode(result)
    return body, FORMATS[fmt]


def _usage(transcript: Transcript) -> dict[str, Any]:
    """OpenAI's duration usage: seconds of audio, rounded up as OpenAI bills them."""
    return {"type": "duration", "seconds": math.ceil(transcript.duration)}


def _logprobs(transcript: Transcript) -> dict[str, Any]:
    """OpenAI's `logprobs` (token, logprob, bytes), one per word: none where the engine has
    no log-probabilities."""
    found = [{"token": w.word, "logprob": w.logprob, "bytes": list(w.word.encode())}
             for s in transcript.segments for w in s.words if w.logprob is not None]
    return {"logprobs": found} if found else {}


def _verbose(transcript: Transcript, *, words: bool, segments: bool, task: str) -> dict[str, Any]:
    """OpenAI's TranscriptionVerbose (or TranslationVerbose) shape."""
    code = "en" if task == "translate" else transcript.language
    result: dict[str, Any] = {
        "task": task,
        "language": LANGUAGE_NAMES.get(code, code) if code else "unknown",
        "duration": transcript.duration,
        "text": transcript.text,
        "usage": _usage(transcript),
    }
    if segments:
        result["segments"] = [_verbose_segment(s) for s in transcript.segments]
    if words:
        all_words = sorted((w for s in transcript.segments for w in s.words),
                           key=lambda w: w.start)
        result["words"] = [_with_speaker({"word": w.word.strip(), "start": w.start, "end": w.end}, w.speaker)
                           for w in all_words]
    return result


def _verbose_segment(segment: Segment) -> dict[str, Any]:
    result = {
        "id": segment.id,
        # Whisper's seek is the 10 ms frame offset; the start time is the nearest we have.
        "seek": round(segment.start * 100),
        "start": segment.start,
        "end": segment.end,
        "text": segment.text,
        "tokens": segment.tokens,
        # OpenAI's client requires numbers here; engines that do not report them give 0.
        "temperature": segment.temperature or 0.0,
        "avg_logprob": segment.avg_logprob or 0.0,
        "compression_ratio": segment.compression_ratio or 0.0,
        "no_speech_prob": segment.no_speech_prob or 0.0,
    }
    # Dalston's addition for multi-channel audio; OpenAI clients ignore unknown fields.
    if segment.channel is not None:
        result["channel"] = segment.channel
    return _with_speaker(result, segment.speaker)


def _with_speaker(item: dict[str, Any], speaker: str | None) -> dict[str, Any]:
    # Dalston's addition where the job was diarized; absent otherwise, as in OpenAI's shape.
    if speaker is not None:
        item["speaker"] = speaker
    return item


def _diarized(transcript: Transcript) -> dict[str, Any]:
    """OpenAI's TranscriptionDiarized shape (`gpt-4o-transcribe-diarize`)."""
    return {
        "task": "transcribe",
        "duration": transcript.duration,
        "text": transcript.text,
        "segments": [
            {"type": "transcript.text.segment", "id": f"seg_{s.id}", "start": s.start, "end": s.end,
             "text": text, "speaker": s.speaker or UNKNOWN_SPEAKER}
            for s, text in _cues(transcript)
        ],
        "usage": {"type": "duration", "seconds": transcript.duration},
    }


def _has_speakers(transcript: Transcript) -> bool:
    return any(s.speaker is not None for s in transcript.segments)


def _speaker_lines(transcript: Transcript) -> str:
    """One line per turn, `SPEAKER: text`: consecutive segments of one speaker joined."""
    lines: list[tuple[str | None, list[str]]] = []
    for segment, text in _cues(transcript):
        if lines and lines[-1][0] == segment.speaker:
            lines[-1][1].append(text)
        else:
            lines.append((segment.speaker, [text]))
    return "\n".join(f"{speaker or UNKNOWN_SPEAKER}: {' '.join(texts)}" for speaker, texts in lines)


def _label(segment: Segment) -> str:
    return f"{segment.speaker}: " if segment.speaker is not None else ""


def _voice(segment: Segment) -> str:
    # WebVTT's voice span; a speaker label never holds `>`, which would end the tag.
    return f"<v {segment.speaker}>" if segment.speaker is not None else ""


def _subtitles(transcript: Transcript, lead: Callable[[Segment], str],
               shown: Callable[[Segment], str]) -> list[tuple[float, float, str]]:
    """Subtitle cues (start, end, text): each segment's text in lines of at most CUE_LINE_CHARS
    (the `shown` part of the `lead` before its first line counted), CUE_LINES lines a cue, as
    subtitle editors split them; a word longer than a line stands alone on it. A cue's times are
    its words' where the segment has them (one per word of its text), else its share of the
    segment's characters."""
    result = []
    for segment, text in _cues(transcript):
        tokens = text.split()
        times = [(w.start, w.end) for w in segment.words] if len(segment.words) == len(tokens) \
            else _spread(segment, tokens)
        width, lines, first = CUE_LINE_CHARS - len(shown(segment)), [[]], 0
        for n, token in enumerate(tokens):
            line = lines[-1]
            if line and len(" ".join([*line, token])) > width:
                width = CUE_LINE_CHARS
                if len(lines) == CUE_LINES:
                    result.append((times[first][0], times[n - 1][1], _cue_text(lead(segment), lines)))
                    lines, first, width = [], n, CUE_LINE_CHARS - len(shown(segment))
                lines.append([])
            lines[-1].append(token)
        result.append((times[first][0], times[-1][1], _cue_text(lead(segment), lines)))
    return result


def _spread(segment: Segment, tokens: list[str]) -> list[tuple[float, float]]:
    """Times for `tokens`, the segment's time shared out by their characters."""
    total, per = len(" ".join(tokens)), segment.end - segment.start
    times, at = [], 0
    for token in tokens:
        times.append((segment.start + per * at / total, segment.start + per * (at + len(token)) / total))
        at += len(token) + 1
    return times


def _cue_text(lead: str, lines: list[list[str]]) -> str:
    return lead + "\n".join(" ".join(line) for line in lines)


def _cues(transcript: Transcript) -> list[tuple[Segment, str]]:
    """Segments with their stripped text, skipping empty ones (an empty cue is invalid)."""
    return [(s, text) for s in transcript.segments if (text := s.text.strip())]


def _timestamp(seconds: float, separator: str) -> str:
    """HH:MM:SS<separator>mmm, rounded to the millisecond."""
    ms = max(round(seconds * 1000), 0)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{ms:03d}"
