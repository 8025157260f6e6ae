"""Jobs as the gateway sees them: submit an upload, wait for it, read its record and result."""

from __future__ import annotations

import asyncio
import uuid
from typing import IO

from nats.js.errors import KeyNotFoundError, NoKeysError, NotFoundError

from dalston.bus.connection import Bus
from dalston.contracts import (
    CANCEL_SUBJECT,
    JOB_EVENT_SUBJECT,
    SUBMIT_SUBJECT,
    TERMINAL,
    CancelRequest,
    JobEvent,
    JobRecord,
    JobRequest,
    TranscribeOptions,
    Transcript,
    decode,
    is_job_id,
    now,
)
from dalston.logs import get_logger

log = get_logger("dalston.gateway")


class JobNotFound(LookupError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id[:80]!r}")


class JobService:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def submit(self, audio: IO[bytes], filename: str, model: str,
                     options: TranscribeOptions, job_id: str | None = None) -> str:
        """Store the audio (streamed in chunks) and publish the job; returns its id."""
        job_id = job_id or uuid.uuid4().hex
        audio_object = f"jobs/{job_id}/audio"
        await self.bus.artifacts.put(audio_object, audio)
        try:
            await self.bus.publish(SUBMIT_SUBJECT, JobRequest(
                id=job_id, model=model, audio_object=audio_object, filename=filename[:255],
                options=options, submitted_at=now()), msg_id=job_id)
        except BaseException:
            # No job will ever point at the upload: do not leave it behind.
            await asyncio.shield(self._forget(audio_object))
            raise
        return job_id

    async def _forget(self, audio_object: str) -> None:
        try:
            await self.bus.artifacts.delete(audio_object)
        except Exception as exc:  # noqa: BLE001 - retention removes it in the end
            log.warning("orphaned upload not deleted", object=audio_object, error=repr(exc))

    async def run(self, audio: IO[bytes], filename: str, model: str,
                  options: TranscribeOptions, timeout: float) -> JobRecord:
        """Submit and wait until the job ends (TimeoutError past `timeout`)."""
        job_id = uuid.uuid4().hex
        ended = asyncio.Event()

        async def on_event(msg) -> None:
            if decode(msg.data, JobEvent).status in TERMINAL:
                ended.set()

        # Subscribe before submitting, so the end of a fast job cannot be missed.
        subscription = await self.bus.nc.subscribe(JOB_EVENT_SUBJECT.format(job_id=job_id), cb=on_event)
        try:
            await self.submit(audio, filename, model, options, job_id=job_id)
            await asyncio.wait_for(ended.wait(), timeout)
        finally:
            await subscription.unsubscribe()
        return await self.get(job_id)

    async def get(self, job_id: str) -> JobRecord:
        if not is_job_id(job_id):
            raise JobNotFound(job_id)  # never a key or subject: wildcards stay out of NATS
        try:
            entry = await self.bus.jobs.get(job_id)
        except KeyNotFoundError:
            return await self._submitted(job_id)
        return decode(entry.value, JobRecord)

    async def _submitted(self, job_id: str) -> JobRecord:
        """A job whose audio is stored but which no orchestrator has recorded yet: queued."""
        audio_object = f"jobs/{job_id}/audio"
        try:
            await self.bus.artifacts.get_info(audio_object)
        except NotFoundError:
            raise JobNotFound(job_id) from None
        return JobRecord(id=job_id, status="queued", model="", runtime="", runtime_model_id="",
                         audio_object=audio_object)

    async def list(self, limit: int = 50) -> list[JobRecord]:
        try:
            keys = await self.bus.jobs.keys()
        except NoKeysError:
            return []
        records = await asyncio.gather(*(self.get(k) for k in keys), return_exceptions=True)
        jobs = [r for r in records if isinstance(r, JobRecord)]
        return sorted(jobs, key=lambda r: r.created_at, reverse=True)[:limit]

    async def transcript(self, record: JobRecord) -> Transcript:
        return decode(await self.bus.read_object(record.transcript_object), Transcript)

    async def cancel(self, job_id: str) -> None:
        await self.get(job_id)
        await self.bus.publish(CANCEL_SUBJECT, CancelRequest(id=job_id))
