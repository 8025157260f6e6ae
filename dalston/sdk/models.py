"""Which models an engine holds: load on demand, evict least recently used, unload when idle.

One place for each decision, as in Ollama's scheduler: `acquire` decides whether to reuse, pull,
evict and load; `expire` decides what keep-alive unloads. The manager runs on the engine's event
loop; the blocking work (pull, load, unload) goes to threads, one at a time.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
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

    def describe(self) -> LoadedModel:
        return LoadedModel(model=self.model, runtime_model_id=self.runtime_model_id,
                           loaded_at=self.loaded_at, last_used=self.last_used, pinned=self.pinned)


class ModelManager:
    """Loaded models of one engine, at most `max_loaded`, least recently used first out."""

    def __init__(self, *, load: Callable[[str, Path], Any], unload: Callable[[Any], None],
                 locate: Callable[[str, str], Awaitable[Path]],
                 on_change: Callable[[str], None], max_loaded: int = 1,
                 keep_alive: float = -1.0) -> None:
        self._load = load
        self._unload = unload
        self._locate = locate  # finds the model on disk, pulling it if missing
        self._on_change = on_change  # tells the engine its status changed (for heartbeats)
        self.max_loaded = max(1, max_loaded)
        self.keep_alive = keep_alive
        self.resident: OrderedDict[str, Resident] = OrderedDict()
        self.loads = 0
        self.swaps = 0
        self.last_unload: Unload | None = None
        self._lock = asyncio.Lock()

    def loaded(self) -> list[LoadedModel]:
        return [r.describe() for r in self.resident.values()]

    def holds(self, runtime_model_id: str) -> bool:
        return runtime_model_id in self.resident

    async def acquire(self, model: str, runtime_model_id: str, *, pin: bool = False) -> Any:
        """The handle of a loaded model, loading it (and evicting others) if needed."""
        async with self._lock:
            resident = self.resident.get(runtime_model_id)
            if resident is None:
                path = await self._locate(model, runtime_model_id)
                await self._make_room()
                self._on_change("loading")
                started = time.monotonic()
                handle = await asyncio.to_thread(self._load_mapped, runtime_model_id, path)
                resident = Resident(model=model, runtime_model_id=runtime_model_id, handle=handle)
                self.resident[runtime_model_id] = resident
                self.loads += 1
                log.info("model loaded", model=model, seconds=round(time.monotonic() - started, 2))
            resident.pinned = resident.pinned or pin
            resident.last_used = time.time()
            self.resident.move_to_end(runtime_model_id)
            return resident.handle

    def _load_mapped(self, runtime_model_id: str, path: Path) -> Any:
        with memory.large_blocks_mapped():
            return self._load(runtime_model_id, path)

    async def _make_room(self) -> None:
        while len(self.resident) >= self.max_loaded:
            victim = next((r for r in self.resident.values() if not r.pinned), None)
            if victim is None:
                raise RuntimeError(f"all {self.max_loaded} model slots hold pinned models")
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

    async def expire(self) -> None:
        """Unload models idle for longer than keep-alive (negative: never)."""
        if self.keep_alive < 0:
            return
        async with self._lock:
            cutoff = time.time() - self.keep_alive
            for resident in [r for r in self.resident.values() if not r.pinned and r.last_used < cutoff]:
                await self._evict(resident)

    async def unload_all(self) -> None:
        async with self._lock:
            for resident in list(self.resident.values()):
                await self._evict(resident)
