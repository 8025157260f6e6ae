"""The Litestar app: `/v1/audio/transcriptions` (OpenAI-compatible), `/v1/jobs`, models,
engines, health. Every route is a thin translation between HTTP and NATS."""

from __future__ import annotations

import math
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from litestar import Litestar, Request, Response, delete, get, post
from litestar.datastructures import UploadFile
from litestar.exceptions import HTTPException, NotFoundException
from litestar.openapi import OpenAPIConfig
from litestar.response import ServerSentEvent, Stream
from litestar.status_codes import HTTP_202_ACCEPTED

from dalston import __version__
from dalston.bus.connection import Bus, connect
from dalston.bus.consumers import consumer_state
from dalston.catalog import Catalog, ModelSpec, UnknownModel
from dalston.config import Settings
from dalston.contracts import (
    FAILURE_STATUS,
    JOBS_STREAM,
    ORCHESTRATOR_JOBS_CONSUMER,
    TASKS_STREAM,
    ContractError,
    JobRecord,
    TranscribeOptions,
    convert,
    encode,
)
from dalston.engines import EngineWatch
from dalston.logs import get_logger
from dalston.services.gateway.auth import job_owner, require_key, visible_owner
from dalston.services.gateway.jobs import JobNotFound, JobService
from dalston.services.gateway.metrics import render_metrics
from dalston.services.gateway.models import ModelLoaded, ModelService
from dalston.services.gateway.realtime import realtime
from dalston.services.gateway.streaming import transcript_events
from dalston.transcript import FORMATS, render

log = get_logger("dalston.gateway")

TIMESTAMP_GRANULARITIES = ("segment", "word")
# A streamed transcription's job, so a client can look it up at /v1/jobs/{id}.
JOB_ID_HEADER = "Dalston-Job-Id"


class ApiError(HTTPException):
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(status_code=status, detail=message)
        self.code = code
        self.param = param


