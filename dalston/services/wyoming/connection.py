"""One Wyoming client's connection, as Home Assistant's speech-to-text speaks it.

`describe` is answered with `info`. `transcribe` (optional: the default model), `audio-start`,
`audio-chunk`s and `audio-stop` make one job, taken in by the intake every surface shares and
answered with `transcript-start`, a `transcript-chunk` for each segment as the engines decode
it, `transcript` (the whole text, which is what older clients wait for) and `transcript-stop`.
Then the connection may go on with another. Other events are dropped, as the protocol asks of
servers. Anything that breaks the protocol or its bounds is answered with an `error` event,
and the connection is closed."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, Eventable, async_write_event
from wyoming.info import Describe

from dalston.catalog import ModelSpec, UnknownModel
from dalston.contracts import MAX_PROMPT_CHARS, ContractError, TranscribeOptions, TranscriptDelta, convert
from dalston.keys import ApiKey
from dalston.logs import get_logger
from dalston.services.intake import Audio, JobFailed, transcription_problem
from dalston.services.intake.admission import Refused, UploadSlot
from dalston.services.intake.jobs import TranscriptGone, new_job_id
from dalston.services.intake.models import ModelNotInstalled
from dalston.services.wyoming.framing import BadFrame, read_event
from dalston.services.wyoming.utterance import BadAudio, Utterance

if TYPE_CHECKING:
    from dalston.services.wyoming.server import WyomingServer

log = get_logger("dalston.wyoming")

MAX_NAME_CHARS = 128


class ClientError(Exception):
    """What the client is told in an `error` event before the connection is closed."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code


class Gone(Exception):
    """The client stopped reading, or left."""


@dataclass
class Request:
    """What a `transcribe` asked for, checked, and the key its job runs under."""

    model: ModelSpec
    options: TranscribeOptions
    key: ApiKey | None


