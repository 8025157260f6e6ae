"""The redelivery policy every consumer applies, on a recording settlement: what reaches a
handler, and how each outcome is settled. No NATS, milliseconds."""

from __future__ import annotations

from dalston.bus.delivery import Delivery, GiveUp, HandleLater, RedeliveryPolicy, handle
from dalston.contracts import JobRequest, Task, encode


class Recorded:
    """A settlement that writes down what was done to its message."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def in_progress(self) -> None:
        self.calls.append("in_progress")

    async def ack(self, confirm: bool) -> None:
        self.calls.append("ack confirmed" if confirm else "ack")

    async def nak(self, delay: float) -> None:
        self.calls.append(f"nak {delay:g}")

    async def dead_letter(self, reason: str) -> None:
        self.calls.append(f"dead letter: {reason}")


REQUEST = encode(JobRequest(id="j1", model="m"))


async def run(policy: RedeliveryPolicy, handler, payload: bytes = REQUEST, attempt: int = 1,
              kind=JobRequest) -> tuple[list[str], list]:
    settled, seen = Recorded(), []

    async def recording(delivery: Delivery) -> None:
        seen.append(delivery)
        await handler(delivery)

    delivery = await policy.admit(payload, "jobs.submit", attempt, settled, kind)
    if delivery is not None:
        await handle(delivery, recording, policy)
    return settled.calls, seen


async def quietly(delivery: Delivery) -> None:
    pass


async def test_a_handled_delivery_is_acked_once_with_its_payload_decoded():
    calls, seen = await run(RedeliveryPolicy(attempts=5), quietly, attempt=2)
    assert calls == ["ack"]
    assert seen[0].payload == JobRequest(id="j1", model="m") and seen[0].attempt == 2
    assert seen[0].subject == "jobs.submit"


async def test_a_payload_that_breaks_its_contract_never_reaches_a_handler():
    calls, seen = await run(RedeliveryPolicy(attempts=5), quietly, payload=b'{"id": 7')
    assert seen == [] and len(calls) == 1 and calls[0].startswith("dead letter: ")


async def test_the_kind_may_be_picked_by_subject():
    calls, seen = await run(RedeliveryPolicy(), quietly, kind=lambda subject: JobRequest)
    assert calls == ["ack"] and isinstance(seen[0].payload, JobRequest)


async def test_a_failure_is_redelivered_after_the_policys_delay_until_the_last_attempt():
    async def failing(delivery: Delivery) -> None:
        raise RuntimeError("NATS away")

    policy = RedeliveryPolicy(attempts=3, delay=lambda attempt: 10.0 * attempt)
    assert (await run(policy, failing, attempt=2))[0] == ["nak 20"]
    calls, _ = await run(policy, failing, attempt=3)
    assert calls == ["dead letter: not handled in 3 deliveries: RuntimeError('NATS away')"]


async def test_a_consumer_without_a_bound_redelivers_without_end():
    async def failing(delivery: Delivery) -> None:
        raise RuntimeError("down")

    assert (await run(RedeliveryPolicy(), failing, attempt=1000))[0] == ["nak 1"]


async def test_a_handler_asks_for_later_or_gives_up():
    async def later(delivery: Delivery) -> None:
        raise HandleLater("not yet", delay=7)

    async def never(delivery: Delivery) -> None:
        raise GiveUp("forged")

    assert (await run(RedeliveryPolicy(attempts=5), later))[0] == ["nak 7"]
    assert (await run(RedeliveryPolicy(attempts=5), never))[0] == ["dead letter: forged"]


async def test_a_handler_that_settles_itself_is_not_settled_again():
    async def confirmed(delivery: Delivery) -> None:
        await delivery.in_progress()
        await delivery.done(confirm=True)

    assert (await run(RedeliveryPolicy(), confirmed))[0] == ["in_progress", "ack confirmed"]


async def test_a_message_past_its_attempts_goes_to_on_exhausted_not_to_the_handler():
    """The engine's crash count: a task whose engines died on it comes back unsettled; past the
    bound the engine fails it (its hook) instead of running it again."""
    exhausted: list[Delivery] = []

    async def fail_the_task(delivery: Delivery) -> None:
        exhausted.append(delivery)
        await delivery.done(confirm=True)

    task = encode(Task(id="j1-transcribe-0", job_id="j1", stage="transcribe", runtime="r", output="jobs/j1/t0"))
    policy = RedeliveryPolicy(attempts=4, on_exhausted=fail_the_task)
    calls, seen = await run(policy, quietly, payload=task, attempt=4, kind=Task)
    assert seen and calls == ["ack"] and exhausted == []
    calls, seen = await run(policy, quietly, payload=task, attempt=5, kind=Task)
    assert seen == [] and calls == ["ack confirmed"] and exhausted[0].payload.id == "j1-transcribe-0"


async def test_an_exhausted_message_its_hook_left_unsettled_is_dead_lettered():
    async def forgetful(delivery: Delivery) -> None:
        pass

    calls, _ = await run(RedeliveryPolicy(attempts=2, on_exhausted=forgetful), quietly, attempt=3)
    assert calls == ["dead letter: delivered 3 times, past its 2"]
