"""The engine: runs one actor against NATS.

It takes tasks through its `TaskIntake` (the consumer of a model it already holds first), keeps
the task's ack deadline fresh while the actor works, reports the outcome on
`events.task.<job>`, and publishes its state on `heartbeat.<runtime>.<identity>.<engine>`.
The bus's redelivery policy settles what the engine must not run: a malformed task is
dead-lettered before the engine sees it, and a task that keeps killing engines is failed
(`engine_crashed`) after `DALSTON_TASK_MAX_DELIVER` deliveries.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

from dalston import __version__, tracing
from dalston.bus.connection import Bus, connect
from dalston.bus.delivery import Delivery, RedeliveryPolicy
from dalston.catalog import Catalog, UnknownModel
from dalston.config import Settings
from dalston.contracts import (
    JOB_CANCELLED_SUBJECT,
    PULL_PROGRESS_SUBJECT,
    TASK_EVENT_SUBJECT,
    EngineStatus,
    Failure,
    Heartbeat,
    PullProgress,
    Task,
    TaskEvent,
    heartbeat_subject,
    nats_identity,
    now,
    subject_token,
)
from dalston.engines import EngineWatch
from dalston.logs import get_logger
from dalston.loops import running
from dalston.pull import PullError, pull
from dalston.sdk import memory
from dalston.sdk.actor import Actor, ModelActor, TaskCancelled, TaskContext, TaskFailed, TaskResult
from dalston.sdk.intake import TaskIntake
from dalston.sdk.models import Located, ModelManager, NoModels
from dalston.sdk.objects import ObjectRefused, TaskClosed, TaskObjects, Unanswered
from dalston.sdk.sessions import SessionHost
from dalston.sdk.voices import VoiceEmbedder, VoiceHost
from dalston.store import ModelStore

log = get_logger("dalston.engine")
# How long a task waits in its queue again where no orchestrator answered for it.
UNANSWERED_RETRY_SECONDS = 5.0

# What a trace calls the actor's work on a task of each stage (others: the stage's name).
WORK_SPANS = {"transcribe": "decode"}


class Engine:
    def __init__(self, actor: Actor, settings: Settings, catalog: Catalog | None = None) -> None:
        self.actor = actor
        self.settings = settings
        self.catalog = catalog or Catalog.from_settings(settings)
        self.runtime = actor.runtime
        self.runtime_spec = self.catalog.runtime(self.runtime)
        self.name = subject_token(settings.engine_name)
        # What its heartbeats' subject names it by: its NATS user, the only one that may beat there.
        self.identity = nats_identity(settings.nats_user)
        self.store = ModelStore(settings.models_path)
        self.status: EngineStatus = "starting"
        self.current_task: str | None = None
        self.current_model: str | None = None
        self.tasks_done = 0
        self.tasks_failed = 0
        self.error: str | None = None
        self.started_at = now()
        self.models = ModelManager(
            load=actor.load, unload=actor.unload, locate=self._locate,
            on_change=self._status_changed, memory_bytes=self._model_memory(),
            max_loaded=settings.max_loaded_models,
            keep_alive=settings.keep_alive) if isinstance(actor, ModelActor) else NoModels()
        self._bus: Bus | None = None
        self.peers = EngineWatch()  # what the other engines hold, for the choice of backlog
        # A task that keeps killing its engines (it comes back unsettled) is failed, not retried.
        self.intake = TaskIntake(settings, self.runtime, self.name, self.models.held, self.peers,
                                 self.models.can_load_another,
                                 policy=RedeliveryPolicy(attempts=settings.task_max_deliver,
                                                         on_exhausted=self._crashed))
        self._stopping = asyncio.Event()
        self._current_ctx: TaskContext | None = None
        # Live sessions, beside the batch tasks (runtimes that transcribe only).
        self.sessions = SessionHost(settings, self.name, actor, self.models, self._sessions_changed) \
            if isinstance(actor, ModelActor) and self.catalog.runs(self.runtime, "transcribe") \
            and settings.max_sessions > 0 else None
        # Voice embeddings for the gateway (runtimes whose models embed voices: diarize).
        self.voices = VoiceHost(self.runtime, actor, self.models) if isinstance(actor, VoiceEmbedder) else None

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self, bus: Bus | None = None) -> None:
        """Serve until stopped, on `bus` (the in-memory one, say) or a new NATS connection."""
        self._bus = bus or await connect(self.settings, name=f"dalston-{self.runtime}-{self.name}")
        await self.peers.start(self._bus)
        log.info("engine started", runtime=self.runtime, engine=self.name)
        try:
            async with running(self._beat_forever(), self.models.expire_forever()):
                await self._preload()
                self._set_status("idle")
                if self.sessions is not None:
                    await self.sessions.start(self._bus)
                if self.voices is not None:
                    await self.voices.start(self._bus)
                await self._work()
        finally:
            if self.voices is not None:
                await self.voices.stop()
            if self.sessions is not None:
                await self.sessions.stop()
            self.status = "stopping"
            await self._beat(ttl=1)
            await self.peers.stop()
            if bus is None:
                await self._bus.close()

    def stop(self) -> None:
        """Stop taking tasks; a task under way is handed back to the queue for another engine."""
        self._stopping.set()
        self.intake.wake()
        if self._current_ctx is not None:
            self._current_ctx.cancelled.set()

    async def _preload(self) -> None:
        if self.settings.preload_model:
            spec = self.catalog.model(self.settings.preload_model)
            try:
                await self.models.preload(spec.runtime_model_id, pin=self.settings.pin_preloaded)
            except TaskFailed as exc:  # the engine still serves other models
                log.warning("preload failed", model=spec.id, reason=exc.message)

    async def _work(self) -> None:
        await self.intake.start(self._bus)
        while (delivery := await self.intake.next_task(self._stopping)) is not None:
            task = delivery.payload
            # In the trace of the step that published it, from its publication on: its wait in
            # the queue is a span of its own.
            with delivery.traced(), tracing.span(
                    f"task {task.stage}", start=delivery.published_at, job=task.job_id, task=task.id,
                    stage=task.stage, runtime=self.runtime, engine=self.name, model=task.model,
                    delivery=delivery.attempt):
                tracing.past_span("queue wait", delivery.published_at)
                try:
                    await self._process(delivery)
                except Exception:  # noqa: BLE001 - NATS failing over, say: the task comes back
                    log.exception("task not settled; NATS redelivers it after ack_wait")
                    self._set_status("idle")

    # --- running one task --------------------------------------------------------------------

    def _unservable(self, task: Task) -> str | None:
        """Why this engine's runtime cannot run `task`, or None: another runtime's task, a stage
        its engines do not run (a transcription with a diarization model), or a model of
        another runtime."""
        if task.runtime != self.runtime:
            return f"task for runtime {task.runtime!r} was published to a {self.runtime} subject"
        if not self.catalog.runs(self.runtime, task.stage):
            return (f"{self.runtime} engines run {', '.join(self.runtime_spec.stages)} tasks, not "
                    f"{task.stage}: {task.model or 'its model'} cannot {task.stage}")
        # A runtime without models (merge, say) is handed the job's model for the record only.
        model = self.catalog.models.get(task.model or "") if self.runtime_spec.store_dir else None
        if model is not None and model.runtime != self.runtime:
            return f"{model.id} is a {model.runtime} model; a {self.runtime} engine cannot run it"
        return None

    async def _crashed(self, delivery: Delivery[Task]) -> None:
        await self._finish(delivery, failure=Failure(
            code="engine_crashed",
            message=f"engines stopped {delivery.attempt - 1} times while running this task; giving up"))

    async def _process(self, delivery: Delivery[Task]) -> None:
        task = delivery.payload
        if (problem := self._unservable(task)) is not None:
            await self._finish(delivery, failure=Failure(code="wrong_runtime", message=problem))
            return
        objects = TaskObjects(self._bus, task)
        try:
            await objects.open()
        except TaskClosed:
            await delivery.done()  # its job ended while it was queued: nothing to do, nobody to tell
            return
        except Unanswered as exc:  # the orchestrator away: later
            log.warning("task not taken", task=task.id, reason=str(exc)[:300])
            await delivery.retry(UNANSWERED_RETRY_SECONDS)
            return
        except ObjectRefused as exc:  # not a task the orchestrator gave: dropped
            log.warning("task refused", task=task.id, reason=str(exc)[:300])
            await delivery.done()
            return
        self.current_task = task.id
        self.current_model = task.runtime_model_id or self.settings.default_model_id or None
        self._set_status("busy")
        await self._event(task, "started")
        ctx = self._current_ctx = TaskContext(bus=self._bus, settings=self.settings, objects=objects)
        keep_fresh = asyncio.create_task(self._keep_in_progress(delivery))
        watch_cancel = await self._bus.doorbell(JOB_CANCELLED_SUBJECT.format(job_id=task.job_id),
                                                self._cancel_on_ring(ctx))
        failure = result = None
        started = time.monotonic()
        try:
            result = await self._run(task, ctx)
        except TaskCancelled:
            failure = Failure(code="cancelled", message="the job was cancelled")
        except TaskFailed as exc:
            failure = Failure(code=exc.code, message=exc.message, retryable=exc.retryable)
        except Exception as exc:
            log.exception("task crashed", task=task.id)
            failure = Failure(code="internal", message=f"{type(exc).__name__}: {exc}"[:2000], retryable=True)
        finally:
            keep_fresh.cancel()
            await watch_cancel.unsubscribe()
            self.current_task = self.current_model = self._current_ctx = None
        if self._stopping.is_set() and failure is not None and failure.code == "cancelled":
            # Stopped, not cancelled by the user: another engine runs it from the start now.
            await delivery.retry()
            return
        log.info("task done", task=task.id, ok=failure is None,
                 seconds=round(time.monotonic() - started, 3))
        await self._finish(delivery, result=result, failure=failure)
        self._set_status("idle")

    @staticmethod
    def _cancel_on_ring(ctx: TaskContext):
        async def on_ring(subject: str) -> None:
            ctx.cancelled.set()
        return on_ring

    async def _run(self, task: Task, ctx: TaskContext) -> TaskResult:
        # The lease keeps the model loaded until the task ends, however long keep-alive is.
        async with self.models.use(self.current_model) as model:
            self._set_status("busy")  # again, after a load
            with tracing.span(WORK_SPANS.get(task.stage, task.stage)):
                return await self.actor.run(task, ctx, model)

    async def _keep_in_progress(self, delivery: Delivery[Task]) -> None:
        while True:
            await asyncio.sleep(max(0.2, self.settings.task_ack_wait / 3))
            await delivery.in_progress()

    async def _finish(self, delivery: Delivery[Task], *, result: TaskResult | None = None,
                      failure: Failure | None = None) -> None:
        """Report, then ack: a crash in between re-runs the task, and the orchestrator ignores
        the duplicate report."""
        task = delivery.payload
        if failure is None:
            self.tasks_done += 1
            await self._event(task, "completed", result=result)
        else:
            self.tasks_failed += 1
            log.warning("task failed", task=task.id, code=failure.code, reason=failure.message)
            await self._event(task, "failed", failure=failure)
        await delivery.done(confirm=True)

    async def _event(self, task: Task, kind: str, *, result: TaskResult | None = None,
                     failure: Failure | None = None) -> None:
        event = TaskEvent(task_id=task.id, job_id=task.job_id, kind=kind, engine=self.name,
                          failure=failure, attempt=task.attempt, at=now(), grant=task.grant)
        if result is not None:
            event.outputs = result.outputs
            event.channels = result.channels
            event.chunks = result.chunks
            event.duration = result.duration
            event.language = result.language
        await self._bus.publish(TASK_EVENT_SUBJECT.format(job_id=task.job_id), event,
                                msg_id=f"{task.id}:{kind}")

    # --- models on disk ------------------------------------------------------------------------

    def _model_memory(self) -> int:
        gb = self.settings.model_memory_gb
        return int(gb * 2**30) if gb else memory.device_bytes(self.actor.device)

    async def _locate(self, runtime_model_id: str) -> Located:
        """The model's public id, its directory in the store (pulled first if not there), and
        the memory it takes on this engine's device."""
        try:
            spec = self.catalog.by_runtime_model_id(self.runtime, runtime_model_id)
        except UnknownModel as exc:
            raise TaskFailed("unknown_model", str(exc)) from None
        path = self.store.path(self.runtime_spec.store_dir, runtime_model_id)
        size = spec.hardware.memory_bytes(self.actor.device)
        if self.store.is_installed(self.runtime_spec, runtime_model_id):
            return Located(spec.id, path, size)
        self._set_status("downloading")
        loop = asyncio.get_running_loop()

        def report(progress: PullProgress) -> None:
            loop.call_soon_threadsafe(asyncio.ensure_future, self._bus.announce(
                PULL_PROGRESS_SUBJECT.format(model=subject_token(spec.id)), progress))

        def pull_mapped() -> Path:
            with memory.large_blocks_mapped():
                return pull(spec, self.runtime_spec, self.store, report)

        try:
            return Located(spec.id, await asyncio.to_thread(pull_mapped), size)
        except PullError as exc:
            self.error = str(exc)
            raise TaskFailed("model_unavailable", str(exc), retryable=False) from None

    # --- heartbeats ---------------------------------------------------------------------------

    def _set_status(self, status: EngineStatus) -> None:
        if status != self.status:
            self.status = status
            if self._bus is not None:
                asyncio.ensure_future(self._beat())

    def _sessions_changed(self) -> None:
        if self._bus is not None:
            asyncio.ensure_future(self._beat())

    def _status_changed(self, change: str) -> None:
        # Loading is a status of its own; an unload changes what the heartbeat lists.
        if change == "loading":
            self._set_status("loading")
        elif self._bus is not None:
            asyncio.ensure_future(self._beat())

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(
            runtime=self.runtime, engine=self.name, identity=self.identity, host=socket.gethostname(),
            status=self.status, version=__version__, device=self.actor.device,
            loaded_models=self.models.loaded(),
            models_on_disk=self.store.installed(self.runtime_spec.store_dir, self.runtime_spec.required_files)
            if self.runtime_spec.store_dir else [],
            current_task=self.current_task, current_model=self.current_model,
            sessions=len(self.sessions.sessions) if self.sessions else 0,
            max_sessions=self.settings.max_sessions if self.sessions else 0,
            tasks_done=self.tasks_done,
            tasks_failed=self.tasks_failed,
            model_loads=self.models.loads,
            swaps=self.models.swaps,
            last_unload=self.models.last_unload,
            rss_bytes=memory.rss_bytes(), vram_bytes=memory.vram_bytes(), error=self.error,
            interval=self.settings.heartbeat_interval, started_at=self.started_at, sent_at=now())

    async def _beat(self, ttl: float | None = None) -> None:
        ttl = ttl or max(1, round(3 * self.settings.heartbeat_interval))
        try:
            await self._bus.publish(heartbeat_subject(self.runtime, self.identity, self.name),
                                    self.heartbeat(), msg_ttl=ttl)
        except Exception as exc:  # noqa: BLE001 - NATS away: the next beat tries again
            log.warning("heartbeat not sent", error=repr(exc))

    async def _beat_forever(self) -> None:
        while True:
            await self._beat()
            await asyncio.sleep(self.settings.heartbeat_interval)
