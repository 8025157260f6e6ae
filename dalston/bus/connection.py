"""One connection to NATS with the handles every service uses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError, NoStreamResponseError, NotFoundError, ServiceUnavailableError

import nats
from dalston.bus.buckets import Artifacts, Bucket, JobRecords
from dalston.bus.credentials import login
from dalston.bus.layout import TaskConsumers, ensure_layout
from dalston.config import Settings
from dalston.contracts import (
    ARTIFACTS_BUCKET,
    DEADLETTER_SUBJECT,
    JOBS_BUCKET,
    Contract,
    dead_letter,
    encode,
    subject_token,
)
from dalston.logs import get_logger

__all__ = ["Bus", "Msg", "connect"]
log = get_logger("dalston.bus")
CONNECT_ATTEMPTS = 60
# The NATS users that may create streams and buckets ("": a server without users).
LAYOUT_OWNERS = ("", "orchestrator", "admin")
PUBLISH_PATIENCE = 30.0


@dataclass
class Bus:
    """A service's connection to NATS. `nc` and `js` are nats-py's own handles, for this package
    (and tests) alone: the rest of Dalston speaks through the typed operations here, in
    `buckets` and in `consumers`."""

    nc: Client
    js: JetStreamContext
    settings: Settings
    jobs: JobRecords
    artifacts: Artifacts
    task_consumers: TaskConsumers
    _pulls: list[JetStreamContext.PullSubscription] = field(default_factory=list)

    @property
    def connected(self) -> bool:
        return self.nc.is_connected

    async def publish(self, subject: str, message: Contract, *, msg_id: str | None = None,
                      msg_ttl: float | None = None) -> None:
        """Publish to a stream and wait for its ack; `msg_id` makes a retry a no-op.

        While a cluster elects a new stream leader (a node died: about 5 s) the stream does
        not answer; the publish is retried for up to PUBLISH_PATIENCE seconds."""
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        deadline = time.monotonic() + PUBLISH_PATIENCE
        while True:
            try:
                await self.js.publish(subject, encode(message), headers=headers, msg_ttl=msg_ttl)
                return
            except (NoStreamResponseError, ServiceUnavailableError, nats.errors.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def announce(self, subject: str, message: Contract) -> None:
        """Publish without keeping it (progress that only live listeners want)."""
        await self.nc.publish(subject, encode(message))

    async def request(self, subject: str, message: Contract, timeout: float) -> bytes | None:
        """Ask whoever listens on `subject` (one member, where they form a queue group): the
        answer, or None when nobody listens or nobody answers within `timeout` seconds."""
        try:
            return (await self.nc.request(subject, encode(message), timeout=timeout)).data
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            return None

    async def subscribe(self, subject: str, handler: Callable[[Msg], Awaitable[None]], *,
                        queue: str = "") -> Subscription:
        """Call `handler` with every message on `subject` from now on (one member of `queue`
        gets each, where a queue group is named)."""
        return await self.nc.subscribe(subject, queue=queue, cb=handler)

    async def dead_letter(self, msg: Msg, reason: str) -> None:
        """Keep a message nobody can process (with the reason and its head) in DEADLETTER, and
        terminate it. Terminated even when keeping it fails: one bad message must never stall a
        consumer by coming back forever."""
        source = subject_token(msg.subject.split(".", 1)[0])
        log.warning("message dead-lettered", subject=msg.subject[:256], reason=reason[:512])
        try:
            await self.js.publish(DEADLETTER_SUBJECT.format(source=source),
                                  encode(dead_letter(msg.subject, reason, msg.data)))
        except Exception as exc:  # noqa: BLE001 - the message goes either way
            log.error("dead letter not kept", subject=msg.subject[:256], error=repr(exc))
        try:
            await msg.term()
        except Exception as exc:  # noqa: BLE001 - the connection is down: it comes back later
            log.error("dead letter not terminated", subject=msg.subject[:256], error=repr(exc))

    async def bucket(self, name: str) -> Bucket:
        """Another key-value bucket of the layout (the API keys')."""
        return Bucket(await self.js.key_value(name))

    async def stream_problem(self, stream: str) -> str | None:
        """Why `stream` cannot be used now, or None when it answers."""
        try:
            await self.js.stream_info(stream)
        except Exception as exc:  # noqa: BLE001 - any failure means not usable
            return repr(exc)
        return None

    async def last(self, stream: str, subject: str) -> bytes | None:
        """The last message `stream` holds on `subject`, or None if it holds none."""
        try:
            return (await self.js.get_last_msg(stream, subject)).data
        except NotFoundError:
            return None

    async def messages_by_subject(self, stream: str, subjects: str) -> dict[str, int]:
        """How many messages `stream` holds on each subject matching `subjects`."""
        info = await self.js.stream_info(stream, subjects_filter=subjects)
        return dict(info.state.subjects or {})

    async def pull(self, durable: str, stream: str) -> JetStreamContext.PullSubscription:
        """A pull subscription on the durable consumer `durable` of `stream`."""
        subscription = await self.js.pull_subscribe_bind(durable, stream=stream)
        self._pulls.append(subscription)
        return subscription

    async def close(self) -> None:
        if self.nc.is_closed:
            return
        # nats-py's fetch takes queued messages without marking them done, so draining a pull
        # subscription waits out drain_timeout (5 s, at every stop). Dropped instead: what
        # they hold unacknowledged is redelivered.
        for subscription in self._pulls:
            with suppress(nats.errors.Error):
                await subscription.unsubscribe()
        await self.nc.drain()


async def connect(settings: Settings, name: str, *, apply_layout: bool = True) -> Bus:
    """Connect (retrying until NATS answers, reconnecting forever) and make sure the layout exists."""
    async def on_error(exc: Exception) -> None:
        log.warning("nats error", error=repr(exc))

    restoring: set[asyncio.Task] = set()

    async def restore_layout() -> None:
        for attempt in range(CONNECT_ATTEMPTS):
            try:
                await ensure_layout(js, settings)
                return
            except Exception as exc:  # noqa: BLE001 - JetStream still recovering its streams
                if attempt == CONNECT_ATTEMPTS - 1:
                    log.warning("layout not restored after reconnecting", error=repr(exc))
                await asyncio.sleep(0.5)

    async def on_reconnect() -> None:
        # A restarted single NATS comes back without its memory stream (HEARTBEATS): whoever may
        # create the layout (accounts.conf: the orchestrator, admin; anyone without users) puts
        # it back, as patiently as at start (JetStream answers a moment after the server), and
        # without holding up the reconnect.
        if apply_layout and settings.nats_user in LAYOUT_OWNERS:
            task = asyncio.create_task(restore_layout())
            restoring.add(task)
            task.add_done_callback(restoring.discard)

    # nats-py does not retry a first connect; services often start before NATS is ready.
    for attempt in range(CONNECT_ATTEMPTS):
        try:
            nc = await nats.connect(
                servers=settings.nats_servers, name=name, max_reconnect_attempts=-1,
                reconnect_time_wait=0.5, connect_timeout=5, allow_reconnect=True, drain_timeout=5,
                error_cb=on_error, reconnected_cb=on_reconnect, **login(settings))
            break
        except (OSError, nats.errors.NoServersError) as exc:
            if attempt == CONNECT_ATTEMPTS - 1:
                raise ConnectionError(f"cannot reach NATS at {', '.join(settings.nats_servers)}: {exc}") from None
            await asyncio.sleep(0.5)
        except nats.errors.Error as exc:  # refused (credentials), or a protocol error
            raise ConnectionError(f"NATS at {', '.join(settings.nats_servers)} refused us: {exc}") from None
    js = nc.jetstream(timeout=10)
    if apply_layout:
        await _ensure_layout_patiently(js, settings)
    return Bus(nc=nc, js=js, settings=settings, jobs=JobRecords(await js.key_value(JOBS_BUCKET)),
               artifacts=Artifacts(await js.object_store(ARTIFACTS_BUCKET)),
               task_consumers=TaskConsumers(js, settings))


async def _ensure_layout_patiently(js: JetStreamContext, settings: Settings) -> None:
    """A new cluster's JetStream answers only once it has elected its leaders, and a service
    whose NATS user may only read the layout waits for the orchestrator to create it (a refused
    request reads as a timeout): retried as patiently as the connection itself."""
    for attempt in range(CONNECT_ATTEMPTS):
        try:
            await ensure_layout(js, settings)
            return
        except (nats.errors.TimeoutError, ServiceUnavailableError, BadRequestError) as exc:
            # 10005: a new cluster's nodes have not all joined JetStream yet.
            transient = not isinstance(exc, BadRequestError) or exc.err_code == 10005
            if not transient or attempt == CONNECT_ATTEMPTS - 1:
                raise
            log.warning("JetStream layout not ready; retrying", error=repr(exc))
            await asyncio.sleep(0.5)
