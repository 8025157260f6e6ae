"""A live session's gateway side, whatever the wire protocol its client speaks (OpenAI Realtime
in realtime.py, ElevenLabs' Scribe Realtime in elevenlabs_realtime.py).

Behind the WebSocket the session is a conversation over NATS with one engine
(dalston/sdk/sessions.py): claimed on the first audio, fed on `session.<identity>.<id>.in`,
heard on `session.<identity>.<id>.out`, where the identity is the claiming engine's NATS user,
the only one that may hear the input or speak on the output. An engine that dies is noticed by its heartbeats going silent: the client
gets an error and the session carries on, on another engine, from the next audio (the turn in
progress is lost). A bad client event gets an error that names the problem, and the session
stays open. A subclass translates its protocol's events to `append`, `commit`, `clear` and
`reconfigure`, and the engine's `SessionOutput`s back to its events.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import msgspec
from litestar import WebSocket
from litestar.exceptions import WebSocketDisconnect

from dalston import tracing
from dalston.catalog import ModelSpec, UnknownModel
from dalston.config import Settings
from dalston.contracts import (
    SESSION_CLAIMS,
    SESSION_INPUT_SUBJECT,
    SESSION_OUTPUT_SUBJECT,
    SessionConfig,
    SessionInput,
    SessionOutput,
    SessionRequest,
    heartbeat_subject,
    subject_token,
)
from dalston.logs import get_logger
from dalston.services.gateway.auth import job_owner, still_valid, verified_key
from dalston.services.gateway.session_bounds import ACTIVE_SECONDS, AudioPace, SessionSlots
from dalston.services.intake import transcription_problem
from dalston.services.intake.models import ModelNotInstalled

log = get_logger("dalston.gateway.realtime")

CLAIM_ATTEMPTS = 5
CLAIM_TIMEOUT_SECONDS = 2.0
ENGINE_CHECK_SECONDS = 0.5
# How often a session checks that its key is still valid (a revoked key's sessions end).
KEY_CHECK_SECONDS = 2.0
# Audio goes to the engine in pieces well under NATS's max_payload.
AUDIO_PIECE_BYTES = 256 * 1024
# Errors of the engine after which it no longer serves the session: the next audio claims anew.
ENGINE_ENDED = ("session_failed", "session_idle", "engine_stopping", "input_audio_buffer_full")


class ClientError(Exception):
    """A client event that cannot be followed: answered with an error event."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def parse_event(raw: str | bytes, type_field: str) -> dict[str, Any]:
    """A client's event: a JSON object with a string `type_field`."""
    try:
        event = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise ClientError("invalid_json", f"the event is not JSON msgspec reads: {exc}") from None
    if not isinstance(event, dict) or not isinstance(event.get(type_field), str):
        raise ClientError("invalid_event", f"an event is a JSON object with a string `{type_field}`", type_field)
    return event


def session_slots(socket: WebSocket) -> SessionSlots:
    """The gateway's one count of open sessions and claimed engine slots, for every protocol."""
    state = socket.app.state
    if "realtime_slots" not in state:
        state.realtime_slots = SessionSlots(state.settings.max_realtime_connections, state.engines)
    return state.realtime_slots


