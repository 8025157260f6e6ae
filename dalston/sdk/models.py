"""Which models an engine holds: leased by tasks, loaded on demand, unloaded when idle.

As in Ollama's scheduler (server/sched.go), a task holds a lease on its model for as long as it
runs (`use`), and a model's keep-alive counts from the end of its last lease: a model in use is
never unloaded, neither by keep-alive nor to make room for another. An engine holds as many
models as its memory allows (the catalog's `hardware` figures against the device's memory), up
to `max_loaded`; a model that does not fit evicts the least recently released idle models, and
where that is not enough it marks leased ones to leave: they take no new lease and go when their
last one ends, so a stream of tasks for a loaded model cannot starve a task for another.

Nothing that waits holds up a lease of a loaded model: a pull runs before the model queues to
load, and loads queue (in order of arrival) only behind each other. The manager runs on the
engine's event loop; the blocking work (pull, load, unload) goes to threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from dalston import tracing
from dalston.contracts import LoadedModel, Unload
from dalston.logs import get_logger
from dalston.sdk import memory

log = get_logger("dalston.engine.models")


class Located(NamedTuple):
    """A model ready to load: its public id, its directory, and the memory it takes."""

    model: str
    path: Path
    memory_bytes: int


class NoRoom(RuntimeError):
    """The model cannot fit beside the pinned models, whatever is evicted."""


@dataclass(eq=False)  # one per load: compared by identity
class Resident:
    model: str
    runtime_model_id: str
    handle: Any
    memory_bytes: int = 0
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    pinned: bool = False
    leases: int = 0
    released: float = 0.0  # the manager's clock when the last lease ended
    leaving: bool = False  # chosen to make room: no new lease, unloaded when its last one ends

    def describe(self) -> LoadedModel:
        return LoadedModel(model=self.model, runtime_model_id=self.runtime_model_id,
                           loaded_at=self.loaded_at, last_used=self.last_used, pinned=self.pinned)


class ModelManager:
    """Loaded models of one engine: as many as fit in `memory_bytes`, at most `max_loaded`, the
    least recently released idle one out first, each unloaded `keep_alive` seconds after its last
    lease ends (negative: never)."""

    def __init__(self, *, load: Callable[[str, Path], Any], unload: Callable[[Any], None],
                 locate: Callable[[str], Awaitable[Located]], on_change: Callable[[str], None],
                 memory_bytes: int, max_loaded: int = 3, keep_alive: float = -1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._load = load
        self._unload = unload
        # Where the model is on disk and what it takes, pulled first if missing.
        self._locate = locate
        self._on_change = on_change  # tells the engine its status changed (for heartbeats)
        self._clock = clock  # for keep-alive and eviction order; tests pass a fake one
        self.memory_bytes = memory_bytes
        self.max_loaded = max(1, max_loaded)
        self.keep_alive = keep_alive
        self.resident: OrderedDict[str, Resident] = OrderedDict()
        self.loads = 0
        self.swaps = 0
        self.last_unload: Unload | None = None
        self._loading = asyncio.Lock()  # one load at a time, in order of arrival
        self._changed = asyncio.Event()  # replaced at every change: a lease ended, a model left

    def loaded(self) -> list[LoadedModel]:
        return [r.describe() for r in self.resident.values()]

    def held(self) -> list[str]:
        """The runtime model ids held, most recently used first."""
        return [r.runtime_model_id for r in reversed(self.resident.values())]

    def used_bytes(self) -> int:
        return sum(r.memory_bytes for r in self.resident.values())

    def can_load_another(self) -> bool:
        """False while every slot and all memory hold models in use: loading another would wait
        for a lease to end, and a live session's lease lasts as long as the session."""
        room = len(self.resident) < self.max_loaded and self.used_bytes() < self.memory_bytes
        return room or any(not r.leases and not r.pinned for r in self.resident.values())

    @contextlib.asynccontextmanager
    async def use(self, runtime_model_id: str, *, pin: bool = False) -> AsyncIterator[Any]:
        """The loaded model's handle, leased until the block ends: loaded (evicting idle models,
        or waiting for leased ones to end) if needed, and kept loaded meanwhile."""
        resident = await self._lease(runtime_model_id, pin)
        try:
            yield resident.handle
        finally:
            resident.leases -= 1
            resident.last_used = time.time()
            resident.released = self._clock()
            self._change()

    async def preload(self, runtime_model_id: str, *, pin: bool = False) -> None:
        """Load a model before any task asks for it; keep-alive counts from now."""
        async with self.use(runtime_model_id, pin=pin):
            pass

    def _change(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _grant(self, resident: Resident, pin: bool) -> Resident:
        resident.leases += 1
        resident.pinned = resident.pinned or pin
        resident.last_used = time.time()
        self.resident.move_to_end(resident.runtime_model_id)
        return resident

    async def _lease(self, runtime_model_id: str, pin: bool) -> Resident:
        while True:
            resident = self.resident.get(runtime_model_id)
            if resident is not None and not resident.leaving:
                return self._grant(resident, pin)
            if resident is not None:  # it makes room for a load queued before: reload after
                await self._changed.wait()
                continue
            with tracing.span("model load", model=runtime_model_id):
                located = await self._locate(runtime_model_id)  # a pull holds up no other lease
                async with self._loading:
                    if runtime_model_id in self.resident:  # loaded by a task queued before this one
                        continue
                    await self._make_room(located.memory_bytes)
                    return self._grant(await self._bring_in(runtime_model_id, located), pin)

    async def _bring_in(self, runtime_model_id: str, located: Located) -> Resident:
        self._on_change("loading")
        started = time.monotonic()
        handle = await asyncio.to_thread(self._load_mapped, runtime_model_id, located.path)
        resident = self.resident[runtime_model_id] = Resident(
            model=located.model, runtime_model_id=runtime_model_id, handle=handle,
            memory_bytes=located.memory_bytes)
        self.loads += 1
        log.info("model loaded", model=located.model, seconds=round(time.monotonic() - started, 2))
        return resident

    def _load_mapped(self, runtime_model_id: str, path: Path) -> Any:
        with memory.large_blocks_mapped():
            return self._load(runtime_model_id, path)

    def _fits(self, need: int, leaving: list[Resident] | None = None) -> bool:
        """Whether a model taking `need` bytes fits once `leaving` are gone. An engine that holds
        nothing loads any model, as Ollama does: the catalog's figures are the model's minimum."""
        staying = [r for r in self.resident.values() if r not in (leaving or [])]
        return len(staying) < self.max_loaded and (
            not staying or sum(r.memory_bytes for r in staying) + need <= self.memory_bytes)

    def _victims(self, need: int) -> list[Resident]:
        """The fewest models to unload, in order, for `need` bytes to fit: idle ones first, the
        least recently released first, then leased ones; never a pinned one."""
        candidates = sorted((r for r in self.resident.values() if not r.pinned),
                            key=lambda r: (r.leases > 0, r.released))
        chosen: list[Resident] = []
        for resident in candidates:
            if self._fits(need, chosen):
                return chosen
            chosen.append(resident)
        if self._fits(need, chosen):
            return chosen
        pinned = [r.model for r in self.resident.values() if r.pinned]
        raise NoRoom(f"no room for a model of {need / 2**30:.1f} GiB beside the pinned models "
                     f"{pinned} ({self.max_loaded} slots, {self.memory_bytes / 2**30:.1f} GiB)")

    async def _make_room(self, need: int) -> None:
        try:
            while not self._fits(need):
                victims = self._victims(need)
                for resident in self.resident.values():
                    resident.leaving = resident in victims
                idle = next((r for r in victims if not r.leases), None)
                if idle is None:  # only leased ones can go: wait for a lease to end
                    await self._changed.wait()
                    continue
                await self._evict(idle)
                self.swaps += 1
        finally:  # room made some other way (keep-alive), or given up: the rest stay
            if any(r.leaving for r in self.resident.values()):
                for resident in self.resident.values():
                    resident.leaving = False
                self._change()

    async def _evict(self, resident: Resident) -> None:
        if self.resident.get(resident.runtime_model_id) is not resident:
            return  # gone already: keep-alive and a load chose it at once
        rss_before, vram_before = memory.rss_bytes(), memory.vram_bytes()
        del self.resident[resident.runtime_model_id]
        self._change()
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
            changed = self._changed
            due = min((at for r in self.resident.values() if (at := self._expires_at(r)) is not None),
                      default=None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(),
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
