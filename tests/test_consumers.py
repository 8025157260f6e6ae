"""The consume loop on a real nats-server: a service that took messages lets go at once."""

from __future__ import annotations

import asyncio
import time

from dalston.bus import consumers
from dalston.bus.connection import connect
from dalston.config import load_settings
from dalston.contracts import JOBS_STREAM, ORCHESTRATOR_JOBS_CONSUMER, SUBMIT_SUBJECT, JobRequest, encode


async def test_a_bus_closes_at_once_after_its_consume_loop_idled_and_took_messages(nats_env, monkeypatch):
    """A fetch that outlived its wait leaves the server's timeout status in the subscription's
    queue; the next fetch takes it without marking it done, and draining the connection then
    waited out its drain timeout (5 s) at every stop of the orchestrator and the engines."""
    monkeypatch.setattr(consumers, "FETCH_WAIT_SECONDS", 0.2)
    bus = await connect(load_settings(nats_env), name="test")
    handled: list[str] = []

    async def handler(delivery) -> None:
        handled.append(delivery.payload.id)

    loop = asyncio.create_task(consumers.consume(bus, JOBS_STREAM, ORCHESTRATOR_JOBS_CONSUMER, handler,
                                                 kind=JobRequest))
    try:
        await asyncio.sleep(0.5)  # idle past a fetch's wait
        for n in range(3):
            await bus.js.publish(SUBMIT_SUBJECT, encode(JobRequest(id=f"job{n}", model="m")))
        while len(handled) < 3:
            await asyncio.sleep(0.02)
    finally:
        loop.cancel()
        started = time.monotonic()
        await bus.close()
    assert time.monotonic() - started < 2.0  # the drain timeout is 5 s
