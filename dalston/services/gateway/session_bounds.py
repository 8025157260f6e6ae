"""What realtime sessions may hold of a gateway and its engines: open WebSockets (a total cap),
engine session slots (at most half of them, or the key's own `max_sessions`, to one key), and
audio (no faster than SPEED times real time, and enough of it to count as not idle)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable

from dalston.engines import EngineWatch

# Audio faster than this many times real time waits: the client's socket is not read meanwhile,
# so TCP pushes back on it, and an engine always keeps up with what it is sent.
SPEED = 4.0
# Seconds of audio a client may send at once before the pace applies (a file sent in one go).
BURST_SECONDS = 10.0
# A session that sent less audio than this in the idle window is idle.
ACTIVE_SECONDS = 1.0


class SessionSlots:
    """One gateway's open realtime WebSockets, and the engine slots each key's sessions hold."""

    def __init__(self, max_connections: int, engines: EngineWatch) -> None:
        self.max_connections, self.engines = max_connections, engines
        self.connections = 0
        self.claimed: Counter[str] = Counter()

    def connect(self) -> bool:
        if self.connections >= self.max_connections:
            return False
        self.connections += 1
        return True

    def disconnect(self) -> None:
        self.connections -= 1

    def refusal(self, owner: str | None, runtime: str, key_limit: int | None) -> str | None:
        """Why `owner` may not claim another engine slot of `runtime` now; None if it may.
        Without keys (one user on loopback) there is no one to share with."""
        if owner is None:
            return None
        slots = sum(engine.max_sessions for engine in self.engines.live(runtime))
        limit = key_limit if key_limit is not None else max(1, slots // 2)
        if self.claimed[owner] >= limit:
            return (f"key {owner!r} holds {self.claimed[owner]} live sessions, its share "
                    f"({'its max_sessions' if key_limit is not None else f'half of {slots} slots'})")
        return None

    def hold(self, owner: str | None) -> None:
        if owner is not None:
            self.claimed[owner] += 1

    def release(self, owner: str | None) -> None:
        if owner is not None:
            self.claimed[owner] -= 1
            if self.claimed[owner] <= 0:
                del self.claimed[owner]


class AudioPace:
    """A session's audio: paced to SPEED times real time (a token bucket of BURST_SECONDS), and
    idle once its last `idle_seconds` held less than ACTIVE_SECONDS of it."""

    def __init__(self, idle_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_seconds, self.clock = idle_seconds, clock
        self.opened = self._refilled = clock()
        self._tokens = BURST_SECONDS
        self._recent: deque[tuple[float, float]] = deque()  # (when, seconds of audio)

    def delay(self, seconds: float) -> float:
        """Take `seconds` of audio; how long to wait before sending it on."""
        now = self.clock()
        self._tokens = min(BURST_SECONDS, self._tokens + SPEED * (now - self._refilled)) - seconds
        self._refilled = now
        self._recent.append((now, seconds))
        return max(0.0, -self._tokens / SPEED)

    async def take(self, seconds: float) -> None:
        if (wait := self.delay(seconds)) > 0:
            await asyncio.sleep(wait)

    def idle(self) -> bool:
        now = self.clock()
        while self._recent and self._recent[0][0] < now - self.idle_seconds:
            self._recent.popleft()
        heard = sum(seconds for _, seconds in self._recent)
        return now - self.opened >= self.idle_seconds and heard < ACTIVE_SECONDS
