"""OpenAI's transcription API: `/v1/audio/transcriptions` and `/v1/audio/translations`, and the
form they share with Dalston's own `/v1/jobs` (`openai_form`)."""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from typing import Any

from litestar import Request, Response, Router, post
from litestar.datastructures import UploadFile
from litestar.response import ServerSentEvent

from dalston.catalog import Catalog, ModelSpec, UnknownModel
from dalston.config import Settings
from dalston.contracts import ContractError, TranscribeOptions, convert
from dalston.services.gateway.form import BadForm, list_values, read_form
from dalston.services.gateway.intake import ApiError, Submission, finished, followed_submission, require_usable
from dalston.services.gateway.streaming import transcript_events
from dalston.services.gateway.voices import asks_known_speakers, known_speakers
from dalston.services.intake import transcription_problem
from dalston.services.intake.jobs import new_job_id
from dalston.transcript import FORMATS, render

SPEAKER_FIELDS = ("num_speakers", "min_speakers", "max_speakers")
TIMESTAMP_GRANULARITIES = ("segment", "word")
INCLUDES = ("logprobs",)
# OpenAI's server_vad chunking parameters -> the VAD's own (TranscribeOptions.vad_parameters).
SERVER_VAD_PARAMETERS = {"threshold": "threshold", "prefix_padding_ms": "speech_pad_ms",
                         "silence_duration_ms": "min_silence_duration_ms"}
# A streamed transcription's job, so a client can look it up at /v1/jobs/{id}.
JOB_ID_HEADER = "Dalston-Job-Id"

def _vad_parameters(form) -> dict[str, float] | None:
    """OpenAI's `chunking_strategy`: `auto` (the VAD's defaults), or server_vad parameters,
    as a JSON object or as the bracketed fields the openai client sends."""
    raw = str(form.get("chunking_strategy") or "")
    strategy = {key[len("chunking_strategy["):-1]: str(form.get(key)) for key in form.keys()
                if key.startswith("chunking_strategy[") and key.endswith("]")}
    if raw and raw != "auto":
        try:
            strategy = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested thousands deep
            strategy = None
        if not isinstance(strategy, dict):
            raise ApiError(400, "chunking_strategy must be `auto` or a server_vad object",
                           param="chunking_strategy")
    if not strategy:
        return None
    if strategy.get("type") != "server_vad":
        raise ApiError(400, "chunking_strategy type must be server_vad", param="chunking_strategy")
    unknown = set(strategy) - {"type", *SERVER_VAD_PARAMETERS}
    if unknown:
        raise ApiError(400, f"unknown chunking_strategy fields {sorted(unknown)}; use "
                            f"{', '.join(SERVER_VAD_PARAMETERS)}", param="chunking_strategy")
    try:
        return {ours: float(strategy[theirs]) if ours == "threshold" else int(float(strategy[theirs]))
                for theirs, ours in SERVER_VAD_PARAMETERS.items() if theirs in strategy}
    except (TypeError, ValueError):
        raise ApiError(400, "chunking_strategy parameters must be numbers", param="chunking_strategy") from None


def _diarize_options(form, response_format: str, model: ModelSpec) -> dict[str, Any] | None:
    """Who spoke: asked by `diarize=true` (or a speaker count, known speakers, or
    response_format=diarized_json), with `num_speakers`, or `min_speakers` and `max_speakers`;
    None when not asked."""
    counts = {name: str(form.get(name)) for name in SPEAKER_FIELDS if str(form.get(name) or "")}
    asked = str(form.get("diarize") or "").lower() in ("true", "1", "yes") or asks_known_speakers(form)
    if not (asked or counts or response_format == "diarized_json"):
        return None
    if not model.capabilities.word_timestamps:
        raise ApiError(400, f"{model.id} gives no word times, which diarization needs to give each "
                            "word its speaker; pick a Whisper model", param="diarize")
    try:
        return {name: int(value) for name, value in counts.items()}
    except ValueError:
        bad = next(name for name, value in counts.items() if not value.lstrip("-").isdigit())
        raise ApiError(400, f"{bad} must be a whole number from 1 to 32", param=bad) from None


