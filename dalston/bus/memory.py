"""The bus in one process: streams, durable consumers, core subjects, the jobs bucket and the
artifacts store over dicts, with the interface the services use of `connection.Bus`.

For tests and one-process runs, where what is under test is Dalston and not NATS: the
orchestrator, engines and webhook service run on it in milliseconds, with no nats-server. It
keeps what the services rely on: the layout's streams (nats/streams.yaml) and their durable
consumers, with cursors, ack deadlines and redelivery (`consumers.consume` and `PullQueue` run on
it unchanged: its messages settle as nats-py's do); duplicate message ids dropped; workqueue
streams forgetting what was acknowledged; the last message per subject; compare-and-set on the
key-value buckets; subject wildcards (`*`, `>`) and queue groups. Not kept: permissions,
clustering, message TTLs, limits on age and size (the real-NATS tests cover those).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TypeVar

from nats.js.api import ObjectInfo

from dalston import tracing
from dalston.bus.buckets import CHUNK_BYTES, JobRecords, ObjectUnreadable
from dalston.bus.connection import ConsumerState
from dalston.bus.layout import load_layout
from dalston.config import Settings
from dalston.contracts import (
    DEADLETTER_SUBJECT,
    TASKS_STREAM,
    Contract,
    ContractError,
    Endpoint,
    JobRecord,
    Rep,
    Req,
    Transcript,
    dead_letter,
    decode,
    encode,
    nats_identity,
    subject_token,
    task_consumer,
    task_subject,
)
from dalston.logs import get_logger

log = get_logger("dalston.bus.memory")
T = TypeVar("T")


def matches(pattern: str, subject: str) -> bool:
    """Whether `subject` is one of `pattern`'s (`*` one token, `>` the rest), as NATS says."""
    wanted, tokens = pattern.split("."), subject.split(".")
    for i, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > i
        if i >= len(tokens) or token not in ("*", tokens[i]):
            return False
    return len(tokens) == len(wanted)


# --- streams and their durable consumers -------------------------------------------------------


@dataclass
class _Message:
    seq: int
    subject: str
    data: bytes
    headers: dict[str, str] | None = None
    stored_at: float = field(default_factory=time.time)


@dataclass
class _Stream:
    name: str
    subjects: list[str]
    workqueue: bool
    last_per_subject: bool
    messages: dict[int, _Message] = field(default_factory=dict)
    ids: set[str] = field(default_factory=set)
    seq: int = 0
    followers: list[Callable[[_Message], None]] = field(default_factory=list)


@dataclass
class _Meta:
    num_delivered: int
    timestamp: datetime  # when its stream stored it


class _Taken:
    """A message a consumer handed out; settled with nats-py's `Msg` methods."""

    def __init__(self, consumer: _Consumer, message: _Message, delivered: int) -> None:
        self._consumer, self.seq = consumer, message.seq
        self.subject, self.data, self.headers = message.subject, message.data, message.headers
        self.metadata = _Meta(num_delivered=delivered,
                              timestamp=datetime.fromtimestamp(message.stored_at, timezone.utc))

    async def ack(self) -> None:
        self._consumer.settle(self.seq)

    async def ack_sync(self) -> None:
        self._consumer.settle(self.seq)

    async def term(self) -> None:
        self._consumer.settle(self.seq)

    async def nak(self, delay: float | None = None) -> None:
        self._consumer.later(self.seq, delay or 0.0)

    async def in_progress(self) -> None:
        self._consumer.extend(self.seq)