class RealtimeSession:
    """One client's live session (the socket accepted already)."""

    def __init__(self, socket: WebSocket) -> None:
        state = socket.app.state
        self.socket, self.bus, self.catalog, self.engines = socket, state.bus, state.catalog, state.engines
        self.settings: Settings = state.settings
        self.slots, self.owner = session_slots(socket), job_owner(socket)
        self.id = uuid.uuid4().hex
        self.model = self.catalog.model(self.settings.default_model)
        self.config = SessionConfig()
        self._engine: str | None = None
        self._identity = ""  # the claiming engine's (SessionClaim.identity)
        self._outputs = None  # the subscription to its output
        self._pace = AudioPace(self.settings.session_idle_seconds)
        # Turns committed and not yet transcribed: a client that waits for them is not idle.
        self._owed = 0
        self._ending = asyncio.Event()  # set where the gateway ends the session
        self._send_lock = asyncio.Lock()

    # --- what a protocol defines ---------------------------------------------------------

    async def opened(self) -> None:
        """Tell the client that the session is open."""

    async def handle(self, raw: str | bytes) -> None:
        """Follow one client event; ClientError where it cannot be followed."""
        raise NotImplementedError

    async def on_output(self, out: SessionOutput) -> None:
        """Tell the client what the engine serving the session reported (errors aside)."""
        raise NotImplementedError

    async def send_error(self, code: str, message: str, param: str | None = None) -> None:
        raise NotImplementedError

    # --- the session's life ---------------------------------------------------------------

    async def run(self) -> None:
        """Serve the session while the gateway has room for it; else tell the client and close."""
        if not self.slots.connect():
            await self.refuse(ClientError("too_many_sessions", f"this gateway has {self.slots.max_connections} "
                                          "realtime connections open (DALSTON_MAX_REALTIME_CONNECTIONS); "
                                          "try again later"))
            return
        try:
            # One trace per session: its claim carries it to the engine, whose turns are spans in it.
            with tracing.span("realtime session", kind=tracing.SERVER, session=self.id, owner=self.owner,
                              protocol=type(self).__name__):
                await self._serve()
        finally:
            self.slots.disconnect()
        if self._ending.is_set():  # once its place is free: a client told of the end may come again
            with contextlib.suppress(Exception):  # the client may be gone already
                await self.socket.close(code=1008)

    async def refuse(self, error: ClientError) -> None:
        await self.send_error(error.code, error.message, error.param)
        await self.socket.close(code=1008)

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
            self._owed = 0  # an engine that let the session go owes it nothing
        self._engine = engine

    async def _serve(self) -> None:
        tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._watch()),
                 asyncio.create_task(self._ending.wait())]
        try:
            await self.opened()
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            if self.engine is not None:
                await self._forward(SessionInput(kind="close"))
                self.engine = None
            if self._outputs is not None:
                await self._outputs.unsubscribe()

    async def end(self, code: str, message: str) -> None:
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
                await self.handle(raw)
            except ClientError as exc:
                await self.send_error(exc.code, exc.message, exc.param)
            except (AttributeError, TypeError, ValueError) as exc:
                # A field of the wrong JSON type (a string where an object belongs, say).
                await self.send_error("invalid_event", f"the event's fields are not of the expected "
                                      f"types: {type(exc).__name__}: {exc}"[:500])

    async def send_json(self, event: dict[str, Any]) -> None:
        async with self._send_lock:
            try:
                await self.socket.send_data(msgspec.json.encode(event).decode(), mode="text")
            except Exception:  # noqa: BLE001 - the client is gone; the session ends with its socket
                pass

    # --- what a client asks ---------------------------------------------------------------

    def choose_model(self, name: str, param: str) -> ModelSpec:
        """The catalog model `name` (an alias of the default model, or a model id) that this
        client may transcribe with; ClientError naming `param` otherwise."""
        try:
            model = self.catalog.model(name, default=self.settings.default_model)
        except UnknownModel as exc:
            raise ClientError("model_not_found", str(exc), param) from None
        if (problem := transcription_problem(self.catalog, model)) is not None:
            raise ClientError("model_not_found", problem, param)
        try:
            self.socket.app.state.models.require_usable(model, verified_key(self.socket))
        except ModelNotInstalled as exc:
            raise ClientError("model_not_installed", str(exc), param) from None
        if model.id != self.model.id and self.engine is not None:
            raise ClientError("model_fixed", "the model cannot change once audio has been sent", param)
        return model

    async def append(self, pcm: bytes) -> None:
        """Audio for the session: 16-bit PCM at its sample rate."""
        if len(pcm) % 2:
            raise ClientError("invalid_audio", "the audio is 16-bit PCM: an odd number of bytes cannot be it",
                              "audio")
        if self.engine is None:
            await self._claim()
        await self._pace.take(len(pcm) / (2 * self.config.sample_rate))
        for start in range(0, len(pcm), AUDIO_PIECE_BYTES):
            await self._forward(SessionInput(kind="audio", audio=pcm[start:start + AUDIO_PIECE_BYTES]))

    async def commit(self) -> None:
        if self.engine is None:
            raise ClientError("input_audio_buffer_commit_empty", "the buffer holds no audio")
        await self._forward(SessionInput(kind="commit"))

    async def clear(self) -> bool:
        """Drop the audio not committed yet; False where there is none (no engine holds any)."""
        if self.engine is None:
            return False
        await self._forward(SessionInput(kind="clear"))
        return True

    async def reconfigure(self, config: SessionConfig) -> None:
        self.config = config
        if self.engine is not None:
            await self._forward(SessionInput(kind="configure", config=config))

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
                    await self._hear(claim.identity)
                    self.engine = claim.engine
                    log.info("session claimed", session=self.id, engine=claim.engine)
                    return
                reason = claim.reason
            await asyncio.sleep(0.2 * (attempt + 1))
        raise ClientError("no_engine", f"no {self.model.runtime} engine can take this session now "
                          f"({reason}); the audio was dropped")

    async def _hear(self, identity: str) -> None:
        """Follow the output of the engine identity that claimed the session (only)."""
        if identity != self._identity or self._outputs is None:
            if self._outputs is not None:
                await self._outputs.unsubscribe()
            self._outputs = await self.bus.subscribe(
                SESSION_OUTPUT_SUBJECT.format(identity=identity, session_id=self.id), self._on_output,
                kind=SessionOutput)
            self._identity = identity

    async def _forward(self, event: SessionInput) -> None:
        await self.bus.announce(SESSION_INPUT_SUBJECT.format(identity=self._identity, session_id=self.id), event)

    async def _on_output(self, out: SessionOutput) -> None:
        if out.engine != self.engine:
            return  # an engine the session has moved away from
        if out.kind != "error":
            if out.kind == "committed":
                self._owed += 1
            elif out.kind == "completed":
                self._owed = max(0, self._owed - 1)
            await self.on_output(out)
            return
        if out.code == "transcription_failed":
            self._owed = max(0, self._owed - 1)
        if out.code in ENGINE_ENDED:
            self.engine = None
        if out.code == "input_audio_buffer_full":
            await self.end(out.code, out.message)
        else:
            await self.send_error(out.code, out.message)

    async def _watch(self) -> None:
        """Ends an idle session (no turn of it waiting to be transcribed), and one whose key was revoked; tells the client of an engine
        that died (its heartbeats stopped): the next audio claims another."""
        checked = time.monotonic()
        while True:
            await asyncio.sleep(ENGINE_CHECK_SECONDS)
            if self._pace.idle() and not self._owed:
                return await self.end("session_idle", f"less than {ACTIVE_SECONDS:g} s of audio in "
                                      f"{self.settings.session_idle_seconds:g} s (DALSTON_SESSION_IDLE_SECONDS)")
            if time.monotonic() - checked >= KEY_CHECK_SECONDS:
                checked = time.monotonic()
                if not await still_valid(self.socket):
                    return await self.end("invalid_api_key", "the API key of this session was revoked")
            engine = self.engine
            if engine is not None and self.engines.silent(
                    heartbeat_subject(self.model.runtime, self._identity, engine)):
                self.engine = None
                log.warning("session engine lost", session=self.id, engine=engine)
                await self.send_error("engine_lost", f"the engine serving this session ({engine}) stopped; "
                                      "the turn in progress is lost, and the next audio goes to another engine")
