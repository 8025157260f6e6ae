"""Live sessions on an engine: taking them, finding turns in their audio, transcribing the turns.

While an engine has a free session slot it is a member of its runtime's claim queue group on
`sessions.<runtime>.*`: NATS hands each `SessionRequest` to one member, which answers with a
`SessionClaim` (a member that filled up meanwhile declines, and the client asks again). The
engine then follows `session.<identity>.<id>.in` (audio, commits, configuration) and reports on
`session.<identity>.<id>.out`, where its identity is its NATS user, the only one that may hear
or speak on those subjects, holding a lease on the session's model until the session ends, so the model
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
from dataclasses import dataclass

import msgspec

from dalston import tracing
from dalston.bus.connection import Bus
from dalston.config import Settings
from dalston.contracts import (
    SESSION_CLAIMS,
    SESSION_INPUT_SUBJECT,
    SESSION_OUTPUT_SUBJECT,
    ContractError,
    Segment,
    SessionClaim,
    SessionConfig,
    SessionInput,
    SessionOutput,
    SessionRequest,
    Word,
    nats_identity,
    subject_token,
)
from dalston.logs import get_logger
from dalston.pcm import from_pcm16
from dalston.sdk.actor import ModelActor
from dalston.sdk.models import ModelManager
from dalston.sdk.turns import MIN_TURN_MS, BufferFull, TurnEvent, Turns

log = get_logger("dalston.engine.sessions")

class SessionHost:
    """The live sessions one engine serves."""

    def __init__(self, settings: Settings, engine: str, actor: ModelActor, models: ModelManager,
                 on_change: Callable[[], None]) -> None:
        self.settings, self.engine, self.actor, self.models = settings, engine, actor, models
        # What its sessions' subjects name: its NATS user (any token where NATS has no users).
        self.identity = nats_identity(settings.nats_user)
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
            self._claims = await self._bus.serve(SESSION_CLAIMS, self._on_request,
                                                 queue=f"sessions-{subject_token(self.actor.runtime)}",
                                                 runtime=subject_token(self.actor.runtime), model="*")
        elif not free and self._claims is not None:
            claims, self._claims = self._claims, None
            await claims.unsubscribe()

    async def _on_request(self, request: SessionRequest) -> SessionClaim:
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
            log.info("session claimed", session=request.id, model=request.model)
            asyncio.create_task(self._serve(session))
        return SessionClaim(session_id=request.id, engine=self.engine, identity=self.identity,
                            accepted=refusal is None, reason=refusal or "")

    async def _serve(self, session: LiveSession) -> None:
        # Out of the claim queue group if this session took the last slot: here, not in the
        # claim's handler, as leaving the group ends the subscription whose handler that is.
        await self._follow_claims()
        self._on_change()
        try:
            await session.run()
        finally:
            self.sessions.pop(session.id, None)
            log.info("session ended", session=session.id)
            await self._follow_claims()
            self._on_change()


# Committed turns waiting to be transcribed: past it a client's commit is refused and server VAD
# lets the turn in progress go on, so a flood of tiny commits cannot queue minutes of work.
MAX_QUEUED_TURNS = 4
# A turn's text so far is decoded again after this much new audio, and sent as a partial; at
# least PARTIAL_SHARE of the engine's time stays free for the turn's final decode, so a partial
# waits for more audio while the last one took longer than that share of the new audio lasts.
PARTIAL_EVERY_MS = 1000
PARTIAL_SHARE = 0.5
# No partial starts once the speech has paused this long: the turn may be ending, and its final
# decode, due when the pause reaches min_silence_ms, would wait behind the partial.
PARTIAL_PAUSE_MS = 64
WINDOW_MS = 30_000  # Whisper decodes audio in windows this long
# A turn's audio past this, after its settled words, is decoded with word times, and the words
# two partials agreed on are settled there: later partials of the turn take only the audio after
# them, so a partial's cost stays bounded however long the turn goes on. Its final does too once
# the turn outgrows one window; within one, the final decodes all of it after the agreed words
# as its prefix (Whisper's encoder costs a whole window however short the audio).
TAIL_MS = 10_000


@dataclass
class Draft:
    """A decode of a turn in progress: its audio up to `covered` bytes."""

    item: str
    covered: int
    task: asyncio.Task
    final: bool  # decoded as the turn's text (every option), not as a cheap partial


@dataclass
class Settled:
    """A long turn's words that are not decoded again: the first `cut` bytes of its audio."""

    item: str
    cut: int
    words: list[Word]  # times from the turn's start


