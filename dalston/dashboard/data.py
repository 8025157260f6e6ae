"""What the dashboard shows, read straight from NATS: engines from their heartbeats (last beat
per engine, then live), model pulls from `models.progress.*`, jobs from a watch on the `jobs`
key-value bucket. No gateway needed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from dalston.bus.connection import Bus, connect
from dalston.catalog import Catalog
from dalston.config import Settings
from dalston.contracts import (
    PULL_PROGRESS_SUBJECT,
    PULL_SUBJECT,
    Heartbeat,
    JobRecord,
    PullProgress,
    PullRequest,
    Transcript,
    now,
    subject_token,
)
from dalston.engines import EngineWatch
from dalston.model_state import ModelState
from dalston.store import ModelStore

# Jobs kept in view, newest first.
JOB_LIMIT = 200


@dataclass
class EngineView:
    beat: Heartbeat
    # When the engine went silent (or said it stops); None while it is alive.
    gone_at: float | None = None

    @property
    def status(self) -> str:
        return "gone" if self.gone_at is not None else self.beat.status


class DashboardData:
    """Live state, updated by NATS callbacks; `on_change` is called after every update."""

    def __init__(self, settings: Settings, on_change: Callable[[], None] = lambda: None,
                 forget_after: float = 60.0) -> None:
        self.settings = settings
        self.catalog = Catalog.from_settings(settings)
        self.store = ModelStore(settings.models_path)
        self.forget_after = forget_after
        self.engines: dict[str, EngineView] = {}
        self.pulls: dict[str, PullProgress] = {}
        self.jobs: dict[str, JobRecord] = {}
        self.bus: Bus | None = None
        self._on_change = on_change
        self._watch = EngineWatch(on_change=self._on_beat)
        self._jobs_task: asyncio.Task | None = None

    async def start(self) -> None:
        # The layout is the services' business: a dashboard only reads it.
        self.bus = await connect(self.settings, name="dalston-dashboard", apply_layout=False)
        await self._watch.start(self.bus)
        await self.bus.subscribe(PULL_PROGRESS_SUBJECT.format(model="*"), self._on_progress, kind=PullProgress)
        self._jobs_task = asyncio.create_task(self._follow_jobs())

    async def stop(self) -> None:
        if self._jobs_task is not None:
            self._jobs_task.cancel()
        await self._watch.stop()
        if self.bus is not None:
            await self.bus.close()

    # --- engines ------------------------------------------------------------------------------

    def _on_beat(self, subject: str, beat: Heartbeat | None) -> None:
        if beat is not None:
            self.engines[subject] = EngineView(beat)
        elif subject in self.engines and self.engines[subject].gone_at is None:
            self.engines[subject].gone_at = time.time()  # the server expired its last beat
        self._on_change()

    def expire(self) -> None:
        """Mark engines that missed their beats as gone; forget those gone for a while."""
        moment = time.time()
        for subject, view in list(self.engines.items()):
            if view.gone_at is None and (self._watch.silent(subject) or view.beat.status == "stopping"):
                view.gone_at = moment
            elif view.gone_at is not None and moment - view.gone_at > self.forget_after:
                del self.engines[subject]

    def live_engines(self) -> list[Heartbeat]:
        return [v.beat for v in self.engines.values() if v.gone_at is None]

    # --- models -------------------------------------------------------------------------------

    def models(self) -> list[ModelState]:
        live = self.live_engines()
        return [ModelState.of(spec, self.catalog.runtime(spec.runtime), self.store, live, self.pulls.get(spec.id))
                for spec in self.catalog.models.values()]

    async def _on_progress(self, progress: PullProgress) -> None:
        self.pulls[progress.model] = progress
        self._on_change()

    async def request_pull(self, model_id: str) -> None:
        """Ask the gateway (any that listens) to pull `model_id` into the store."""
        self.pulls[model_id] = PullProgress(model=model_id, status="started", message="requested", at=now())
        await self.bus.announce(PULL_SUBJECT.format(model=subject_token(model_id)), PullRequest(model=model_id))
        self._on_change()

    # --- jobs ---------------------------------------------------------------------------------

    async def _follow_jobs(self) -> None:
        async for job_id, record in self.bus.jobs.watch():
            if record is None:
                self.jobs.pop(job_id, None)
            else:
                self.jobs[job_id] = record
                if len(self.jobs) > JOB_LIMIT:
                    oldest = min(self.jobs.values(), key=lambda r: r.created_at)
                    del self.jobs[oldest.id]
            self._on_change()

    def recent_jobs(self) -> list[JobRecord]:
        return sorted(self.jobs.values(), key=lambda r: r.created_at, reverse=True)

    async def transcript(self, record: JobRecord) -> Transcript:
        return await self.bus.artifacts.transcript(record)