class _Consumer:
    """A durable pull consumer: a cursor over its stream, and the messages handed out and not
    settled yet (redelivered after `ack_wait`, or when naked after its delay)."""

    def __init__(self, bus: MemoryBus, stream: _Stream, name: str, filter_subject: str,
                 ack_wait: float, deliver_new: bool) -> None:
        self.bus, self.stream, self.name = bus, stream, name
        self.filter, self.ack_wait = filter_subject, ack_wait
        self.cursor = stream.seq + 1 if deliver_new else 1
        self.delivered: dict[int, int] = {}  # seq -> deliveries, while unsettled
        self.deadline: dict[int, float] = {}  # seq -> when it is due (again)
        self.waiting = 0

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def settle(self, seq: int) -> None:
        self.delivered.pop(seq, None)
        self.deadline.pop(seq, None)
        if self.stream.workqueue:
            self.stream.messages.pop(seq, None)
        self.bus.wake()

    def later(self, seq: int, delay: float) -> None:
        if seq in self.delivered:
            self.deadline[seq] = self._now() + delay
            self.bus.wake()

    def extend(self, seq: int) -> None:
        if seq in self.delivered:
            self.deadline[seq] = self._now() + self.ack_wait

    def _pending(self) -> list[_Message]:
        return [m for seq, m in sorted(self.stream.messages.items())
                if seq >= self.cursor and matches(self.filter, m.subject)]

    def state(self) -> ConsumerState:
        return ConsumerState(name=self.name, pending=len(self._pending()), unacked=len(self.delivered),
                             waiting=self.waiting)

    def _take(self, batch: int) -> list[_Taken]:
        now, taken = self._now(), []
        for seq in sorted(s for s, due in self.deadline.items() if due <= now)[:batch]:
            message = self.stream.messages.get(seq)
            if message is None:  # gone from its stream meanwhile
                self.settle(seq)
                continue
            self.delivered[seq] += 1
            self.deadline[seq] = now + self.ack_wait
            taken.append(_Taken(self, message, self.delivered[seq]))
        for message in self._pending()[:batch - len(taken)]:
            self.cursor = message.seq + 1
            self.delivered[message.seq] = 1
            self.deadline[message.seq] = now + self.ack_wait
            taken.append(_Taken(self, message, 1))
        return taken

    async def fetch(self, batch: int, timeout: float) -> list[_Taken]:
        """Up to `batch` messages due now; TimeoutError if none comes within `timeout`."""
        end = self._now() + timeout
        self.waiting += 1
        try:
            while not (taken := self._take(batch)):
                left = end - self._now()
                if left <= 0:
                    raise TimeoutError
                # Woken by a publish or a settle, or when the next redelivery falls due.
                nearest = min(self.deadline.values(), default=end) - self._now()
                wake = self.bus.woken
                try:
                    await asyncio.wait_for(wake.wait(), max(0.0, min(left, nearest)))
                except TimeoutError:
                    pass
            return taken
        finally:
            self.waiting -= 1


# --- core subscriptions ---------------------------------------------------------------------------


class _Subscription:
    """A core subscription: its messages handled one at a time, in order, as nats-py does."""

    def __init__(self, bus: MemoryBus, subject: str, queue: str,
                 handler: Callable[[str, bytes, asyncio.Future | None, dict | None], Awaitable[None]],
                 on_stop: Callable[[], None] = lambda: None) -> None:
        self.bus, self.subject, self.queue, self._handler = bus, subject, queue, handler
        self._on_stop = on_stop
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run())

    def put(self, subject: str, data: bytes, reply: asyncio.Future | None = None,
            headers: dict[str, str] | None = None) -> None:
        self._inbox.put_nowait((subject, data, reply, headers))

    async def _run(self) -> None:
        while True:
            subject, data, reply, headers = await self._inbox.get()
            try:
                await self._handler(subject, data, reply, headers)
            except Exception:  # noqa: BLE001 - as nats-py: a handler's error ends no subscription
                log.exception("subscription handler failed", subject=subject[:256])

    async def unsubscribe(self) -> None:
        if self in self.bus._subscriptions:
            self.bus._subscriptions.remove(self)
        self._on_stop()
        self._task.cancel()


# --- buckets and the object store -------------------------------------------------------------


class MemoryBucket:
    """A key-value bucket with revisions and compare-and-set (`buckets.Bucket`'s methods)."""

    def __init__(self) -> None:
        self._values: dict[str, tuple[bytes, int]] = {}
        self._revision = itertools.count(1)
        self._watchers: list[asyncio.Queue] = []

    async def get(self, key: str) -> tuple[bytes, int] | None:
        return self._values.get(key)

    def _put(self, key: str, value: bytes) -> None:
        self._values[key] = (value, next(self._revision))
        for watcher in self._watchers:
            watcher.put_nowait((key, value))

    async def create(self, key: str, value: bytes) -> bool:
        if key in self._values:
            return False
        self._put(key, value)
        return True

    async def update(self, key: str, value: bytes, revision: int) -> bool:
        if key not in self._values or self._values[key][1] != revision:
            return False
        self._put(key, value)
        return True

    async def purge(self, key: str) -> None:
        if self._values.pop(key, None) is not None:
            for watcher in self._watchers:
                watcher.put_nowait((key, None))

    async def keys(self) -> list[str]:
        return list(self._values)

    async def watch(self) -> AsyncIterator[tuple[str, bytes | None]]:
        queue: asyncio.Queue = asyncio.Queue()
        for key, (value, _) in self._values.items():
            queue.put_nowait((key, value))
        self._watchers.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._watchers.remove(queue)


