"""ElevenLabs' speech-to-text API: `POST /v1/speech-to-text` and
`GET /v1/speech-to-text/transcripts/{id}`, so apps built on the `elevenlabs` SDK work by
changing `base_url` alone. Errors come in ElevenLabs' shapes: a 422 lists the fields at fault
(`{"detail": [{"loc", "msg", "type"}]}`), anything else is `{"detail": {"status", "message"}}`."""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from typing import Any

from litestar import Request, Response, Router, get, post
from litestar.datastructures import FormMultiDict, MultiDict, UploadFile
from litestar.exceptions import HTTPException

from dalston.catalog import Catalog, UnknownModel
from dalston.config import Settings
from dalston.contracts import MAX_SPEAKERS, ContractError, DiarizeOptions, TranscribeOptions, convert
from dalston.elevenlabs_shape import EXPORTS, GRANULARITIES, speech_to_text, whisper_language
from dalston.logs import get_logger
from dalston.services.gateway.audio_url import FetchFailed, fetch_audio
from dalston.services.gateway.auth import visible_owner
from dalston.services.gateway.form import BadForm, read_form
from dalston.services.gateway.intake import (
    ApiError,
    Submission,
    error_message,
    finished,
    followed_submission,
    jobs,
    raise_for_failure,
    require_usable,
)
from dalston.services.intake import transcription_problem
from dalston.services.intake.jobs import JobNotFound, new_job_id

log = get_logger("dalston.gateway")

# ElevenLabs' model ids: the default model here.
SCRIBE_MODELS = ("scribe_v1", "scribe_v2")
URL_FIELDS = ("cloud_storage_url", "source_url")


def _invalid(param: str, message: str) -> ApiError:
    return ApiError(422, message, code="invalid_parameters", param=param)


