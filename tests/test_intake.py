"""Pure logic of taking work: which queue an engine serves first (TaskIntake's preference) and
which engines are live (EngineWatch), with peers' beats and the clock given, in milliseconds."""

from __future__ import annotations

import pytest

from dalston.config import load_settings
from dalston.contracts import Heartbeat, LoadedModel, encode, task_consumer
from dalston.engines import MISSED_BEATS, EngineWatch
from dalston.sdk.intake import SWAP_BACKLOG_PER_HOLDER, TaskIntake

RUNTIME = "faster-whisper"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def beat(engine: str, *models: str, status: str = "idle", loading: str | None = None,
         runtime: str = RUNTIME) -> Heartbeat:
    return Heartbeat(runtime=runtime, engine=engine, host="h", status=status, version="t", interval=1.0,
                     current_model=loading,
                     loaded_models=[LoadedModel(model=m, runtime_model_id=m, loaded_at=0, last_used=0)
                                    for m in models])


async def watch_of(*beats: Heartbeat, clock: Clock | None = None) -> EngineWatch:
    watch = EngineWatch(clock=clock or Clock())
    for b in beats:
        await watch._receive(f"heartbeat.{b.runtime}.anonymous.{b.engine}", encode(b))
    return watch


def q(model: str) -> str:
    return task_consumer(RUNTIME, model)


async def intake(held: list[str], *peers: Heartbeat, can_load_another: bool = True,
                 prefer_loaded: bool = True) -> TaskIntake:
    settings = load_settings({"DALSTON_PREFER_LOADED": str(prefer_loaded).lower()})
    return TaskIntake(settings, RUNTIME, "me", lambda: held, await watch_of(*peers),
                      lambda: can_load_another)


# --- the preference ------------------------------------------------------------------------------


async def test_held_models_come_first_most_recent_first_then_the_longest_backlog():
    taker = await intake(["base", "tiny"])
    pending = {q("tiny"): 1, q("small"): 2, q("base"): 1, q("large"): 5}
    assert taker._preference(pending) == [q("base"), q("tiny"), q("large"), q("small")]


async def test_a_backlog_a_peer_holds_is_left_to_it_until_it_outgrows_its_holders():
    taker = await intake([], beat("peer", "base"))
    assert taker._preference({q("base"): SWAP_BACKLOG_PER_HOLDER}) == []
    assert taker._preference({q("base"): SWAP_BACKLOG_PER_HOLDER + 1}) == [q("base")]
    # Two holders clear twice the backlog.
    two = await intake([], beat("peer", "base"), beat("other", "base"))
    assert two._preference({q("base"): 2 * SWAP_BACKLOG_PER_HOLDER}) == []


async def test_a_peer_loading_a_model_counts_as_its_holder():
    taker = await intake([], beat("peer", loading="base"))
    assert taker._preference({q("base"): SWAP_BACKLOG_PER_HOLDER}) == []


async def test_only_live_peers_other_than_itself_hold_anything():
    stopping = await intake([], beat("peer", "base", status="stopping"))
    assert stopping._preference({q("base"): 1}) == [q("base")]
    itself = await intake([], beat("me", "base"))
    assert itself._preference({q("base"): 1}) == [q("base")]
    elsewhere = await intake([], beat("peer", "base", runtime="nemo"))
    assert elsewhere._preference({q("base"): 1}) == [q("base")]


async def test_with_every_slot_leased_only_held_models_are_served():
    taker = await intake(["tiny"], can_load_another=False)
    assert taker._preference({q("tiny"): 1, q("base"): 9}) == [q("tiny")]


async def test_without_the_preference_every_backlog_is_served_in_any_order():
    taker = await intake(["tiny"], beat("peer", "base"), prefer_loaded=False)
    pending = {q("tiny"): 1, q("base"): 1, q("large"): 3}
    assert sorted(taker._preference(pending)) == sorted(pending)


# --- the watch -----------------------------------------------------------------------------------


async def test_an_engine_is_live_until_it_misses_its_beats():
    clock = Clock()
    watch = await watch_of(beat("b"), beat("a"), beat("n", runtime="nemo"), clock=clock)
    assert [b.engine for b in watch.live()] == ["a", "b", "n"]  # by runtime, then engine
    assert [b.engine for b in watch.live(RUNTIME)] == ["a", "b"]
    clock.now += MISSED_BEATS * 1.0 - 0.01
    assert len(watch.live()) == 3
    clock.now += 0.02
    assert watch.live() == [] and watch.silent("heartbeat.faster-whisper.anonymous.a")
    await watch._receive("heartbeat.faster-whisper.anonymous.a", encode(beat("a")))
    assert [b.engine for b in watch.live()] == ["a"]


async def test_an_expired_beat_removes_the_engine_and_says_so():
    changes: list[tuple[str, str | None]] = []
    watch = EngineWatch(on_change=lambda subject, b: changes.append((subject, b and b.engine)))
    await watch._receive("heartbeat.faster-whisper.anonymous.a", encode(beat("a")))
    await watch._receive("heartbeat.faster-whisper.anonymous.a", None)
    assert watch.live() == []
    assert changes == [("heartbeat.faster-whisper.anonymous.a", "a"), ("heartbeat.faster-whisper.anonymous.a", None)]


@pytest.mark.parametrize("data", [b"not json", b'{"engine": "a"}', b"[]"])
async def test_a_beat_that_is_not_a_heartbeat_changes_nothing(data):
    watch = await watch_of(beat("a"))
    await watch._receive("heartbeat.faster-whisper.anonymous.a", data)
    assert [b.engine for b in watch.live()] == ["a"]


async def test_a_runtime_counts_as_seen_while_live_and_for_a_while_after():
    """What decides between waiting for an engine (a restart) and refusing at once (none)."""
    clock = Clock()
    watch = await watch_of(beat("a"), clock=clock)
    # The watch's start is a sighting of every runtime: engines starting beside it get the time.
    assert watch.seen_within(RUNTIME, 10) and watch.seen_within("diarize", 10)
    clock.now += 60
    assert watch.seen_within(RUNTIME, 10) is False  # silent since its beat
    assert watch.seen_within("diarize", 10) is False
    await watch._receive("heartbeat.faster-whisper.anonymous.a", encode(beat("a")))
    clock.now += 30  # live no more (missed beats), and its expiry marker arrives...
    await watch._receive("heartbeat.faster-whisper.anonymous.a", None)
    assert watch.live() == [] and watch.seen_within(RUNTIME, 31)  # ... but it was seen
    assert not watch.seen_within(RUNTIME, 29)
    await watch._receive("heartbeat.diarize.anonymous.d", encode(beat("d", runtime="diarize")))
    assert watch.seen_within("diarize", 0)  # live
