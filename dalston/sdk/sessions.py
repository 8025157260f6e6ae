"""Live sessions on an engine: taking them, finding turns in their audio, transcribing the turns.

While an engine has a free session slot it is a member of its runtime's claim queue group on
`sessions.<runtime>.*`: NATS hands each `SessionRequest` to one member, which answers with a
`SessionClaim` (a member that filled up meanwhile declines, and the client asks again). The
engine then follows `session.<id>.in` (audio, commits, configuration) and reports on
`session.<id>.out`, holding a lease on the session's model until the session ends, so the model
stays loaded however long keep-alive is.

Sessions do not queue behind batch tasks, nor batch tasks behind sessions: an engine runs its one
batch task and up to DALSTON_MAX_SESSIONS sessions side by side. Live audio arrives at 1x and a
turn is decoded many times faster than that, so the cap bounds the share of the engine sessions
can take, and batch work keeps the rest.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable

import msgspec
import numpy as np

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

log = get_logger("dalston.engine.sessions")

FRAME_MS = 20
FRAME_BYTES = SESSION_SAMPLE_RATE * FRAME_MS // 1000 * 2
# Server VAD's threshold (0 to 1) spans these frame levels, in dB below full scale: a quiet
# room is below -50, speech close to a microphone above -30.
QUIETEST_DB, LOUDEST_DB = -50.0, -20.0
# A commit with less audio than this has nothing to transcribe.
MIN_TURN_MS = 100


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
        self._buffer = bytearray()  # the turn so far (or, between turns, the prefix padding)
        self._partial = b""  # the start of a frame not complete yet
        self._audio_ms = 0  # of the session's audio so far
        self._item: str | None = None  # the turn in progress
        self._silence_ms = 0
        self._turns: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
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
            for kind, fields in self._feed(event.audio):
                await self._say(kind, **fields)
        elif event.kind == "commit":
            if len(self._buffer) < MIN_TURN_MS * FRAME_BYTES // FRAME_MS:
                await self._say("error", code="input_audio_buffer_commit_empty",
                                message=f"the buffer holds less than {MIN_TURN_MS} ms of audio")
            else:
                await self._say("committed", item_id=self._commit())
        elif event.kind == "clear":
            self._buffer.clear()
            self._item = None
            await self._say("cleared")
        elif event.kind == "configure" and event.config is not None:
            self.config = event.config
        elif event.kind == "close":
            self._ended.set()

    def _feed(self, pcm: bytes) -> list[tuple[str, dict]]:
        """Take in audio; what server VAD saw in it (speech started, stopped, turns committed)."""
        if self.config.turn_detection is None:
            self._buffer += pcm
            self._audio_ms += len(pcm) * 1000 // (2 * SESSION_SAMPLE_RATE)
            return []
        vad = self.config.turn_detection
        level = 10 ** ((QUIETEST_DB + vad.threshold * (LOUDEST_DB - QUIETEST_DB)) / 20)
        data, events = self._partial + pcm, []
        whole = len(data) // FRAME_BYTES * FRAME_BYTES
        self._partial = data[whole:]
        for start in range(0, whole, FRAME_BYTES):
            frame = data[start:start + FRAME_BYTES]
            self._audio_ms += FRAME_MS
            self._buffer += frame
            samples = np.frombuffer(frame, dtype="<i2").astype(np.float32) / 32768.0
            loud = float(np.sqrt(np.mean(samples * samples))) > level
            if self._item is None:
                if loud:
                    self._item, self._silence_ms = _item_id(), 0
                    padding = len(self._buffer) * FRAME_MS // FRAME_BYTES
                    events.append(("speech_started", {"item_id": self._item,
                                                      "audio_ms": self._audio_ms - padding}))
                else:
                    keep = vad.prefix_padding_ms // FRAME_MS * FRAME_BYTES
                    del self._buffer[:max(0, len(self._buffer) - keep)]
            else:
                self._silence_ms = 0 if loud else self._silence_ms + FRAME_MS
                if self._silence_ms >= vad.silence_duration_ms:
                    item = self._item
                    events.append(("speech_stopped", {"item_id": item,
                                                      "audio_ms": self._audio_ms - self._silence_ms}))
                    self._commit()
                    events.append(("committed", {"item_id": item}))
        return events

    def _commit(self) -> str:
        """The buffer as a turn, queued for transcription; its item id."""
        item = self._item or _item_id()
        self._turns.put_nowait((item, bytes(self._buffer)))
        self._buffer.clear()
        self._item = None
        return item

    # --- transcription ------------------------------------------------------------------

    async def _transcribe_turns(self, handle) -> None:
        while True:
            item, pcm = await self._turns.get()
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


def _item_id() -> str:
    return f"item_{uuid.uuid4().hex[:20]}"
