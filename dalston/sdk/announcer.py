"""Announcing what a runtime decodes while it decodes it, from the thread that runs the model.

The actor calls the announcer once per segment, in its worker thread; the announcer hands each
segment to the event loop, which announces them on core NATS one at a time, in order. A lost
announcement costs a live listener a partial result, never the task its result: failures are
logged, not raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from dalston.bus.connection import Bus
from dalston.contracts import Contract, Segment
from dalston.logs import get_logger

log = get_logger("dalston.engine")

# What an actor is handed to report a segment it has just decoded (callable from any thread).
SegmentSink = Callable[[Segment], None]


class SegmentAnnouncer:
    """A `SegmentSink` that announces `message(seq, segment)` on `subject` for each segment."""

    def __init__(self, bus: Bus, subject: str, message: Callable[[int, Segment], Contract]) -> None:
        self._bus, self._subject, self._message = bus, subject, message
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Segment | None] = asyncio.Queue()
        self._sender = asyncio.create_task(self._send())

    def __call__(self, segment: Segment) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, segment)

    async def _send(self) -> None:
        seq = 0
        while (segment := await self._queue.get()) is not None:
            try:
                await self._bus.announce(self._subject, self._message(seq, segment))
            except Exception as exc:  # noqa: BLE001 - live-only: the result does not depend on it
                log.warning("segment not announced", subject=self._subject, error=repr(exc))
            seq += 1

    async def close(self) -> None:
        """Once every segment reported so far is announced (call after the decoding thread ended)."""
        # Behind the segments still scheduled by __call__ (callbacks run in order).
        self._loop.call_soon(self._queue.put_nowait, None)
        await self._sender
