"""Which models an engine holds: leased by tasks, loaded on demand, unloaded when idle.

As in Ollama's scheduler, a task holds a lease on its model for as long as it runs (`use`), and
a model's keep-alive counts from the end of its last lease: a model in use is never unloaded,
neither by keep-alive nor to make room for another, and a swap waits for the lease to end.
`_lease` decides whether to reuse, pull, evict and load; `expire` decides what keep-alive
unloads. The manager runs on the engine's event loop; leases are granted in order, and the
blocking work (pull, load, unload) goes to threads, one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dalston.contracts import LoadedModel, Unload
from dalston.logs import get_logger
from dalston.sdk import memory

log = get_logger("dalston.engine.models")


@dataclass
class Resident:
    model: str
    runtime_model_id: str
    handle: Any
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    pinned: bool = False
    leases: int = 0
    released: float = 0.0  # the manager's clock when the last lease ended

    def describe(self) -> LoadedModel:
        return LoadedModel(model=self.model, runtime_model_id=self.runtime_model_id,
                           loaded_at=self.loaded_at, last_used=self.last_used, pinned=self.pinned)


class ModelManager:
    """Loaded models of one engine: at most `max_loaded`, the least recently used idle one out
    first, each unloaded `keep_alive` seconds after its last lease ends (negative: never)."""

    def __init__(self, *, load: Callable[[str, Path], Any], unload: Callable[[Any], None],
                 locate: Callable[[str], Awaitable[tuple[str, Path]]],
                 on_change: Callable[[str], None], max_loaded: int = 1,
                 keep_alive: float = -1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._load = load
        self._unload = unload
        # The model's public id and its directory on disk, pulled first if missing.
        self._locate = locate
        self._on_change = on_change  # tells the engine its status changed (for heartbeats)
        self._clock = clock  # for keep-alive; tests pass a fake one
        self.max_loaded = max(1, max_loaded)
        self.keep_alive = keep_alive
        self.resident: OrderedDict[str, Resident] = OrderedDict()
        self.loads = 0
        self.swaps = 0
        self.last_unload: Unload | None = None
        self._lock = asyncio.Lock()
        self._lease_ended = asyncio.Event()

    def loaded(self) -> list[LoadedModel]:
        return [r.describe() for r in self.resident.values()]

    def held(self) -> list[str]:
        """The runtime model ids held, most recently used first."""
        return [r.runtime_model_id for r in reversed(self.resident.values())]

    def can_load_another(self) -> bool:
        """False while every slot holds a model in use: loading another would wait for a lease
        to end, and a live session's lease lasts as long as the session."""
        return len(self.resident) < self.max_loaded or any(r.leases == 0 for r in self.resident.values())

    @contextlib.asynccontextmanager
    async def use(self, runtime_model_id: str, *, pin: bool = False) -> AsyncIterator[Any]:
        """The loaded model's handle, leased until the block ends: loaded (evicting an idle
        model, or waiting for one to become idle) if needed, and kept loaded meanwhile."""
        resident = await self._lease(runtime_model_id, pin)
        try:
            yield resident.handle
        finally:
            resident.leases -= 1
            resident.last_used = time.time()
            resident.released = self._clock()
            self._lease_ended.set()

    async def preload(self, runtime_model_id: str, *, pin: bool = False) -> None:
        """Load a model before any task asks for it; keep-alive counts from now."""
        async with self.use(runtime_model_id, pin=pin):
            pass

    async def _lease(self, runtime_model_id: str, pin: bool) -> Resident:
        async with self._lock:
            resident = self.resident.get(runtime_model_id) or await self._bring_in(runtime_model_id)
            resident.leases += 1
            resident.pinned = resident.pinned or pin
            resident.last_used = time.time()
            self.resident.move_to_end(runtime_model_id)
            return resident

    async def _bring_in(self, runtime_model_id: str) -> Resident:
        model, path = await self._locate(runtime_model_id)
        await self._make_room()
        self._on_change("loading")
        started = time.monotonic()
        handle = await asyncio.to_thread(self._load_mapped, runtime_model_id, path)
        resident = self.resident[runtime_model_id] = Resident(
            model=model, runtime_model_id=runtime_model_id, handle=handle)
        self.loads += 1
        log.info("model loaded", model=model, seconds=round(time.monotonic() - started, 2))
        return resident

    def _load_mapped(self, runtime_model_id: str, path: Path) -> Any:
        with memory.large_blocks_mapped():
            return self._load(runtime_model_id, path)

    async def _make_room(self) -> None:
        while len(self.resident) >= self.max_loaded:
            unpinned = [r for r in self.resident.values() if not r.pinned]
            if not unpinned:
                raise RuntimeError(f"all {self.max_loaded} model slots hold pinned models")
            victim = next((r for r in unpinned if not r.leases), None)
            if victim is None:  # every slot is in use: the swap waits for a task to end
                self._lease_ended.clear()
                await self._lease_ended.wait()
                continue
            await self._evict(victim)
            self.swaps += 1

    async def _evict(self, resident: Resident) -> None:
        rss_before, vram_before = memory.rss_bytes(), memory.vram_bytes()
        del self.resident[resident.runtime_model_id]
        handle, resident.handle = resident.handle, None
        await asyncio.to_thread(self._unload, handle)
        del handle
        await asyncio.to_thread(memory.release)
        self.last_unload = Unload(model=resident.model, at=time.time(), rss_before=rss_before,
                                  rss_after=memory.rss_bytes(), vram_before=vram_before,
                                  vram_after=memory.vram_bytes())
        log.info("model unloaded", model=resident.model, rss_before=rss_before,
                 rss_after=self.last_unload.rss_after, vram_after=self.last_unload.vram_after)
        self._on_change("unloaded")

    def _expires_at(self, resident: Resident) -> float | None:
        """When keep-alive unloads `resident` (its clock), or None: never, or not while leased."""
        if self.keep_alive < 0 or resident.pinned or resident.leases:
            return None
        return resident.released + self.keep_alive

    async def expire(self) -> None:
        """Unload the models whose keep-alive has run out since their last lease ended."""
        async with self._lock:
            now = self._clock()
            for resident in list(self.resident.values()):
                due = self._expires_at(resident)
                if due is not None and due <= now:
                    await self._evict(resident)

    async def expire_forever(self) -> None:
        """Unload each model as its keep-alive runs out (0: as soon as its lease ends)."""
        if self.keep_alive < 0:
            return
        while True:
            self._lease_ended.clear()
            due = min((at for r in self.resident.values() if (at := self._expires_at(r)) is not None),
                      default=None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lease_ended.wait(),
                                       None if due is None else max(0.0, due - self._clock()))
            try:
                await self.expire()
            except Exception:  # noqa: BLE001 - the model is dropped all the same; keep watching
                log.exception("unload failed")


class NoModels:
    """The model manager of a runtime that serves no model (audio-prepare, merge): it holds
    nothing, and its tasks, which name no model, are all it takes."""

    loads = swaps = 0
    last_unload: Unload | None = None

    def loaded(self) -> list[LoadedModel]:
        return []

    def held(self) -> list[None]:
        return [None]  # the runtime's one queue: tasks with no runtime model id

    def can_load_another(self) -> bool:
        return True

    @contextlib.asynccontextmanager
    async def use(self, runtime_model_id: str | None, *, pin: bool = False) -> AsyncIterator[None]:
        yield None

    async def preload(self, runtime_model_id: str, *, pin: bool = False) -> None:
        pass

    async def expire_forever(self) -> None:
        pass
