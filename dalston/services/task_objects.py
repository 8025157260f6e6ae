"""The objects of tasks, for the engines running them: engines have no right on the object store
(nor on the job records), so they ask here, presenting the task's grant. A task reads only its
inputs and writes only its output (`dag.task_objects`), and only while it is still to run.

Reads go in pages of chunks by stream sequence (an input may be far bigger than NATS's
max_payload); writes go chunk by chunk under an object id derived from the task, the name and the
writer's upload id, so that no engine can add chunks to another object. Stateless: any
orchestrator answers any page.
"""

from __future__ import annotations

import hashlib

from dalston import dag
from dalston.bus.buckets import ObjectUnreadable
from dalston.bus.connection import Bus
from dalston.contracts import TASK_OBJECT_PAGE, TASK_OBJECTS, TaskObjectReply, TaskObjectRequest
from dalston.logs import get_logger

log = get_logger("dalston.orchestrator.objects")

# Requests answered side by side (one queue-group member each): object pages of several
# engines must not wait behind one another.
CONCURRENT_REQUESTS = 8


def upload_nuid(request: TaskObjectRequest) -> str:
    """The object store id of the chunks an upload writes: bound to its task and name."""
    return hashlib.sha256(f"{request.task_id}/{request.name}/{request.upload}".encode()).hexdigest()[:24]


class TaskObjects:
    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._subscriptions = []

    async def start(self) -> None:
        for _ in range(CONCURRENT_REQUESTS):
            self._subscriptions.append(await self._bus.serve(TASK_OBJECTS, self.answer, queue="task-objects"))

    async def stop(self) -> None:
        for subscription in self._subscriptions:
            await subscription.unsubscribe()
        self._subscriptions.clear()

    async def answer(self, request: TaskObjectRequest) -> TaskObjectReply:
        record = await self._bus.jobs.get(request.job_id)
        if record is None or not dag.presents_grant(record, request.task_id, request.grant):
            log.warning("task object refused", job=request.job_id, task=request.task_id, op=request.op)
            return TaskObjectReply(error=f"the request does not present task {request.task_id}'s grant")
        allowed = dag.task_objects(record, request.task_id)
        if allowed is None:
            return TaskObjectReply(closed=True, error=f"task {request.task_id} is no longer to run")
        reads, output = allowed
        name = request.name or ""
        try:
            if request.op == "open":
                return TaskObjectReply()
            if request.op == "read":
                if name not in reads:
                    return TaskObjectReply(error=f"{name!r} is not an input of task {request.task_id}")
                info, chunks, cursor = await self._bus.artifacts.read_page(name, request.cursor, TASK_OBJECT_PAGE)
                return TaskObjectReply(size=info.size, digest=(info.digest or "").partition("=")[2],
                                       chunks=chunks, cursor=cursor)
            if not dag.writes(output, name) or request.upload is None:
                return TaskObjectReply(error=f"{name!r} is not an output of task {request.task_id}")
            if request.op == "write":
                await self._bus.artifacts.write_chunks(upload_nuid(request), request.chunks)
            else:
                await self._bus.artifacts.seal(name, upload_nuid(request), request.size, request.digest)
            return TaskObjectReply()
        except ObjectUnreadable as exc:
            return TaskObjectReply(error=exc.reason, unreadable=True, gone=exc.gone)
        except Exception as exc:  # noqa: BLE001 - NATS failing over, say: the engine is told, not left waiting
            log.warning("task object not served", task=request.task_id, op=request.op, error=repr(exc)[:300])
            return TaskObjectReply(error=f"the orchestrator could not {request.op} {name!r}: {exc!r}"[:1000])