async def _read_form(request: Request, task: str | None = None) -> Submission:
    """The form of a transcription or translation (`task`; None: the form's `task` field)."""
    try:
        form = await read_form(request)
    except BadForm as exc:
        raise ApiError(exc.status, str(exc), param=exc.param) from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise ApiError(400, "the multipart field `file` (the audio) is missing", param="file")
    catalog: Catalog = request.app.state.catalog
    settings: Settings = request.app.state.settings
    model_name = str(form.get("model") or settings.default_model)
    try:
        model = catalog.model(model_name, default=settings.default_model)
    except UnknownModel as exc:
        raise ApiError(404, str(exc), code="model_not_found", param="model") from None
    if (problem := transcription_problem(catalog, model)) is not None:
        raise ApiError(400, problem, code="wrong_runtime", param="model")
    granularities = list_values(form, "timestamp_granularities")
    unknown = set(granularities) - set(TIMESTAMP_GRANULARITIES)
    if unknown:
        raise ApiError(400, f"unknown timestamp_granularities {sorted(unknown)}; use segment or word",
                       param="timestamp_granularities[]")
    response_format = str(form.get("response_format") or "json")
    if response_format not in FORMATS:
        raise ApiError(400, f"response_format must be one of {', '.join(FORMATS)}", param="response_format")
    try:
        temperature = float(form.get("temperature") or 0.0)
    except ValueError:
        temperature = math.nan
    if not math.isfinite(temperature):
        raise ApiError(400, "temperature must be a finite number from 0 to 1", param="temperature")
    include = list_values(form, "include")
    if set(include) - set(INCLUDES):
        raise ApiError(400, f"unknown include {sorted(set(include) - set(INCLUDES))}; use logprobs",
                       param="include[]")
    keywords = [k.strip() for k in list_values(form, "keywords") if k.strip()]
    stream = str(form.get("stream") or "").lower() in ("true", "1")
    redact = str(form.get("redact") or "") or None
    if redact is not None and stream:  # streamed text goes out before the transcript is redacted
        raise ApiError(400, "redact cannot stream: the text is masked once the whole transcript is in; "
                            "drop stream=true", param="redact")
    diarize = _diarize_options(form, response_format, model)
    if diarize is not None and asks_known_speakers(form):
        diarize["known_speakers"] = await known_speakers(request, form)
    try:
        # The contract bounds every field (prompt length, temperature range, language code).
        options = convert({"language": str(form.get("language") or "") or None,
                           "prompt": str(form.get("prompt") or "") or None,
                           "temperature": temperature, "word_timestamps": "word" in granularities,
                           "task": task or str(form.get("task") or "transcribe"),
                           "hotwords": ", ".join(keywords) or None,
                           "vad_parameters": _vad_parameters(form), "logprobs": "logprobs" in include,
                           "diarize": diarize,
                           "stream": stream, "redact": redact},
                          TranscribeOptions)
    except ContractError as exc:
        # diarize.num_speakers is the form's num_speakers; other paths name the option itself.
        param = exc.field.removeprefix("diarize.") if exc.field else None
        raise ApiError(400, f"invalid {param}: {str(exc).split(': ', 1)[-1]}", param=param) from None
    if (problem := catalog.language_problem(model, options.language)) is not None:
        raise ApiError(400, problem, code="unsupported_language", param="language")
    require_usable(request, model, options)
    # The upload is already spooled (up to 1 MB in memory, the rest in a temporary file):
    # measuring it is cheap.
    size = upload.file.seek(0, 2)
    upload.file.seek(0)
    if size == 0:
        raise ApiError(400, "the uploaded file is empty", code="invalid_audio", param="file")
    return Submission(upload, model.id, options, webhook_url=str(form.get("webhook_url") or ""),
                      shape={"response_format": response_format, "words": "word" in granularities,
                             "stream": stream})


def openai_form(task: str | None = None) -> Callable[[Request], Awaitable[Submission]]:
    """Reads the OpenAI form of `task` (None: the form's `task` field)."""
    return lambda request: _read_form(request, task)


@post("/transcriptions", status_code=200,
      summary="Transcribe audio (OpenAI-compatible); stream=true streams the text as Server-Sent Events")
async def create_transcription(request: Request) -> Response | ServerSentEvent:
    return await _answer(request, "transcribe")


@post("/translations", status_code=200,
      summary="Translate speech into English text (OpenAI-compatible; multilingual Whisper models)")
async def create_translation(request: Request) -> Response | ServerSentEvent:
    return await _answer(request, "translate")


async def _answer(request: Request, task: str) -> Response | ServerSentEvent:
    """Run the job and answer with its result in the response_format asked for, or, with
    stream=true, with its text as it is decoded (Server-Sent Events)."""
    settings: Settings = request.app.state.settings
    job_id = new_job_id()
    followed, submission = await followed_submission(request, job_id, openai_form(task), segments=True)
    if submission.shape["stream"]:
        return ServerSentEvent(transcript_events(followed, settings.request_timeout),
                               headers={JOB_ID_HEADER: job_id})
    transcript = await finished(request, followed)
    options = submission.options
    body, media_type = render(transcript, submission.shape["response_format"], words=submission.shape["words"],
                              task=options.task, logprobs=options.logprobs)
    return Response(body, media_type=media_type)


openai_api = Router(path="/v1/audio", route_handlers=[create_transcription, create_translation])
