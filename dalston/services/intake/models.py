"""Models as the gateway serves them: each one's state (`dalston.model_state`), and pulls into
the shared model store (the same `dalston.pull` the CLI and engines use)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from dalston.bus.connection import Bus
from dalston.catalog import Catalog, ModelSpec
from dalston.config import Settings
from dalston.contracts import (
    MODEL_PULLS,
    PULL_ENDED,
    PULL_PROGRESS_SUBJECT,
    PullProgress,
    PullRequest,
    now,
    subject_token,
)
from dalston.engines import EngineWatch
from dalston.keys import ApiKey
from dalston.logs import get_logger
from dalston.model_state import ModelState
from dalston.pull import PullError, pull
from dalston.store import ModelStore

log = get_logger("dalston.intake.models")


class ModelLoaded(RuntimeError):
    def __init__(self, model: str, engines: list[str]) -> None:
        super().__init__(f"{model} is loaded on {', '.join(engines)}; unload it first or force the delete")


class ModelNotInstalled(PermissionError):
    """A user key asked for a model not installed: running it would pull it, which is an admin's call."""

    def __init__(self, model: str, key: str) -> None:
        super().__init__(f"{model} is not installed, and key {key!r} is a user key: only an admin key "
                         f"pulls models (POST /v1/models/{model}/pull, or `dalston models pull {model}`)")


class ModelService:
    def __init__(self, bus: Bus, settings: Settings, catalog: Catalog, engines: EngineWatch) -> None:
        self.bus = bus
        self.catalog = catalog
        self.engines = engines
        self.store = ModelStore(settings.models_path)
        self.progress: dict[str, PullProgress] = {}
        self._pulls: dict[str, asyncio.Task] = {}
        self._watchers: dict[str, set[asyncio.Queue]] = {}

    async def start(self) -> None:
        # Any NATS client (the dashboard, say) may ask for a pull; one gateway takes each ask.
        await self.bus.serve(MODEL_PULLS, self._on_request, queue="gateway", model="*")

    async def _on_request(self, request: PullRequest) -> None:
        try:
            self.start_pull(self.catalog.model(request.model), force=request.force)
        except LookupError as exc:
            log.warning("pull request refused", model=request.model[:256], reason=str(exc))

    # --- what is there ----------------------------------------------------------------------

    def state(self, model: ModelSpec) -> ModelState:
        return ModelState.of(model, self.catalog.runtime(model.runtime), self.store,
                             self.engines.live(model.runtime), self.progress.get(model.id))

    def require_usable(self, model: ModelSpec, key: ApiKey | None) -> None:
        """ModelNotInstalled unless `key` may run `model`: engines pull a model that is not
        installed, so a user key gets installed models only; an admin key, or none where the
        gateway demands none (one user), any. Jobs and live sessions both ask here."""
        if key is not None and key.role != "admin" and not self.state(model).installed:
            raise ModelNotInstalled(model.id, key.name)

    def describe(self, model: ModelSpec) -> dict[str, Any]:
        """The model as the API serves it."""
        return self.state(model).openai_object()

    # --- pulls --------------------------------------------------------------------------------

    def start_pull(self, model: ModelSpec, force: bool = False) -> None:
        """Start pulling `model` unless a pull of it is already under way (then share it)."""
        running = self._pulls.get(model.id)
        if running is None or running.done():
            self._pulls[model.id] = asyncio.create_task(self._pull(model, force))

    async def _pull(self, model: ModelSpec, force: bool) -> None:
        loop = asyncio.get_running_loop()

        def report(progress: PullProgress) -> None:
            loop.call_soon_threadsafe(self._record, progress)

        try:
            path = await asyncio.to_thread(pull, model, self.catalog.runtime(model.runtime),
                                           self.store, report, force)
        except PullError as exc:
            self._record(PullProgress(model=model.id, status="failed", message=str(exc), at=now()))
        else:
            # Said even when nothing was downloaded (already installed), so followers finish.
            self._record(PullProgress(model=model.id, status="installed", message=str(path), at=now()))

    def _record(self, progress: PullProgress) -> None:
        self.progress[progress.model] = progress
        for queue in self._watchers.get(progress.model, ()):
            queue.put_nowait(progress)
        asyncio.ensure_future(self.bus.announce(
            PULL_PROGRESS_SUBJECT.format(model=subject_token(progress.model)), progress))

    async def follow(self, model: ModelSpec) -> AsyncIterator[PullProgress]:
        """Progress of the pull of `model`, until it is installed or failed."""
        queue: asyncio.Queue[PullProgress] = asyncio.Queue()
        self._watchers.setdefault(model.id, set()).add(queue)
        try:
            last = self.progress.get(model.id)
            if last is not None and last.status in PULL_ENDED and self._pulls[model.id].done():
                yield last
                return
            while True:
                progress = await queue.get()
                yield progress
                if progress.status in PULL_ENDED:
                    return
        finally:
            self._watchers[model.id].discard(queue)

    # --- removal ------------------------------------------------------------------------------

    def remove(self, model: ModelSpec, force: bool) -> bool:
        engines = self.state(model).loaded_on
        if engines and not force:
            raise ModelLoaded(model.id, engines)
        runtime = self.catalog.runtime(model.runtime)
        # The news of an earlier pull is stale now: it would say the model is installed.
        self.progress.pop(model.id, None)
        return self.store.remove(runtime.store_dir, model.runtime_model_id)

