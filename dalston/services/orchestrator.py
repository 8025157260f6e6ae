"""The orchestrator: owns job state and drives each job's DAG.

It consumes `jobs.submit` and `events.task.>` through durable consumers, keeps every job in the
`jobs` KV bucket (compare-and-set, so several orchestrators can run), and publishes tasks with
message ids, so a replay after a crash publishes nothing twice. Restartable at any moment.
"""

from __future__ import annotations

import asyncio
import time

import nats.errors
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError

from dalston import dag
from dalston.bus.connection import Bus, connect
from dalston.bus.layout import TaskConsumers, load_layout
from dalston.catalog import Catalog, UnknownModel
from dalston.config import Settings
from dalston.contracts import (
    CANCEL_SUBJECT,
    EVENTS_STREAM,
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
    encode,
    now,
    task_subject,
)
from dalston.engines import EngineWatch
from dalston.logs import get_logger

log = get_logger("dalston.orchestrator")

SWEEP_SECONDS = 2.0


class EarlyEvent(Exception):
    """A report on a task that the job's committed record does not list yet."""


class Orchestrator:
    def __init__(self, settings: Settings, catalog: Catalog | None = None) -> None:
        self.settings = settings
        self.catalog = catalog or Catalog.from_settings(settings)
        self.engines = EngineWatch()
        self._bus: Bus | None = None
        self._consumers: TaskConsumers | None = None
        # Jobs not yet ended, for the timeout sweep: filled from KV at start, then kept current.
        self._active: set[str] = set()
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        self._bus = await connect(self.settings, name="dalston-orchestrator")
        self._consumers = TaskConsumers(self._bus.js, self.settings)
        await self.engines.start(self._bus.js)
        await self._load_active()
        loops = [
            self._consume(JOBS_STREAM, ORCHESTRATOR_JOBS_CONSUMER, self._on_job_message),
            self._consume(EVENTS_STREAM, ORCHESTRATOR_EVENTS_CONSUMER, self._on_task_event),
            self._sweep_forever(),
        ]
        log.info("orchestrator started")
        tasks = [asyncio.create_task(loop) for loop in loops]
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            done, _ = await asyncio.wait([*tasks, stopping], return_when=asyncio.FIRST_COMPLETED)
            if stopping not in done:
                # A loop that ends would leave jobs queued forever behind a live process: exit
                # instead, so the supervisor (`dalston up`, compose) starts a fresh orchestrator.
                ended = done.pop()
                raise RuntimeError(f"a consume loop ended: {ended.exception()!r}")
        finally:
            for task in [*tasks, stopping]:
                task.cancel()
            await asyncio.gather(*tasks, stopping, return_exceptions=True)
            await self.engines.stop()
            await self._bus.close()

    def stop(self) -> None:
        self._stopping.set()

    async def _consume(self, stream: str, durable: str, handler) -> None:
        subscription = await self._bus.js.pull_subscribe_bind(durable, stream=stream)
        max_deliver = load_layout()["consumers"][stream][durable]["max_deliver"]
        while True:
            try:
                messages = await subscription.fetch(32, timeout=5)
            except (TimeoutError, nats.errors.TimeoutError):
                # nats-py raises either, depending on where in the fetch the deadline passed.
                continue
            except Exception as exc:  # noqa: BLE001 - a lost connection, a 409: try again
                log.warning("fetch failed; retrying", stream=stream, error=repr(exc))
                await asyncio.sleep(0.5)
                continue
            for msg in messages:
                await self._handle(msg, handler, max_deliver)

    async def _handle(self, msg: Msg, handler, max_deliver: int) -> None:
        """Handle one message; whatever it holds, the loop goes on to the next."""
        try:
            await handler(msg)
            await msg.ack()
        except ContractError as exc:
            await self._bus.dead_letter(msg, str(exc))
        except Exception as exc:  # noqa: BLE001 - NATS failing over, say: it comes back
            if msg.metadata.num_delivered >= max_deliver:
                # The server would drop it silently after this delivery: keep it with the reason.
                await self._bus.dead_letter(msg, f"not handled in {max_deliver} deliveries: {exc!r}")
                return
            if isinstance(exc, EarlyEvent):
                log.info("event before its task; it will be redelivered", reason=str(exc))
            else:
                log.exception("message not handled; it will be redelivered", subject=msg.subject[:256])
            try:
                await msg.nak(delay=1)
            except Exception:  # noqa: BLE001 - no connection: redelivered after ack_wait
                pass

    # --- job state in KV ------------------------------------------------------------------------

    async def _load(self, job_id: str) -> tuple[JobRecord, int] | None:
        try:
            entry = await self._bus.jobs.get(job_id)
        except KeyNotFoundError:
            return None
        return decode(entry.value, JobRecord), entry.revision

    async def _update(self, job_id: str, change, *, redrive: bool = False) -> JobRecord | None:
        """Apply `change(record) -> bool` with compare-and-set, retrying on a concurrent write.

        The record is committed before the tasks it queues are published, so an engine can only
        report on a task that the committed record lists (with several orchestrators, a report
        on an uncommitted task would find no task to apply it to). `redrive` (the message that
        led here came again: the last try may have died between commit and publish) publishes
        the job's queued tasks and status again; message ids make that a no-op if they went out.
        """
        while True:
            loaded = await self._load(job_id)
            if loaded is None:
                return None
            record, revision = loaded
            before = record.status
            changed = change(record)
            ready: list[str] = []
            if changed:
                ready = dag.advance(record)
                record.updated_at = now()
                try:
                    await self._bus.jobs.update(job_id, encode(record), last=revision)
                except KeyWrongLastSequenceError:
                    continue
            elif not redrive:
                return record
            await self._publish_tasks(record, dag.queued(record) if redrive else ready)
            if record.status != before or (redrive and record.status != "queued"):
                await self._job_event(record)
            self._track(record)
            return record

    async def _publish_tasks(self, record: JobRecord, keys: list[str]) -> None:
        for key in keys:
            task = dag.task_message(record, key)
            durable = await self._consumers.ensure(task.runtime, task.runtime_model_id)
            log.debug("task published", task=task.id, consumer=durable)
            await self._bus.publish(task_subject(task.runtime, task.runtime_model_id), task,
                                    msg_id=task.id)

    async def _job_event(self, record: JobRecord) -> None:
        await self._bus.publish(
            JOB_EVENT_SUBJECT.format(job_id=record.id),
            JobEvent(job_id=record.id, status=record.status, failure=record.failure,
                     transcript_object=record.transcript_object, at=now()),
            msg_id=f"{record.id}:{record.status}")

    # --- handlers ----------------------------------------------------------------------------------

    async def _on_job_message(self, msg: Msg) -> None:
        if msg.subject == CANCEL_SUBJECT:
            await self._cancel(decode(msg.data, CancelRequest))
        else:
            await self._submit(decode(msg.data, JobRequest))

    async def _submit(self, request: JobRequest) -> None:
        if await self._load(request.id) is None:
            record = await self._new_record(request)
            ready = dag.advance(record)
            try:
                await self._bus.jobs.create(request.id, encode(record))
            except KeyWrongLastSequenceError:
                pass  # a redelivered submission: the record exists, carry on from it
            else:
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
        try:
            model = self.catalog.model(request.model or self.settings.default_model,
                                       default=self.settings.default_model)
        except UnknownModel as exc:
            return self._rejected(request, created, Failure(code="unknown_model", message=str(exc)))
        language = request.options.language
        if language and model.languages and language not in model.languages:
            return self._rejected(request, created, Failure(
                code="unsupported_language",
                message=f"{model.id} transcribes {', '.join(model.languages)}, not {language!r}; "
                        "pick a multilingual model"))
        audio_object = request.audio_object or f"jobs/{request.id}/audio"
        if request.audio is not None:
            await self._bus.artifacts.put(audio_object, request.audio)
        elif not request.audio_object:
            return self._rejected(request, created, Failure(
                code="no_audio", message="the job carries neither `audio` nor `audio_object`"))
        else:
            try:
                await self._bus.artifacts.get_info(audio_object)
            except NotFoundError:
                return self._rejected(request, created, Failure(
                    code="no_audio", message=f"audio object {audio_object!r} is not in the object store"))
        record = JobRecord(id=request.id, model=model.id, runtime=model.runtime,
                           runtime_model_id=model.runtime_model_id, options=request.options,
                           audio_object=audio_object, filename=request.filename,
                           created_at=created, updated_at=now(), owner=request.owner)
        dag.start(record)
        return record

    def _rejected(self, request: JobRequest, created: float, failure: Failure) -> JobRecord:
        record = JobRecord(id=request.id, model=request.model, runtime="", runtime_model_id="",
                           audio_object=request.audio_object or "", filename=request.filename,
                           created_at=created, owner=request.owner)
        dag.finish(record, "failed", failure)
        return record

    async def _on_task_event(self, msg: Msg) -> None:
        event = decode(msg.data, TaskEvent)
        record = await self._update(
            event.job_id, lambda r: dag.apply_event(r, event, self.settings.task_max_attempts),
            redrive=msg.metadata.num_delivered > 1)
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
        try:
            keys = await self._bus.jobs.keys()
        except nats.js.errors.NoKeysError:
            return
        for job_id in keys:
            loaded = await self._load(job_id)
            if loaded is not None:
                self._track(loaded[0])

    async def _sweep(self) -> None:
        """Fail jobs whose tasks have waited past `engine_wait` for a runtime with no engine."""
        deadline = time.time() - self.settings.engine_wait
        for job_id in list(self._active):
            loaded = await self._load(job_id)
            if loaded is None or loaded[0].status in TERMINAL:
                self._active.discard(job_id)
                continue
            stuck = next((t for t in loaded[0].tasks.values() if t.status == "queued"
                          and (t.queued_at or 0) < deadline and not self.engines.live(t.runtime)), None)
            if stuck is None:
                continue

            def fail(record: JobRecord, runtime: str = stuck.runtime) -> bool:
                if record.status in TERMINAL:
                    return False
                dag.finish(record, "failed", Failure(
                    code="no_engine", retryable=True,
                    message=f"no {runtime} engine is running: the task waited "
                            f"{self.settings.engine_wait:.0f} s (start one, e.g. "
                            f"`dalston up --runtimes {runtime}`)"))
                return True

            await self._update(job_id, fail)
