"""The gateway's front door: how many jobs are unfinished, whether one more may come in, and how
many uploads are being received at once, in all and per key.

The count is the gateway's own, kept current by following the `jobs` bucket (every record and
each change, pushed by NATS), plus the jobs this gateway has accepted that no orchestrator has
recorded yet. It is read without a round trip, so a request is refused before a byte of its
upload is read. Jobs the gateway accepts are published `admitted` (see `JobRequest`): the
orchestrator takes them whatever its own count, and a 202 is never undone. With several
gateways each sees every recorded job but only its own not yet recorded, so together they can
pass the bound by the jobs they accept in the same instant.

A fair share: one key holds at most half the queue (its record's `max_jobs` overrides that) and
half the upload slots, so no key locks the others out. Jobs waiting for a runtime no live
engine serves count against their own key only: they run nowhere, and fail after
DALSTON_ENGINE_WAIT. Jobs without an owner (no keys demanded: one user) have no share of their
own. Following the bucket also tells who wants to know (the metrics, the job index) of each
record.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from dalston.bus.connection import Bus
from dalston.contracts import TERMINAL, JobRecord
from dalston.logs import get_logger

log = get_logger("dalston.intake")

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


@dataclass(frozen=True)
class Unfinished:
    """What the count needs of a job queued or running."""

    owner: str | None
    created_at: float  # wall-clock time
    runtime: str = ""
    recorded: bool = False  # False: accepted here, not recorded yet


def half(limit: int) -> int:
    """One key's default share of `limit`."""
    return max(1, limit // 2)


class UploadSlot:
    """An upload slot held: the key's and one of the gateway's shared ones."""

    def __init__(self, admission: Admission, owner: str | None) -> None:
        self._admission, self._owner, self._shared = admission, owner, True

    def release_shared(self) -> None:
        """Give the shared slot back early, keeping the key's (while the audio is fetched from a
        URL: a slow source then holds up its own key only)."""
        if self._shared:
            self._shared = False
            self._admission._give_back(self._owner, shared=True, key=False)

    def _release(self) -> None:
        self._admission._give_back(self._owner, shared=self._shared, key=True)


class Admission:
    def __init__(self, bus: Bus, max_queued_jobs: int, max_concurrent_uploads: int,
                 on_record: Callable[[str, JobRecord | None], None] = lambda job_id, record: None,
                 on_ended: Callable[[JobRecord], None] = lambda record: None,
                 served: Callable[[str], bool] = lambda runtime: True, engine_wait: float = 120.0,
                 upload_wait: float = UPLOAD_WAIT_SECONDS) -> None:
        self._bus = bus
        self._limit = max_queued_jobs
        self._on_record = on_record  # each record seen, None when one expired
        self._on_ended = on_ended
        self._served = served  # whether a live engine serves a runtime
        self._engine_wait = engine_wait
        self._unfinished: dict[str, Unfinished] = {}  # recorded, not ended; and accepted here
        self._ends: deque[float] = deque()  # monotonic times of recent job ends
        self._owner_ends: defaultdict[str | None, deque[float]] = defaultdict(deque)
        self._max_uploads = max_concurrent_uploads
        self._uploads = 0
        self._owner_uploads: defaultdict[str | None, int] = defaultdict(int)
        self._upload_freed = asyncio.Event()  # set when a slot is given back
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
        return len(self._unfinished)

    def reserve(self, job_id: str, owner: str | None = None, max_jobs: int | None = None) -> None:
        """A place among the unfinished jobs for a new job of `owner` (whose share is `max_jobs`,
        None: half the bound); Refused (429) past the bound or past the owner's share."""
        own = [job for job in self._unfinished.values() if job.owner == owner]
        share = max_jobs if max_jobs is not None else half(self._limit)
        if owner is not None and len(own) >= share:
            raise Refused(429, "key_quota", f"key {owner!r} has {len(own)} jobs queued or running, its share "
                          f"(half of DALSTON_MAX_QUEUED_JOBS, or the key's max_jobs): submit again when one "
                          "has ended", self._owner_retry_after(owner, own))
        # Another key's jobs that no engine serves do not count: they hold up only their key.
        counted = sum(1 for job in self._unfinished.values()
                      if job.owner == owner or not job.recorded or self._served(job.runtime))
        if counted >= self._limit:
            raise Refused(429, "overloaded", f"{counted} jobs are queued or running, the most this "
                          "Dalston takes (DALSTON_MAX_QUEUED_JOBS): submit again later",
                          min(self.retry_after(), self._owner_retry_after(owner, own)))
        self._unfinished[job_id] = Unfinished(owner, time.time())

    def release(self, job_id: str) -> None:
        """Give back the place of a job that was not published."""
        if (job := self._unfinished.get(job_id)) is not None and not job.recorded:
            del self._unfinished[job_id]

    @asynccontextmanager
    async def receiving(self, owner: str | None = None) -> AsyncIterator[UploadSlot]:
        """A slot for receiving one upload, held while the block runs; Refused (503) when none
        came free in `upload_wait` seconds, of the gateway's or of the key's half of them.
        Bounds the gateway's memory and disk under a flood of uploads (the waiting ones are
        bounded too: each holds a place among the jobs)."""
        key_share = half(self._max_uploads)

        def free() -> bool:
            return self._uploads < self._max_uploads and (
                owner is None or self._owner_uploads[owner] < key_share)
        deadline = time.monotonic() + self._upload_wait
        while not free():
            try:
                await asyncio.wait_for(self._upload_freed.wait(), deadline - time.monotonic())
            except TimeoutError:
                whose = (f"key {owner!r} is sending {self._owner_uploads[owner]}, its half of them"
                         if self._uploads < self._max_uploads else "the most this gateway takes at once")
                raise Refused(503, "uploads_busy", f"{self._uploads} uploads are being received, {whose} "
                              "(DALSTON_MAX_CONCURRENT_UPLOADS)", UPLOAD_RETRY_AFTER_SECONDS) from None
        self._uploads += 1
        self._owner_uploads[owner] += 1
        slot = UploadSlot(self, owner)
        try:
            yield slot
        finally:
            slot._release()

    def _give_back(self, owner: str | None, *, shared: bool, key: bool) -> None:
        if shared:
            self._uploads -= 1
        if key:
            self._owner_uploads[owner] -= 1
            if not self._owner_uploads[owner]:
                del self._owner_uploads[owner]
        # Wake every waiter to look again; later ones wait on a fresh event.
        self._upload_freed.set()
        self._upload_freed = asyncio.Event()

    def retry_after(self) -> int:
        """Seconds until a queued job's place is likely free: the mean gap between job ends over
        the last minute, 1 to 60 s (60 when none ended)."""
        self._forget_old_ends()
        if not self._ends:
            return MAX_RETRY_AFTER_SECONDS
        return max(1, min(MAX_RETRY_AFTER_SECONDS, math.ceil(THROUGHPUT_WINDOW_SECONDS / len(self._ends))))

    def _owner_retry_after(self, owner: str | None, own: list[Unfinished]) -> int:
        """Seconds until one of `owner`'s jobs (`own`) likely ends: the soonest that one no
        engine serves fails (DALSTON_ENGINE_WAIT after it came), or the mean gap between the
        key's own job ends over the last minute; without either, `retry_after`."""
        estimates = [job.created_at + self._engine_wait - time.time()
                     for job in own if job.recorded and not self._served(job.runtime)]
        self._forget_old_ends()
        if ends := self._owner_ends.get(owner):
            estimates.append(THROUGHPUT_WINDOW_SECONDS / len(ends))
        if not estimates:
            return self.retry_after()
        return max(1, min(max(MAX_RETRY_AFTER_SECONDS, math.ceil(self._engine_wait)), math.ceil(min(estimates))))

    def _forget_old_ends(self) -> None:
        horizon = time.monotonic() - THROUGHPUT_WINDOW_SECONDS
        while self._ends and self._ends[0] < horizon:
            self._ends.popleft()
        for owner, ends in list(self._owner_ends.items()):
            while ends and ends[0] < horizon:
                ends.popleft()
            if not ends:
                del self._owner_ends[owner]

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
            self.observe(job_id, record, since)

    def observe(self, job_id: str, record: JobRecord | None, since: float = 0.0) -> None:
        """A record seen in the bucket (None: it expired); a job that ended after `since` is
        counted as ended."""
        self._on_record(job_id, record)
        if record is None:
            self._unfinished.pop(job_id, None)
        elif record.status not in TERMINAL:
            self._unfinished[job_id] = Unfinished(record.owner, record.created_at, record.runtime, recorded=True)
        elif self._unfinished.pop(job_id, None) is not None or (record.finished_at or 0.0) >= since:
            ended = time.monotonic()
            self._ends.append(ended)
            self._owner_ends[record.owner].append(ended)
            self._forget_old_ends()
            self._on_ended(record)
