"""Taking in a job over HTTP, whichever API's form it came in (OpenAI's, ElevenLabs'): each API
reads its own form into a `Submission`; the intake that every surface shares
(`dalston.services.intake`) admits and publishes it, and its failures become `ApiError`s."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from litestar import Request
from litestar.datastructures import UploadFile
from litestar.exceptions import HTTPException

from dalston.catalog import ModelSpec
from dalston.config import Settings
from dalston.contracts import WEBHOOK_URL_MAX_CHARS, JobRecord, TranscribeOptions, Transcript, is_webhook_url
from dalston.services.gateway.auth import verified_key
from dalston.services.gateway.metrics import GatewayMetrics
from dalston.services.intake import Audio, Intake, JobFailed, check_completed
from dalston.services.intake.admission import Refused, UploadSlot
from dalston.services.intake.jobs import FollowedJob, JobService
from dalston.services.intake.models import ModelNotInstalled
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


def intake(request: Request) -> Intake:
    return request.app.state.intake


def jobs(request: Request) -> JobService:
    return intake(request).jobs


def require_usable(request: Request, model: ModelSpec, options: TranscribeOptions) -> None:
    """403 `model_not_installed` where the request's key may not run `model`, or the model that
    tells speakers apart when `options` ask who spoke."""
    try:
        intake(request).require_usable(model, options, verified_key(request))
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


class _Reading:
    """Reads a request's submission once the intake holds an upload slot for it."""

    def __init__(self, request: Request, read: Callable[[Request], Awaitable[Submission]]) -> None:
        self.request, self.read = request, read
        self.submission: Submission | None = None

    async def __call__(self, slot: UploadSlot) -> Audio:
        self.submission = submission = await self.read(self.request)
        if submission.fetch is not None:
            # A URL's audio comes at its source's pace: that holds up this key alone.
            slot.release_shared()
            submission.upload = await submission.fetch()
        try:
            webhook_url = await checked_webhook_url(self.request, submission.webhook_url)
        except BaseException:
            await submission.upload.close()
            raise
        return Audio(submission.upload.file, submission.upload.filename or "", submission.model,
                     submission.options, webhook_url=webhook_url, close=submission.upload.close)


@contextmanager
def _refusals(request: Request) -> Iterator[None]:
    """The admission's refusals as ApiErrors, with Retry-After, counted in the metrics."""
    try:
        yield
    except Refused as exc:
        metrics: GatewayMetrics = request.app.state.metrics
        metrics.refused(exc.code)
        raise ApiError(exc.status, str(exc), code=exc.code, retry_after=exc.retry_after) from None


async def submit(request: Request, job_id: str, read: Callable[[Request], Awaitable[Submission]]) -> Submission:
    """Admit job `job_id`, receive its audio (`read` reads the request) and publish it.

    Refused before a byte of the upload is read when DALSTON_MAX_QUEUED_JOBS jobs are
    unfinished or the key holds its share of them (429), or DALSTON_MAX_CONCURRENT_UPLOADS
    uploads (or the key's half of them) are being received (503), all with Retry-After; and
    once its form is read when a runtime it needs has no engine (503)."""
    reading = _Reading(request, read)
    with _refusals(request):
        await intake(request).submit(job_id, verified_key(request), reading)
    return reading.submission


async def followed_submission(request: Request, job_id: str, read: Callable[[Request], Awaitable[Submission]],
                              *, segments: bool) -> tuple[FollowedJob, Submission]:
    """`submit` a job that is followed from before it is published, so nothing of a fast job
    can be missed: its end, and with `segments` the text its engines decode."""
    reading = _Reading(request, read)
    with _refusals(request):
        followed, _ = await intake(request).followed_submission(job_id, verified_key(request), reading,
                                                                segments=segments)
    return followed, reading.submission


async def finished(request: Request, followed: FollowedJob) -> Transcript:
    """The transcript of a followed job once it has ended; 504 past DALSTON_REQUEST_TIMEOUT,
    and the job's failure as an ApiError."""
    settings: Settings = request.app.state.settings
    try:
        return await intake(request).finished(followed)
    except TimeoutError:
        raise ApiError(504, f"transcription did not finish within {settings.request_timeout:g} s "
                            "(DALSTON_REQUEST_TIMEOUT); use /v1/jobs for long files") from None
    except JobFailed as exc:
        raise ApiError(exc.status, str(exc), code=exc.code) from None


def raise_for_failure(record: JobRecord) -> None:
    """ApiError for a job that did not complete, with its failure's code and status."""
    try:
        check_completed(record)
    except JobFailed as exc:
        raise ApiError(exc.status, str(exc), code=exc.code) from None
