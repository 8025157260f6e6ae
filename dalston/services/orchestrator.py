"""The orchestrator: owns job state and drives each job's DAG.

It consumes `jobs.submit` and `events.task.>` through durable consumers, keeps every job in the
`jobs` KV bucket (compare-and-set, so several orchestrators can run), and publishes tasks with
message ids, so a replay after a crash publishes nothing twice. Restartable at any moment.
"""

from __future__ import annotations

import asyncio
import time

from dalston import dag, tracing
from dalston.bus.connection import Bus, connect
from dalston.bus.consumers import consume
from dalston.bus.delivery import Delivery, GiveUp, HandleLater
from dalston.catalog import Catalog, UnknownModel
from dalston.config import Settings
from dalston.contracts import (
    CANCEL_SUBJECT,
    EVENTS_STREAM,
    JOB_AUDIO_OBJECT,
    JOB_CANCELLED_SUBJECT,
    JOB_EVENT_SUBJECT,
    JOBS_STREAM,
    ORCHESTRATOR_EVENTS_CONSUMER,
    ORCHESTRATOR_JOBS_CONSUMER,
    TERMINAL,
    CancelRequest,
    ContractError,
    Failure,
    JobEvent,
    JobRecord,
    JobRequest,
    TaskEvent,
    decode,
    now,
    task_ring,
    task_subject,
)
from dalston.engines import EngineWatch, how_to_start
from dalston.logs import get_logger
from dalston.loops import until_stopped
from dalston.services.task_objects import TaskObjects

log = get_logger("dalston.orchestrator")

SWEEP_SECONDS = 2.0


class EarlyEvent(HandleLater):
    """A report on a task that the job's committed record does not list yet."""


def job_message_kind(subject: str) -> type[JobRequest | CancelRequest]:
    """The JOBS stream carries two contracts, told apart by subject."""
    return CancelRequest if subject == CANCEL_SUBJECT else JobRequest


