"""The engine: runs one actor against NATS.

It takes tasks from its runtime's shared pull consumers (one per model; the consumer of a model
it already holds first), keeps the task's ack deadline fresh while the actor works, reports the
outcome on `events.task.<job>`, and publishes its state on `heartbeat.<runtime>.<engine>`.
Malformed messages are dead-lettered and terminated; a task that keeps killing engines is
failed after `DALSTON_TASK_MAX_DELIVER` deliveries.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
import socket
import time
from pathlib import Path

import nats.errors
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError

from dalston import __version__
from dalston.bus.connection import Bus, connect
from dalston.bus.layout import ensure_task_consumer
from dalston.catalog import Catalog, UnknownModel
from dalston.config import Settings
from dalston.engines import EngineWatch
from dalston.contracts import (
    DEADLETTER_SUBJECT, HEARTBEAT_SUBJECT, JOB_EVENT_SUBJECT, NO_MODEL, TERMINAL, PULL_PROGRESS_SUBJECT, TASK_EVENT_SUBJECT, TASKS_STREAM,
    ContractError, DeadLetter, EngineStatus, Failure, Heartbeat, JobEvent, JobRecord, PullProgress,
    Task, TaskEvent,
    decode, encode, now, subject_token, task_consumer, task_consumer_prefix,
)
from dalston.logs import get_logger
from dalston.pull import PullError, pull
from dalston.sdk import memory
from dalston.sdk.actor import (
    Actor, ModelActor, TaskCancelled, TaskContext, TaskFailed, TaskResult,
)
from dalston.sdk.models import ModelManager
from dalston.store import ModelStore

log = get_logger("dalston.engine")

# An engine swaps to a model other engines hold only when its backlog exceeds this many tasks
# per holder.
SWAP_BACKLOG_PER_HOLDER = 1
# How long an idle engine waits for a doorbell before it looks at the backlog anyway.
IDLE_POLL_SECONDS = 2.0
FETCH_TIMEOUT_SECONDS = 0.5
# A short look where a task may be: just rung for, or due for redelivery after its engine died.
PROBE_SECONDS = 0.05


class Engine:
    def __init__(self, actor: Actor, settings: Settings, catalog: Catalog | None = None) -> None:
        memory.limit_malloc_arenas()
        self.actor = actor
        self.settings = settings
        self.catalog = catalog or Catalog.from_settings(settings)
        self.runtime = actor.runtime
        self.runtime_spec = self.catalog.runtime(self.runtime)
        self.name = subject_token(settings.engine_name)
        self.store = ModelStore(settings.models_path)
        self.status: EngineStatus = "starting"
        self.current_task: str | None = None
        self.tasks_done = 0
        self.tasks_failed = 0
        self.error: str | None = None
        self.started_at = now()
        self.models: ModelManager | None = None
        if isinstance(actor, ModelActor):
            self.models = ModelManager(
                load=actor.load, unload=actor.unload, locate=self._locate,
                on_change=self._status_changed, max_loaded=settings.max_loaded_models,
                keep_alive=settings.keep_alive)
        self._bus: Bus | None = None
        self.peers = EngineWatch()  # what the other engines hold, for the choice of backlog
        self._stopping = asyncio.Event()
        self._doorbell = asyncio.Event()
        self._rung: set[str] = set()  # consumers the doorbell rang for since the last look
        self._subscriptions: dict[str, object] = {}
        self._known_consumers: set[str] = set()
        self._current_ctx: TaskContext | None = None

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        self._bus = await connect(self.settings, name=f"dalston-{self.runtime}-{self.name}")
        await self.peers.start(self._bus.js)
        prefix = f"tasks.{subject_token(self.runtime)}"
        await self._bus.nc.subscribe(f"{prefix}.*", cb=self._ring)
        background = [asyncio.create_task(self._beat_forever())]
        if self.models and self.models.keep_alive >= 0:
            background.append(asyncio.create_task(self._expire_forever()))
        log.info("engine started", runtime=self.runtime, engine=self.name)
        try:
            await self._preload()
            self._set_status("idle")
            await self._work()
        finally:
            for job in background:
                job.cancel()
            self.status = "stopping"
            await self._beat(ttl=1)
            await self.peers.stop()
            await self._bus.close()

    def stop(self) -> None:
        """Stop taking tasks; a task under way is handed back to the queue for another engine."""
        self._stopping.set()
        self._doorbell.set()
        if self._current_ctx is not None:
            self._current_ctx.cancelled.set()

    async def _preload(self) -> None:
        if self.models and self.settings.preload_model:
            spec = self.catalog.model(self.settings.preload_model)
            try:
                await self.models.acquire(spec.id, spec.runtime_model_id, pin=self.settings.pin_preloaded)
            except TaskFailed as exc:  # the engine still serves other models
                log.warning("preload failed", model=spec.id, reason=exc.message)

    # --- taking tasks ----------------------------------------------------------------------

    async def _ring(self, msg: Msg) -> None:
        # A task was published for this runtime: make sure its model's consumer exists (a
        # third-party publisher may have invented the subject), then wake the task loop.
        model_token = msg.subject.rsplit(".", 1)[-1]
        self._rung.add(await self._ensure_consumer(model_token))
        self._doorbell.set()

    async def _ensure_consumer(self, model_token: str) -> str:
        durable = task_consumer(self.runtime, model_token)
        if durable not in self._known_consumers:
            await ensure_task_consumer(self._bus.js, self.settings, self.runtime, model_token)
            self._known_consumers.add(durable)
        return durable

    async def _backlog(self) -> tuple[dict[str, int], list[str]]:
        """This runtime's consumers with undelivered tasks (and how many), and those whose
        delivered tasks are unacked: a dead engine's task comes back there after ack_wait."""
        prefix = task_consumer_prefix(self.runtime)
        infos = [i for i in await self._bus.js.consumers_info(TASKS_STREAM) if i.name.startswith(prefix)]
        return ({i.name: i.num_pending for i in infos if i.num_pending},
                [i.name for i in infos if i.num_ack_pending])

    def _held_consumers(self) -> set[str]:
        if self.models is None:
            return {task_consumer(self.runtime, NO_MODEL)}
        return {task_consumer(self.runtime, rid) for rid in self.models.resident}

    def _preference(self, pending: dict[str, int]) -> list[str]:
        """Which backlogs to serve, best first: models this engine holds (most recently used
        first); then models no other engine holds, or whose backlog is more than their holders
        can soon clear, longest backlog first. A backlog another engine is already working
        through is left to it: taking it would cost a swap here for little gain."""
        if not self.settings.prefer_loaded:
            return random.sample(list(pending), len(pending))
        held = []
        if self.models:
            held = [task_consumer(self.runtime, r.runtime_model_id)
                    for r in reversed(self.models.resident.values())]
        first = [name for name in held if name in pending]
        holders = Counter(task_consumer(self.runtime, m.runtime_model_id)
                          for beat in self.peers.live(self.runtime) if beat.engine != self.name
                          for m in beat.loaded_models)
        rest = [name for name in pending if name not in first
                and pending[name] > SWAP_BACKLOG_PER_HOLDER * holders[name]]
        return first + sorted(rest, key=lambda n: -pending[n])

    async def _fetch(self, durable: str, timeout: float) -> Msg | None:
        subscription = self._subscriptions.get(durable)
        if subscription is None:
            subscription = await self._bus.js.pull_subscribe_bind(durable, stream=TASKS_STREAM)
            self._subscriptions[durable] = subscription
        try:
            return (await subscription.fetch(1, timeout=timeout))[0]
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            return None  # another engine took it first, or nothing is due for redelivery

    async def _next_message(self) -> Msg | None:
        while not self._stopping.is_set():
            self._doorbell.clear()
            rung, self._rung = self._rung, set()
            try:
                # Fast path: a new task for a model this engine holds needs no backlog survey.
                for durable in rung & self._held_consumers():
                    if msg := await self._fetch(durable, PROBE_SECONDS):
                        return msg
                pending, unacked = await self._backlog()
                for durable in self._preference(pending):
                    if msg := await self._fetch(durable, FETCH_TIMEOUT_SECONDS):
                        return msg
                for durable in unacked:
                    if msg := await self._fetch(durable, PROBE_SECONDS):
                        return msg
            except Exception as exc:  # noqa: BLE001 - NATS restarting, a 409: look again shortly
                log.warning("taking a task failed; retrying", error=repr(exc))
            try:
                await asyncio.wait_for(self._doorbell.wait(), IDLE_POLL_SECONDS)
            except TimeoutError:
                pass
        return None

    async def _work(self) -> None:
        if self.models is None:
            # Model-less runtimes have exactly one consumer; model runtimes get one per model.
            await self._ensure_consumer(NO_MODEL)
        while (msg := await self._next_message()) is not None:
            await self._process(msg)

    # --- running one task --------------------------------------------------------------------

    async def _process(self, msg: Msg) -> None:
        try:
            task = decode(msg.data, Task)
        except ContractError as exc:
            await self._dead_letter(msg, str(exc))
            return
        deliveries = msg.metadata.num_delivered
        if task.runtime != self.runtime:
            await self._finish(msg, task, failure=Failure(
                code="wrong_runtime",
                message=f"task for runtime {task.runtime!r} was published to a {self.runtime} subject"))
            return
        if deliveries > self.settings.task_max_deliver:
            await self._finish(msg, task, failure=Failure(
                code="engine_crashed",
                message=f"engines stopped {deliveries - 1} times while running this task; giving up"))
            return
        if await self._job_ended(task.job_id):
            await msg.ack()  # cancelled (or failed) while queued: nothing to do, nobody to tell
            return
        self.current_task = task.id
        self._set_status("busy")
        await self._event(task, "started")
        ctx = self._current_ctx = TaskContext(bus=self._bus, settings=self.settings)
        keep_fresh = asyncio.create_task(self._keep_in_progress(msg))
        watch_cancel = await self._bus.nc.subscribe(
            JOB_EVENT_SUBJECT.format(job_id=task.job_id), cb=self._cancel_on_event(ctx))
        failure = result = None
        started = time.monotonic()
        try:
            result = await self._run(task, ctx)
        except TaskCancelled:
            failure = Failure(code="cancelled", message="the job was cancelled")
        except TaskFailed as exc:
            failure = Failure(code=exc.code, message=exc.message, retryable=exc.retryable)
        except Exception as exc:  # noqa: BLE001 - any other error is reported, the engine lives on
            log.exception("task crashed", task=task.id)
            failure = Failure(code="internal", message=f"{type(exc).__name__}: {exc}", retryable=True)
        finally:
            keep_fresh.cancel()
            await watch_cancel.unsubscribe()
            self.current_task = self._current_ctx = None
        if self._stopping.is_set() and failure is not None and failure.code == "cancelled":
            # Stopped, not cancelled by the user: another engine runs it from the start now.
            await msg.nak()
            return
        log.info("task done", task=task.id, ok=failure is None,
                 seconds=round(time.monotonic() - started, 3))
        await self._finish(msg, task, result=result, failure=failure)
        self._set_status("idle")

    async def _job_ended(self, job_id: str) -> bool:
        try:
            entry = await self._bus.jobs.get(job_id)
        except KeyNotFoundError:
            return False  # a task without a job record (a third-party publisher): run it
        return decode(entry.value, JobRecord).status in TERMINAL

    @staticmethod
    def _cancel_on_event(ctx: TaskContext):
        async def on_event(msg: Msg) -> None:
            try:
                if decode(msg.data, JobEvent).status == "cancelled":
                    ctx.cancelled.set()
            except ContractError:
                pass
        return on_event

    async def _run(self, task: Task, ctx: TaskContext) -> TaskResult:
        if self.models is None:
            return await self.actor.handle(task, ctx)
        runtime_model_id = task.runtime_model_id or self.settings.default_model_id
        try:
            spec = self.catalog.by_runtime_model_id(self.runtime, runtime_model_id)
        except UnknownModel as exc:
            raise TaskFailed("unknown_model", str(exc)) from None
        handle = await self.models.acquire(spec.id, spec.runtime_model_id)
        return await self.actor.run_model_task(task, ctx, handle)

    async def _keep_in_progress(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(max(0.2, self.settings.task_ack_wait / 3))
            await msg.in_progress()

    async def _finish(self, msg: Msg, task: Task, *, result: TaskResult | None = None,
                      failure: Failure | None = None) -> None:
        """Report, then ack: a crash in between re-runs the task, and the orchestrator ignores
        the duplicate report."""
        if failure is None:
            self.tasks_done += 1
            await self._event(task, "completed", result=result)
        else:
            self.tasks_failed += 1
            log.warning("task failed", task=task.id, code=failure.code, reason=failure.message)
            await self._event(task, "failed", failure=failure)
        await msg.ack_sync()

    async def _event(self, task: Task, kind: str, *, result: TaskResult | None = None,
                     failure: Failure | None = None) -> None:
        event = TaskEvent(task_id=task.id, job_id=task.job_id, kind=kind, engine=self.name,
                          failure=failure, attempt=task.attempt, at=now())
        if result is not None:
            event.outputs = result.outputs
            event.channels = result.channels
            event.duration = result.duration
            event.language = result.language
        await self._bus.publish(TASK_EVENT_SUBJECT.format(job_id=task.job_id), event,
                                msg_id=f"{task.id}:{kind}")

    async def _dead_letter(self, msg: Msg, reason: str) -> None:
        log.warning("malformed task dead-lettered", subject=msg.subject, reason=reason)
        await self._bus.publish(DEADLETTER_SUBJECT.format(source="tasks"), DeadLetter(
            subject=msg.subject, reason=reason, payload=msg.data, at=now()))
        await msg.term()

    # --- models on disk ------------------------------------------------------------------------

    async def _locate(self, model: str, runtime_model_id: str) -> Path:
        """The model's directory in the store, pulled first if it is not there."""
        spec = self.catalog.model(model)
        path = self.store.path(self.runtime_spec.store_dir, runtime_model_id)
        if self.store.is_installed(self.runtime_spec, runtime_model_id):
            return path
        self._set_status("downloading")
        loop = asyncio.get_running_loop()

        def report(progress: PullProgress) -> None:
            loop.call_soon_threadsafe(asyncio.ensure_future, self._bus.nc.publish(
                PULL_PROGRESS_SUBJECT.format(model=subject_token(model)), encode(progress)))

        try:
            return await asyncio.to_thread(pull, spec, self.runtime_spec, self.store, report)
        except PullError as exc:
            self.error = str(exc)
            raise TaskFailed("model_unavailable", str(exc), retryable=False) from None

    # --- heartbeats ---------------------------------------------------------------------------

    def _set_status(self, status: EngineStatus) -> None:
        if status != self.status:
            self.status = status
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
            runtime=self.runtime, engine=self.name, host=socket.gethostname(),
            status=self.status, version=__version__, device=self.actor.device,
            loaded_models=self.models.loaded() if self.models else [],
            models_on_disk=self.store.installed(self.runtime_spec.store_dir, self.runtime_spec.required_files)
            if self.models else [],
            current_task=self.current_task, tasks_done=self.tasks_done,
            tasks_failed=self.tasks_failed,
            model_loads=self.models.loads if self.models else 0,
            swaps=self.models.swaps if self.models else 0,
            last_unload=self.models.last_unload if self.models else None,
            rss_bytes=memory.rss_bytes(), vram_bytes=memory.vram_bytes(), error=self.error,
            interval=self.settings.heartbeat_interval, started_at=self.started_at, sent_at=now())

    async def _beat(self, ttl: float | None = None) -> None:
        ttl = ttl or max(1, round(3 * self.settings.heartbeat_interval))
        try:
            await self._bus.publish(HEARTBEAT_SUBJECT.format(runtime=self.runtime, engine=self.name),
                                    self.heartbeat(), msg_ttl=ttl)
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("heartbeat not sent", error=repr(exc))

    async def _beat_forever(self) -> None:
        while True:
            await self._beat()
            await asyncio.sleep(self.settings.heartbeat_interval)

    async def _expire_forever(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self.models.keep_alive / 4))
            await self.models.expire()
