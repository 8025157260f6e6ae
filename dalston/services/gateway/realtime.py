"""OpenAI's Realtime API, transcription sessions: `/v1/realtime?intent=transcription`.

The WebSocket speaks OpenAI's events; behind it the session is a conversation over NATS with one
engine (dalston/sdk/sessions.py): claimed on the first audio, fed on `session.<id>.in`, heard on
`session.<id>.out`. An engine that dies is noticed by its heartbeats going silent: the client
gets an `error` event and the session carries on, on another engine, from the next audio (the
turn in progress is lost). A bad client event gets an `error` event that names the problem, and
the session stays open.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import time
import uuid
from typing import Any

import msgspec
from litestar import WebSocket, websocket
from litestar.exceptions import WebSocketDisconnect

from dalston.bus.connection import Bus
from dalston.catalog import Catalog, UnknownModel
from dalston.config import Settings
from dalston.contracts import (
    HEARTBEAT_SUBJECT,
    SESSION_CLAIMS,
    SESSION_INPUT_SUBJECT,
    SESSION_OUTPUT_SUBJECT,
    SESSION_SAMPLE_RATE,
    ContractError,
    SessionConfig,
    SessionInput,
    SessionOutput,
    SessionRequest,
    TranscribeOptions,
    TurnDetection,
    convert,
    subject_token,
)
from dalston.engines import EngineWatch
from dalston.logs import get_logger
from dalston.services.gateway.auth import job_owner, still_valid, verified_key
from dalston.services.gateway.session_bounds import ACTIVE_SECONDS, AudioPace, SessionSlots

log = get_logger("dalston.gateway.realtime")

CLAIM_ATTEMPTS = 5
CLAIM_TIMEOUT_SECONDS = 2.0
ENGINE_CHECK_SECONDS = 0.5
# How often a session checks that its key is still valid (a revoked key's sessions end).
KEY_CHECK_SECONDS = 2.0
# Audio goes to the engine in pieces well under NATS's max_payload.
AUDIO_PIECE_BYTES = 256 * 1024
# Offered by browsers beside the key's subprotocol (auth.py); a browser drops a connection
# whose answer names none of the subprotocols it offered.
REALTIME_SUBPROTOCOL = "realtime"


class ClientError(Exception):
    """A client event that cannot be followed: answered with an `error` event."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


@websocket("/v1/realtime")
async def realtime(socket: WebSocket, intent: str = "") -> None:
    offered = {p.strip() for p in socket.headers.get("sec-websocket-protocol", "").split(",")}
    await socket.accept(subprotocols=REALTIME_SUBPROTOCOL if REALTIME_SUBPROTOCOL in offered else None)
    state = socket.app.state
    if "realtime_slots" not in state:
        state.realtime_slots = SessionSlots(state.settings.max_realtime_connections, state.engines)
    slots: SessionSlots = state.realtime_slots
    session = RealtimeTranscription(socket, state.bus, state.catalog, state.settings, state.engines, slots)
    if intent != "transcription":
        await session.send_error("unsupported_intent", "Dalston serves transcription sessions only: "
                                 "connect with ?intent=transcription", "intent")
    elif not slots.connect():
        await session.send_error("too_many_sessions", f"this gateway has {slots.max_connections} realtime "
                                 "connections open (DALSTON_MAX_REALTIME_CONNECTIONS); try again later")
    else:
        try:
            await session.serve()
        finally:
            slots.disconnect()
        return
    await socket.close(code=1008)