def _error_response(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    message = getattr(exc, "detail", "") or str(exc) or "internal error"
    if status == 413:
        message = (f"the upload is larger than the limit of "
                   f"{request.app.state.settings.max_upload_mb:g} MB (DALSTON_MAX_UPLOAD_MB)")
    if status >= 500:
        log.error("request failed", path=request.url.path, error=repr(exc))
    kind = "invalid_request_error" if status < 500 else "server_error"
    return Response({"error": {"message": message, "type": kind, "param": getattr(exc, "param", None),
                               "code": getattr(exc, "code", None)}}, status_code=status)


def _jobs(request: Request) -> JobService:
    return request.app.state.jobs


async def _read_request(request: Request) -> tuple[UploadFile, str, TranscribeOptions, dict[str, Any]]:
    form = await request.form()
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
    granularities = form.getall("timestamp_granularities[]") if "timestamp_granularities[]" in form else []
    granularities += form.getall("timestamp_granularities") if "timestamp_granularities" in form else []
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
    try:
        # The contract bounds every field (prompt length, temperature range, language code).
        options = convert({"language": str(form.get("language") or "") or None,
                           "prompt": str(form.get("prompt") or "") or None,
                           "temperature": temperature, "word_timestamps": "word" in granularities},
                          TranscribeOptions)
    except ContractError as exc:
        raise ApiError(400, f"invalid {exc.field}: {str(exc).split(': ', 1)[-1]}", param=exc.field) from None
    # The upload is already spooled (memory or a temp file): measuring it is cheap.
    size = upload.file.seek(0, 2)
    upload.file.seek(0)
    if size == 0:
        raise ApiError(400, "the uploaded file is empty", code="invalid_audio", param="file")
    return upload, model.id, options, {"response_format": response_format, "words": "word" in granularities,
                                       "stream": str(form.get("stream") or "").lower() in ("true", "1")}


def _raise_for_failure(record: JobRecord) -> None:
    if record.status == "completed":
        return
    failure = record.failure
    code = failure.code if failure else "internal"
    message = failure.message if failure else f"job ended {record.status}"
    raise ApiError(FAILURE_STATUS[code], message, code=code)


@post("/v1/audio/transcriptions", status_code=200,
      summary="Transcribe audio (OpenAI-compatible); stream=true streams the text as Server-Sent Events")
async def create_transcription(request: Request) -> Response | ServerSentEvent:
    upload, model, options, shape = await _read_request(request)
    settings: Settings = request.app.state.settings
    if shape["stream"]:
        followed = await _jobs(request).submit_followed(upload.file, upload.filename, model, options,
                                                        job_owner(request))
        return ServerSentEvent(transcript_events(followed, settings.request_timeout),
                               headers={JOB_ID_HEADER: followed.id})
    try:
        record = await _jobs(request).run(upload.file, upload.filename, model, options,
                                          job_owner(request), timeout=settings.request_timeout)
    except TimeoutError:
        raise ApiError(504, f"transcription did not finish within {settings.request_timeout:g} s "
                            "(DALSTON_REQUEST_TIMEOUT); use /v1/jobs for long files") from None
    _raise_for_failure(record)
    transcript = await _jobs(request).transcript(record)
    body, media_type = render(transcript, shape["response_format"], words=shape["words"])
    return Response(body, media_type=media_type)


@post("/v1/jobs", status_code=HTTP_202_ACCEPTED, summary="Submit a transcription job")
async def submit_job(request: Request) -> dict[str, Any]:
    upload, model, options, _ = await _read_request(request)
    job_id = await _jobs(request).submit(upload.file, upload.filename, model, options, job_owner(request))
    return {"id": job_id, "status": "queued", "model": model}


async def _record(request: Request, job_id: str) -> JobRecord:
    try:
        return await _jobs(request).get(job_id, visible_owner(request))
    except JobNotFound as exc:
        raise NotFoundException(str(exc)) from None


@get("/v1/jobs/{job_id:str}", summary="A job's status, stages and error")
async def get_job(request: Request, job_id: str) -> JobRecord:
    return await _record(request, job_id)


@get("/v1/jobs", summary="Recent jobs, newest first")
async def list_jobs(request: Request, limit: int = 50) -> dict[str, Any]:
    return {"object": "list", "data": await _jobs(request).list(visible_owner(request), limit)}


@delete("/v1/jobs/{job_id:str}", status_code=HTTP_202_ACCEPTED, summary="Cancel a job")
async def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
    try:
        await _jobs(request).cancel(job_id, visible_owner(request))
    except JobNotFound as exc:
        raise NotFoundException(str(exc)) from None
    return {"id": job_id, "status": "cancelling"}


@get("/v1/jobs/{job_id:str}/transcript", summary="A finished job's transcript")
async def get_transcript(request: Request, job_id: str, format: str = "json") -> Response:
    if format not in FORMATS:
        raise ApiError(400, f"format must be one of {', '.join(FORMATS)}", param="format")
    record = await _record(request, job_id)
    if record.status not in ("completed", "failed", "cancelled"):
        raise ApiError(409, f"job {job_id} is {record.status}; the transcript is not ready", code="not_ready")
    _raise_for_failure(record)
    body, media_type = render(await _jobs(request).transcript(record), format, words=True)
    return Response(body, media_type=media_type)


@get("/v1/engines", summary="Live engines, from their heartbeats")
async def list_engines(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": request.app.state.engines.live()}


def _models(request: Request) -> ModelService:
    return request.app.state.models


def _catalog_model(request: Request, model_id: str) -> ModelSpec:
    try:
        return request.app.state.catalog.model(model_id)
    except UnknownModel as exc:
        raise ApiError(404, str(exc), code="model_not_found") from None


@get("/v1/models", summary="The model catalog with installed and loaded state (OpenAI list shape)")
async def list_models(request: Request) -> dict[str, Any]:
    catalog: Catalog = request.app.state.catalog
    return {"object": "list", "data": [_models(request).describe(m) for m in catalog.models.values()]}


@get("/v1/models/{model_id:str}", summary="One model of the catalog")
async def get_model(request: Request, model_id: str) -> dict[str, Any]:
    return _models(request).describe(_catalog_model(request, model_id))


@post("/v1/models/{model_id:str}/pull", status_code=HTTP_202_ACCEPTED, opt={"admin": True},
      summary="Pull a model into the store; stream=true streams progress as NDJSON")
async def pull_model(request: Request, model_id: str, stream: bool = False,
                     force: bool = False) -> Response | Stream:
    model = _catalog_model(request, model_id)
    service = _models(request)
    service.start_pull(model, force=force)
    if not stream:
        return Response({"id": model.id, "status": "pulling"}, status_code=HTTP_202_ACCEPTED)

    async def lines() -> AsyncIterator[bytes]:
        async for progress in service.follow(model):
            yield encode(progress) + b"\n"

    return Stream(lines(), media_type="application/x-ndjson", status_code=200)


@delete("/v1/models/{model_id:str}", status_code=200, opt={"admin": True},
        summary="Remove a model from the store (refused while loaded unless force)")
async def delete_model(request: Request, model_id: str, force: bool = False) -> dict[str, Any]:
    model = _catalog_model(request, model_id)
    try:
        deleted = _models(request).remove(model, force)
    except ModelLoaded as exc:
        raise ApiError(409, str(exc), code="model_loaded") from None
    return {"id": model.id, "deleted": deleted}


@get("/metrics", summary="Prometheus metrics: engines and task queues", include_in_schema=False)
async def metrics(request: Request) -> Response:
    body = await render_metrics(request.app.state.bus, request.app.state.engines)
    return Response(body, media_type="text/plain; version=0.0.4")


@get("/healthz", summary="The gateway process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok", "version": __version__}


@get("/readyz", summary="NATS is connected and the streams exist")
async def readyz(request: Request) -> Response:
    bus: Bus = request.app.state.bus
    problems = []
    if not bus.connected:
        problems.append("not connected to NATS")
    else:
        for stream in (JOBS_STREAM, TASKS_STREAM):
            if (problem := await bus.stream_problem(stream)) is not None:
                problems.append(f"stream {stream}: {problem}")
        if not problems:
            problems += await _intake_problems(bus)
    status = 503 if problems else 200
    return Response({"status": "unavailable" if problems else "ready", "problems": problems},
                    status_code=status)


async def _intake_problems(bus: Bus) -> list[str]:
    """Submissions waiting while no orchestrator pulls them: accepting more would only queue
    them behind a stalled intake. (An orchestrator between two fetches still has its batch
    unacknowledged, so this is not raised by a busy one.)"""
    try:
        intake = await consumer_state(bus, JOBS_STREAM, ORCHESTRATOR_JOBS_CONSUMER)
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        return [f"consumer {ORCHESTRATOR_JOBS_CONSUMER}: {exc!r}"]
    if intake.pending and not intake.waiting and not intake.unacked:
        return [f"{intake.pending} submitted jobs wait and no orchestrator is taking them"]
    return []


def create_app(settings: Settings, catalog: Catalog | None = None) -> Litestar:
    catalog = catalog or Catalog.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        bus = await connect(settings, name="dalston-gateway")
        engines = EngineWatch()
        await engines.start(bus)
        app.state.bus = bus
        app.state.engines = engines
        app.state.jobs = JobService(bus)
        app.state.models = ModelService(bus, settings, catalog, engines)
        await app.state.models.start()
        try:
            yield
        finally:
            await engines.stop()
            await bus.close()

    app = Litestar(
        route_handlers=[create_transcription, submit_job, get_job, list_jobs, cancel_job,
                        get_transcript, list_engines, list_models, get_model, pull_model, delete_model,
                        metrics, healthz, readyz, realtime],
        lifespan=[lifespan],
        exception_handlers={HTTPException: _error_response, Exception: _error_response},
        guards=[require_key],
        request_max_body_size=int(settings.max_upload_mb * 1024 * 1024),
        logging_config=None,  # ours (dalston.logs), configured by the runner
        openapi_config=OpenAPIConfig(title="Dalston", version=__version__, path="/openapi"),
    )
    app.state.settings = settings
    app.state.catalog = catalog
    return app
