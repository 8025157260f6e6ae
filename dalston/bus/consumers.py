"""Taking messages from JetStream: the consume loop of a durable consumer, single fetches from a
shared task queue, and the state of a consumer for status reports. The loop and the fetches run
on the in-memory bus too (`memory.MemoryBus`), whose messages settle as nats-py's do.

Every way a message can be handled badly ends the same way (`delivery.RedeliveryPolicy`): a
message that breaks its contract is dead-lettered, one that fails is redelivered a bounded number
of times and then dead-lettered, and no message, however hostile, ends the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import nats.errors
from nats.aio.msg import Msg

import nats
from dalston.bus.connection import Bus, ConsumerState, Settled, consumer_state_of
from dalston.bus.credentials import login
from dalston.bus.delivery import Delivery, RedeliveryPolicy, handle
from dalston.bus.layout import load_layout
from dalston.config import Settings
from dalston.logs import get_logger

log = get_logger("dalston.bus")
T = TypeVar("T")

FETCH_BATCH = 32
# How long one fetch waits on the server: while it waits, the consumer shows a waiting puller
# (what readiness checks look for).
FETCH_WAIT_SECONDS = 5.0


def consumer_policy(stream: str, durable: str) -> RedeliveryPolicy:
    """The policy of a durable consumer of nats/streams.yaml: its `max_deliver` deliveries
    (-1: without end)."""
    return RedeliveryPolicy(attempts=max(load_layout()["consumers"][stream][durable]["max_deliver"], 0))


async def consume(bus: Bus, stream: str, durable: str, handler: Callable[[Delivery[T]], Awaitable[None]],
                  *, kind: type[T] | Callable[[str], type[T]], concurrent: int = 0,
                  policy: RedeliveryPolicy | None = None) -> None:
    """Hand every message of the durable consumer (nats/streams.yaml) to `handler`, decoded as
    `kind`, forever: one after another, or up to `concurrent` at once, each on its own (for
    handlers that wait on others, such as webhook receivers: a slow one holds up no other).
    Redelivered as `policy` says (the consumer's own from streams.yaml by default)."""
    subscription = await bus.pull(durable, stream)
    policy = policy or consumer_policy(stream, durable)
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
                    task = asyncio.create_task(_handle(bus, msg, kind, handler, policy))
                    running.add(task)
                    task.add_done_callback(running.discard)
                else:
                    await _handle(bus, msg, kind, handler, policy)
    finally:
        for task in running:  # unacknowledged: redelivered after the ack wait
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def _handle(bus: Bus, msg: Msg, kind, handler: Callable[[Delivery], Awaitable[None]],
                  policy: RedeliveryPolicy) -> None:
    """Handle one message; whatever it holds, the loop goes on to the next."""
    delivery = await admitted(bus, msg, kind, policy)
    if delivery is not None:
        await handle(delivery, handler, policy)


async def admitted(bus: Bus, msg: Msg, kind, policy: RedeliveryPolicy) -> Delivery | None:
    # The metadata's timestamp is when the stream stored the message (its ack subject's).
    return await policy.admit(msg.data, msg.subject, msg.metadata.num_delivered, Settled(bus, msg), kind,
                              headers=msg.headers, published_at=msg.metadata.timestamp.timestamp())


class PullQueue(Generic[T]):
    """One durable consumer that several engines share, taken from one message at a time."""

    def __init__(self, bus: Bus, stream: str, durable: str, kind: type[T], policy: RedeliveryPolicy) -> None:
        self._bus, self._stream, self._durable = bus, stream, durable
        self._kind, self._policy = kind, policy
        self._subscription = None

    async def fetch(self, timeout: float) -> Delivery[T] | None:
        """The next message, or None if none came within `timeout` seconds (or the one that came
        may not be handled: the policy settled it)."""
        if self._subscription is None:
            self._subscription = await self._bus.pull(self._durable, self._stream)
        try:
            msg = (await self._subscription.fetch(1, timeout=timeout))[0]
        except (TimeoutError, nats.errors.TimeoutError):
            return None
        return await admitted(self._bus, msg, self._kind, self._policy)


async def consumer_state(bus: Bus, stream: str, durable: str) -> ConsumerState:
    return consumer_state_of(await bus.js.consumer_info(stream, durable))


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
        return consumer_state_of(await nc.jetstream(timeout=timeout).consumer_info(stream, durable))
    except Exception:  # noqa: BLE001 - no layout yet, or no permission to look
        return None
    finally:
        await nc.close()
