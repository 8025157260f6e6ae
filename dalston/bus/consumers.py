"""Taking messages from JetStream: the consume loop of a durable consumer, single fetches from a
shared task queue, the state of consumers, and following the last message per subject.

Every way a message can be handled badly ends here the same way: a message that breaks its
contract is dead-lettered, one that fails is redelivered a bounded number of times and then
dead-lettered, and no message, however hostile, ends the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats.errors
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

import nats
from dalston.bus.connection import Bus
from dalston.bus.credentials import login
from dalston.bus.layout import load_layout
from dalston.config import Settings
from dalston.contracts import ContractError
from dalston.logs import get_logger

log = get_logger("dalston.bus")

FETCH_BATCH = 32
# How long one fetch waits on the server: while it waits, the consumer shows a waiting puller
# (what readiness checks look for).
FETCH_WAIT_SECONDS = 5.0
REDELIVERY_DELAY_SECONDS = 1.0


class HandleLater(Exception):
    """Raised by a handler for a message that cannot be handled yet (it arrived before what it
    refers to, or its receiver is down): redelivered after `delay` seconds, quietly, within the
    consumer's deliveries."""

    def __init__(self, reason: str, delay: float = REDELIVERY_DELAY_SECONDS) -> None:
        super().__init__(reason)
        self.delay = delay


class GiveUp(Exception):
    """Raised by a handler for a message it will never handle (its retries outlived their
    time): dead-lettered with the reason."""


async def consume(bus: Bus, stream: str, durable: str, handler: Callable[[Msg], Awaitable[None]],
                  *, concurrent: int = 0) -> None:
    """Hand every message of the durable consumer (nats/streams.yaml) to `handler`, forever:
    one after another, or up to `concurrent` at once, each on its own (for handlers that wait
    on others, such as webhook receivers: a slow one holds up no other). A consumer whose
    `max_deliver` is -1 redelivers without end; its handler decides when to give up."""
    subscription = await bus.pull(durable, stream)
    max_deliver = load_layout()["consumers"][stream][durable]["max_deliver"]
    running: set[asyncio.Task] = set()
    try:
        while True:
            if concurrent and len(running) >= concurrent:
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                batch = min(FETCH_BATCH, concurrent - len(running)) if concurrent else FETCH_BATCH
                messages = await subscription.fetch(batch, timeout=FETCH_WAIT_SECONDS)
            except (TimeoutError, nats.errors.TimeoutError):
                # nats-py raises either, depending on where in the fetch the deadline passed.
                continue
            except Exception as exc:  # noqa: BLE001 - a lost connection, a 409: try again
                log.warning("fetch failed; retrying", stream=stream, error=repr(exc))
                await asyncio.sleep(0.5)
                continue
            for msg in messages:
                if concurrent:
                    task = asyncio.create_task(_handle(bus, msg, handler, max_deliver))
                    running.add(task)
                    task.add_done_callback(running.discard)
                else:
                    await _handle(bus, msg, handler, max_deliver)
    finally:
        for task in running:  # unacknowledged: redelivered after the ack wait
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def _handle(bus: Bus, msg: Msg, handler: Callable[[Msg], Awaitable[None]], max_deliver: int) -> None:
    """Handle one message; whatever it holds, the loop goes on to the next."""
    try:
        await handler(msg)
        await msg.ack()
    except (ContractError, GiveUp) as exc:
        await bus.dead_letter(msg, str(exc))
    except Exception as exc:  # noqa: BLE001 - NATS failing over, say: it comes back
        if 0 < max_deliver <= msg.metadata.num_delivered:
            # The server would drop it silently after this delivery: keep it with the reason.
            await bus.dead_letter(msg, f"not handled in {max_deliver} deliveries: {exc!r}")
            return
        delay = REDELIVERY_DELAY_SECONDS
        if isinstance(exc, HandleLater):
            log.info("message redelivered later", reason=str(exc), delay=exc.delay)
            delay = exc.delay
        else:
            log.exception("message not handled; it will be redelivered", subject=msg.subject[:256])
        try:
            await msg.nak(delay=delay)
        except Exception:  # noqa: BLE001 - no connection: redelivered after ack_wait
            pass


class PullQueue:
    """One durable consumer that several engines share, taken from one message at a time."""

    def __init__(self, bus: Bus, stream: str, durable: str) -> None:
        self._bus, self._stream, self._durable = bus, stream, durable
        self._subscription = None

    async def fetch(self, timeout: float) -> Msg | None:
        """The next message, or None if none came within `timeout` seconds."""
        if self._subscription is None:
            self._subscription = await self._bus.pull(self._durable, self._stream)
        try:
            return (await self._subscription.fetch(1, timeout=timeout))[0]
        except (TimeoutError, nats.errors.TimeoutError):
            return None


