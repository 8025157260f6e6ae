"""One connection to NATS with the handles every service uses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import BadRequestError, NoStreamResponseError, NotFoundError, ServiceUnavailableError

import nats
from dalston import tracing
from dalston.bus.buckets import Artifacts, Bucket, JobRecords
from dalston.bus.credentials import login
from dalston.bus.delivery import Subscription
from dalston.bus.layout import TaskConsumers, ensure_layout
from dalston.config import Settings
from dalston.contracts import (
    ARTIFACTS_BUCKET,
    DEADLETTER_SUBJECT,
    JOBS_BUCKET,
    Contract,
    ContractError,
    Endpoint,
    Rep,
    Req,
    dead_letter,
    decode,
    encode,
    nats_identity,
    subject_token,
)
from dalston.logs import get_logger

__all__ = ["Bus", "connect"]
log = get_logger("dalston.bus")
T = TypeVar("T")
CONNECT_ATTEMPTS = 60
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
        headers = tracing.headers({"Nats-Msg-Id": msg_id} if msg_id else None)
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
        await self.nc.publish(subject, encode(message), headers=tracing.headers())

    async def ring(self, subject: str) -> None:
        """Publish an empty message: something happened, which its listeners look up themselves."""
        await self.nc.publish(subject, b"")

    async def request(self, endpoint: Endpoint[Req, Rep], message: Req, timeout: float,
                      **tokens: str) -> Rep | None:
        """Ask whoever serves `endpoint` on its subject filled with `tokens` (one member, where
        they form a queue group): the answer, or None when nobody serves it or nobody answers
        within `timeout` seconds; ContractError where the answer breaks its contract."""
        try:
            answer = await self.nc.request(endpoint.subject.format(**tokens), encode(message), timeout=timeout,
                                           headers=tracing.headers())
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            return None
        return decode(answer.data, endpoint.reply)

    async def serve(self, endpoint: Endpoint[Req, Rep], handler: Callable[[Req], Awaitable[Rep | None]],
                    *, queue: str = "", on_invalid: Callable[[ContractError], Awaitable[Rep | None]] | None = None,
                    **tokens: str) -> Subscription:
        """Answer every request on `endpoint` (its subject filled with `tokens`, wildcards
        allowed) with what `handler` returns, one request at a time; None answers nothing. A
        request that breaks its contract is answered by `on_invalid`, or dropped unanswered (its
        asker times out)."""
        async def receive(msg: Msg) -> None:
            try:
                request = decode(msg.data, endpoint.request)
            except ContractError as exc:
                log.warning("bad request", subject=msg.subject[:256], error=str(exc)[:300])
                answer = await on_invalid(exc) if on_invalid is not None else None
            else:
                with tracing.continued(msg.headers):
                    answer = await handler(request)
            if answer is not None and msg.reply:
                await msg.respond(encode(answer))

        return await self.nc.subscribe(endpoint.subject.format(**tokens), queue=queue, cb=receive)

    async def subscribe(self, subject: str, handler: Callable[[T], Awaitable[None]], *, kind: type[T],
                        queue: str = "", on_invalid: Callable[[ContractError], Awaitable[None]] | None = None
                        ) -> Subscription:
        """Call `handler` with every message on `subject` from now on, decoded as `kind` (one
        member of `queue` gets each, where a queue group is named). One that breaks its contract
        goes to `on_invalid`, or is dropped with a warning."""
        async def receive(msg: Msg) -> None:
            try:
                payload = decode(msg.data, kind)
            except ContractError as exc:
                if on_invalid is not None:
                    await on_invalid(exc)
                else:
                    log.warning("bad message dropped", subject=msg.subject[:256], error=str(exc)[:300])
                return
            with tracing.continued(msg.headers):
                await handler(payload)

        return await self.nc.subscribe(subject, queue=queue, cb=receive)

    async def doorbell(self, subjects: str, ring: Callable[[str], Awaitable[None]]) -> Subscription:
        """Call `ring(subject)` for every message on a subject matching `subjects`, without
        reading it: the message itself is taken elsewhere (from its stream)."""
        async def receive(msg: Msg) -> None:
            await ring(msg.subject)

        return await self.nc.subscribe(subjects, cb=receive)

    async def dead_letter(self, msg: Msg, reason: str) -> None:
        """Keep a message nobody can process (with the reason and its head) in DEADLETTER, and
        terminate it. Terminated even when keeping it fails: one bad message must never stall a
        consumer by coming back forever."""
        source = subject_token(msg.subject.split(".", 1)[0])
        log.warning("message dead-lettered", subject=msg.subject[:256], reason=reason[:512])
        try:
            # The subject names who wrote it (its NATS user): nobody may write one as another.
            identity = nats_identity(self.settings.nats_user)
            await self.js.publish(DEADLETTER_SUBJECT.format(source=source, identity=identity),
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

    async def ensure_layout(self, task_queues: Iterable[tuple[str, str | None]] = ()) -> None:
        """Apply the layout again (after NATS lost its memory streams, say)."""
        await _ensure_layout_patiently(self.js, self.settings, task_queues)

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

    async def consumer_states(self, stream: str, prefix: str = "") -> list[ConsumerState]:
        """The consumers of `stream` whose names start with `prefix` (one request)."""
        return [consumer_state_of(info) for info in await self.js.consumers_info(stream)
                if info.name.startswith(prefix)]

    async def follow_last_per_subject(self, stream: str, subjects: str,
                                      on_message: Callable[[str, bytes | None], Awaitable[None]]
                                      ) -> LastPerSubject:
        """Call `on_message(subject, data)` with the last message of every subject matching
        `subjects`, then with each new one; `data` is None where the server says that a
        subject's message expired (its TTL marker). `unsubscribe()` ends it."""
        follower = LastPerSubject(self.js, stream, subjects, on_message)
        await follower.start()
        return follower

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


