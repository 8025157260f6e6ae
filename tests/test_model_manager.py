"""The model manager alone, with fake models and a fake clock: leases, keep-alive counted from
the last release, eviction of idle models only, pins, and loads that fail."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dalston.sdk.models import ModelManager, NoModels


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Models:
    """Fake load, unload and locate; what happened, in order, in `log`."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.changes: list[str] = []

    def load(self, runtime_model_id: str, path: Path) -> dict:
        if runtime_model_id == "broken":
            raise RuntimeError("not a model")
        self.log.append(f"load {runtime_model_id}")
        return {"id": runtime_model_id, "path": path, "unloaded": False}

    def unload(self, handle: dict) -> None:
        self.log.append(f"unload {handle['id']}")
        handle["unloaded"] = True

    async def locate(self, runtime_model_id: str) -> tuple[str, Path]:
        if runtime_model_id == "unknown":
            raise LookupError("unknown model")
        return f"public-{runtime_model_id}", Path("/store") / runtime_model_id

    def manager(self, **options) -> ModelManager:
        return ModelManager(load=self.load, unload=self.unload, locate=self.locate,
                            on_change=self.changes.append, **options)


@pytest.fixture
def models() -> Models:
    return Models()


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def test_a_lease_loads_the_model_once_and_ends_with_the_block(models):
    manager = models.manager()
    async with manager.use("a") as handle:
        assert handle["id"] == "a" and manager.resident["a"].leases == 1
        assert [m.model for m in manager.loaded()] == ["public-a"]
    async with manager.use("a") as again:
        assert again is handle
    assert manager.resident["a"].leases == 0 and not handle["unloaded"]
    assert models.log == ["load a"] and manager.loads == 1 and models.changes == ["loading"]


async def test_concurrent_leases_share_one_load_and_are_counted(models):
    manager = models.manager()
    inside = asyncio.Event()
    leave = asyncio.Event()

    async def task():
        async with manager.use("a") as handle:
            inside.set()
            await leave.wait()
            return handle

    first, second = asyncio.create_task(task()), asyncio.create_task(task())
    await asyncio.wait_for(inside.wait(), 5)
    await asyncio.wait_for(_until(lambda: manager.resident["a"].leases == 2), 5)
    leave.set()
    assert (await first) is (await second)
    assert models.log == ["load a"] and manager.resident["a"].leases == 0


async def test_keep_alive_counts_from_the_last_release(models, clock):
    manager = models.manager(keep_alive=10, clock=clock)
    async with manager.use("a"):
        async with manager.use("a"):
            clock.now = 100  # far past keep-alive since the lease began: leased, so kept
            await manager.expire()
            assert manager.held() == ["a"]
        clock.now = 105  # one lease ended at 100: still one to go
        await manager.expire()
        assert manager.held() == ["a"]
    clock.now = 114.9
    await manager.expire()
    assert manager.held() == ["a"]
    clock.now = 115  # keep-alive after the last release
    await manager.expire()
    assert manager.held() == [] and models.log == ["load a", "unload a"]
    assert manager.last_unload.model == "public-a" and models.changes[-1] == "unloaded"


async def test_a_negative_keep_alive_keeps_models_forever(models, clock):
    manager = models.manager(keep_alive=-1, clock=clock)
    await manager.preload("a")
    clock.now = 1e9
    await manager.expire()
    await asyncio.wait_for(manager.expire_forever(), 1)  # nothing to watch: returns at once
    assert manager.held() == ["a"]


async def test_eviction_picks_the_least_recently_used_idle_model(models):
    manager = models.manager(max_loaded=2)
    async with manager.use("a"):  # a is the least recently used, but in use
        await manager.preload("b")
        await manager.preload("c")
        assert manager.held() == ["c", "a"]
        await manager.preload("d")
        assert manager.held() == ["d", "a"]
    assert models.log == ["load a", "load b", "unload b", "load c", "unload c", "load d"]
    assert manager.swaps == 2 and manager.loads == 4


async def test_max_loaded_models_stay_loaded_most_recently_used_first(models):
    manager = models.manager(max_loaded=3)
    for model in ("a", "b", "c", "a"):
        await manager.preload(model)
    assert manager.held() == ["a", "c", "b"] and manager.swaps == 0 and manager.loads == 3
    await manager.preload("d")
    assert manager.held() == ["d", "a", "c"] and models.log[-2:] == ["unload b", "load d"]


