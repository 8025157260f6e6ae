"""A service's loops (dalston/loops.py): stopped on request, and an error when one ends by
itself. In-process, milliseconds."""

from __future__ import annotations

import asyncio

import pytest

from dalston.loops import running, until_stopped


async def test_loops_run_until_stopped_then_are_cancelled_and_awaited():
    stopping, ticks, cleaned = asyncio.Event(), [], []

    async def loop(name: str) -> None:
        try:
            while True:
                ticks.append(name)
                await asyncio.sleep(0.001)
        finally:
            await asyncio.sleep(0)  # its clean-up awaits too: done before until_stopped returns
            cleaned.append(name)

    service = asyncio.create_task(until_stopped(stopping, loop("a"), loop("b")))
    while not {"a", "b"} <= set(ticks):
        await asyncio.sleep(0.001)
    assert not service.done()
    stopping.set()
    await asyncio.wait_for(service, 5)
    assert sorted(cleaned) == ["a", "b"]


@pytest.mark.parametrize("ending", ["raises", "returns"])
async def test_a_loop_that_ends_by_itself_stops_the_others_and_is_an_error(ending):
    cancelled = asyncio.Event()
    forever = _forever(cancelled)

    async def ends() -> None:
        await asyncio.sleep(0.001)
        if ending == "raises":
            raise ValueError("boom")

    with pytest.raises(RuntimeError, match="loop ended: " + ("ValueError.*boom" if ending == "raises" else "None")):
        await asyncio.wait_for(until_stopped(asyncio.Event(), forever, ends()), 5)
    assert cancelled.is_set()


async def test_running_cancels_its_loops_when_the_block_fails():
    cancelled = asyncio.Event()
    forever = _forever(cancelled)

    with pytest.raises(KeyError):
        async with running(forever) as (task,):
            await asyncio.sleep(0)
            raise KeyError("the service's own work failed")
    assert cancelled.is_set() and task.cancelled()


async def _forever(cancelled: asyncio.Event) -> None:
    """A loop that never ends by itself; `cancelled` is set when it is cancelled."""
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        cancelled.set()
        raise
