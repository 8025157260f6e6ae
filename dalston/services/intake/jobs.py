"""Jobs as the gateway sees them: submit an upload, wait for it, read its record and result.

A job has an owner (an API key's name, or None). Every read takes `owner`, whose jobs the caller
may see (None: everyone's); another owner's job is not found, so its existence is not revealed.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import IO

from dalston import dag
from dalston.bus.buckets import ObjectUnreadable
from dalston.bus.connection import Bus
from dalston.contracts import (
    CANCEL_SUBJECT,
    JOB_AUDIO_OBJECT,
    JOB_EVENT_SUBJECT,
    SUBMIT_SUBJECT,
    TERMINAL,
    TRANSCRIPT_SUBJECT,
    CancelRequest,
    JobEvent,
    JobRecord,
    JobRequest,
    TranscribeOptions,
    Transcript,
    TranscriptDelta,
    is_job_id,
    now,
)
from dalston.logs import get_logger
from dalston.services.intake.job_index import JobIndex

log = get_logger("dalston.intake")

# The owner rides on the audio object too, so a job not yet recorded keeps to its owner.
OWNER_HEADER = "Dalston-Owner"


def new_job_id() -> str:
    return uuid.uuid4().hex


# Job records read at once while listing.
LIST_READS = 16


class JobNotFound(LookupError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id[:80]!r}")


class TranscriptGone(Exception):
    """A completed job whose transcript is missing or damaged (expired, purged): a 410."""

    status_code = 410
    code = "transcript_gone"

    def __init__(self, job_id: str, cause: ObjectUnreadable) -> None:
        self.detail = f"the transcript of job {job_id} is no longer available: {cause}"
        super().__init__(self.detail)


class JobService:
    def __init__(self, bus: Bus, index: JobIndex) -> None:
        self.bus = bus
        self.index = index

    async def submit(self, job_id: str, audio: IO[bytes], filename: str, model: str,
                     options: TranscribeOptions, owner: str | None, webhook_url: str | None = None) -> None:
        """Store the audio (streamed in chunks) and publish the job, admitted: its place among
        the unfinished jobs was reserved before its upload was read (admission.py). A checked
        `webhook_url` is called when the job ends."""
        audio_object = JOB_AUDIO_OBJECT.format(job_id=job_id)
        await self.bus.artifacts.put(audio_object, audio, {OWNER_HEADER: owner} if owner else None)
        try:
            await self.bus.publish(SUBMIT_SUBJECT, JobRequest(
                id=job_id, model=model, audio_object=audio_object, filename=filename[:255],
                options=options, submitted_at=now(), owner=owner, webhook_url=webhook_url,
                admitted=True), msg_id=job_id)
        except BaseException:
            # No job will ever point at the upload: do not leave it behind.
            await asyncio.shield(self._forget(audio_object))
            raise

    async def _forget(self, audio_object: str) -> None:
        try:
            await self.bus.artifacts.delete(audio_object)
        except Exception as exc:  # noqa: BLE001 - retention removes it in the end
            log.warning("orphaned upload not deleted", object=audio_object, error=repr(exc))

    async def get(self, job_id: str, owner: str | None) -> JobRecord:
        if not is_job_id(job_id):
            raise JobNotFound(job_id)  # never a key or subject: wildcards stay out of NATS
        record = await self.bus.jobs.get(job_id) or await self._submitted(job_id)
        if owner is not None and record.owner != owner:
            raise JobNotFound(job_id)
        return record

    async def _submitted(self, job_id: str) -> JobRecord:
        """A job whose audio is stored but which no orchestrator has recorded yet: queued."""
        audio_object = JOB_AUDIO_OBJECT.format(job_id=job_id)
        headers = await self.bus.artifacts.headers(audio_object)
        if headers is None:
            raise JobNotFound(job_id)
        return JobRecord(id=job_id, status="queued", model="", runtime="", runtime_model_id="",
                         audio_object=audio_object, owner=headers.get(OWNER_HEADER))

    async def list(self, owner: str | None, limit: int = 50, after: str | None = None) -> tuple[list[JobRecord], bool]:
        """A page of `owner`'s jobs (None: everyone's), newest first, after the job `after`;
        and whether more follow. Reads the page's records only (UnknownCursor: see JobIndex)."""
        ids = self.index.newest(owner, limit + 1, after)
        # A few reads at a time: a page of hundreds must not flood NATS with requests at once.
        reads = asyncio.Semaphore(LIST_READS)

        async def read(job_id: str) -> JobRecord | None:
            async with reads:
                try:
                    return await self.get(job_id, owner)
                except JobNotFound:  # gone meanwhile
                    return None
        records = await asyncio.gather(*(read(job_id) for job_id in ids[:limit]))
        return [r for r in records if r], len(ids) > limit

    async def transcript(self, record: JobRecord) -> Transcript:
        try:
            return await self.bus.artifacts.transcript(record)
        except ObjectUnreadable as exc:
            log.warning("transcript unreadable", job=record.id, reason=str(exc))
            raise TranscriptGone(record.id, exc) from None

    async def cancel(self, job_id: str, owner: str | None) -> None:
        await self.get(job_id, owner)
        await self.bus.publish(CANCEL_SUBJECT, CancelRequest(id=job_id))