def _error_response(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    message = error_message(request, exc)
    if status >= 500 and getattr(exc, "retry_after", None) is None:  # a refusal is no failure
        log.error("request failed", path=request.url.path, error=repr(exc))
    if status == 422:
        body: dict[str, Any] = {"detail": [{"loc": ["body", getattr(exc, "param", None) or "form"],
                                            "msg": message, "type": "value_error"}]}
    else:
        body = {"detail": {"status": getattr(exc, "code", None) or "error", "message": message}}
    return Response(body, status_code=status, headers=getattr(exc, "headers", None))


def flag_field(form: MultiDict, name: str) -> bool:
    """The field (of a form, or a WebSocket's query) as true or false; absent is false."""
    value = str(form.get(name) or "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise _invalid(name, f"{name} must be true or false")
    return value in ("true", "1")


def number_field(form: MultiDict, name: str, kind: type, low: float, high: float) -> Any:
    """The field as `kind`, from `low` to `high`; None where it is not sent."""
    raw = str(form.get(name) or "")
    if not raw:
        return None
    try:
        value = kind(raw)
    except ValueError:
        value = math.nan
    if not low <= value <= high:  # NaN fails too
        raise _invalid(name, f"{name} must be a number from {low:g} to {high:g}")
    return value


def _export_formats(form: FormMultiDict) -> tuple[str, ...]:
    """The `format` of each additional_formats entry (a JSON list of ExportOptions); their
    layout options are taken but not applied."""
    raw = str(form.get("additional_formats") or "")
    if not raw:
        return ()
    try:
        entries = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested thousands deep
        entries = None
    if isinstance(entries, dict):
        entries = [entries]
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise _invalid("additional_formats", "additional_formats must be a JSON list of {\"format\": ...}")
    formats = tuple(str(e.get("format"))[:40] for e in entries)
    unknown = sorted(set(formats) - set(EXPORTS))
    if unknown:
        raise _invalid("additional_formats", f"unknown additional_formats {unknown[:5]}; use {', '.join(EXPORTS)}")
    if len(set(formats)) < len(formats):
        # Each is the whole transcript again: repeats would only multiply the answer.
        raise _invalid("additional_formats", "additional_formats names each format at most once")
    return formats


def _diarize(form: FormMultiDict) -> DiarizeOptions | None:
    """ElevenLabs' diarize, num_speakers (the most speakers) and diarization_threshold (taken,
    bounded, not used yet)."""
    num_speakers = number_field(form, "num_speakers", int, 1, MAX_SPEAKERS)
    number_field(form, "diarization_threshold", float, 0.0, 1.0)
    if not flag_field(form, "diarize"):
        return None
    return DiarizeOptions(num_speakers=num_speakers)


def _audio(request: Request, form: FormMultiDict) -> tuple[UploadFile | None, Callable[[], Awaitable[UploadFile]] | None]:
    """The uploaded `file`, or how to fetch the audio from cloud_storage_url or source_url."""
    upload = form.get("file")
    urls = [(name, str(form.get(name))) for name in URL_FIELDS if form.get(name)]
    if isinstance(upload, UploadFile) == bool(urls) or len(urls) > 1:
        raise _invalid("file", "send exactly one of file, cloud_storage_url and source_url")
    if not urls:
        _refuse_empty(upload)
        return upload, None
    name, url = urls[0]

    async def fetch() -> UploadFile:
        try:
            fetched = await fetch_audio(url, request.app.state.settings)
        except FetchFailed as exc:
            raise ApiError(exc.status, str(exc), code="invalid_source_url", param=name) from None
        try:
            _refuse_empty(fetched)
        except ApiError:
            await fetched.close()
            raise
        return fetched
    return None, fetch


def _refuse_empty(upload: UploadFile) -> None:
    size = upload.file.seek(0, 2)
    upload.file.seek(0)
    if size == 0:
        raise _invalid("file", "the audio is empty")


async def _read(request: Request) -> Submission:
    """The job an ElevenLabs speech-to-text form asks for."""
    try:
        form = await read_form(request)
    except BadForm as exc:
        if exc.status != 400:
            raise ApiError(exc.status, str(exc), code="request_timeout") from None
        raise _invalid(exc.param or "form", str(exc)) from None
    settings: Settings = request.app.state.settings
    catalog: Catalog = request.app.state.catalog
    model_id = str(form.get("model_id") or "")
    if not model_id:
        raise _invalid("model_id", "model_id is required (scribe_v1, scribe_v2 or a Dalston model id)")
    try:
        model = catalog.model(settings.default_model if model_id in SCRIBE_MODELS else model_id,
                              default=settings.default_model)
    except UnknownModel as exc:
        raise _invalid("model_id", str(exc)) from None
    if (problem := transcription_problem(catalog, model)) is not None:
        raise _invalid("model_id", problem)
    granularity = str(form.get("timestamps_granularity") or "word")
    if granularity not in GRANULARITIES:
        raise _invalid("timestamps_granularity", f"timestamps_granularity must be one of {', '.join(GRANULARITIES)}")
    flag_field(form, "tag_audio_events")  # taken; Whisper does not tag audio events
    keyterms = [k.strip() for key in ("keyterms[]", "keyterms") for k in form.getall(key, []) if str(k).strip()]
    try:
        # The contract bounds every field (language code, temperature range, hotwords length).
        options = convert({"language": whisper_language(str(form.get("language_code") or "")) or None,
                           "temperature": number_field(form, "temperature", float, 0.0, 1.0) or 0.0,
                           "word_timestamps": granularity != "none",
                           "hotwords": ", ".join(keyterms) or None, "diarize": _diarize(form)},
                          TranscribeOptions)
    except ContractError as exc:
        field = {"language": "language_code", "hotwords": "keyterms"}.get(exc.field, exc.field)
        raise _invalid(field, f"invalid {field}: {str(exc).split(': ', 1)[-1]}") from None
    if (problem := catalog.language_problem(model, options.language)) is not None:
        raise _invalid("language_code", problem)
    require_usable(request, model, options)
    shape = {"granularity": granularity, "multichannel": flag_field(form, "use_multi_channel"),
             "formats": _export_formats(form), "webhook": flag_field(form, "webhook")}
    upload, fetch = _audio(request, form)
    return Submission(upload, model.id, options, webhook_url=str(form.get("webhook_url") or ""), shape=shape,
                      fetch=fetch)


@post("/speech-to-text", status_code=200, summary="Transcribe audio (ElevenLabs-compatible)")
async def convert_speech(request: Request) -> dict[str, Any]:
    job_id = new_job_id()
    followed, submission = await followed_submission(request, job_id, _read, segments=False)
    shape = submission.shape
    if shape["webhook"]:
        await followed.close()
        return {"message": f"Accepted: the transcript will be at /v1/speech-to-text/transcripts/{job_id}",
                "request_id": job_id, "transcription_id": job_id}
    transcript = await finished(request, followed)
    return speech_to_text(transcript, granularity=shape["granularity"], multichannel=shape["multichannel"],
                          formats=shape["formats"], transcription_id=job_id)


@get("/speech-to-text/transcripts/{transcription_id:str}",
     summary="A transcript by its transcription_id (ElevenLabs-compatible)")
async def get_speech_transcript(request: Request, transcription_id: str) -> dict[str, Any]:
    try:
        record = await jobs(request).get(transcription_id, visible_owner(request))
    except JobNotFound as exc:
        raise ApiError(404, str(exc), code="transcript_not_found") from None
    if record.status not in ("completed", "failed", "cancelled"):
        raise ApiError(409, f"transcription {transcription_id} is {record.status}; not ready",
                       code="not_ready")
    raise_for_failure(record)
    transcript = await jobs(request).transcript(record)
    # The request's answer shape is not kept: word timings as the job asked, and one
    # transcript per channel where there are several.
    return speech_to_text(transcript, granularity="word" if record.options.word_timestamps else "none",
                          multichannel=transcript.channels > 1, transcription_id=record.id)


elevenlabs_api = Router(path="/v1", route_handlers=[convert_speech, get_speech_transcript],
                        exception_handlers={HTTPException: _error_response, Exception: _error_response})