async def test_a_swap_waits_for_the_lease_to_end(models):
    manager = models.manager(max_loaded=1)
    leave = asyncio.Event()

    async def long_task():
        async with manager.use("a") as handle:
            await leave.wait()
            assert not handle["unloaded"]  # loaded to the very end of the task

    running = asyncio.create_task(long_task())
    await asyncio.wait_for(_until(lambda: "load a" in models.log), 5)
    waiting = asyncio.create_task(manager.preload("b"))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not waiting.done() and models.log == ["load a"]
    leave.set()
    await asyncio.wait_for(asyncio.gather(running, waiting), 5)
    assert models.log == ["load a", "unload a", "load b"] and manager.held() == ["b"]


async def test_leases_are_granted_in_order(models):
    """A task for the loaded model that comes after a swap waits behind it, so a stream of
    tasks for one model cannot starve a task for another."""
    manager = models.manager(max_loaded=1)
    leave = asyncio.Event()
    order: list[str] = []

    async def task(model: str, hold: bool = False):
        async with manager.use(model):
            order.append(model)
            if hold:
                await leave.wait()

    first = asyncio.create_task(task("a", hold=True))
    await asyncio.wait_for(_until(lambda: order), 5)
    others = [asyncio.create_task(task("b")), asyncio.create_task(task("a"))]
    for _ in range(10):
        await asyncio.sleep(0)
    leave.set()
    await asyncio.wait_for(asyncio.gather(first, *others), 5)
    assert order == ["a", "b", "a"]


async def test_pinned_models_never_expire_nor_make_room(models, clock):
    manager = models.manager(max_loaded=2, keep_alive=0, clock=clock)
    await manager.preload("a", pin=True)
    await manager.preload("b")
    clock.now = 1e9
    await manager.expire()
    assert manager.held() == ["a"]  # b expired, a is pinned
    await manager.preload("c")
    await manager.preload("d")
    assert manager.held() == ["d", "a"] and manager.loaded()[0].pinned
    assert "unload a" not in models.log


async def test_slots_all_pinned_refuse_another_model(models):
    manager = models.manager(max_loaded=1)
    await manager.preload("a", pin=True)
    with pytest.raises(RuntimeError, match="pinned"):
        async with manager.use("b"):
            pass
    assert manager.held() == ["a"] and models.log == ["load a"]


async def test_a_failed_load_leaves_nothing_half_loaded(models):
    manager = models.manager(max_loaded=2)
    await manager.preload("a")
    with pytest.raises(LookupError):  # not found: nothing evicted, nothing loaded
        await manager.preload("unknown")
    with pytest.raises(RuntimeError, match="not a model"):
        await manager.preload("broken")
    assert manager.held() == ["a"] and manager.loads == 1
    async with manager.use("b"):
        assert manager.held() == ["b", "a"]


async def test_expiry_watch_unloads_keep_alive_after_release_not_during_a_task(models):
    """The real clock: a task four times longer than keep-alive keeps its model, which is
    unloaded once keep-alive has passed after the task."""
    manager = models.manager(keep_alive=0.05)
    watch = asyncio.create_task(manager.expire_forever())
    try:
        async with manager.use("a") as handle:
            await asyncio.sleep(0.2)
            assert manager.held() == ["a"] and not handle["unloaded"]
        assert manager.held() == ["a"]  # released this instant
        await asyncio.wait_for(_until(lambda: handle["unloaded"]), 5)
        assert manager.held() == []
        await manager.preload("b", pin=True)
        await asyncio.sleep(0.2)
        assert manager.held() == ["b"]
    finally:
        watch.cancel()


async def test_keep_alive_zero_unloads_as_soon_as_the_lease_ends(models):
    manager = models.manager(keep_alive=0)
    watch = asyncio.create_task(manager.expire_forever())
    try:
        async with manager.use("a"):
            for _ in range(10):
                await asyncio.sleep(0)
            assert manager.held() == ["a"]
        await asyncio.wait_for(_until(lambda: "unload a" in models.log), 5)
    finally:
        watch.cancel()
    assert manager.held() == [] and models.log == ["load a", "unload a"]


async def test_a_runtime_without_models_holds_nothing():
    models = NoModels()
    async with models.use(None) as handle:
        assert handle is None
    await models.preload("anything")
    await asyncio.wait_for(models.expire_forever(), 1)
    assert models.held() == [None] and models.loaded() == []
    assert (models.loads, models.swaps, models.last_unload) == (0, 0, None)


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.01)


async def test_another_model_can_load_unless_every_slot_is_in_use(models):
    manager = models.manager(max_loaded=2)
    assert manager.can_load_another()  # free slots
    async with manager.use("a"):
        assert manager.can_load_another()  # one slot still free
        async with manager.use("b"):
            assert not manager.can_load_another()  # sessions' leases, say, hold every slot
        assert manager.can_load_another()  # b is idle: it would be evicted
    assert NoModels().can_load_another()
