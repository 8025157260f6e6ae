"""How an engine takes its next task: which of its runtime's queues, and when.

Every engine of a runtime shares one durable pull consumer per model (`tasks.<runtime>.<model>`).
The orchestrator's empty ring on `ring.tasks.<runtime>.<model>` is the doorbell: it wakes an
idle engine the moment a task is published (the task itself, with its grant, reaches only the
engine that takes it). The engine then surveys the backlog (one `consumers_info` request) and pulls
one task from the best queue: the model it holds first, so mixed traffic does not make every
engine swap on every task.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable

from dalston.bus.connection import Bus
from dalston.bus.consumers import PullQueue
from dalston.bus.delivery import Delivery, RedeliveryPolicy
from dalston.config import Settings
from dalston.contracts import (
    TASK_RING_SUBJECT,
    TASKS_STREAM,
    Heartbeat,
    Task,
    subject_token,
    task_consumer,
    task_consumer_prefix,
)
from dalston.engines import EngineWatch
from dalston.logs import get_logger

log = get_logger("dalston.engine.intake")

# An engine swaps to a model other engines hold only when its backlog exceeds this many tasks
# per holder: measured on 24 mixed jobs, 2 engines (bench/models.py), 1 gave 3 loads and the
# shortest makespan, 2 gave 4 loads and a longer one.
SWAP_BACKLOG_PER_HOLDER = 1
# How long an idle engine waits for the doorbell before it surveys the backlog anyway.
IDLE_POLL_SECONDS = 2.0
FETCH_TIMEOUT_SECONDS = 0.5
# A short look where a task may be: just rung for, or due for redelivery after its engine died.
PROBE_SECONDS = 0.05


class TaskIntake:
    def __init__(self, settings: Settings, runtime: str, engine: str,
                 held_models: Callable[[], list[str | None]], peers: EngineWatch,
                 can_load_another: Callable[[], bool] = lambda: True, *,
                 policy: RedeliveryPolicy = RedeliveryPolicy()) -> None:
        self.settings = settings
        self.runtime = runtime
        self.engine = engine
        # Runtime model ids, most recently used first; [None] for a runtime that serves no
        # model, whose tasks all wait in the queue of tasks without one.
        self._held_models = held_models
        # False while live sessions lease every model slot: a task for another model would wait
        # for them to end, so only tasks for held models are taken.
        self._can_load_another = can_load_another
        self._peers = peers
        self._policy = policy  # the engine's: how often a task may come back (its engine died)
        self._bus: Bus | None = None
        self._doorbell = asyncio.Event()
        self._rung: set[str] = set()  # consumers the doorbell rang for since the last look
        self._queues: dict[str, PullQueue] = {}

    async def start(self, bus: Bus) -> None:
        self._bus = bus
        await bus.doorbell(TASK_RING_SUBJECT.format(runtime=subject_token(self.runtime), model="*"), self._ring)
        for runtime_model_id in self._held_models():  # its first choices exist before it looks
            await bus.task_consumers.ensure(self.runtime, runtime_model_id)

    def wake(self) -> None:
        self._doorbell.set()

    async def _ring(self, subject: str) -> None:
        # A task was published for this runtime: make sure its model's consumer exists (a
        # third-party publisher may have invented the subject), then wake the task loop.
        model_token = subject.rsplit(".", 1)[-1]
        self._rung.add(await self._bus.task_consumers.ensure(self.runtime, model_token))
        self._doorbell.set()

    async def next_task(self, stopping: asyncio.Event) -> Delivery[Task] | None:
        """The next task for this engine, or None once `stopping` is set."""
        while not stopping.is_set():
            self._doorbell.clear()
            rung, self._rung = self._rung, set()
            try:
                # Fast path: a new task for a model this engine holds needs no backlog survey.
                for durable in rung & self._held_consumers():
                    if msg := await self._fetch(durable, PROBE_SECONDS):
                        return msg
                pending, unacked = await self._backlog()
                held = self._held_consumers()
                for durable in self._preference(pending):
                    # Wait a little for a task only where it costs no swap; elsewhere, a task
                    # taken first by a peer means the peer is loading that model: look again.
                    wait = FETCH_TIMEOUT_SECONDS if durable in held else PROBE_SECONDS
                    if msg := await self._fetch(durable, wait):
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

    async def _backlog(self) -> tuple[dict[str, int], list[str]]:
        """This runtime's consumers with undelivered tasks (and how many), and those whose
        delivered tasks are unacked: a dead engine's task comes back there after ack_wait."""
        states = await self._bus.consumer_states(TASKS_STREAM, task_consumer_prefix(self.runtime))
        return ({s.name: s.pending for s in states if s.pending}, [s.name for s in states if s.unacked])

    def _held_consumers(self) -> set[str]:
        return {task_consumer(self.runtime, rid) for rid in self._held_models()}

    def _preference(self, pending: dict[str, int]) -> list[str]:
        """Which backlogs to serve, best first: models this engine holds (most recently used
        first); then models no other engine holds, or whose backlog is more than their holders
        can soon clear, longest backlog first. A backlog another engine is already working
        through is left to it: taking it would cost a swap here for little gain."""
        held = [task_consumer(self.runtime, rid) for rid in self._held_models()]
        first = [name for name in held if name in pending]
        if not self._can_load_another():
            return first
        if not self.settings.prefer_loaded:
            return random.sample(list(pending), len(pending))
        holders = Counter(task_consumer(self.runtime, model)
                          for beat in self._peers.live(self.runtime) if beat.engine != self.engine
                          for model in _models_held(beat))
        rest = [name for name in pending if name not in first
                and pending[name] > SWAP_BACKLOG_PER_HOLDER * holders[name]]
        return first + sorted(rest, key=lambda n: -pending[n])

    async def _fetch(self, durable: str, timeout: float) -> Delivery[Task] | None:
        """A task from `durable`; None when another engine took it first, or nothing is due."""
        queue = self._queues.get(durable)
        if queue is None:
            queue = self._queues[durable] = PullQueue(self._bus, TASKS_STREAM, durable, Task, self._policy)
        return await queue.fetch(timeout)


def _models_held(beat: Heartbeat) -> set[str]:
    """What a peer holds for the backlog's sake: its loaded models and the one it is loading."""
    return {m.runtime_model_id for m in beat.loaded_models} | ({beat.current_model} - {None})
