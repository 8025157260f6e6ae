"""ElevenLabs' Scribe Realtime: `/v1/speech-to-text/realtime`, as the `elevenlabs` SDK's
`speech_to_text.realtime.connect` speaks it.

The session is configured by the URL's query (model_id, audio_format, commit_strategy and the
VAD's parameters, language_code, include_timestamps, keyterms); the client sends
`input_audio_chunk` messages (base64 PCM, `commit: true` to end a turn) and hears
`session_started`, `partial_transcript`, `committed_transcript` and, where asked,
`committed_transcript_with_timestamps`. Errors come as ElevenLabs' `{message_type, error}`,
its types by what went wrong. The session behind it is realtime_session.py's.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import msgspec
from litestar import WebSocket, websocket
from litestar.datastructures import MultiDict

from dalston.contracts import (
    SESSION_SAMPLE_RATES,
    ContractError,
    Segment,
    SessionConfig,
    SessionOutput,
    TranscribeOptions,
    TurnDetection,
    convert,
)
from dalston.elevenlabs_shape import ISO_639_3, scribe_words, whisper_language
from dalston.services.gateway.elevenlabs import SCRIBE_MODELS, flag_field, number_field
from dalston.services.gateway.intake import ApiError
from dalston.services.gateway.realtime_session import ClientError, RealtimeSession, parse_event
from dalston.services.gateway.session_bounds import BURST_SECONDS

AUDIO_FORMATS = {f"pcm_{rate}": rate for rate in SESSION_SAMPLE_RATES}
# ElevenLabs' realtime model, beside its batch ones: the default model here.
REALTIME_MODELS = (*SCRIBE_MODELS, "scribe_v2_realtime")
# A chunk holds at most what the session's pace lets through at once (base64 is 4/3 of it, and
# the message around it is small).
MAX_CHUNK_SECONDS = BURST_SECONDS
MESSAGE_OVERHEAD = 4096
# ElevenLabs' VAD parameters: query name -> (TurnDetection field, type, low, high, its default,
# the factor from the query's unit to the field's).
VAD_PARAMETERS: dict[str, tuple[str, type, float, float, float, int]] = {
    "vad_silence_threshold_secs": ("silence_duration_ms", float, 0.3, 3.0, 1.5, 1000),
    "vad_threshold": ("threshold", float, 0.1, 0.9, 0.4, 1),
    "min_speech_duration_ms": ("min_speech_ms", int, 50, 2000, 100, 1),
    "min_silence_duration_ms": ("min_silence_ms", int, 50, 2000, 100, 1),
}
# What Dalston cannot do: refused, rather than answered as though it were done.
UNSUPPORTED = ("secondary_languages", "entity_detection", "entity_redaction", "transcript_edit")
# Dalston's error codes -> ElevenLabs' message types (anything else is a plain `error`).
MESSAGE_TYPES = {
    **dict.fromkeys(("invalid_json", "invalid_event", "unknown_event", "invalid_base64", "invalid_audio",
                     "invalid_input", "input_audio_buffer_commit_empty"), "input_error"),
    **dict.fromkeys(("invalid_request", "model_not_found", "model_fixed", "model_not_installed"),
                    "invalid_request"),
    "chunk_size_exceeded": "chunk_size_exceeded",
    **dict.fromkeys(("too_many_sessions", "session_limit", "no_engine"), "resource_exhausted"),
    **dict.fromkeys(("engine_lost", "engine_stopping", "session_failed", "transcription_failed"),
                    "transcriber_error"),
    "session_idle": "insufficient_audio_activity",
    "input_audio_buffer_full": "queue_overflow",
    "turn_queue_full": "commit_throttled",
    "invalid_api_key": "auth_error",
}


@websocket("/v1/speech-to-text/realtime")
async def scribe_realtime(socket: WebSocket) -> None:
    await socket.accept()
    session = ScribeSession(socket)
    try:
        session.configure(socket.query_params)
    except ClientError as exc:
        await session.refuse(exc)
        return
    await session.run()


class ScribeSession(RealtimeSession):
    """One client's session, in ElevenLabs' messages."""

    def __init__(self, socket: WebSocket) -> None:
        super().__init__(socket)
        self.commit_strategy = "manual"
        self.vad = TurnDetection()  # as asked, though only the vad strategy uses it
        self.include_timestamps = self.include_language = False
        self._chunks = 0  # input_audio_chunk messages with audio so far

    # --- the session's configuration: the URL's query ---------------------------------------

    def configure(self, query: MultiDict) -> None:
        try:
            self._configure(query)
        except ApiError as exc:  # a field the batch API's readers refused
            raise _invalid(exc.param or "query", str(exc.detail)) from None

    def _configure(self, query: MultiDict) -> None:
        model_id = _choice(query, "model_id", None) or REALTIME_MODELS[-1]
        self.model = self.choose_model(self.settings.default_model if model_id in REALTIME_MODELS else model_id,
                                       "model_id")
        audio_format = _choice(query, "audio_format", "pcm_16000")
        if audio_format not in AUDIO_FORMATS:
            raise _invalid("audio_format", f"audio_format {audio_format[:40]!r} is not supported; use one of "
                           f"{', '.join(AUDIO_FORMATS)} (16-bit little-endian mono PCM)")
        self.commit_strategy = _choice(query, "commit_strategy", "manual")
        if self.commit_strategy not in ("manual", "vad"):
            raise _invalid("commit_strategy", "commit_strategy is manual or vad")
        for name in UNSUPPORTED:
            if query.get(name):
                raise _invalid(name, f"{name} is not supported by Dalston")
        if flag_field(query, "no_verbatim"):
            raise _invalid("no_verbatim", "no_verbatim is not supported by Dalston")
        flag_field(query, "enable_logging")  # taken: Dalston keeps no session's audio anyway
        flag_field(query, "filter_background_audio")  # taken: server VAD is what filters here
        self.include_timestamps = flag_field(query, "include_timestamps")
        self.include_language = flag_field(query, "include_language_detection")
        vad = {}
        for name, (field, kind, low, high, default, factor) in VAD_PARAMETERS.items():
            value = number_field(query, name, kind, low, high)
            vad[field] = (default if value is None else value) * factor
        keyterms = [term.strip() for term in query.getall("keyterms", []) if term.strip()]
        try:
            # The contracts bound every field (the language code, the keyterms' length).
            self.vad = convert({k: round(v) if k != "threshold" else v for k, v in vad.items()}, TurnDetection)
            options = convert({"language": whisper_language(_choice(query, "language_code", "")) or None,
                               "hotwords": ", ".join(keyterms) or None,
                               "word_timestamps": self.include_timestamps}, TranscribeOptions)
        except ContractError as exc:
            field = {"language": "language_code", "hotwords": "keyterms"}.get(exc.field, exc.field)
            raise _invalid(field, f"invalid {field}: {str(exc).split(': ', 1)[-1]}") from None
        if (problem := self.catalog.language_problem(self.model, options.language)) is not None:
            raise _invalid("language_code", problem)
        self.config = SessionConfig(options=options, sample_rate=AUDIO_FORMATS[audio_format],
                                    turn_detection=self.vad if self.commit_strategy == "vad" else None)

    async def opened(self) -> None:
        vad, language = self.vad, self.config.options.language
        await self.send_json({"message_type": "session_started", "session_id": self.id, "config": {
            "sample_rate": self.config.sample_rate, "audio_format": f"pcm_{self.config.sample_rate}",
            "language_code": ISO_639_3.get(language, language) if language else None,
            "commit_strategy": self.commit_strategy, "vad_silence_threshold_secs": vad.silence_duration_ms / 1000,
            "vad_threshold": vad.threshold, "min_speech_duration_ms": vad.min_speech_ms,
            "min_silence_duration_ms": vad.min_silence_ms, "model_id": self.model.id,
            "include_timestamps": self.include_timestamps,
            "include_language_detection": self.include_language}})

    # --- the client's messages --------------------------------------------------------------

    async def handle(self, raw: str | bytes) -> None:
        # Refused before it is parsed: a chunk past the bound costs no more than its reading.
        most = int(MAX_CHUNK_SECONDS * 2 * self.config.sample_rate)
        if len(raw) > most * 4 // 3 + MESSAGE_OVERHEAD:
            raise ClientError("chunk_size_exceeded", f"a message of {len(raw)} bytes; a chunk holds at most "
                              f"{MAX_CHUNK_SECONDS:g} s of audio ({most} bytes, base64 encoded)", "audio_base_64")
        message = parse_event(raw, "message_type")
        kind = message["message_type"]
        if kind != "input_audio_chunk":
            raise ClientError("unknown_event", f"unknown message_type {kind[:100]!r}; a session takes "
                              "input_audio_chunk", "message_type")
        audio, commit, rate = message.get("audio_base_64", ""), message.get("commit", False), message.get("sample_rate")
        if not isinstance(audio, str):
            raise ClientError("invalid_audio", "audio_base_64 is base64 PCM, as a string", "audio_base_64")
        if not isinstance(commit, bool):
            raise ClientError("invalid_event", "commit is true or false", "commit")
        if rate is not None and rate != self.config.sample_rate:
            raise ClientError("invalid_audio", f"sample_rate {str(rate)[:20]} is not the session's "
                              f"{self.config.sample_rate} (its audio_format)", "sample_rate")
        try:
            pcm = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise ClientError("invalid_base64", "audio_base_64 is not valid base64", "audio_base_64") from None
        if len(pcm) > most:
            raise ClientError("chunk_size_exceeded", f"a chunk of {len(pcm)} bytes; it holds at most "
                              f"{MAX_CHUNK_SECONDS:g} s of audio ({most} bytes)", "audio_base_64")
        await self._previous_text(message.get("previous_text"))
        if pcm:
            await self.append(pcm)
            self._chunks += 1
        if commit:
            await self.commit()

    async def _previous_text(self, text: Any) -> None:
        """The text before the session's audio (the model's prompt): with the first chunk only."""
        if text is None:
            return
        if not isinstance(text, str):
            raise ClientError("invalid_event", "previous_text is a string", "previous_text")
        if self._chunks:
            raise ClientError("invalid_event", "previous_text comes with the first audio chunk only",
                              "previous_text")
        try:
            options = convert({**msgspec.to_builtins(self.config.options), "prompt": text or None}, TranscribeOptions)
        except ContractError as exc:
            raise ClientError("invalid_event", f"invalid previous_text: {str(exc).split(': ', 1)[-1]}",
                              "previous_text") from None
        await self.reconfigure(msgspec.structs.replace(self.config, options=options))

    # --- the engine's reports -----------------------------------------------------------------

    async def on_output(self, out: SessionOutput) -> None:
        if out.kind == "partial":
            await self.send_json({"message_type": "partial_transcript", "text": out.text})
        elif out.kind == "completed":
            language = ISO_639_3.get(out.language, out.language) if out.language else None
            await self.send_json({"message_type": "committed_transcript", "text": out.text,
                                  **({"language_code": language} if self.include_language else {})})
            if self.include_timestamps:
                turn = Segment(start=0.0, end=0.0, text=out.text, words=out.words)
                await self.send_json({"message_type": "committed_transcript_with_timestamps", "text": out.text,
                                      "language_code": language, "words": scribe_words([turn], "word", None)})

    async def send_error(self, code: str, message: str, param: str | None = None) -> None:
        await self.send_json({"message_type": MESSAGE_TYPES.get(code, "error"), "error": message,
                              "code": code, "param": param})


def _invalid(param: str, message: str) -> ClientError:
    return ClientError("invalid_request", message, param)


def _choice(query: MultiDict, name: str, default: str | None) -> str | None:
    value = query.get(name)
    return default if value is None else str(value)[:200]