# How often a follower looks whether its stream was created anew.
STREAM_RECHECK_SECONDS = 5.0


class LastPerSubject:
    """What Bus.follow_last_per_subject returns. A single NATS restarted loses a memory stream
    (HEARTBEATS) and the layout keeper creates it anew; an ordered consumer would resume at the
    old stream's sequence and hear nothing, so a stream created anew is followed afresh."""

    def __init__(self, js: JetStreamContext, stream: str, subjects: str,
                 on_message: Callable[[str, bytes | None], Awaitable[None]]) -> None:
        self._js, self._stream, self._subjects, self._on_message = js, stream, subjects, on_message
        self._subscription = None
        self._created = None
        self._watch: asyncio.Task | None = None

    async def start(self) -> None:
        self._created = (await self._js.stream_info(self._stream)).created
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
        return await self._js.subscribe(
            self._subjects, stream=self._stream, cb=self._receive, ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            # The consumer lives on one node: a missed idle beat after 2 s recreates it elsewhere,
            # so a cluster node's death hides engines for seconds, not ~15 s.
            idle_heartbeat=1.0)

    async def _follow_new_streams(self) -> None:
        while True:
            await asyncio.sleep(STREAM_RECHECK_SECONDS)
            try:
                created = (await self._js.stream_info(self._stream)).created
                if created == self._created:
                    continue
                log.warning("stream created anew; following it afresh", stream=self._stream)
                with suppress(Exception):
                    await self._subscription.unsubscribe()
                self._subscription = await self._subscribe()
                self._created = created
            except Exception as exc:  # noqa: BLE001 - NATS away or the stream not back yet: look again
                log.info("stream not checked", stream=self._stream, error=repr(exc))


@dataclass
class ConsumerState:
    name: str
    pending: int  # not delivered yet
    unacked: int  # delivered, neither acknowledged nor failed yet
    waiting: int  # pull requests waiting for messages: consumers at work


def consumer_state_of(info) -> ConsumerState:
    return ConsumerState(name=info.name, pending=info.num_pending or 0,
                         unacked=info.num_ack_pending or 0, waiting=info.num_waiting or 0)


@dataclass
class Settled:
    """How a message taken from JetStream is settled (`delivery.Settlement`)."""

    bus: Bus
    msg: Msg

    async def in_progress(self) -> None:
        await self.msg.in_progress()

    async def ack(self, confirm: bool) -> None:
        await (self.msg.ack_sync() if confirm else self.msg.ack())

    async def nak(self, delay: float) -> None:
        await self.msg.nak(delay=delay or None)

    async def dead_letter(self, reason: str) -> None:
        await self.bus.dead_letter(self.msg, reason)


async def connect(settings: Settings, name: str, *, apply_layout: bool = True,
                  task_queues: Iterable[tuple[str, str | None]] = ()) -> Bus:
    """Connect (retrying until NATS answers, reconnecting forever) and make sure the layout
    exists, with the shared consumers of `task_queues` (the admin step's: dalston.bus.layout)."""
    async def on_error(exc: Exception) -> None:
        log.warning("nats error", error=repr(exc))

    # nats-py does not retry a first connect; services often start before NATS is ready.
    for attempt in range(CONNECT_ATTEMPTS):
        try:
            nc = await nats.connect(
                servers=settings.nats_servers, name=name, max_reconnect_attempts=-1,
                reconnect_time_wait=0.5, connect_timeout=5, allow_reconnect=True, drain_timeout=5,
                error_cb=on_error, **login(settings))
            break
        except (OSError, nats.errors.NoServersError) as exc:
            if attempt == CONNECT_ATTEMPTS - 1:
                raise ConnectionError(f"cannot reach NATS at {', '.join(settings.nats_servers)}: {exc}") from None
            await asyncio.sleep(0.5)
        except nats.errors.Error as exc:  # refused (credentials), or a protocol error
            raise ConnectionError(f"NATS at {', '.join(settings.nats_servers)} refused us: {exc}") from None
    js = nc.jetstream(timeout=10)
    if apply_layout:
        await _ensure_layout_patiently(js, settings, task_queues)
    return Bus(nc=nc, js=js, settings=settings, jobs=JobRecords(Bucket(await js.key_value(JOBS_BUCKET))),
               artifacts=Artifacts(js, await js.object_store(ARTIFACTS_BUCKET), ARTIFACTS_BUCKET),
               task_consumers=TaskConsumers(js, settings))


async def _ensure_layout_patiently(js: JetStreamContext, settings: Settings,
                                   task_queues: Iterable[tuple[str, str | None]] = ()) -> None:
    """A new cluster's JetStream answers only once it has elected its leaders, and a service
    whose NATS user may only read the layout waits for the orchestrator to create it (a refused
    request reads as a timeout): retried as patiently as the connection itself."""
    for attempt in range(CONNECT_ATTEMPTS):
        try:
            await ensure_layout(js, settings, task_queues)
            return
        except (nats.errors.TimeoutError, ServiceUnavailableError, BadRequestError) as exc:
            # 10005: a new cluster's nodes have not all joined JetStream yet.
            transient = not isinstance(exc, BadRequestError) or exc.err_code == 10005
            if not transient or attempt == CONNECT_ATTEMPTS - 1:
                raise
            log.warning("JetStream layout not ready; retrying", error=repr(exc))
            await asyncio.sleep(0.5)
