"""Live sessions on an engine: taking them, finding turns in their audio, transcribing the turns.

While an engine has a free session slot it is a member of its runtime's claim queue group on
`sessions.<runtime>.*`: NATS hands each `SessionRequest` to one member, which answers with a
`SessionClaim` (a member that filled up meanwhile declines, and the client asks again). The
engine then follows `session.<id>.in` (audio, commits, configuration) and reports on
`session.<id>.out`, holding a lease on the session's model until the session ends, so the model
stays loaded however long keep-alive is.

Sessions do not queue behind batch tasks, nor batch tasks behind sessions: an engine runs its one
batch task and up to DALSTON_MAX_SESSIONS sessions side by side, on the same loaded model (the
runtime queues their decoding calls, so a turn waits at most for the batch window under way).
Live audio arrives at 1x and a turn is decoded many times faster than that, so the cap bounds the
share of the engine sessions can take, and batch work keeps the rest.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import msgspec

from dalston.bus.connection import Bus, Msg
from dalston.config import Settings
from dalston.contracts import (
    SESSION_CLAIM_SUBJECT,
    SESSION_INPUT_SUBJECT,
    SESSION_OUTPUT_SUBJECT,
    SESSION_SAMPLE_RATE,
    ContractError,
    Segment,
    SessionClaim,
    SessionConfig,
    SessionInput,
    SessionOutput,
    SessionRequest,
    decode,
    encode,
    subject_token,
)
from dalston.logs import get_logger
from dalston.pcm import from_pcm16
from dalston.sdk.actor import ModelActor
from dalston.sdk.announcer import SegmentAnnouncer
from dalston.sdk.models import ModelManager
from dalston.sdk.turns import MIN_TURN_MS, TurnEvent, Turns

log = get_logger("dalston.engine.sessions")

class SessionHost:
    """The live sessions one engine serves."""

    def __init__(self, settings: Settings, engine: str, actor: ModelActor, models: ModelManager,
                 on_change: Callable[[], None]) -> None:
        self.settings, self.engine, self.actor, self.models = settings, engine, actor, models
        self.sessions: dict[str, LiveSession] = {}
        self._on_change = on_change
        self._bus: Bus | None = None
        self._claims = None  # the claim subscription, while a slot is free

    async def start(self, bus: Bus) -> None:
        self._bus = bus
        await self._follow_claims()

    async def stop(self) -> None:
        for session in list(self.sessions.values()):
            await session.end("engine_stopping", "the engine serving this session is stopping")
        if self._claims is not None:
            await self._claims.unsubscribe()
            self._claims = None

    async def _follow_claims(self) -> None:
        """In the claim queue group exactly while a slot is free."""
        free = len(self.sessions) < self.settings.max_sessions
        if free and self._claims is None:
            subject = SESSION_CLAIM_SUBJECT.format(runtime=subject_token(self.actor.runtime), model="*")
            self._claims = await self._bus.subscribe(subject, self._on_request,
                                                     queue=f"sessions-{subject_token(self.actor.runtime)}")
        elif not free and self._claims is not None:
            claims, self._claims = self._claims, None
            await claims.unsubscribe()

    async def _on_request(self, msg: Msg) -> None:
        try:
            request = decode(msg.data, SessionRequest)
        except ContractError as exc:
            log.warning("bad session request", error=str(exc)[:300])
            return
        refusal = None
        if request.runtime != self.actor.runtime:
            refusal = f"this engine runs {self.actor.runtime}, not {request.runtime}"
        elif len(self.sessions) >= self.settings.max_sessions or request.id in self.sessions:
            refusal = "no free session slot"
        elif request.runtime_model_id not in self.models.held() and not self.models.can_load_another():
            # Loading it would wait for the sessions that lease this engine's models to end.
            refusal = "its model slots are in use by other sessions"
        if refusal is None:
            session = self.sessions[request.id] = LiveSession(self, request)
            await session.open()  # following its input before the client hears it may send
        await msg.respond(encode(SessionClaim(session_id=request.id, engine=self.engine,
                                              accepted=refusal is None, reason=refusal or "")))
        if refusal is None:
            log.info("session claimed", session=request.id, model=request.model)
            asyncio.create_task(self._serve(session))
            await self._follow_claims()
            self._on_change()

    async def _serve(self, session: LiveSession) -> None:
        try:
            await session.run()
        finally:
            self.sessions.pop(session.id, None)
            log.info("session ended", session=session.id)
            await self._follow_claims()
            self._on_change()


class LiveSession:
    """One client's live audio: turns found by server VAD (or committed by the client), each
    transcribed as soon as it ends, with a delta per decoded segment."""

    def __init__(self, host: SessionHost, request: SessionRequest) -> None:
        self.host, self.request, self.id = host, request, request.id
        self.config: SessionConfig = request.config
        self._bus: Bus = host._bus
        self._out = SESSION_OUTPUT_SUBJECT.format(session_id=self.id)
        self._turns = Turns(self.config.turn_detection)
        self._committed: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._ended = asyncio.Event()
        self._cancelled = threading.Event()
        self._last_input = time.monotonic()
        self._input = None

    async def open(self) -> None:
        self._input = await self._bus.subscribe(SESSION_INPUT_SUBJECT.format(session_id=self.id),
                                                self._on_input)

    async def run(self) -> None:
        try:
            async with self.host.models.use(self.request.runtime_model_id) as handle:
                transcriber = asyncio.create_task(self._transcribe_turns(handle))
                try:
                    while not self._ended.is_set():
                        if time.monotonic() - self._last_input > self.host.settings.session_idle_timeout:
                            await self.end("session_idle", "no audio or events for "
                                           f"{self.host.settings.session_idle_timeout:g} s; session ended")
                        try:
                            await asyncio.wait_for(self._ended.wait(), 1.0)
                        except TimeoutError:
                            pass
                finally:
                    transcriber.cancel()
        except Exception as exc:  # noqa: BLE001 - the model could not be had: the client is told
            message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            await self._say("error", code="session_failed", message=message[:1000])
        finally:
            self._cancelled.set()
            await self._input.unsubscribe()

    async def end(self, code: str, message: str) -> None:
        await self._say("error", code=code, message=message)
        self._ended.set()

    async def _say(self, kind: str, **fields) -> None:
        try:
            await self._bus.announce(self._out, SessionOutput(kind=kind, engine=self.host.engine, **fields))
        except Exception as exc:  # noqa: BLE001 - the connection is down: the client notices the engine gone
            log.warning("session event not sent", session=self.id, error=repr(exc))

    # --- input --------------------------------------------------------------------------

    async def _on_input(self, msg: Msg) -> None:
        self._last_input = time.monotonic()
        try:
            event = decode(msg.data, SessionInput)
        except ContractError as exc:
            await self._say("error", code="invalid_input", message=str(exc)[:1000])
            return
        if event.kind == "audio":
            for found in self._turns.feed(event.audio):
                await self._turn_event(found)
        elif event.kind == "commit":
            if (found := self._turns.commit()) is None:
                await self._say("error", code="input_audio_buffer_commit_empty",
                                message=f"the buffer holds less than {MIN_TURN_MS} ms of audio")
            else:
                await self._turn_event(found)
        elif event.kind == "clear":
            self._turns.clear()
            await self._say("cleared")
        elif event.kind == "configure" and event.config is not None:
            self.config = event.config
            self._turns.detection = event.config.turn_detection
        elif event.kind == "close":
            self._ended.set()

    async def _turn_event(self, found: TurnEvent) -> None:
        if found.kind == "committed":
            self._committed.put_nowait((found.item_id, found.audio))
        await self._say(found.kind, item_id=found.item_id, audio_ms=found.audio_ms)

    # --- transcription ------------------------------------------------------------------

    async def _transcribe_turns(self, handle) -> None:
        while True:
            item, pcm = await self._committed.get()
            said: list[str] = []

            def delta(seq: int, segment: Segment) -> SessionOutput:
                text = segment.text.strip()
                return SessionOutput(kind="delta", engine=self.host.engine, item_id=item,
                                     text=f" {text}" if seq and text else text)

            announce = SegmentAnnouncer(self._bus, self._out, delta)
            # Server VAD has already cut the turn to its speech: the runtime's own VAD would
            # only add to the latency. A committed turn may hold long silences: it keeps it.
            options = msgspec.structs.replace(self.config.options, vad=self.config.turn_detection is None)
            try:
                result = await asyncio.to_thread(self.host.actor.transcribe, handle,
                                                 from_pcm16(pcm, SESSION_SAMPLE_RATE),
                                                 options, self._cancelled, announce)
                said = [text for s in result.segments if (text := s.text.strip())]
            except Exception as exc:  # noqa: BLE001 - one turn failed; the session goes on
                log.exception("turn not transcribed", session=self.id)
                await self._say("error", item_id=item, code="transcription_failed",
                                message=f"{type(exc).__name__}: {exc}"[:1000])
                continue
            finally:
                await announce.close()
            await self._say("completed", item_id=item, text=" ".join(said),
                            seconds=len(pcm) / (2 * SESSION_SAMPLE_RATE))

