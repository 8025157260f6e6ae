"""The gateway's front door: how many jobs are unfinished, whether one more may come in, and how
many uploads are being received at once.

The count is the gateway's own, kept current by following the `jobs` bucket (every record and
each change, pushed by NATS), plus the jobs this gateway has accepted that no orchestrator has
recorded yet. It is read without a round trip, so a request is refused before a byte of its
upload is read. Jobs the gateway accepts are published `admitted` (see `JobRequest`): the
orchestrator takes them whatever its own count, and a 202 is never undone. With several
gateways each sees every recorded job but only its own not yet recorded, so together they can
pass the bound by the jobs they accept in the same instant.

Following the bucket also tells who wants to know (the metrics) of every job that ends.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from dalston.bus.connection import Bus
from dalston.contracts import TERMINAL, JobRecord
from dalston.logs import get_logger

log = get_logger("dalston.gateway")

# Retry-After is the mean gap between job ends over this window: in about that time a queued
# job's place is free again.
THROUGHPUT_WINDOW_SECONDS = 60.0
MAX_RETRY_AFTER_SECONDS = 60
# A request waits this long for an upload slot (its body unread: the server holds at most 64 KB
# of it) before it is refused; a burst of uploads is taken in turn rather than refused at once.
UPLOAD_WAIT_SECONDS = 5.0
# Uploads are received in seconds: a refused one may try again soon.
UPLOAD_RETRY_AFTER_SECONDS = 2
RESTART_SECONDS = 1.0


class Refused(Exception):
    """The gateway cannot take the request now; `retry_after` seconds is when to try again
    (None: no telling). `code` is the error code (and the reason in dalston_refusals_total)."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after = retry_after


class Admission:
    def __init__(self, bus: Bus, max_queued_jobs: int, max_concurrent_uploads: int,
                 on_ended: Callable[[JobRecord], None], upload_wait: float = UPLOAD_WAIT_SECONDS) -> None:
        self._bus = bus
        self._limit = max_queued_jobs
        self._on_ended = on_ended
        self._unfinished: set[str] = set()  # recorded, not ended
        self._accepted: set[str] = set()  # accepted here, not recorded yet
        self._ends: deque[float] = deque()  # monotonic times of recent job ends
        self._max_uploads = max_concurrent_uploads
        self._upload_slots = asyncio.Semaphore(max_concurrent_uploads)
        self._upload_wait = upload_wait
        self._follower: asyncio.Task | None = None

    async def start(self) -> None:
        self._follower = asyncio.create_task(self._follow_forever())

    async def stop(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)

    @property
    def unfinished(self) -> int:
        """Jobs queued or running, as this gateway counts them."""
        return len(self._unfinished) + len(self._accepted)

    def reserve(self, job_id: str) -> None:
        """A place among the unfinished jobs for a new job; Refused (429) past the bound."""
        if self.unfinished >= self._limit:
            raise Refused(429, "overloaded", f"{self.unfinished} jobs are queued or running, the most "
                          "this Dalston takes (DALSTON_MAX_QUEUED_JOBS): submit again later",
                          self.retry_after())
        self._accepted.add(job_id)

    def release(self, job_id: str) -> None:
        """Give back the place of a job that was not published."""
        self._accepted.discard(job_id)

    @asynccontextmanager
    async def receiving(self) -> AsyncIterator[None]:
        """A slot for receiving one upload, held while the block runs; Refused (503) when none
        came free in `upload_wait` seconds. Bounds the gateway's memory and disk under a flood
        of uploads (the waiting ones are bounded too: each holds a place among the jobs)."""
        try:
            await asyncio.wait_for(self._upload_slots.acquire(), self._upload_wait)
        except TimeoutError:
            raise Refused(503, "uploads_busy", f"{self._max_uploads} uploads are being received, the most "
                          "this gateway takes at once (DALSTON_MAX_CONCURRENT_UPLOADS)",
                          UPLOAD_RETRY_AFTER_SECONDS) from None
        try:
            yield
        finally:
            self._upload_slots.release()

    def retry_after(self) -> int:
        """Seconds until a queued job's place is likely free: the mean gap between job ends over
        the last minute, 1 to 60 s (60 when none ended)."""
        self._forget_old_ends()
        if not self._ends:
            return MAX_RETRY_AFTER_SECONDS
        return max(1, min(MAX_RETRY_AFTER_SECONDS, math.ceil(THROUGHPUT_WINDOW_SECONDS / len(self._ends))))

    def _forget_old_ends(self) -> None:
        horizon = time.monotonic() - THROUGHPUT_WINDOW_SECONDS
        while self._ends and self._ends[0] < horizon:
            self._ends.popleft()

    # --- following the jobs bucket ---------------------------------------------------------------

    async def _follow_forever(self) -> None:
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - NATS failing over: follow again
                log.warning("following job records failed; again", error=repr(exc))
            await asyncio.sleep(RESTART_SECONDS)

    async def _follow(self) -> None:
        # The watch first replays every record: a job that ended before now was counted by
        # whoever saw it end, unless this gateway saw it unfinished (it ended while we were
        # not following).
        since = time.time()
        async for job_id, record in self._bus.jobs.watch():
            self._accepted.discard(job_id)
            if record is None:  # expired
                self._unfinished.discard(job_id)
            elif record.status not in TERMINAL:
                self._unfinished.add(job_id)
            elif job_id in self._unfinished or (record.finished_at or 0.0) >= since:
                self._unfinished.discard(job_id)
                self._ends.append(time.monotonic())
                self._forget_old_ends()
                self._on_ended(record)
