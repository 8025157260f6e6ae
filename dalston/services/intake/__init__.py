"""Taking in a job, whatever surface it came by (the HTTP APIs, Wyoming): whether its key may
run the model, its place among the unfinished jobs, a receiving slot while its audio comes in,
its publication, and its end. Nothing here knows a transport: each surface maps `Refused`,
`ModelNotInstalled`, `JobFailed` and TimeoutError to its own error shape."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import IO

from dalston import dag
from dalston.bus.connection import Bus
from dalston.catalog import Catalog, ModelSpec, UnknownModel
from dalston.config import Settings
from dalston.contracts import FAILURE_STATUS, JobRecord, TranscribeOptions, Transcript
from dalston.engines import EngineWatch, how_to_start
from dalston.keys import ApiKey
from dalston.services.intake.admission import Admission, Refused, UploadSlot
from dalston.services.intake.job_index import JobIndex
from dalston.services.intake.jobs import FollowedJob, JobService
from dalston.services.intake.models import ModelService


class JobFailed(Exception):
    """A job that ended without a transcript: its failure's code and HTTP-like status."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.status = FAILURE_STATUS[code]


async def _nothing() -> None:
    return None


@dataclass
class Audio:
    """A job's audio as received, and what to run on it. `close` frees what holds the audio
    (a spooled upload), once it is stored; `webhook_url` is already checked."""

    file: IO[bytes]
    filename: str
    model: str
    options: TranscribeOptions
    webhook_url: str | None = None
    close: Callable[[], Awaitable[None]] = _nothing


def transcription_problem(catalog: Catalog, model: ModelSpec) -> str | None:
    """Why `model` cannot transcribe (a diarization model, say), or None where it can."""
    if catalog.runs(model.runtime, "transcribe"):
        return None
    return f"{model.id} is a {model.runtime} model, which does not transcribe; pick a transcription model"


def check_completed(record: JobRecord) -> None:
    """JobFailed for a job that did not complete."""
    if record.status == "completed":
        return
    failure = record.failure
    raise JobFailed(failure.code if failure else "internal",
                    failure.message if failure else f"job ended {record.status}")


class Intake:
    """One surface's way in: its jobs, its admission (which follows every job record) and the
    models its keys may run."""

    def __init__(self, settings: Settings, catalog: Catalog, jobs: JobService, admission: Admission,
                 models: ModelService, engines: EngineWatch) -> None:
        self.settings, self.catalog = settings, catalog
        self.jobs, self.admission, self.models, self.engines = jobs, admission, models, engines

    @classmethod
    def build(cls, bus: Bus, settings: Settings, catalog: Catalog, engines: EngineWatch, *,
              index: JobIndex | None = None, on_ended: Callable[[JobRecord], None] = lambda record: None
              ) -> Intake:
        """The intake of a surface on `bus`; `start` it before it takes jobs. `index` learns of
        every job record, `on_ended` of every job that ends."""
        index = index or JobIndex()
        admission = Admission(bus, settings.max_queued_jobs, settings.max_concurrent_uploads,
                              on_record=index.observe, on_ended=on_ended,
                              served=lambda runtime: bool(engines.live(runtime)),
                              engine_wait=settings.engine_wait)
        return cls(settings, catalog, JobService(bus, index), admission,
                   ModelService(bus, settings, catalog, engines), engines)

    async def start(self) -> None:
        await self.admission.start()

    async def stop(self) -> None:
        await self.admission.stop()

    def require_usable(self, model: ModelSpec, options: TranscribeOptions, key: ApiKey | None) -> None:
        """ModelNotInstalled where `key` may not run `model`, or the model that tells speakers
        apart when `options` ask who spoke."""
        models = [model]
        for model_id in dag.stage_models(options, self.settings.diarize_model).values():
            models += [m for m in self.catalog.models.values() if m.id == model_id]  # unknown: the orchestrator says
        for needed in models:
            self.models.require_usable(needed, key)

    async def submit(self, job_id: str, key: ApiKey | None,
                     receive: Callable[[UploadSlot], Awaitable[Audio]]) -> Audio:
        """Admit job `job_id` of `key` (None: no key demanded), receive its audio (`receive`,
        given the upload slot it holds) and publish it.

        Refused before its audio is received when DALSTON_MAX_QUEUED_JOBS jobs are unfinished
        or the key holds its share of them (429), or DALSTON_MAX_CONCURRENT_UPLOADS uploads
        (or the key's half of them) are being received (503); once it is received, when a
        runtime it needs has no engine (503 `no_engine`)."""
        owner = key.name if key else None
        self.admission.reserve(job_id, owner, key.max_jobs if key else None)
        try:
            async with self.admission.receiving(owner) as slot:
                audio = await receive(slot)
                try:
                    self.check_engines(audio.model, audio.options)
                    await self.jobs.submit(job_id, audio.file, audio.filename, audio.model, audio.options,
                                           owner, webhook_url=audio.webhook_url)
                finally:
                    await audio.close()
        except BaseException:
            self.admission.release(job_id)
            raise
        return audio

    def check_engines(self, model: str, options: TranscribeOptions) -> None:
        """Refused (503) when a runtime the job needs has no live engine and had none for
        DALSTON_ENGINE_WAIT: the orchestrator would only fail the job after that long. A runtime
        seen within it (an engine restarting) is waited for, as the orchestrator does."""
        wait = self.settings.engine_wait
        for runtime in self._runtimes(model, options):
            if not self.engines.seen_within(runtime, wait):
                raise Refused(503, "no_engine", f"no {runtime} engine is running, nor was one in the last "
                              f"{wait:g} s (DALSTON_ENGINE_WAIT), and this job needs one: "
                              f"{how_to_start(runtime)}", None)

    def _runtimes(self, model: str, options: TranscribeOptions) -> list[str]:
        """The runtimes a job's stages run on, as the orchestrator will plan them (a model it
        will refuse needs nothing: the orchestrator says why)."""
        default = self.settings.default_model
        try:
            spec = self.catalog.model(model or default, default=default)
            models = {stage: self.catalog.model(model_id).ref()
                      for stage, model_id in dag.stage_models(options, self.settings.diarize_model).items()}
        except UnknownModel:
            return []
        planned = JobRecord(id="planned", model=spec.id, runtime=spec.runtime, runtime_model_id=spec.runtime_model_id,
                            options=options, audio_object="", models=models)
        return dag.runtimes(planned)

    async def followed_submission(self, job_id: str, key: ApiKey | None,
                                  receive: Callable[[UploadSlot], Awaitable[Audio]], *,
                                  segments: bool) -> tuple[FollowedJob, Audio]:
        """`submit` a job that is followed from before it is published, so nothing of a fast
        job can be missed: its end, and with `segments` the text its engines decode."""
        followed = await FollowedJob.start(self.jobs, job_id, key.name if key else None, segments=segments)
        try:
            return followed, await self.submit(job_id, key, receive)
        except BaseException:
            await followed.close()
            raise

    async def finished(self, followed: FollowedJob) -> Transcript:
        """The transcript of a followed job once it has ended; TimeoutError past
        DALSTON_REQUEST_TIMEOUT, JobFailed for a job that failed."""
        record = None
        async for record in followed.events(self.settings.request_timeout):
            pass  # any segments go by; the last item is the ended job's record
        return await self.transcript(record)

    async def transcript(self, record: JobRecord) -> Transcript:
        """The transcript of an ended job; JobFailed where it failed."""
        check_completed(record)
        return await self.jobs.transcript(record)