class FollowedJob:
    """A submitted job as it runs: the segments its engines announce, then its final record."""

    def __init__(self, jobs: JobService, job_id: str, owner: str | None) -> None:
        self.jobs, self.id, self.owner = jobs, job_id, owner
        self._queue: asyncio.Queue[TranscriptDelta | None] = asyncio.Queue()
        self._subscriptions: list = []
        self._record: JobRecord | None = None  # the tasks' grants, for the segments

    @classmethod
    async def start(cls, jobs: JobService, job_id: str, owner: str | None, segments: bool) -> FollowedJob:
        followed = cls(jobs, job_id, owner)
        bus = jobs.bus
        followed._subscriptions.append(
            await bus.subscribe(JOB_EVENT_SUBJECT.format(job_id=job_id), followed._on_job_event, kind=JobEvent))
        if segments:
            followed._subscriptions.append(
                await bus.subscribe(TRANSCRIPT_SUBJECT.format(job_id=job_id), followed._on_delta,
                                    kind=TranscriptDelta))
        return followed

    async def _on_job_event(self, event: JobEvent) -> None:
        if event.status in TERMINAL:
            self._queue.put_nowait(None)

    async def _on_delta(self, delta: TranscriptDelta) -> None:
        # One that breaks its contract (a publisher's bug) is dropped by the bus: the job's
        # result is unaffected.
        self._queue.put_nowait(delta)

    async def events(self, timeout: float) -> AsyncIterator[TranscriptDelta | JobRecord]:
        """Each segment once, in order per task, then the job's record when it has ended
        (TimeoutError past `timeout`). Unsubscribes when it ends, or is closed early."""
        deadline = time.monotonic() + timeout
        sent: dict[str, int] = {}  # per task, the next segment not forwarded yet
        try:
            while (item := await asyncio.wait_for(self._queue.get(), deadline - time.monotonic())) is not None:
                # A task run again after its engine died repeats the segments already sent.
                if item.seq >= sent.get(item.task_id, 0) and await self._granted(item):
                    sent[item.task_id] = item.seq + 1
                    yield item
            yield await self.jobs.get(self.id, self.owner)
        finally:
            await self.close()

    async def _granted(self, delta: TranscriptDelta) -> bool:
        """Whether the segment comes from the engine given its task: it presents the task's
        grant, which the job record holds (read again only for a task it did not list yet)."""
        record = self._record
        if record is None or not any(t.id == delta.task_id for t in record.tasks.values()):
            record = self._record = await self.jobs.bus.jobs.get(self.id)
        if record is None or not dag.presents_grant(record, delta.task_id, delta.grant):
            log.warning("transcript delta without its task's grant dropped", job=self.id, task=delta.task_id)
            return False
        return True

    async def close(self) -> None:
        subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            try:
                await subscription.unsubscribe()
            except Exception as exc:  # noqa: BLE001 - a closing connection drops it anyway
                log.warning("unsubscribe failed", job=self.id, error=repr(exc))
