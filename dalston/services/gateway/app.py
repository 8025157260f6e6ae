"""The Litestar app: `/v1/audio/*` (OpenAI-compatible, openai.py), `/v1/speech-to-text`
(ElevenLabs-compatible, elevenlabs.py) and its realtime WebSocket (elevenlabs_realtime.py),
`/v1/realtime` (realtime.py), `/v1/jobs`, models, engines, health. Every route is a thin translation between HTTP and NATS."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from litestar import Litestar, Request, Response, delete, get, post
from litestar.exceptions import HTTPException, NotFoundException
from litestar.openapi import OpenAPIConfig
from litestar.response import Stream
from litestar.status_codes import HTTP_202_ACCEPTED
from prometheus_client import CONTENT_TYPE_LATEST

from dalston import __version__
from dalston.bus.connection import Bus, connect
from dalston.bus.consumers import consumer_state
from dalston.catalog import Catalog, ModelSpec, UnknownModel
from dalston.config import Settings
from dalston.contracts import JOBS_STREAM, ORCHESTRATOR_JOBS_CONSUMER, TASKS_STREAM, JobRecord, encode
from dalston.engines import EngineWatch
from dalston.logs import get_logger
from dalston.services.gateway.auth import require_key, visible_owner
from dalston.services.gateway.elevenlabs import elevenlabs_api
from dalston.services.gateway.elevenlabs_realtime import scribe_realtime
from dalston.services.gateway.intake import ApiError, error_message, jobs, raise_for_failure, submit
from dalston.services.gateway.metrics import GatewayMetrics
from dalston.services.gateway.openai import openai_api, openai_form
from dalston.services.gateway.realtime import realtime
from dalston.services.gateway.voices import delete_voice, enroll_voice, list_voices
from dalston.services.gateway.web import web_page
from dalston.services.intake import Intake
from dalston.services.intake.job_index import UnknownCursor
from dalston.services.intake.jobs import JobNotFound, new_job_id
from dalston.services.intake.models import ModelLoaded, ModelService
from dalston.transcript import FORMATS, render

log = get_logger("dalston.gateway")



def _error_response(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    message = error_message(request, exc)
    code = getattr(exc, "code", None)
    if status >= 500 and getattr(exc, "retry_after", None) is None:  # a refusal is no failure
        log.error("request failed", path=request.url.path, error=repr(exc))
    kind = "invalid_request_error" if status < 500 else "server_error"
    return Response({"error": {"message": message, "type": kind, "param": getattr(exc, "param", None),
                               "code": code}}, status_code=status, headers=getattr(exc, "headers", None))


@post("/v1/jobs", status_code=HTTP_202_ACCEPTED, summary="Submit a transcription job")
async def submit_job(request: Request) -> dict[str, Any]:
    job_id = new_job_id()
    submission = await submit(request, job_id, openai_form())
    return {"id": job_id, "status": "queued", "model": submission.model}


async def _record(request: Request, job_id: str) -> JobRecord:
    try:
        return await jobs(request).get(job_id, visible_owner(request))
    except JobNotFound as exc:
        raise NotFoundException(str(exc)) from None


@get("/v1/jobs/{job_id:str}", summary="A job's status, stages and error")
async def get_job(request: Request, job_id: str) -> JobRecord:
    return await _record(request, job_id)


MAX_LIST_LIMIT = 1000


@get("/v1/jobs", summary="Recent jobs, newest first; a page after the job `after`")
async def list_jobs(request: Request, limit: int = 50, after: str | None = None) -> dict[str, Any]:
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise ApiError(400, f"limit must be from 1 to {MAX_LIST_LIMIT}", param="limit")
    try:
        page, has_more = await jobs(request).list(visible_owner(request), limit, after)
    except UnknownCursor:
        raise ApiError(400, "after must be the id of a listed job (the last_id of the previous page)",
                       param="after") from None
    return {"object": "list", "data": page, "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None, "has_more": has_more}


@delete("/v1/jobs/{job_id:str}", status_code=HTTP_202_ACCEPTED, summary="Cancel a job")
async def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
    try:
        await jobs(request).cancel(job_id, visible_owner(request))
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
    raise_for_failure(record)
    body, media_type = render(await jobs(request).transcript(record), format, words=True,
                              task=record.options.task, logprobs=record.options.logprobs)
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


@get("/metrics", summary="Prometheus metrics: engines, queues, jobs, refusals", include_in_schema=False)
async def metrics(request: Request) -> Response:
    body = await request.app.state.metrics.render(request.app.state.bus)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@get("/healthz", summary="The gateway process is up", opt={"open": True})
async def healthz() -> dict[str, str]:
    return {"status": "ok", "version": __version__}


@get("/readyz", summary="NATS is connected and the streams exist", opt={"open": True})
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
        # The metrics show the admission's count; the intake tells them of each job that ends,
        # and the index of each record.
        metrics = GatewayMetrics(engines, lambda: intake.admission.unfinished, settings.max_queued_jobs)
        intake = Intake.build(bus, settings, catalog, engines, on_ended=metrics.job_ended)
        app.state.metrics = metrics
        app.state.intake = intake
        await intake.start()
        app.state.models = intake.models
        await app.state.models.start()
        try:
            yield
        finally:
            await intake.stop()
            await engines.stop()
            await bus.close()

    app = Litestar(
        route_handlers=[openai_api, submit_job, get_job, list_jobs, cancel_job,
                        get_transcript, list_engines, list_models, get_model, pull_model, delete_model,
                        enroll_voice, list_voices, delete_voice,
                        metrics, healthz, readyz, elevenlabs_api, scribe_realtime, realtime, web_page],
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