@dataclass
class ConsumerState:
    name: str
    pending: int  # not delivered yet
    unacked: int  # delivered, neither acknowledged nor failed yet
    waiting: int  # pull requests waiting for messages: consumers at work


async def consumer_states(bus: Bus, stream: str, prefix: str = "") -> list[ConsumerState]:
    """The consumers of `stream` whose names start with `prefix` (one request)."""
    return [_state(info) for info in await bus.js.consumers_info(stream) if info.name.startswith(prefix)]


async def consumer_state(bus: Bus, stream: str, durable: str) -> ConsumerState:
    return _state(await bus.js.consumer_info(stream, durable))


async def consumer_state_at(settings: Settings, stream: str, durable: str,
                            timeout: float) -> ConsumerState | None:
    """One look at a durable consumer, for status reports: no retries, no layout. None when the
    consumer is not there or may not be seen; ConnectionError when NATS cannot be reached."""
    try:
        nc = await nats.connect(servers=settings.nats_servers, connect_timeout=timeout,
                                allow_reconnect=False, max_reconnect_attempts=0, **login(settings))
    except Exception as exc:  # noqa: BLE001 - any failure to connect is the answer
        raise ConnectionError(f"unreachable ({exc})") from None
    try:
        return _state(await nc.jetstream(timeout=timeout).consumer_info(stream, durable))
    except Exception:  # noqa: BLE001 - no layout yet, or no permission to look
        return None
    finally:
        await nc.close()


def _state(info) -> ConsumerState:
    return ConsumerState(name=info.name, pending=info.num_pending or 0,
                         unacked=info.num_ack_pending or 0, waiting=info.num_waiting or 0)


# How often a follower looks whether its stream was created anew.
STREAM_RECHECK_SECONDS = 5.0


class LastPerSubject:
    """The subscription follow_last_per_subject returns. A single NATS restarted loses a memory
    stream (HEARTBEATS) and the orchestrator creates it anew; an ordered consumer would resume at
    the old stream's sequence and hear nothing, so a stream created anew is followed afresh."""

    def __init__(self, bus: Bus, stream: str, subjects: str,
                 on_message: Callable[[str, bytes | None], Awaitable[None]]) -> None:
        self._bus, self._stream, self._subjects, self._on_message = bus, stream, subjects, on_message
        self._subscription = None
        self._created = None
        self._watch: asyncio.Task | None = None

    async def start(self) -> None:
        self._created = (await self._bus.js.stream_info(self._stream)).created
        self._subscription = await self._subscribe()
        self._watch = asyncio.create_task(self._follow_new_streams())

    async def unsubscribe(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await self._subscription.unsubscribe()

    async def _receive(self, msg: Msg) -> None:
        expired = not msg.data or bool((msg.headers or {}).get("Nats-Marker-Reason"))
        await self._on_message(msg.subject, None if expired else msg.data)

    async def _subscribe(self):
        return await self._bus.js.subscribe(
            self._subjects, stream=self._stream, cb=self._receive, ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            # The consumer lives on one node: a missed idle beat after 2 s recreates it elsewhere,
            # so a cluster node's death hides engines for seconds, not ~15 s.
            idle_heartbeat=1.0)

    async def _follow_new_streams(self) -> None:
        while True:
            await asyncio.sleep(STREAM_RECHECK_SECONDS)
            try:
                created = (await self._bus.js.stream_info(self._stream)).created
                if created == self._created:
                    continue
                log.warning("stream created anew; following it afresh", stream=self._stream)
                with contextlib.suppress(Exception):
                    await self._subscription.unsubscribe()
                self._subscription = await self._subscribe()
                self._created = created
            except Exception as exc:  # noqa: BLE001 - NATS away or the stream not back yet: look again
                log.info("stream not checked", stream=self._stream, error=repr(exc))


async def follow_last_per_subject(bus: Bus, stream: str, subjects: str,
                                  on_message: Callable[[str, bytes | None], Awaitable[None]]) -> LastPerSubject:
    """Call `on_message(subject, data)` with the last message of every subject matching
    `subjects`, then with each new one; `data` is None where the server says that a subject's
    message expired (its TTL marker). Returns the subscription (`unsubscribe()` ends it)."""
    follower = LastPerSubject(bus, stream, subjects, on_message)
    await follower.start()
    return follower
