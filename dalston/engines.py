"""Live engines, as their heartbeats tell: shared by the orchestrator, gateway and dashboard."""

from __future__ import annotations

import time
from collections.abc import Callable

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from dalston.contracts import HEARTBEATS_STREAM, ContractError, Heartbeat, decode

# An engine that missed this many beats is gone, whether or not its TTL marker arrived yet.
MISSED_BEATS = 3


class EngineWatch:
    """The last heartbeat of every engine, kept current by a last-per-subject subscription."""

    def __init__(self, on_change: Callable[[str, Heartbeat | None], None] | None = None) -> None:
        self._beats: dict[str, Heartbeat] = {}
        # When each last beat arrived, by this process's clock: an engine's own clock (sent_at)
        # may be off by more than three beats on another host.
        self._heard: dict[str, float] = {}
        self._on_change = on_change
        self._subscription = None

    async def start(self, js: JetStreamContext) -> None:
        self._subscription = await js.subscribe(
            "heartbeat.>", stream=HEARTBEATS_STREAM, cb=self._receive, ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            # The consumer lives on one node: a missed idle beat after 2 s recreates it
            # elsewhere, so a cluster node's death hides engines for seconds, not ~15 s.
            idle_heartbeat=1.0)

    async def stop(self) -> None:
        if self._subscription is not None:
            await self._subscription.unsubscribe()

    async def _receive(self, msg: Msg) -> None:
        # An empty message with Nats-Marker-Reason is the server saying the beat expired.
        if not msg.data or (msg.headers or {}).get("Nats-Marker-Reason"):
            beat = None
        else:
            try:
                beat = decode(msg.data, Heartbeat)
            except ContractError:
                return
        if beat is None:
            self._beats.pop(msg.subject, None)
            self._heard.pop(msg.subject, None)
        else:
            self._beats[msg.subject] = beat
            self._heard[msg.subject] = time.monotonic()
        if self._on_change:
            self._on_change(msg.subject, beat)

    def silent(self, subject: str) -> bool:
        """Whether the engine beating on `subject` missed its last beats, or its beat expired.
        (The server's expiry marker usually says so first; this covers a lost marker.)"""
        beat = self._beats.get(subject)
        return beat is None or self._heard[subject] + MISSED_BEATS * beat.interval < time.monotonic()

    def live(self, runtime: str | None = None) -> list[Heartbeat]:
        return sorted(
            (b for subject, b in self._beats.items()
             if not self.silent(subject) and b.status != "stopping"
             and (runtime is None or b.runtime == runtime)),
            key=lambda b: (b.runtime, b.engine))
