"""A real Dalston for tests (`dalston.loopback`: a real nats-server and real service processes on
loopback), and what tests do with it: submit jobs, wait for them, compare transcripts."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from dalston.loopback import LoopbackStack, free_port, heartbeat, wait_ok  # noqa: F401 - for the tests
from dalston.synthetic_speech import words  # noqa: F401 - for the tests
from tests.audio_fixtures import AUDIO_DIR as AUDIO  # noqa: F401 - for the tests


class TestStack(LoopbackStack):
    """The loopback stack, under the name the tests know it by."""

    __test__ = False  # a helper, not a test class




DIALOGUE_WORDS = words("That was hilarious, I can't believe you said that. "
                       "What do you mean? I was really serious about it.")


def submit(stack: TestStack, path: Path, model: str) -> str:
    """POST /v1/jobs; the new job's id."""
    with open(path, "rb") as audio:
        response = httpx.post(f"{stack.url}/v1/jobs", files={"file": audio}, data={"model": model})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def job(stack: TestStack, job_id: str) -> dict:
    """The job's record; empty until the orchestrator has taken the submission."""
    response = httpx.get(f"{stack.url}/v1/jobs/{job_id}")
    return {"status": None, "tasks": {}} if response.status_code == 404 else response.json()


async def wait_job(stack: TestStack, job_id: str, timeout: float = 90.0) -> dict:
    """The job's record once it has ended."""
    async def ended():
        record = job(stack, job_id)
        return record if record["status"] in ("completed", "failed", "cancelled") else None
    return await wait_for(ended, timeout)


async def wait_for(predicate, timeout: float = 30.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(interval)
    raise TimeoutError("condition not met in time")
