"""The model manager alone, with fake models, fake sizes and a fake clock: leases, keep-alive
counted from the last release, eviction by memory fit of idle models only, pins, loads that
fail, and pulls that hold up no lease of a loaded model."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path

import msgspec
import pytest

from dalston.catalog import Catalog, HfSource, Source
from dalston.pull import pull
from dalston.sdk.models import Located, ModelManager, NoModels, NoRoom
from dalston.store import ModelStore
from tests.hubserver import FakeHub

GIB = 2**30


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Models:
    """Fake load, unload and locate; what happened, in order, in `log`. Every model takes 1 GiB
    but those named in `sizes`; a model in `pulls` is located once its event is set."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.changes: list[str] = []
        self.sizes: dict[str, float] = {}
        self.pulls: dict[str, asyncio.Event] = {}

    def load(self, runtime_model_id: str, path: Path) -> dict:
        if runtime_model_id == "broken":
            raise RuntimeError("not a model")
        self.log.append(f"load {runtime_model_id}")
        return {"id": runtime_model_id, "path": path, "unloaded": False}

    def unload(self, handle: dict) -> None:
        self.log.append(f"unload {handle['id']}")
        handle["unloaded"] = True

    async def locate(self, runtime_model_id: str) -> Located:
        if runtime_model_id == "unknown":
            raise LookupError("unknown model")
        if runtime_model_id in self.pulls:
            self.log.append(f"pull {runtime_model_id}")
            await self.pulls[runtime_model_id].wait()
            self.log.append(f"pulled {runtime_model_id}")
        return Located(f"public-{runtime_model_id}", Path("/store") / runtime_model_id,
                       int(self.sizes.get(runtime_model_id, 1) * GIB))

    def manager(self, memory_gb: float = 100, **options) -> ModelManager:
        return ModelManager(load=self.load, unload=self.unload, locate=self.locate,
                            on_change=self.changes.append, memory_bytes=int(memory_gb * GIB), **options)


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


async def test_small_models_stay_loaded_together_where_they_fit(models):
    models.sizes.update(a=1, b=2, c=1)
    manager = models.manager(memory_gb=4, max_loaded=8)
    for model in ("a", "b", "c"):
        await manager.preload(model)
    assert manager.held() == ["c", "b", "a"] and manager.swaps == 0
    assert manager.used_bytes() == 4 * GIB


async def test_a_large_model_evicts_the_least_recently_released_first(models, clock):
    models.sizes.update(a=1, b=1, c=1, big=2)
    manager = models.manager(memory_gb=4, clock=clock)
    for at, model in enumerate(("a", "b", "c")):
        clock.now = at
        await manager.preload(model)
    clock.now = 10
    await manager.preload("a")  # released last now: b is the least recently released
    await manager.preload("big")  # 2 GiB in 4: one of the three must go
    assert manager.held() == ["big", "a", "c"] and models.log[-2:] == ["unload b", "load big"]
    models.sizes["huge"] = 3
    await manager.preload("huge")  # all of it: the rest go, least recently released first
    assert manager.held() == ["huge"]
    assert models.log[-4:] == ["unload c", "unload a", "unload big", "load huge"]


async def test_a_large_model_never_evicts_a_leased_one(models, clock):
    models.sizes.update(a=1, b=1, big=2)
    manager = models.manager(memory_gb=3, clock=clock)
    await manager.preload("b")
    clock.now = 1
    async with manager.use("a"):  # a is leased, released never: b goes although a is older
        await manager.preload("big")
        assert manager.held() == ["big", "a"] and "unload a" not in models.log
        # Nothing idle is left to make room: the next large model waits for a's lease to end,
        # so "huge" below cannot load while this block holds a.
        models.sizes["huge"] = 3
        waiting = asyncio.create_task(manager.preload("huge"))
        await _until(lambda: "unload big" in models.log and manager.resident["a"].leaving)
        await _spin()
        assert not waiting.done() and manager.held() == ["a"]
    await asyncio.wait_for(waiting, 5)
    assert manager.held() == ["huge"] and models.log[-2:] == ["unload a", "load huge"]


async def test_a_model_marked_to_leave_takes_no_new_lease_while_others_do(models, clock):
    """A load waiting for a's lease to end: a new task for a waits behind it (no starvation),
    and b, which need not go (pinned here), keeps serving."""
    models.sizes.update(a=2, b=1, big=2)
    manager = models.manager(memory_gb=3, clock=clock)
    await manager.preload("b", pin=True)
    order: list[str] = []
    leave = asyncio.Event()

    async def task(model: str, hold: bool = False) -> None:
        async with manager.use(model):
            order.append(model)
            if hold:
                await leave.wait()

    holder = asyncio.create_task(task("a", hold=True))
    await _until(lambda: order)
    loading = asyncio.create_task(manager.preload("big"))
    await _until(lambda: manager.resident["a"].leaving)
    late_a = asyncio.create_task(task("a"))
    await task("b")
    await task("b")
    await _spin()
    assert order == ["a", "b", "b"] and not late_a.done() and not loading.done()
    leave.set()
    await asyncio.wait_for(asyncio.gather(holder, loading, late_a), 5)
    assert order == ["a", "b", "b", "a"]
    assert models.log == ["load b", "load a", "unload a", "load big", "unload big", "load a"]


