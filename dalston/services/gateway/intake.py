"""Taking in a job over HTTP, whichever API's form it came in (OpenAI's, ElevenLabs'): its place
among the unfinished jobs, an upload slot while its audio is received, the webhook check, and
its publication. Each API reads its own form into a `Submission`; the rest is the same."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from litestar import Request
from litestar.datastructures import UploadFile
from litestar.exceptions import HTTPException

from dalston import dag
from dalston.catalog import Catalog, ModelSpec, UnknownModel
from dalston.config import Settings
from dalston.contracts import (
    FAILURE_STATUS,
    WEBHOOK_URL_MAX_CHARS,
    JobRecord,
    TranscribeOptions,
    Transcript,
    is_webhook_url,
)
from dalston.engines import EngineWatch, how_to_start
from dalston.services.gateway.admission import Admission, Refused
from dalston.services.gateway.auth import job_owner, verified_key
from dalston.services.gateway.jobs import FollowedJob, JobService
from dalston.services.gateway.metrics import GatewayMetrics
from dalston.services.gateway.models import ModelNotInstalled, ModelService
from dalston.webhook_targets import RefusedTarget, check_target


class ApiError(HTTPException):
    """An error with what each API's error shape needs: a code, the parameter at fault, and
    when to try again."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 retry_after: int | None = None):
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        if status == 408:  # the rest of the body is not read: the connection cannot serve another request
            headers["Connection"] = "close"
        super().__init__(status_code=status, detail=message, headers=headers or None)
        self.code = code
        self.param = param
        self.retry_after = retry_after


def error_message(request: Request, exc: Exception) -> str:
    """What an error answer says: its detail, or for a 413 the limit the upload passed."""
    if getattr(exc, "status_code", 500) == 413:
        return (f"the upload is larger than the limit of "
                f"{request.app.state.settings.max_upload_mb:g} MB (DALSTON_MAX_UPLOAD_MB)")
    return getattr(exc, "detail", "") or str(exc) or "internal error"


@dataclass
class Submission:
    """A job read from a request: its audio (spooled, closed once published; None until `fetch`
    brings it from a URL), model, options, the webhook URL asked for (unchecked; empty: none)
    and how to shape the answer."""

    upload: UploadFile | None
    model: str
    options: TranscribeOptions
    webhook_url: str = ""
    shape: dict[str, Any] = field(default_factory=dict)
    fetch: Callable[[], Awaitable[UploadFile]] | None = None


def jobs(request: Request) -> JobService:
    return request.app.state.jobs


def transcription_problem(catalog: Catalog, model: ModelSpec) -> str | None:
    """Why `model` cannot transcribe (a diarization model, say), or None where it can."""
    if catalog.runs(model.runtime, "transcribe"):
        return None
    return f"{model.id} is a {model.runtime} model, which does not transcribe; pick a transcription model"


def require_usable(request: Request, model: ModelSpec, options: TranscribeOptions) -> None:
    """403 `model_not_installed` where the request's key may not run `model`, or the model that
    tells speakers apart when `options` ask who spoke."""
    service: ModelService = request.app.state.models
    models = [model]
    if options.diarize is not None:
        diarizer = request.app.state.settings.diarize_model
        models += [m for m in service.catalog.models.values() if m.id == diarizer]  # unknown: the orchestrator says
    for model in models:
        try:
            service.require_usable(model, verified_key(request))
        except ModelNotInstalled as exc:
            raise ApiError(403, str(exc), code="model_not_installed", param="model") from None


async def checked_webhook_url(request: Request, url: str) -> str | None:
    """A webhook URL fit to be called, or None for none; 400 for one Dalston will not call
    (its host is checked again at each delivery)."""
    if not url:
        return None
    settings: Settings = request.app.state.settings
    if not settings.webhook_secret:
        raise ApiError(400, "webhooks are off here: DALSTON_WEBHOOK_SECRET is not set", param="webhook_url")
    if not is_webhook_url(url):
        raise ApiError(400, f"webhook_url must be an http or https URL of at most "
                            f"{WEBHOOK_URL_MAX_CHARS} characters", param="webhook_url")
    try:
        await check_target(url, settings.webhook_allow_private)
    except RefusedTarget as exc:
        raise ApiError(400, f"webhook_url refused: {exc}", param="webhook_url") from None
    return url