class RealtimeTranscription:
    """One client's transcription session."""

    def __init__(self, socket: WebSocket, bus: Bus, catalog: Catalog, settings: Settings,
                 engines: EngineWatch, slots: SessionSlots) -> None:
        self.socket, self.bus, self.catalog, self.settings = socket, bus, catalog, settings
        self.engines, self.slots, self.owner = engines, slots, job_owner(socket)
        self.id = uuid.uuid4().hex
        self.model = catalog.model(settings.default_model)
        self.config = SessionConfig()
        self._engine: str | None = None
        self._pace = AudioPace(settings.session_idle_seconds)
        self._ending = asyncio.Event()  # set where the gateway ends the session
        self._send_lock = asyncio.Lock()
        self._previous_item: str | None = None
        self._shown: dict[str, str] = {}  # item -> the text its deltas have sent (turns in progress)

    @property
    def engine(self) -> str | None:
        """The engine serving the session, once claimed: it holds one of the key's slots."""
        return self._engine

    @engine.setter
    def engine(self, engine: str | None) -> None:
        if self._engine is None and engine is not None:
            self.slots.hold(self.owner)
        elif self._engine is not None and engine is None:
            self.slots.release(self.owner)
        self._engine = engine

    # --- the client's side ---------------------------------------------------------------

    async def serve(self) -> None:
        outputs = await self.bus.subscribe(SESSION_OUTPUT_SUBJECT.format(session_id=self.id), self._on_output,
                                           kind=SessionOutput)
        tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._watch()),
                 asyncio.create_task(self._ending.wait())]
        try:
            await self.send({"type": "session.created", "session": self.describe()})
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await outputs.unsubscribe()
            if self.engine is not None:
                await self._forward(SessionInput(kind="close"))
                self.engine = None
            if self._ending.is_set():
                with contextlib.suppress(Exception):  # the client may be gone already
                    await self.socket.close(code=1008)

    async def _end(self, code: str, message: str) -> None:
        """The gateway ends the session: the client is told why, then the socket closes."""
        await self.send_error(code, message)
        self._ending.set()

    async def _read(self) -> None:
        while True:
            try:
                raw = await self.socket.receive_data(mode="text")
            except WebSocketDisconnect:
                return
            try:
                await self._handle(raw)
            except ClientError as exc:
                await self.send_error(exc.code, exc.message, exc.param)
            except (AttributeError, TypeError, ValueError) as exc:
                # A field of the wrong JSON type (a string where an object belongs, say).
                await self.send_error("invalid_event", f"the event's fields are not of the expected "
                                      f"types: {type(exc).__name__}: {exc}"[:500])

    async def _handle(self, raw: str | bytes) -> None:
        try:
            event = msgspec.json.decode(raw)
        except (msgspec.DecodeError, RecursionError) as exc:  # RecursionError: nested too deep
            raise ClientError("invalid_json", f"the event is not JSON msgspec reads: {exc}") from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise ClientError("invalid_event", "an event is a JSON object with a string `type`", "type")
        kind = event["type"]
        if kind == "session.update":
            await self._update(event.get("session"))
        elif kind == "input_audio_buffer.append":
            await self._append(event.get("audio"))
        elif kind == "input_audio_buffer.commit":
            if self.engine is None:
                raise ClientError("input_audio_buffer_commit_empty", "the buffer holds no audio")
            await self._forward(SessionInput(kind="commit"))
        elif kind == "input_audio_buffer.clear":
            if self.engine is None:
                await self.send({"type": "input_audio_buffer.cleared"})
            else:
                await self._forward(SessionInput(kind="clear"))
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
                try:
                    model = self.catalog.model(str(transcription["model"]), default=self.settings.default_model)
                except UnknownModel as exc:
                    raise ClientError("model_not_found", str(exc),
                                      "session.audio.input.transcription.model") from None
            try:
                options = convert({**msgspec.to_builtins(options),
                                   "language": transcription.get("language", options.language),
                                   "prompt": transcription.get("prompt", options.prompt)}, TranscribeOptions)
            except ContractError as exc:
                raise ClientError("invalid_transcription", str(exc),
                                  f"session.audio.input.transcription.{exc.field}") from None
        if model.id != self.model.id and self.engine is not None:
            raise ClientError("model_fixed", "the model cannot change once audio has been sent",
                              "session.audio.input.transcription.model")
        self.model, self.config = model, SessionConfig(options=options, turn_detection=turn_detection)
        if self.engine is not None:
            await self._forward(SessionInput(kind="configure", config=self.config))
        await self.send({"type": "session.updated", "session": self.describe()})

    async def _append(self, audio: Any) -> None:
        if not isinstance(audio, str):
            raise ClientError("invalid_audio", "input_audio_buffer.append needs `audio`: base64 PCM", "audio")
        try:
            pcm = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise ClientError("invalid_base64", "`audio` is not valid base64", "audio") from None
        if len(pcm) % 2:
            raise ClientError("invalid_audio", "audio/pcm is 16-bit: an odd number of bytes cannot be it",
                              "audio")
        if self.engine is None:
            await self._claim()
        await self._pace.take(len(pcm) / (2 * SESSION_SAMPLE_RATE))
        for start in range(0, len(pcm), AUDIO_PIECE_BYTES):
            await self._forward(SessionInput(kind="audio", audio=pcm[start:start + AUDIO_PIECE_BYTES]))

    def describe(self) -> dict[str, Any]:
        vad = self.config.turn_detection
        return {"type": "transcription", "id": f"sess_{self.id}", "object": "realtime.transcription_session",
                "audio": {"input": {
                    "format": {"type": "audio/pcm", "rate": SESSION_SAMPLE_RATE},
                    "transcription": {"model": self.model.id, "language": self.config.options.language,
                                      "prompt": self.config.options.prompt or ""},
                    "turn_detection": None if vad is None else {"type": "server_vad", **msgspec.to_builtins(vad)},
                    "noise_reduction": None}}}

    async def send(self, event: dict[str, Any]) -> None:
        event = {"event_id": f"event_{uuid.uuid4().hex[:20]}", **event}
        async with self._send_lock:
            try:
                await self.socket.send_data(msgspec.json.encode(event).decode(), mode="text")
            except Exception:  # noqa: BLE001 - the client is gone; serve() ends with its socket
                pass

    async def send_error(self, code: str, message: str, param: str | None = None) -> None:
        kind = "server_error" if code in ("no_engine", "engine_lost", "session_failed") else "invalid_request_error"
        await self.send({"type": "error", "error": {"type": kind, "code": code, "message": message,
                                                    "param": param}})

    # --- the engine's side ---------------------------------------------------------------

    async def _claim(self) -> None:
        key = verified_key(self.socket)
        if refusal := self.slots.refusal(self.owner, self.model.runtime, getattr(key, "max_sessions", None)):
            raise ClientError("session_limit", f"{refusal}; end one first, or ask for a higher "
                              "max_sessions (`dalston keys create --max-sessions N`)")
        request = SessionRequest(id=self.id, model=self.model.id, runtime=self.model.runtime,
                                 runtime_model_id=self.model.runtime_model_id, config=self.config,
                                 owner=self.owner)
        reason = "no engine of the runtime is running"
        for attempt in range(CLAIM_ATTEMPTS):
            claim = await self.bus.request(SESSION_CLAIMS, request, CLAIM_TIMEOUT_SECONDS,
                                           runtime=subject_token(self.model.runtime),
                                           model=subject_token(self.model.runtime_model_id))
            if claim is not None:
                if claim.accepted:
                    self.engine = claim.engine
                    log.info("session claimed", session=self.id, engine=claim.engine)
                    return
                reason = claim.reason
            await asyncio.sleep(0.2 * (attempt + 1))
        raise ClientError("no_engine", f"no {self.model.runtime} engine can take this session now "
                          f"({reason}); the audio was dropped")

    async def _forward(self, event: SessionInput) -> None:
        await self.bus.announce(SESSION_INPUT_SUBJECT.format(session_id=self.id), event)

    async def _on_output(self, out: SessionOutput) -> None:
        if out.engine != self.engine:
            return  # an engine the session has moved away from
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
        elif out.kind == "error":
            if out.code in ("session_failed", "session_idle", "engine_stopping", "input_audio_buffer_full"):
                self.engine = None  # that engine ended the session: the next audio claims anew
            if out.code == "input_audio_buffer_full":
                await self._end(out.code, out.message)
            else:
                await self.send_error(out.code, out.message)

    async def _delta(self, item: str, text: str) -> None:
        """OpenAI's deltas add to what came before: a partial that extends the text shown so
        far sends what it adds; one that revises it waits for a later partial or the final text
        (ElevenLabs' partial_transcript, which replaces, can send each as it is)."""
        shown = self._shown.get(item, "")
        if text.startswith(shown) and len(text) > len(shown):
            self._shown[item] = text
            await self.send({"type": "conversation.item.input_audio_transcription.delta", "content_index": 0,
                             "delta": text[len(shown):], "item_id": item})

    async def _watch(self) -> None:
        """Ends an idle session, and one whose key was revoked; tells the client of an engine
        that died (its heartbeats stopped): the next audio claims another."""
        checked = time.monotonic()
        while True:
            await asyncio.sleep(ENGINE_CHECK_SECONDS)
            if self._pace.idle():
                return await self._end("session_idle", f"less than {ACTIVE_SECONDS:g} s of audio in "
                                       f"{self.settings.session_idle_seconds:g} s (DALSTON_SESSION_IDLE_SECONDS)")
            if time.monotonic() - checked >= KEY_CHECK_SECONDS:
                checked = time.monotonic()
                if not await still_valid(self.socket):
                    return await self._end("invalid_api_key", "the API key of this session was revoked")
            engine = self.engine
            if engine is not None and self.engines.silent(
                    HEARTBEAT_SUBJECT.format(runtime=self.model.runtime, engine=engine)):
                self.engine = None
                log.warning("session engine lost", session=self.id, engine=engine)
                await self.send_error("engine_lost", f"the engine serving this session ({engine}) stopped; "
                                      "the turn in progress is lost, and the next audio goes to another engine")


def _turn_detection(value: Any) -> TurnDetection | None:
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") != "server_vad":
        raise ClientError("unsupported_turn_detection", "turn_detection is server_vad, or null to commit "
                          "turns with input_audio_buffer.commit", "session.audio.input.turn_detection")
    try:
        return convert({k: v for k, v in value.items()
                        if k in ("threshold", "prefix_padding_ms", "silence_duration_ms")}, TurnDetection)
    except ContractError as exc:
        raise ClientError("invalid_turn_detection", str(exc),
                          f"session.audio.input.turn_detection.{exc.field}") from None