async def test_a_pull_holds_up_no_lease_of_a_loaded_model(models):
    """While a missing model is pulled, tasks on the loaded one come and go; the pulled model
    then loads beside it."""
    manager = models.manager(memory_gb=4)
    await manager.preload("a")
    models.pulls["slow"] = asyncio.Event()
    pulling = asyncio.create_task(manager.preload("slow"))
    await _until(lambda: "pull slow" in models.log)
    for _ in range(5):
        async with manager.use("a"):
            pass
    assert not pulling.done() and manager.resident["a"].leases == 0
    models.pulls["slow"].set()
    await asyncio.wait_for(pulling, 5)
    assert manager.held() == ["slow", "a"]
    assert models.log == ["load a", "pull slow", "pulled slow", "load slow"]


async def test_an_engine_holding_nothing_loads_a_model_larger_than_its_memory(models):
    models.sizes.update(a=1, huge=16)
    manager = models.manager(memory_gb=4)
    await manager.preload("a")
    await manager.preload("huge")
    assert manager.held() == ["huge"] and models.log[-2:] == ["unload a", "load huge"]


async def test_no_room_beside_pinned_models_is_an_error_that_evicts_nothing(models):
    models.sizes.update(a=2, b=1, big=3)
    manager = models.manager(memory_gb=4)
    await manager.preload("a", pin=True)
    await manager.preload("b")
    with pytest.raises(NoRoom, match="pinned"):
        await manager.preload("big")
    assert manager.held() == ["b", "a"] and models.log == ["load a", "load b"]


async def test_a_load_given_up_frees_the_model_marked_to_leave(models):
    """A load waiting for a's lease is cancelled (its engine stops, say): a stays, and takes
    leases again at once."""
    manager = models.manager(max_loaded=1)
    leave = asyncio.Event()

    async def hold_a() -> None:
        async with manager.use("a"):
            await leave.wait()

    holder = asyncio.create_task(hold_a())
    await _until(lambda: "a" in manager.resident)
    loading = asyncio.create_task(manager.preload("c"))
    await _until(lambda: manager.resident["a"].leaving)
    loading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loading
    assert not manager.resident["a"].leaving
    await asyncio.wait_for(manager.preload("a"), 1)
    leave.set()
    await holder
    assert manager.held() == ["a"] and models.log == ["load a"]


async def test_can_load_another_counts_memory(models):
    models.sizes.update(a=2, b=2)
    manager = models.manager(memory_gb=4, max_loaded=8)
    async with manager.use("a"), manager.use("b"):
        assert not manager.can_load_another()  # memory all leased
    assert manager.can_load_another()


async def test_tasks_on_a_loaded_model_keep_their_pace_while_a_slow_pull_runs(
        models, catalog: Catalog, store: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A real pull of 3 MB from a loopback Hub that sends 1 MB/s, beside tasks of 50 ms on a
    loaded model: they keep completing, at about their pace alone, until the pull is done."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "model.bin").write_bytes(os.urandom(3 << 20))
    for name in ("config.json", "tokenizer.json"):
        (repo / name).write_text("{}")
    runtime = catalog.runtime("faster-whisper")
    spec = msgspec.structs.replace(catalog.model("faster-whisper-tiny"),
                                   sources=[Source(hf=HfSource(repo="test/slow"))])

    async def locate(runtime_model_id: str) -> Located:
        if runtime_model_id != spec.runtime_model_id:
            return await models.locate(runtime_model_id)
        return Located(spec.id, await asyncio.to_thread(pull, spec, runtime, store), GIB)

    manager = ModelManager(load=models.load, unload=models.unload, locate=locate,
                           on_change=models.changes.append, memory_bytes=4 * GIB)
    await manager.preload("a")

    async def task() -> float:
        started = time.monotonic()
        async with manager.use("a"):
            await asyncio.to_thread(time.sleep, 0.05)
        return time.monotonic() - started

    alone = [await task() for _ in range(5)]
    with FakeHub() as hub:
        hub.add_repo("test/slow", repo)
        hub.rate = 1 << 20
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        pulling = asyncio.create_task(manager.preload(spec.runtime_model_id))
        beside = []
        while not pulling.done():
            beside.append(await task())
        await pulling
    assert manager.held() == [spec.runtime_model_id, "a"] and hub.downloads("model.bin") == 1
    assert len(beside) >= 20, beside  # the pull took about 3 s: tasks went on throughout
    assert statistics.median(beside) < 2 * statistics.median(alone) + 0.05, (alone, beside)


async def _spin(turns: int = 20) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)
