"""OpenAI's Realtime API, transcription sessions: `/v1/realtime?intent=transcription`.

The WebSocket speaks OpenAI's events; the session behind it is realtime_session.py's.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from typing import Any

import msgspec
from litestar import WebSocket, websocket

from dalston.contracts import (
    SESSION_SAMPLE_RATE,
    ContractError,
    SessionConfig,
    SessionOutput,
    TranscribeOptions,
    TurnDetection,
    convert,
)
from dalston.services.gateway.realtime_session import ClientError, RealtimeSession, parse_event

# Offered by browsers beside the key's subprotocol (auth.py); a browser drops a connection
# whose answer names none of the subprotocols it offered.
REALTIME_SUBPROTOCOL = "realtime"
# OpenAI's server_vad parameters (TurnDetection has more, which other protocols set).
SERVER_VAD_FIELDS = ("threshold", "prefix_padding_ms", "silence_duration_ms")


@websocket("/v1/realtime")
async def realtime(socket: WebSocket, intent: str = "") -> None:
    offered = {p.strip() for p in socket.headers.get("sec-websocket-protocol", "").split(",")}
    await socket.accept(subprotocols=REALTIME_SUBPROTOCOL if REALTIME_SUBPROTOCOL in offered else None)
    session = RealtimeTranscription(socket)
    if intent != "transcription":
        await session.refuse(ClientError("unsupported_intent", "Dalston serves transcription sessions only: "
                                         "connect with ?intent=transcription", "intent"))
    else:
        await session.run()


class RealtimeTranscription(RealtimeSession):
    """One client's transcription session, in OpenAI's events."""

    def __init__(self, socket: WebSocket) -> None:
        super().__init__(socket)
        self._previous_item: str | None = None
        self._shown: dict[str, str] = {}  # item -> the text its deltas have sent (turns in progress)

    async def opened(self) -> None:
        await self.send({"type": "session.created", "session": self.describe()})

    async def handle(self, raw: str | bytes) -> None:
        event = parse_event(raw, "type")
        kind = event["type"]
        if kind == "session.update":
            await self._update(event.get("session"))
        elif kind == "input_audio_buffer.append":
            await self._append(event.get("audio"))
        elif kind == "input_audio_buffer.commit":
            await self.commit()
        elif kind == "input_audio_buffer.clear":
            if not await self.clear():
                await self.send({"type": "input_audio_buffer.cleared"})
        else:
            raise ClientError("unknown_event", f"unknown event type {kind[:100]!r}; a transcription "
                              "session takes session.update and input_audio_buffer.append, commit "
                              "and clear", "type")

    async def _update(self, session: Any) -> None:
        if not isinstance(session, dict):
            raise ClientError("invalid_session", "session.update needs a `session` object", "session")
        if session.get("type", "transcription") != "transcription":
            raise ClientError("unsupported_session", f"session type {session.get('type')!r}: Dalston "
                              "serves transcription sessions only", "session.type")
        audio_input = (session.get("audio") or {}).get("input") or {}
        audio_format = audio_input.get("format")
        if audio_format is not None:
            if audio_format.get("type", "audio/pcm") != "audio/pcm":
                raise ClientError("unsupported_format", f"audio format {audio_format.get('type')!r} is not "
                                  "supported; send audio/pcm (16-bit mono, 24 kHz)", "session.audio.input.format")
            if audio_format.get("rate", SESSION_SAMPLE_RATE) != SESSION_SAMPLE_RATE:
                raise ClientError("unsupported_rate", f"sample rate {audio_format.get('rate')!r} is not "
                                  f"supported; audio/pcm is {SESSION_SAMPLE_RATE} Hz",
                                  "session.audio.input.format.rate")
        turn_detection = self.config.turn_detection
        if "turn_detection" in audio_input:
            turn_detection = _turn_detection(audio_input["turn_detection"])
        model, options = self.model, self.config.options
        transcription = audio_input.get("transcription")
        if transcription:
            if "model" in transcription:
                model = self.choose_model(str(transcription["model"]), "session.audio.input.transcription.model")
            try:
                options = convert({**msgspec.to_builtins(options),
                                   "language": transcription.get("language", options.language),
                                   "prompt": transcription.get("prompt", options.prompt)}, TranscribeOptions)
            except ContractError as exc:
                raise ClientError("invalid_transcription", str(exc),
                                  f"session.audio.input.transcription.{exc.field}") from None
        self.model = model
        await self.reconfigure(SessionConfig(options=options, turn_detection=turn_detection))
        await self.send({"type": "session.updated", "session": self.describe()})

    async def _append(self, audio: Any) -> None:
        if not isinstance(audio, str):
            raise ClientError("invalid_audio", "input_audio_buffer.append needs `audio`: base64 PCM", "audio")
        try:
            pcm = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise ClientError("invalid_base64", "`audio` is not valid base64", "audio") from None
        await self.append(pcm)

    def describe(self) -> dict[str, Any]:
        vad = self.config.turn_detection
        return {"type": "transcription", "id": f"sess_{self.id}", "object": "realtime.transcription_session",
                "audio": {"input": {
                    "format": {"type": "audio/pcm", "rate": SESSION_SAMPLE_RATE},
                    "transcription": {"model": self.model.id, "language": self.config.options.language,
                                      "prompt": self.config.options.prompt or ""},
                    "turn_detection": None if vad is None else {"type": "server_vad", **{
                        name: getattr(vad, name) for name in SERVER_VAD_FIELDS}},
                    "noise_reduction": None}}}

    async def send(self, event: dict[str, Any]) -> None:
        await self.send_json({"event_id": f"event_{uuid.uuid4().hex[:20]}", **event})

    async def send_error(self, code: str, message: str, param: str | None = None) -> None:
        kind = "server_error" if code in ("no_engine", "engine_lost", "session_failed") else "invalid_request_error"
        await self.send({"type": "error", "error": {"type": kind, "code": code, "message": message,
                                                    "param": param}})

    async def on_output(self, out: SessionOutput) -> None:
        item = {"item_id": out.item_id}
        if out.kind == "speech_started":
            await self.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": out.audio_ms, **item})
        elif out.kind == "speech_stopped":
            await self.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": out.audio_ms, **item})
        elif out.kind == "committed":
            await self.send({"type": "input_audio_buffer.committed", "previous_item_id": self._previous_item,
                             **item})
            self._previous_item = out.item_id
        elif out.kind == "partial":
            await self._delta(out.item_id, out.text)
        elif out.kind == "completed":
            await self._delta(out.item_id, out.text)
            self._shown.pop(out.item_id, None)
            await self.send({"type": "conversation.item.input_audio_transcription.completed",
                             "content_index": 0, "transcript": out.text,
                             "usage": {"type": "duration", "seconds": out.seconds}, **item})
        elif out.kind == "cleared":
            await self.send({"type": "input_audio_buffer.cleared"})

    async def _delta(self, item: str, text: str) -> None:
        """OpenAI's deltas add to what came before: a partial that extends the text shown so
        far sends what it adds; one that revises it waits for a later partial or the final text
        (ElevenLabs' partial_transcript, which replaces, can send each as it is)."""
        shown = self._shown.get(item, "")
        if text.startswith(shown) and len(text) > len(shown):
            self._shown[item] = text
            await self.send({"type": "conversation.item.input_audio_transcription.delta", "content_index": 0,
                             "delta": text[len(shown):], "item_id": item})


def _turn_detection(value: Any) -> TurnDetection | None:
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") != "server_vad":
        raise ClientError("unsupported_turn_detection", "turn_detection is server_vad, or null to commit "
                          "turns with input_audio_buffer.commit", "session.audio.input.turn_detection")
    try:
        return convert({k: v for k, v in value.items()
                        if k in SERVER_VAD_FIELDS}, TurnDetection)
    except ContractError as exc:
        raise ClientError("invalid_turn_detection", str(exc),
                          f"session.audio.input.turn_detection.{exc.field}") from None