class Orchestrator:
    def __init__(self, settings: Settings, catalog: Catalog | None = None) -> None:
        self.settings = settings
        self.catalog = catalog or Catalog.from_settings(settings)
        self.engines = EngineWatch()
        self._bus: Bus | None = None
        # Jobs not yet ended, for the timeout sweep and the bound on queued jobs: filled from
        # KV at start, then kept current.
        self._active: set[str] = set()
        self._stopping = asyncio.Event()

    async def run(self, bus: Bus | None = None) -> None:
        """Serve until stopped, on `bus` (the in-memory one, say) or a new NATS connection."""
        self._bus = bus or await connect(self.settings, name="dalston-orchestrator")
        await self.engines.start(self._bus)
        await self._load_active()
        objects = TaskObjects(self._bus)
        await objects.start()
        log.info("orchestrator started")
        try:
            await until_stopped(
                self._stopping,
                consume(self._bus, JOBS_STREAM, ORCHESTRATOR_JOBS_CONSUMER, self._on_job_message,
                        kind=job_message_kind),
                consume(self._bus, EVENTS_STREAM, ORCHESTRATOR_EVENTS_CONSUMER, self._on_task_event,
                        kind=TaskEvent),
                self._sweep_forever())
        finally:
            await objects.stop()
            await self.engines.stop()
            if bus is None:
                await self._bus.close()

    def stop(self) -> None:
        self._stopping.set()

    # --- job state in KV ------------------------------------------------------------------------

    async def _update(self, job_id: str, change, *, redrive: bool = False) -> JobRecord | None:
        """Apply `change(record) -> bool` with compare-and-set, retrying on a concurrent write.

        The record is committed before the tasks it queues are published, so an engine can only
        report on a task that the committed record lists (with several orchestrators, a report
        on an uncommitted task would find no task to apply it to). `redrive` (the message that
        led here came again: the last try may have died between commit and publish) publishes
        the job's queued tasks and status again; message ids make that a no-op if they went out.
        """
        while True:
            loaded = await self._bus.jobs.load(job_id)
            if loaded is None:
                return None
            record, revision = loaded
            before = record.status
            changed = change(record)
            ready: list[str] = []
            if changed:
                ready = dag.advance(record)
                record.updated_at = now()
                if not await self._bus.jobs.update(record, revision):
                    continue  # another orchestrator wrote first: apply the change to its record
            elif not redrive:
                return record
            await self._publish_tasks(record, dag.queued(record) if redrive else ready)
            if record.status != before or (redrive and record.status != "queued"
                                           and not await self._announced(record)):
                await self._job_event(record)
            self._track(record)
            return record

    async def _publish_tasks(self, record: JobRecord, keys: list[str]) -> None:
        for key in keys:
            task = dag.task_message(record, key)
            durable = await self._bus.task_consumers.ensure(task.runtime, task.runtime_model_id)
            log.debug("task published", task=task.id, consumer=durable)
            await self._bus.publish(task_subject(task.runtime, task.runtime_model_id), task,
                                    msg_id=task.id)
            await self._bus.ring(task_ring(task.runtime, task.runtime_model_id))

    async def _announced(self, record: JobRecord) -> bool:
        """Whether the job's last event already says its status. A stream drops a repeated event
        (message ids), but live subscribers would see it twice: only a lost one is sent again."""
        last = await self._bus.last(EVENTS_STREAM, JOB_EVENT_SUBJECT.format(job_id=record.id))
        try:
            return last is not None and decode(last, JobEvent).status == record.status
        except ContractError:
            return False

    async def _job_event(self, record: JobRecord) -> None:
        await self._bus.publish(
            JOB_EVENT_SUBJECT.format(job_id=record.id),
            JobEvent(job_id=record.id, status=record.status, failure=record.failure,
                     transcript_object=record.transcript_object, at=now(),
                     webhook_url=record.webhook_url),
            msg_id=f"{record.id}:{record.status}")
        if record.status == "cancelled":  # engines running its tasks stop them
            await self._bus.ring(JOB_CANCELLED_SUBJECT.format(job_id=record.id))

    # --- handlers ----------------------------------------------------------------------------------

    async def _on_job_message(self, delivery: Delivery[JobRequest | CancelRequest]) -> None:
        if isinstance(delivery.payload, CancelRequest):
            with tracing.span("orchestrator cancel", job=delivery.payload.id):
                await self._cancel(delivery.payload)
        else:
            with tracing.span("orchestrator submit", job=delivery.payload.id, delivery=delivery.attempt):
                await self._submit(delivery.payload)

    async def _submit(self, request: JobRequest) -> None:
        if await self._bus.jobs.get(request.id) is None:
            record = await self._new_record(request)
            ready = dag.advance(record)
            # Not created: a redelivered submission, whose record exists; carry on from it.
            if await self._bus.jobs.create(record):
                self._track(record)
                if record.status in TERMINAL:
                    await self._job_event(record)
                await self._publish_tasks(record, ready)
                return
        # A submission seen before re-drives its job (publishing is idempotent), in case the
        # last try died between commit and publish.
        await self._update(request.id, lambda r: bool(dag.pending(r)), redrive=True)

    async def _new_record(self, request: JobRequest) -> JobRecord:
        created = request.submitted_at or now()
        if not request.admitted and len(self._active) >= self.settings.max_queued_jobs:
            # Refused before its audio is stored. A gateway's jobs come admitted: it counted
            # them itself before answering its client, and an accepted job is never refused.
            return self._rejected(request, created, Failure(
                code="overloaded", retryable=True,
                message=f"{len(self._active)} jobs are queued or running, the most this Dalston "
                        "takes (DALSTON_MAX_QUEUED_JOBS): submit again later"))
        try:
            model = self.catalog.model(request.model or self.settings.default_model,
                                       default=self.settings.default_model)
        except UnknownModel as exc:
            return self._rejected(request, created, Failure(code="unknown_model", message=str(exc)))
        if (problem := self.catalog.language_problem(model, request.options.language)) is not None:
            return self._rejected(request, created, Failure(code="unsupported_language", message=problem))
        if request.options.task == "translate" and not model.capabilities.translation:
            return self._rejected(request, created, Failure(
                code="unsupported_task",
                message=f"{model.id} cannot translate (an English-only model, or a runtime "
                        "without a translate task); pick a multilingual Whisper such as "
                        "faster-whisper-base"))
        if request.options.diarize is not None and not model.capabilities.word_timestamps:
            return self._rejected(request, created, Failure(
                code="bad_task", message=f"{model.id} gives no word times, which diarization "
                                         "needs to give each word its speaker"))
        models = {}
        for stage, model_id in dag.stage_models(request.options, self.settings.diarize_model).items():
            try:
                models[stage] = self.catalog.model(model_id).ref()
            except UnknownModel as exc:
                return self._rejected(request, created, Failure(code="unknown_model", message=str(exc)))
        audio_object = request.audio_object or JOB_AUDIO_OBJECT.format(job_id=request.id)
        if request.audio is not None:
            await self._bus.artifacts.put(audio_object, request.audio)
        elif not request.audio_object:
            return self._rejected(request, created, Failure(
                code="no_audio", message="the job carries neither `audio` nor `audio_object`"))
        elif not await self._bus.artifacts.exists(audio_object):
            return self._rejected(request, created, Failure(
                code="no_audio", message=f"audio object {audio_object!r} is not in the object store"))
        record = JobRecord(id=request.id, model=model.id, runtime=model.runtime,
                           runtime_model_id=model.runtime_model_id, models=models,
                           options=request.options,
                           audio_object=audio_object, filename=request.filename,
                           created_at=created, updated_at=now(), owner=request.owner,
                           webhook_url=request.webhook_url, trace=tracing.carrier(),
                           # A model of one language needs no detection: its chunks start at once.
                           language=model.languages[0] if len(model.languages) == 1 else None)
        dag.start(record)
        return record

    def _rejected(self, request: JobRequest, created: float, failure: Failure) -> JobRecord:
        record = JobRecord(id=request.id, model=request.model, runtime="", runtime_model_id="",
                           audio_object=request.audio_object or "", filename=request.filename,
                           created_at=created, owner=request.owner, webhook_url=request.webhook_url)
        dag.finish(record, "failed", failure)
        return record

    async def _on_task_event(self, delivery: Delivery[TaskEvent]) -> None:
        event = delivery.payload

        def apply(record: JobRecord) -> bool:
            if (reason := dag.refusal(record, event)) is not None:
                raise GiveUp(reason)  # a forged report: dead-lettered, never applied
            return dag.apply_event(record, event, self.settings.task_max_attempts)

        with tracing.span("orchestrator task event", job=event.job_id, task=event.task_id, event=event.kind,
                          engine=event.engine, delivery=delivery.attempt):
            record = await self._update(event.job_id, apply, redrive=delivery.attempt > 1)
        if record is not None and dag.is_early(record, event):
            raise EarlyEvent(f"job {record.id} does not list task {event.task_id} yet")

    async def _cancel(self, request: CancelRequest) -> None:
        def cancel(record: JobRecord) -> bool:
            if record.status in TERMINAL:
                return False
            dag.finish(record, "cancelled", Failure(code="cancelled", message=request.reason))
            return True

        await self._update(request.id, cancel)

    # --- timeouts -----------------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                await self._sweep()
            except Exception:
                log.exception("sweep failed")

    def _track(self, record: JobRecord) -> None:
        if record.status in TERMINAL:
            self._active.discard(record.id)
        else:
            self._active.add(record.id)

    async def _load_active(self) -> None:
        for job_id in await self._bus.jobs.ids():
            record = await self._bus.jobs.get(job_id)
            if record is not None:
                self._track(record)

    async def _sweep(self) -> None:
        """Fail jobs whose tasks have waited past `engine_wait` for a runtime with no engine."""
        deadline = time.time() - self.settings.engine_wait
        for job_id in list(self._active):
            record = await self._bus.jobs.get(job_id)
            if record is None or record.status in TERMINAL:
                self._active.discard(job_id)
                continue
            stuck = next((t for t in record.tasks.values() if t.status == "queued"
                          and (t.queued_at or 0) < deadline and not self.engines.live(t.runtime)), None)
            if stuck is None:
                continue

            def fail(record: JobRecord, runtime: str = stuck.runtime) -> bool:
                if record.status in TERMINAL:
                    return False
                dag.finish(record, "failed", Failure(
                    code="no_engine", retryable=True,
                    message=f"no {runtime} engine is running: the task waited "
                            f"{self.settings.engine_wait:.0f} s (start one: {how_to_start(runtime)})"))
                return True

            with tracing.continued(record.trace), tracing.span("orchestrator timeout", job=job_id):
                await self._update(job_id, fail)