class LiveSession:
    """One client's live audio: turns found by server VAD (or committed by the client), each
    transcribed as soon as it ends; while a turn goes on, its text so far as partials.

    One decode at a time per session: a partial is only started while nothing waits to be
    transcribed, and a committed turn reuses the last draft where it covers all its speech.

    Partials are stable as whisper_streaming's LocalAgreement-2 makes them: the words two
    successive partials of a turn begin with alike are kept, and every later decode of the
    turn, its final too, continues from them (TranscribeOptions.prefix). Partials keep the
    beam, so the words they agree on are as good as the final's own."""

    def __init__(self, host: SessionHost, request: SessionRequest) -> None:
        self.host, self.request, self.id = host, request, request.id
        self.config: SessionConfig = request.config
        self._bus: Bus = host._bus
        self._out = SESSION_OUTPUT_SUBJECT.format(identity=host.identity, session_id=self.id)
        # The rate is the claim's: a later `configure` changes how turns are found, not the audio.
        self.rate = request.config.sample_rate
        self._turns = Turns(self.config.turn_detection, int(host.settings.max_session_buffer_seconds * 1000),
                            self.rate)
        self._committed: asyncio.Queue[TurnEvent] = asyncio.Queue(MAX_QUEUED_TURNS)
        self._decoding = asyncio.Lock()
        self._draft: Draft | None = None
        self._heard: tuple[str, list[str]] = ("", [])  # the last partial's item and words
        self._agreed: tuple[str, list[str]] = ("", [])  # a turn's words two partials agreed on
        self._settled = Settled("", 0, [])
        self._partial_seconds = 0.0  # how long the last partial took to decode
        self._language: str | None = None  # as the last decode heard it
        self._handle = None  # the model, once leased
        self._ended = asyncio.Event()
        self._cancelled = threading.Event()
        self._last_input = time.monotonic()
        self._input = None

    async def open(self) -> None:
        self._input = await self._bus.subscribe(SESSION_INPUT_SUBJECT.format(identity=self.host.identity,
                                                                             session_id=self.id),
                                                self._on_input, kind=SessionInput,
                                                on_invalid=self._on_invalid_input)

    async def run(self) -> None:
        # In the trace of the gateway's session, whose claim this session began in: each turn
        # is a span under it.
        with tracing.span("engine session", session=self.id, engine=self.host.engine,
                          model=self.request.model):
            await self._run()

    async def _run(self) -> None:
        idle = self.host.settings.session_idle_seconds
        try:
            async with self.host.models.use(self.request.runtime_model_id) as handle:
                self._handle = handle
                transcriber = asyncio.create_task(self._transcribe_turns())
                self._draft_turn()  # audio that came while the model loaded: its partial now
                try:
                    while not self._ended.is_set():
                        # A gateway that went away without closing: nothing comes, nothing waits
                        # (no committed turn queued or being transcribed).
                        if (time.monotonic() - self._last_input > idle and self._committed.empty()
                                and not self._decoding.locked()):
                            await self.end("session_idle", f"no audio or events for {idle:g} s; session ended")
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
            self._draft = None
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

    async def _on_invalid_input(self, exc: ContractError) -> None:
        self._last_input = time.monotonic()
        await self._say("error", code="invalid_input", message=str(exc)[:1000])

    async def _on_input(self, event: SessionInput) -> None:
        self._last_input = time.monotonic()
        if event.kind == "audio":
            await self._audio(event.audio)
        elif event.kind == "commit":
            await self._commit()
        elif event.kind == "clear":
            self._turns.clear()
            await self._say("cleared")
        elif event.kind == "configure" and event.config is not None:
            self.config = event.config
            self._turns.detection = event.config.turn_detection
        elif event.kind == "close":
            self._ended.set()

    async def _audio(self, pcm: bytes) -> None:
        self._turns.hold = self._committed.full()
        try:
            found = self._turns.feed(pcm)
        except BufferFull as exc:
            await self.end("input_audio_buffer_full", f"{exc}; commit more often")
            return
        for event in found:
            await self._turn_event(event)
        self._draft_turn()

    async def _commit(self) -> None:
        if self._committed.full():
            await self._say("error", code="turn_queue_full",
                            message=f"{MAX_QUEUED_TURNS} committed turns wait to be transcribed; the buffer "
                            "is kept: commit again once one is done")
        elif (found := self._turns.commit()) is None:
            await self._say("error", code="input_audio_buffer_commit_empty",
                            message=f"the buffer holds less than {MIN_TURN_MS} ms of audio")
        else:
            await self._turn_event(found)

    async def _turn_event(self, found: TurnEvent) -> None:
        if found.kind == "committed":
            self._committed.put_nowait(found)
        await self._say(found.kind, item_id=found.item_id, audio_ms=found.audio_ms)

    # --- transcription ------------------------------------------------------------------

    def _bytes(self, ms: int) -> int:
        return 2 * self.rate * ms // 1000

    def _pause(self) -> int:
        """Bytes of a pause that ends a turn's speech (TurnDetection.min_silence_ms): the turn is
        decoded then, so that server VAD's commit finds its text ready. A client's commit
        needs no pause: a decode of all the audio is its text."""
        vad = self.config.turn_detection
        return 0 if vad is None else self._bytes(vad.min_silence_ms)

    def _draft_turn(self) -> None:
        """Decode the turn in progress again, when enough is new or its speech may have ended."""
        turn = self._turns.turn
        if turn is None or self._handle is None or self._decoding.locked() or not self._committed.empty():
            return
        item, length, spoken = turn
        draft = self._draft if self._draft is not None and self._draft.item == item else None
        done = draft.covered if draft is not None else 0
        pause = self._pause()
        # Its speech may have ended: decoded now as its final text, ready when the turn commits.
        paused = (pause > 0 and length - spoken >= pause
                  and (draft is None or not draft.final or done < spoken + pause))
        every = max(self._bytes(PARTIAL_EVERY_MS), self._bytes(int(1000 * self._partial_seconds / PARTIAL_SHARE)))
        speaking = length - spoken < self._bytes(PARTIAL_PAUSE_MS)
        if paused or (speaking and length - done >= every):
            pcm = self._turns.turn_audio()
            self._draft = Draft(item, length, asyncio.create_task(self._decode_draft(item, pcm, paused)), paused)

    async def _decode_draft(self, item: str, pcm: bytes, final: bool) -> list[Segment] | None:
        said = await self._decode(pcm, item, draft=not final)
        if said and not final:
            words = _text(said).split()
            heard_item, heard = self._heard
            if heard_item == item:
                agreed = _common_start(heard, words)
                if len(agreed) > len(self._agreed_words(item)):
                    self._agreed = (item, agreed)
            self._heard = (item, words)
            self._settle(item, said)
            await self._say("partial", item_id=item, text=_text(said))
        self._draft_turn()  # a pause found while this decoded: the turn's final now, not at the next audio
        return said

    def _settled_for(self, item: str) -> Settled:
        return self._settled if self._settled.item == item else Settled(item, 0, [])

    def _settle(self, item: str, said: list[Segment]) -> None:
        """Settle the agreed words of a partial that timed them, all but the last (the audio
        after a word's end may still belong to it): the turn's audio is cut midway to the next."""
        timed = [w for s in said for w in s.words]
        if [w.word.strip() for w in timed] != _text(said).split():
            return  # a short tail's partial, without word times (or words that do not line up)
        last = len(self._agreed_words(item)) - 1
        if last <= len(self._settled_for(item).words):
            return
        cut = 2 * int((timed[last - 1].end + timed[last].start) / 2 * self.rate)
        if cut > self._settled_for(item).cut:
            self._settled = Settled(item, cut, timed[:last])
            log.debug("turn words settled", session=self.id, item=item, words=last, seconds=round(cut / (2 * self.rate), 2))

    def _tail_segments(self, said: list[Segment], settled: Settled) -> list[Segment]:
        """A tail's segments on the turn's clock, after a segment of its settled words."""
        offset = settled.cut / (2 * self.rate)
        def later(timed):
            return msgspec.structs.replace(timed, start=timed.start + offset, end=timed.end + offset)
        tail = [msgspec.structs.replace(later(s), words=[later(w) for w in s.words]) for s in said]
        if not settled.words:
            return tail
        first = Segment(start=settled.words[0].start, end=settled.words[-1].end,
                        text=" ".join(w.word.strip() for w in settled.words), words=settled.words)
        return [first, *tail]

    def _agreed_words(self, item: str) -> list[str]:
        return self._agreed[1] if self._agreed[0] == item else []

    async def _decode(self, pcm: bytes, item: str, draft: bool = False) -> list[Segment] | None:
        """A turn's segments that hold words; None (the client told) where decoding failed."""
        # A long turn: only the audio after its settled words, the words before as the prompt.
        settled = (self._settled_for(item) if draft or len(pcm) > self._bytes(WINDOW_MS)
                   else Settled(item, 0, []))
        pcm = pcm[settled.cut:]
        # Server VAD has already cut the turn to its speech: the runtime's own VAD would
        # only add to the latency. A committed turn may hold long silences: it keeps it.
        # The prefix leads Whisper's first 30 s window only: a longer tail's agreed words may
        # lie past it, so such a tail is decoded afresh.
        agreed = self._agreed_words(item)[len(settled.words):] if len(pcm) <= self._bytes(WINDOW_MS) else []
        # A partial times its words where it may settle some.
        timed = self.config.options.word_timestamps if not draft else len(pcm) > self._bytes(TAIL_MS)
        options = msgspec.structs.replace(self.config.options, vad=self.config.turn_detection is None, draft=draft,
                                          prefix=" ".join(agreed) or None, word_timestamps=timed)
        if settled.words:
            options = msgspec.structs.replace(options, prompt=" ".join(w.word.strip() for w in settled.words[-50:]))
        async with self._decoding:
            try:
                with tracing.span("decode", seconds=len(pcm) / (2 * self.rate), draft=draft):
                    began = time.monotonic()
                    result = await asyncio.to_thread(self.host.actor.transcribe, self._handle,
                                                     from_pcm16(pcm, self.rate), options,
                                                     self._cancelled, lambda segment: None)
                    if draft:
                        self._partial_seconds = time.monotonic() - began
            except Exception as exc:  # noqa: BLE001 - one turn failed; the session goes on
                if self._cancelled.is_set():
                    return None  # the session ended under it
                log.exception("turn not transcribed", session=self.id)
                await self._say("error", code="transcription_failed", message=f"{type(exc).__name__}: {exc}"[:1000])
                return None
        self._language = result.language
        return self._tail_segments([s for s in result.segments if s.text.strip()], settled)

    async def _transcribe_turns(self) -> None:
        while True:
            turn = await self._committed.get()
            with tracing.span("turn", session=self.id, item=turn.item_id, audio_ms=turn.audio_ms):
                await self._transcribe_turn(turn)
            self._draft_turn()

    async def _transcribe_turn(self, turn: TurnEvent) -> None:
        draft, self._draft = self._draft, None
        if (draft is not None and draft.final and draft.item == turn.item_id
                and draft.covered >= turn.spoken + self._pause()):
            said = await draft.task  # all its speech was decoded already
        else:
            said = await self._decode(turn.audio, turn.item_id)
        self._committed.task_done()
        if said is not None:
            # Word times from the turn's start to the session's clock.
            offset = turn.start_ms / 1000
            words = [msgspec.structs.replace(w, start=w.start + offset, end=w.end + offset)
                     for s in said for w in s.words] if self.config.options.word_timestamps else []
            await self._say("completed", item_id=turn.item_id, text=_text(said), words=words,
                            language=self._language, seconds=len(turn.audio) / (2 * self.rate))


def _common_start(one: list[str], other: list[str]) -> list[str]:
    """The words both begin with."""
    size = 0
    while size < min(len(one), len(other)) and one[size] == other[size]:
        size += 1
    return one[:size]


def _text(segments: list[Segment]) -> str:
    return " ".join(s.text.strip() for s in segments)
