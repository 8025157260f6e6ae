"""What a live connection heard, for the realtime tests of every API (OpenAI's, ElevenLabs'):
its events in order, waited for by kind, and audio sent at the pace of speech."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any


class Heard:
    """Every event heard, in order; `kind_of` names an event's kind. `timeout`: how long a wait
    lasts unless told."""

    def __init__(self, kind_of: Callable[[Any], str], timeout: float = 60.0) -> None:
        self.heard: list[Any] = []
        self._kind_of, self._timeout = kind_of, timeout

    def of(self, kind: str) -> list[Any]:
        return [event for event in self.heard if self._kind_of(event) == kind]

    async def until(self, kind: str, count: int = 1, timeout: float | None = None) -> list[Any]:
        """The events of `kind`, once there are `count`; the test fails after `timeout` s."""
        timeout = self._timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while len(self.of(kind)) < count:
            assert time.monotonic() < deadline, \
                f"{count} {kind} not heard in {timeout} s; heard {[self._kind_of(e) for e in self.heard]}"
            await asyncio.sleep(0.05)
        return self.of(kind)


async def paced(send: Callable[[bytes], Awaitable[Any]], audio: bytes, step: int, chunk_ms: int,
                real_time: bool = True) -> float:
    """`audio` sent in pieces of `step` bytes (`chunk_ms` of audio each): at 1x speed where
    `real_time`, else as fast as the peer takes it. The time its last piece went."""
    started = time.monotonic()
    for number, start in enumerate(range(0, len(audio), step)):
        await send(audio[start:start + step])
        # Always a pause, if only to let a reader take a close: a send to a peer that reads as
        # fast as it comes never yields to it.
        await asyncio.sleep(max(0.0, started + (number + 1) * chunk_ms / 1000 - time.monotonic())
                            if real_time else 0)
    return time.monotonic()