class MemoryArtifacts:
    """The artifacts store (`buckets.Artifacts`' methods), as bytes in a dict."""

    def __init__(self) -> None:
        self._objects: dict[str, tuple[bytes, dict[str, str]]] = {}
        self._uploads: dict[str, list[bytes]] = {}  # chunks written, not sealed yet

    async def put(self, name: str, data: bytes | IO[bytes], headers: dict[str, str] | None = None) -> str:
        body = bytes(data) if isinstance(data, bytes | bytearray | memoryview) else data.read()
        self._objects[name] = (body, dict(headers or {}))
        return name

    def _get(self, name: str) -> bytes:
        if name not in self._objects:
            raise ObjectUnreadable(name, "does not exist", gone=False)
        return self._objects[name][0]

    async def read(self, name: str) -> bytes:
        return self._get(name)

    async def read_into(self, name: str, sink: IO[bytes]) -> None:
        data = self._get(name)
        for start in range(0, len(data), 128 * 1024):  # in chunks, as sinks expect
            sink.write(data[start:start + 128 * 1024])

    async def read_to(self, name: str, path: Path) -> None:
        path.write_bytes(self._get(name))

    async def read_page(self, name: str, cursor: int, most: int) -> tuple[ObjectInfo, list[bytes], int]:
        """As `Artifacts.read_page`; its cursor here is 1 + the index of the next chunk."""
        data = self._get(name)
        info = ObjectInfo(name=name, bucket="artifacts", nuid=name, size=len(data),
                          digest="SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode())
        count = -(-len(data) // CHUNK_BYTES)
        first = max(0, cursor - 1)
        end = min(count, first + most)
        chunks = [data[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES] for i in range(first, end)]
        return info, chunks, end + 1 if end < count else 0

    async def write_chunks(self, nuid: str, chunks: list[bytes]) -> None:
        self._uploads.setdefault(nuid, []).extend(chunks)

    async def seal(self, name: str, nuid: str, size: int, digest: str,
                   headers: dict[str, str] | None = None) -> None:
        self._objects[name] = (b"".join(self._uploads.pop(nuid, [])), dict(headers or {}))

    async def size(self, name: str) -> int:
        return len(self._get(name))

    async def transcript(self, record: JobRecord) -> Transcript:
        return decode(self._get(record.transcript_object), Transcript)

    async def headers(self, name: str) -> dict[str, str] | None:
        found = self._objects.get(name)
        return None if found is None else dict(found[1])

    async def exists(self, name: str) -> bool:
        return name in self._objects

    async def delete(self, name: str) -> None:
        self._objects.pop(name, None)


class MemoryTaskConsumers:
    """The shared task consumer per (runtime, model), made where missing (`layout.TaskConsumers`)."""

    def __init__(self, bus: MemoryBus) -> None:
        self._bus = bus

    async def ensure(self, runtime: str, runtime_model_id: str | None) -> str:
        durable = task_consumer(runtime, runtime_model_id)
        if durable not in self._bus._consumers[TASKS_STREAM]:
            self._bus._add_consumer(TASKS_STREAM, durable, task_subject(runtime, runtime_model_id),
                                    self._bus.settings.task_ack_wait)
        return durable


# --- the bus --------------------------------------------------------------------------------------


class MemoryBus:
    """`connection.Bus` in one process: pass one to several services' `run(bus)`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        layout = load_layout()
        self._streams = {name: _Stream(name, spec["subjects"], spec.get("retention") == "workqueue",
                                       spec.get("max_msgs_per_subject") == 1)
                         for name, spec in layout["streams"].items()}
        self._consumers: dict[str, dict[str, _Consumer]] = {name: {} for name in self._streams}
        for stream, consumers in layout["consumers"].items():
            for durable, spec in consumers.items():
                self._add_consumer(stream, durable, spec.get("filter_subject", ">"), spec["ack_wait"],
                                   deliver_new=spec.get("deliver_policy") == "new")
        self._subscriptions: list[_Subscription] = []
        self._buckets: dict[str, MemoryBucket] = {}
        self.woken = asyncio.Event()
        self.jobs = JobRecords(MemoryBucket())
        self.artifacts = MemoryArtifacts()
        self.task_consumers = MemoryTaskConsumers(self)
        self.connected = True

    def _add_consumer(self, stream: str, durable: str, filter_subject: str, ack_wait: float,
                      deliver_new: bool = False) -> None:
        self._consumers[stream][durable] = _Consumer(self, self._streams[stream], durable, filter_subject,
                                                     ack_wait, deliver_new)

    def wake(self) -> None:
        """Wake every waiting fetch (it looks again, and waits on a new event if still empty)."""
        woken, self.woken = self.woken, asyncio.Event()
        woken.set()

    def _stream_of(self, subject: str) -> _Stream | None:
        return next((s for s in self._streams.values() if any(matches(p, subject) for p in s.subjects)), None)

    # --- publishing --------------------------------------------------------------------------------

    async def publish(self, subject: str, message: Contract, *, msg_id: str | None = None,
                      msg_ttl: float | None = None) -> None:
        await self._append(subject, encode(message), msg_id, tracing.headers())

    async def _append(self, subject: str, data: bytes, msg_id: str | None = None,
                      headers: dict[str, str] | None = None) -> None:
        stream = self._stream_of(subject)
        if stream is None:
            raise LookupError(f"no stream takes {subject!r}")
        if msg_id is not None:
            if msg_id in stream.ids:
                return  # a duplicate: stored once, as the stream's duplicate window does
            stream.ids.add(msg_id)
        stream.seq += 1
        message = _Message(stream.seq, subject, data, headers)
        if stream.last_per_subject:
            for seq in [s for s, m in stream.messages.items() if m.subject == subject]:
                del stream.messages[seq]
        stream.messages[message.seq] = message
        for follow in list(stream.followers):
            follow(message)
        self._deliver(subject, data, headers=headers)
        self.wake()

    async def announce(self, subject: str, message: Contract) -> None:
        self._deliver(subject, encode(message), headers=tracing.headers())

    async def ring(self, subject: str) -> None:
        self._deliver(subject, b"")

    def _deliver(self, subject: str, data: bytes, reply: asyncio.Future | None = None,
                 headers: dict[str, str] | None = None) -> int:
        """Hand a core message to every matching subscription (one per queue group)."""
        groups: dict[str, list[_Subscription]] = {}
        for subscription in self._subscriptions:
            if matches(subscription.subject, subject):
                groups.setdefault(subscription.queue or f"\0{id(subscription)}", []).append(subscription)
        for members in groups.values():
            random.choice(members).put(subject, data, reply, headers)
        return len(groups)

    # --- core subscriptions and endpoints --------------------------------------------------------

    def _subscribe(self, subject: str, queue: str, handler) -> _Subscription:
        subscription = _Subscription(self, subject, queue, handler)
        self._subscriptions.append(subscription)
        return subscription

    async def subscribe(self, subject: str, handler: Callable[[T], Awaitable[None]], *, kind: type[T],
                        queue: str = "", on_invalid: Callable[[ContractError], Awaitable[None]] | None = None
                        ) -> _Subscription:
        async def receive(subject: str, data: bytes, reply, headers) -> None:
            try:
                payload = decode(data, kind)
            except ContractError as exc:
                if on_invalid is not None:
                    await on_invalid(exc)
                else:
                    log.warning("bad message dropped", subject=subject[:256], error=str(exc)[:300])
                return
            with tracing.continued(headers):
                await handler(payload)

        return self._subscribe(subject, queue, receive)

    async def doorbell(self, subjects: str, ring: Callable[[str], Awaitable[None]]) -> _Subscription:
        async def receive(subject: str, data: bytes, reply, headers) -> None:
            await ring(subject)

        return self._subscribe(subjects, "", receive)

    async def serve(self, endpoint: Endpoint[Req, Rep], handler: Callable[[Req], Awaitable[Rep | None]],
                    *, queue: str = "", on_invalid: Callable[[ContractError], Awaitable[Rep | None]] | None = None,
                    **tokens: str) -> _Subscription:
        async def receive(subject: str, data: bytes, reply: asyncio.Future | None, headers) -> None:
            try:
                request = decode(data, endpoint.request)
            except ContractError as exc:
                log.warning("bad request", subject=subject[:256], error=str(exc)[:300])
                answer = await on_invalid(exc) if on_invalid is not None else None
            else:
                with tracing.continued(headers):
                    answer = await handler(request)
            if answer is not None and reply is not None and not reply.done():
                reply.set_result(encode(answer))

        return self._subscribe(endpoint.subject.format(**tokens), queue, receive)

    async def request(self, endpoint: Endpoint[Req, Rep], message: Req, timeout: float,
                      **tokens: str) -> Rep | None:
        reply: asyncio.Future = asyncio.get_running_loop().create_future()
        if not self._deliver(endpoint.subject.format(**tokens), encode(message), reply, tracing.headers()):
            return None  # nobody serves it
        try:
            answer = await asyncio.wait_for(reply, timeout)
        except TimeoutError:
            return None
        return decode(answer, endpoint.reply)

    # --- streams -------------------------------------------------------------------------------

    async def pull(self, durable: str, stream: str) -> _Consumer:
        return self._consumers[stream][durable]

    async def dead_letter(self, msg: _Taken, reason: str) -> None:
        log.warning("message dead-lettered", subject=msg.subject[:256], reason=reason[:512])
        source = subject_token(msg.subject.split(".", 1)[0])
        await self._append(DEADLETTER_SUBJECT.format(source=source, identity=nats_identity("")),
                           encode(dead_letter(msg.subject, reason, msg.data)))
        await msg.term()

    async def consumer_states(self, stream: str, prefix: str = "") -> list[ConsumerState]:
        return [c.state() for name, c in self._consumers[stream].items() if name.startswith(prefix)]

    async def follow_last_per_subject(self, stream: str, subjects: str,
                                      on_message: Callable[[str, bytes | None], Awaitable[None]]
                                      ) -> _Subscription:
        async def receive(subject: str, data: bytes, reply, headers) -> None:
            await on_message(subject, data)

        held = self._streams[stream]

        def follow(message: _Message) -> None:
            if matches(subjects, message.subject):
                follower.put(message.subject, message.data)

        # Not in the core list: it follows the stream, not the subject's core messages.
        follower = _Subscription(self, subjects, "", receive, on_stop=lambda: held.followers.remove(follow))
        last: dict[str, _Message] = {}
        for message in sorted(held.messages.values(), key=lambda m: m.seq):
            if matches(subjects, message.subject):
                last[message.subject] = message
        for message in last.values():
            follower.put(message.subject, message.data)
        held.followers.append(follow)
        return follower

    async def last(self, stream: str, subject: str) -> bytes | None:
        found = [m for m in self._streams[stream].messages.values() if m.subject == subject]
        return max(found, key=lambda m: m.seq).data if found else None

    async def messages_by_subject(self, stream: str, subjects: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for message in self._streams[stream].messages.values():
            if matches(subjects, message.subject):
                counts[message.subject] = counts.get(message.subject, 0) + 1
        return counts

    async def stream_problem(self, stream: str) -> str | None:
        return None if stream in self._streams else f"no stream {stream}"

    async def bucket(self, name: str) -> MemoryBucket:
        return self._buckets.setdefault(name, MemoryBucket())

    async def ensure_layout(self, task_queues=()) -> None:
        for runtime, runtime_model_id in task_queues:
            await self.task_consumers.ensure(runtime, runtime_model_id)

    async def close(self) -> None:
        for subscription in list(self._subscriptions):
            await subscription.unsubscribe()

    # --- for tests ------------------------------------------------------------------------------

    def dead_letters(self) -> list[bytes]:
        """Every dead letter kept so far."""
        return [m.data for m in self._streams["DEADLETTER"].messages.values()]

    def raw(self, subject: str, data: bytes) -> Awaitable[None]:
        """Publish bytes that need not be a contract (a hostile publisher's)."""
        return self._append(subject, data)