def _text(data: dict[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is not None and (not isinstance(value, str) or len(value) > MAX_NAME_CHARS):
        raise ClientError("invalid_event", f"{name} must be a string of at most {MAX_NAME_CHARS} characters")
    return value or None


def _count(data: dict[str, Any], name: str) -> int:
    value = data.get(name)
    if type(value) is not int:
        raise ClientError("invalid_event", f"{name} must be a whole number")
    return value


def _hotwords(data: dict[str, Any]) -> str | None:
    """Home Assistant's names and terms to bias towards, as the model's hotwords: as many as fit
    the bound on them, names first."""
    words: list[str] = []
    for name in ("transcript_names", "transcript_terms"):
        values = data.get(name) or []
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ClientError("invalid_event", f"{name} must be a list of strings")
        words += [v.strip() for v in values if v.strip()]
    kept, length = [], 0
    for word in words:
        length += len(word) + (2 if kept else 0)
        if length > MAX_PROMPT_CHARS:
            break
        kept.append(word)
    return ", ".join(kept) or None


class Connection:
    def __init__(self, server: WyomingServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server, self.reader, self.writer = server, reader, writer
        self.timeout = server.settings.session_idle_seconds
        self.request: Request | None = None
        self.utterance: Utterance | None = None

    async def serve(self) -> None:
        try:
            while (event := await self._next()) is not None:
                await self._handle(event)
        except ClientError as exc:
            await self._refuse(exc.code, str(exc))
        except BadFrame as exc:
            await self._refuse("bad_event", str(exc))
        except (Gone, ConnectionError):
            pass
        except Exception as exc:  # noqa: BLE001 - NATS failing, say: this client is told, others go on
            log.error("connection failed", error=repr(exc))
            await self._refuse("internal", "the transcription failed inside Dalston; try again")
        finally:
            if self.utterance is not None:
                await self.utterance.close()

    async def _next(self) -> Event | None:
        try:
            return await read_event(self.reader, self.timeout)
        except TimeoutError:
            raise ClientError("timeout", f"nothing came for {self.timeout:g} s (DALSTON_SESSION_IDLE_SECONDS)") from None

    async def _handle(self, event: Event) -> None:
        if Describe.is_type(event.type):
            await self._send(self.server.info())
        elif Transcribe.is_type(event.type):
            self._no_stream_open("transcribe")
            self.request = await self._request(event.data)
        elif AudioStart.is_type(event.type):
            self._no_stream_open("audio-start")
            self.request = self.request or await self._request({})
            settings = self.server.settings
            try:
                self.utterance = Utterance(
                    _count(event.data, "rate"), _count(event.data, "width"), _count(event.data, "channels"),
                    max_channels=settings.max_channels, max_seconds=settings.max_audio_seconds,
                    max_bytes=int(settings.max_upload_mb * 1024 * 1024))
            except BadAudio as exc:
                raise ClientError("invalid_audio", str(exc)) from None
        elif AudioChunk.is_type(event.type):
            utterance = self._stream_open("audio-chunk")
            try:
                utterance.add(_count(event.data, "rate"), _count(event.data, "width"),
                              _count(event.data, "channels"), event.payload or b"")
            except BadAudio as exc:
                raise ClientError("invalid_audio", str(exc)) from None
        elif AudioStop.is_type(event.type):
            utterance, request = self._stream_open("audio-stop"), self.request
            self.utterance = self.request = None
            try:
                await self._transcribe(utterance, request)
            finally:
                await utterance.close()

    def _no_stream_open(self, kind: str) -> None:
        if self.utterance is not None:
            raise ClientError("invalid_event", f"{kind} came while an audio stream is open; send audio-stop first")

    def _stream_open(self, kind: str) -> Utterance:
        if self.utterance is None:
            raise ClientError("invalid_event", f"{kind} came before audio-start")
        return self.utterance

    async def _request(self, data: dict[str, Any]) -> Request:
        """The model, options and key of a `transcribe` (`data`; empty: the defaults), checked."""
        server, settings = self.server, self.server.settings
        try:
            model = server.catalog.model(_text(data, "name") or settings.default_model,
                                         default=settings.default_model)
        except UnknownModel as exc:
            raise ClientError("unknown_model", str(exc)) from None
        if (problem := transcription_problem(server.catalog, model)) is not None:
            raise ClientError("wrong_runtime", problem)
        try:
            # Streamed: a long stream's chunks are transcribed in order, so its text comes in order.
            options = convert({"language": _text(data, "language"), "hotwords": _hotwords(data), "stream": True},
                              TranscribeOptions)
        except ContractError as exc:
            raise ClientError("invalid_event", f"invalid {exc.field or 'transcribe'}: {exc}") from None
        if (problem := server.catalog.language_problem(model, options.language)) is not None:
            raise ClientError("unsupported_language", problem)
        key = await server.key()
        try:
            server.intake.require_usable(model, options, key)
        except ModelNotInstalled as exc:
            raise ClientError("model_not_installed", str(exc)) from None
        return Request(model, options, key)

    async def _transcribe(self, utterance: Utterance, request: Request) -> None:
        if not utterance.size:
            raise ClientError("no_audio", "audio-stop came before any audio")
        intake = self.server.intake

        async def receive(slot: UploadSlot) -> Audio:
            return Audio(utterance.wav(), "wyoming.wav", request.model.id, request.options, close=utterance.close)

        job_id = new_job_id()
        try:
            followed, _ = await intake.followed_submission(job_id, request.key, receive, segments=True)
        except Refused as exc:
            raise ClientError(exc.code, str(exc)) from None
        await self._send(TranscriptStart(language=request.options.language))
        said_anything = False
        transcript = None
        timeout = intake.settings.request_timeout
        try:
            async with aclosing(followed.events(timeout)) as events:
                async for item in events:
                    if not isinstance(item, TranscriptDelta):
                        transcript = await intake.transcript(item)
                    elif text := item.segment.text.strip():
                        # The whole text joins segments with one space.
                        await self._send(TranscriptChunk(text=f" {text}" if said_anything else text))
                        said_anything = True
        except TimeoutError:
            raise ClientError("timeout", f"transcription did not finish within {timeout:g} s "
                                         "(DALSTON_REQUEST_TIMEOUT)") from None
        except (JobFailed, TranscriptGone) as exc:
            raise ClientError(exc.code, str(exc)) from None
        log.info("transcribed", job=job_id, model=request.model.id, seconds=round(transcript.duration, 2))
        await self._send(Transcript(text=transcript.text, language=transcript.language))
        await self._send(TranscriptStop())

    async def _send(self, message: Eventable) -> None:
        try:
            await asyncio.wait_for(async_write_event(message.event(), self.writer), self.timeout)
        except (TimeoutError, ConnectionError) as exc:
            raise Gone() from exc

    async def _refuse(self, code: str, text: str) -> None:
        log.info("client refused", code=code, reason=text[:200])
        try:
            await self._send(Error(text=text, code=code))
        except Gone:
            pass