async def submit(request: Request, job_id: str, read: Callable[[Request], Awaitable[Submission]]) -> Submission:
    """Admit job `job_id`, receive its audio (`read` reads the request) and publish it.

    Refused before a byte of the upload is read when DALSTON_MAX_QUEUED_JOBS jobs are
    unfinished or the key holds its share of them (429), or DALSTON_MAX_CONCURRENT_UPLOADS
    uploads (or the key's half of them) are being received (503), all with Retry-After; and
    once its form is read when a runtime it needs has no engine (503)."""
    admission: Admission = request.app.state.admission
    metrics: GatewayMetrics = request.app.state.metrics
    owner, key = job_owner(request), verified_key(request)
    try:
        admission.reserve(job_id, owner, key.max_jobs if key else None)
        try:
            async with admission.receiving(owner) as slot:
                submission = await read(request)
                if submission.fetch is not None:
                    # A URL's audio comes at its source's pace: that holds up this key alone.
                    slot.release_shared()
                    submission.upload = await submission.fetch()
                try:
                    check_engines(request, submission)
                    webhook_url = await checked_webhook_url(request, submission.webhook_url)
                    await jobs(request).submit(job_id, submission.upload.file, submission.upload.filename or "",
                                               submission.model, submission.options, job_owner(request),
                                               webhook_url=webhook_url)
                finally:
                    await submission.upload.close()
        except BaseException:
            admission.release(job_id)
            raise
    except Refused as exc:
        metrics.refused(exc.code)
        raise ApiError(exc.status, str(exc), code=exc.code, retry_after=exc.retry_after) from None
    return submission


def check_engines(request: Request, submission: Submission) -> None:
    """Refused (503) when a runtime the job needs has no live engine and had none for
    DALSTON_ENGINE_WAIT: the orchestrator would only fail the job after that long. A runtime
    seen within it (an engine restarting) is waited for, as the orchestrator does."""
    settings: Settings = request.app.state.settings
    watch: EngineWatch = request.app.state.engines
    for runtime in _runtimes(request.app.state.catalog, settings, submission):
        if not watch.seen_within(runtime, settings.engine_wait):
            raise Refused(503, "no_engine", f"no {runtime} engine is running, nor was one in the last "
                          f"{settings.engine_wait:g} s (DALSTON_ENGINE_WAIT), and this job needs one: "
                          f"{how_to_start(runtime)}", None)


def _runtimes(catalog: Catalog, settings: Settings, submission: Submission) -> list[str]:
    """The runtimes a job's stages run on, as the orchestrator will plan them (a model it will
    refuse needs nothing: the orchestrator says why)."""
    try:
        runtimes = [dag.PREPARE_RUNTIME, catalog.model(submission.model or settings.default_model,
                                                       default=settings.default_model).runtime]
        if submission.options.diarize is not None:
            runtimes.append(catalog.model(settings.diarize_model).runtime)
    except UnknownModel:
        return []
    return [*runtimes, dag.MERGE_RUNTIME]


async def followed_submission(request: Request, job_id: str, read: Callable[[Request], Awaitable[Submission]],
                              *, segments: bool) -> tuple[FollowedJob, Submission]:
    """`submit` a job that is followed from before it is published, so nothing of a fast job
    can be missed: its end, and with `segments` the text its engines decode."""
    followed = await FollowedJob.start(jobs(request), job_id, job_owner(request), segments=segments)
    try:
        return followed, await submit(request, job_id, read)
    except BaseException:
        await followed.close()
        raise


async def finished(request: Request, followed: FollowedJob) -> Transcript:
    """The transcript of a followed job once it has ended; 504 past DALSTON_REQUEST_TIMEOUT,
    and the job's failure as an ApiError."""
    settings: Settings = request.app.state.settings
    record = None
    try:
        async for record in followed.events(settings.request_timeout):
            pass  # any segments go by; the last item is the ended job's record
    except TimeoutError:
        raise ApiError(504, f"transcription did not finish within {settings.request_timeout:g} s "
                            "(DALSTON_REQUEST_TIMEOUT); use /v1/jobs for long files") from None
    raise_for_failure(record)
    return await jobs(request).transcript(record)


def raise_for_failure(record: JobRecord) -> None:
    """ApiError for a job that did not complete, with its failure's code and status."""
    if record.status == "completed":
        return
    failure = record.failure
    code = failure.code if failure else "internal"
    message = failure.message if failure else f"job ended {record.status}"
    raise ApiError(FAILURE_STATUS[code], message, code=code)
