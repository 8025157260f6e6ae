"""Live engines, as their heartbeats tell: shared by the orchestrator, gateway and dashboard."""

from __future__ import annotations

import time
from collections.abc import Callable

from dalston.bus.connection import Bus
from dalston.contracts import HEARTBEATS_STREAM, ContractError, Heartbeat, decode, heartbeat_subject

# An engine that missed this many beats is gone, whether or not its TTL marker arrived yet.
MISSED_BEATS = 3
# How each runtime's engines are started, for messages that say so.
_STARTED_BY_UP = ("audio-prepare", "merge", "diarize", "redact")


def how_to_start(runtime: str) -> str:
    """How a user starts an engine of `runtime`: with `dalston up`, or compose's service."""
    if runtime in _STARTED_BY_UP:
        return f"`dalston up` starts one; with compose: `docker compose up -d {runtime}`"
    return (f"`dalston up --runtimes {runtime}`, or `dalston serve engine {runtime}`; with compose: "
            f"`docker compose up -d {runtime}`")


class EngineWatch:
    """The last heartbeat of every engine, kept current by a last-per-subject subscription."""

    def __init__(self, on_change: Callable[[str, Heartbeat | None], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._beats: dict[str, Heartbeat] = {}
        # When each last beat arrived, by this process's clock: an engine's own clock (sent_at)
        # may be off by more than three beats on another host.
        self._heard: dict[str, float] = {}
        self._on_change = on_change
        self._clock = clock
        self._subscription = None
        # When an engine of each runtime last beat; kept after it is gone. The watch's start
        # counts as a sighting of every runtime: engines that start beside it are not yet heard.
        self._runtime_heard: dict[str, float] = {}
        self._started = clock()

    async def start(self, bus: Bus) -> None:
        self._started = self._clock()
        self._subscription = await bus.follow_last_per_subject(HEARTBEATS_STREAM, "heartbeat.>", self._receive)

    async def stop(self) -> None:
        if self._subscription is not None:
            await self._subscription.unsubscribe()

    async def _receive(self, subject: str, data: bytes | None) -> None:
        # No data: the server says the beat expired.
        if data is None:
            beat = None
        else:
            try:
                beat = decode(data, Heartbeat)
            except ContractError:
                return
            # Only its own user may publish on a subject that names it: a beat that claims another
            # runtime, user or engine than its subject says is forged.
            if subject != heartbeat_subject(beat.runtime, beat.identity, beat.engine):
                return
        if beat is None:
            self._beats.pop(subject, None)
            self._heard.pop(subject, None)
        else:
            self._beats[subject] = beat
            self._heard[subject] = self._runtime_heard[beat.runtime] = self._clock()
        if self._on_change:
            self._on_change(subject, beat)

    def silent(self, subject: str) -> bool:
        """Whether the engine beating on `subject` missed its last beats, or its beat expired.
        (The server's expiry marker usually says so first; this covers a lost marker.)"""
        beat = self._beats.get(subject)
        return beat is None or self._heard[subject] + MISSED_BEATS * beat.interval < self._clock()

    def seen_within(self, runtime: str, seconds: float) -> bool:
        """Whether an engine of `runtime` is live, or was within `seconds` (restarting, say)."""
        last = max(self._runtime_heard.get(runtime, self._started), self._started)
        return bool(self.live(runtime)) or last + seconds >= self._clock()

    def live(self, runtime: str | None = None) -> list[Heartbeat]:
        return sorted(
            (b for subject, b in self._beats.items()
             if not self.silent(subject) and b.status != "stopping"
             and (runtime is None or b.runtime == runtime)),
            key=lambda b: (b.runtime, b.engine))
