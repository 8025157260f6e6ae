"""Listing jobs with 10,000 of them: a page of `GET /v1/jobs` (cut from the gateway's per-owner
index, then `limit` records read) against reading every record, as listing did before, side by
side on the same NATS. Target: a page under 50 ms."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import httpx

from dalston.contracts import JobRecord
from dalston.loopback import LoopbackStack

JOBS = 10_000
OWNERS = 10
PAGE = 50
ROUNDS = 20


async def _fill(stack: LoopbackStack) -> None:
    bus = await stack.bus()
    try:
        writes = asyncio.Semaphore(64)

        async def put(n: int) -> None:
            async with writes:
                await bus.jobs.create(JobRecord(
                    id=f"{n:032x}", status="completed", model="faster-whisper-tiny.en", runtime="faster-whisper",
                    runtime_model_id="tiny.en", audio_object="a", owner=f"key{n % OWNERS}",
                    created_at=1.7e9 + n))
        await asyncio.gather(*(put(n) for n in range(JOBS)))
    finally:
        await bus.close()


async def _scan(stack: LoopbackStack) -> float:
    """Every record read, the newest PAGE kept: the cost of listing by a scan."""
    bus = await stack.bus()
    try:
        started = time.perf_counter()
        reads = asyncio.Semaphore(16)

        async def read(job_id: str) -> JobRecord | None:
            async with reads:
                return await bus.jobs.get(job_id)
        records = await asyncio.gather(*(read(job_id) for job_id in await bus.jobs.ids()))
        sorted((r for r in records if r), key=lambda r: r.created_at, reverse=True)[:PAGE]
        return time.perf_counter() - started
    finally:
        await bus.close()


def _page(client: httpx.Client, url: str) -> float:
    started = time.perf_counter()
    response = client.get(f"{url}/v1/jobs", params={"limit": PAGE})
    elapsed = time.perf_counter() - started
    assert response.status_code == 200 and len(response.json()["data"]) == PAGE, response.text
    return elapsed


def run(root: Path) -> list[str]:
    stack = LoopbackStack(root, DALSTON_LOG_LEVEL="WARNING")
    stack.start_nats()
    try:
        asyncio.run(_fill(stack))
        stack.start("gateway", "gateway")
        stack.wait_http()
        with httpx.Client(timeout=60) as client:
            deadline = time.monotonic() + 60  # the gateway indexes the bucket as it replays it
            while client.get(f"{stack.url}/v1/jobs", params={"limit": 1000}).json()["has_more"] is False:
                assert time.monotonic() < deadline, "jobs not indexed"
                time.sleep(0.5)
            pages = [_page(client, stack.url) for _ in range(ROUNDS)]
        scans = [asyncio.run(_scan(stack)) for _ in range(3)]
        page, scan = statistics.median(pages), statistics.median(scans)
        return [f"job_list {JOBS} jobs: a page of {PAGE} over HTTP {page * 1000:.1f} ms (median of {ROUNDS}), "
                f"a scan of every record {scan * 1000:.0f} ms (median of 3), ratio {scan / page:.0f}x"]
    finally:
        stack.close()
