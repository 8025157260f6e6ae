"""A service's loops, run for as long as it runs: the one way the orchestrator, the webhook
service and the engines start their loops and stop them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any


@contextlib.asynccontextmanager
async def running(*loops: Coroutine[Any, Any, Any]) -> AsyncIterator[list[asyncio.Task]]:
    """Run `loops` as tasks for as long as the block lasts; at its end each is cancelled and
    awaited, so none outlives the connection the service closes next."""
    tasks = [asyncio.create_task(loop) for loop in loops]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_stopped(stopping: asyncio.Event, *loops: Coroutine[Any, Any, Any]) -> None:
    """Run `loops`, which never end, until `stopping` is set. One that ends first is an error:
    a live process whose loop died would take work it never does, so the service exits instead
    and its supervisor (`dalston up`, compose) starts a fresh one."""
    async with running(stopping.wait(), *loops) as (stop, *work):
        done, _ = await asyncio.wait([stop, *work], return_when=asyncio.FIRST_COMPLETED)
        if stop not in done:
            raise RuntimeError(f"a consume loop ended: {done.pop().exception()!r}")
