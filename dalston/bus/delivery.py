"""What a handler is given, and the one policy for messages that come again.

A `Delivery[T]` is a message taken from a durable consumer: its payload already decoded with
the consumer's contract type, the subject it came on, which delivery this is, and the four ways
to settle it. A payload that breaks its contract never reaches a handler: the policy rejects it
(dead letter) first. The `RedeliveryPolicy` decides everything else about deliveries that come
again, for every consumer: how many a message gets, how long it waits between them, and what
happens to one that has had them all (dead-lettered, or the consumer's own `on_exhausted`).

The settling itself is the bus's (`Settlement`): nats-py's for the real bus, dicts for the
in-memory one, so handlers see the same type on both.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from dalston import tracing
from dalston.contracts import ContractError, decode
from dalston.logs import get_logger

log = get_logger("dalston.bus")

T = TypeVar("T")
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


class Subscription(Protocol):
    """A subscription or an endpoint of a bus, until `unsubscribe()`."""

    async def unsubscribe(self) -> None: ...


class Settlement(Protocol):
    """How one bus settles one taken message."""

    async def in_progress(self) -> None: ...
    async def ack(self, confirm: bool) -> None: ...
    async def nak(self, delay: float) -> None: ...
    async def dead_letter(self, reason: str) -> None: ...


class Delivery(Generic[T]):
    def __init__(self, payload: T, subject: str, attempt: int, settlement: Settlement,
                 headers: dict[str, str] | None = None, published_at: float | None = None) -> None:
        self.payload = payload
        self.subject = subject
        self.attempt = attempt  # 1 for the first delivery
        self.settled = False
        # When its stream took it (wall clock), where the bus knows: the start of its wait.
        self.published_at = published_at
        self._settlement = settlement
        self._headers = headers

    def traced(self):
        """The trace context it was published in is current within the block (a no-op while
        traces are off): spans opened there belong to the publisher's trace."""
        return tracing.continued(self._headers)

    async def in_progress(self) -> None:
        """Still at work on it: its ack deadline starts again."""
        await self._settlement.in_progress()

    async def done(self, *, confirm: bool = False) -> None:
        """Handled: never delivered again. `confirm` waits until the server has it settled (the
        engine's report-then-ack order needs that)."""
        self.settled = True
        await self._settlement.ack(confirm)

    async def retry(self, delay: float = 0.0) -> None:
        """Not handled now: delivered again (to any member) after `delay` seconds."""
        self.settled = True
        await self._settlement.nak(delay)

    async def reject(self, reason: str) -> None:
        """Never to be handled: kept in DEADLETTER with the reason, and not delivered again."""
        self.settled = True
        await self._settlement.dead_letter(reason)


def constant(seconds: float) -> Callable[[int], float]:
    return lambda attempt: seconds


@dataclass(frozen=True)
class RedeliveryPolicy:
    """How a consumer's messages come again. `attempts` is how many deliveries a message gets
    (0: without end, its handler decides when to give up); `delay(attempt)` is how long a failed
    one waits before the next; one that has had them all goes to `on_exhausted` (the engine fails
    its task there), else to the dead letters."""

    attempts: int = 0
    delay: Callable[[int], float] = constant(REDELIVERY_DELAY_SECONDS)
    on_exhausted: Callable[[Delivery], Awaitable[None]] | None = None

    async def admit(self, payload: bytes, subject: str, attempt: int, settlement: Settlement,
                    kind: type[T] | Callable[[str], type[T]], headers: dict[str, str] | None = None,
                    published_at: float | None = None) -> Delivery[T] | None:
        """The delivery its handler gets, or None where it must not get it: a payload that breaks
        its contract (rejected), or a message whose last holder died on its last attempt
        (exhausted). `kind` is the contract type, or picks it by subject."""
        contract = kind if isinstance(kind, type) else kind(subject)
        try:
            delivery = Delivery(decode(payload, contract), subject, attempt, settlement, headers, published_at)
        except ContractError as exc:
            await Delivery(None, subject, attempt, settlement).reject(str(exc))
            return None
        if self.attempts > 0 and attempt > self.attempts:
            await self.exhausted(delivery, f"delivered {attempt} times, past its {self.attempts}")
            return None
        return delivery

    async def failed(self, delivery: Delivery, exc: Exception) -> None:
        """Its handler raised `exc`: delivered again later, or exhausted on its last attempt."""
        if 0 < self.attempts <= delivery.attempt:
            await self.exhausted(delivery, f"not handled in {self.attempts} deliveries: {exc!r}")
            return
        if isinstance(exc, HandleLater):
            log.info("message redelivered later", reason=str(exc), delay=exc.delay)
            delay = exc.delay
        else:
            log.exception("message not handled; it will be redelivered", subject=delivery.subject[:256])
            delay = self.delay(delivery.attempt)
        try:
            await delivery.retry(delay)
        except Exception:  # noqa: BLE001 - no connection: redelivered after ack_wait
            pass

    async def exhausted(self, delivery: Delivery, reason: str) -> None:
        if self.on_exhausted is not None:
            await self.on_exhausted(delivery)
        if not delivery.settled:  # one bad message must never come back forever
            await delivery.reject(reason)


async def handle(delivery: Delivery[T], handler: Callable[[Delivery[T]], Awaitable[None]],
                 policy: RedeliveryPolicy) -> None:
    """Run `handler` on an admitted delivery and settle it as the policy says, whatever it
    raises: done if the handler left it unsettled, dead letter on GiveUp, else redelivered.
    The handler runs in the trace context the message was published in."""
    try:
        with delivery.traced():
            await handler(delivery)
        if not delivery.settled:
            await delivery.done()
    except (ContractError, GiveUp) as exc:
        await delivery.reject(str(exc))
    except Exception as exc:  # noqa: BLE001 - NATS failing over, say: it comes back
        await policy.failed(delivery, exc)
