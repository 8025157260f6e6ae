"""A task's objects, as its engine reads and writes them: through the orchestrator, which checks
the task's grant and that the object is the task's (dalston/services/task_objects.py). An
engine's NATS user has no right on the object store itself."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import secrets
from collections.abc import AsyncIterator, Callable
from typing import IO

from dalston.bus.buckets import ObjectUnreadable
from dalston.contracts import (
    TASK_OBJECT_CHUNK,
    TASK_OBJECT_PAGE,
    TASK_OBJECTS,
    Task,
    TaskObjectReply,
    TaskObjectRequest,
)

# How long one page may take to come (an orchestrator reads 2 MB from JetStream per page).
ASK_TIMEOUT_SECONDS = 30.0


class TaskClosed(Exception):
    """The task is no longer to run: its job ended, or another attempt of it was given."""


class ObjectRefused(Exception):
    """The orchestrator refused the request."""


class Unanswered(ObjectRefused):
    """No orchestrator answered."""


class TaskObjects:
    def __init__(self, bus, task: Task) -> None:
        self._bus = bus
        self._task = task

    async def _ask(self, op: str, **fields) -> TaskObjectReply:
        task = self._task
        reply = await self._bus.request(TASK_OBJECTS, TaskObjectRequest(
            job_id=task.job_id, task_id=task.id, grant=task.grant, op=op, **fields), ASK_TIMEOUT_SECONDS)
        if reply is None:
            raise Unanswered(f"no orchestrator answered for task {task.id}'s objects within "
                                f"{ASK_TIMEOUT_SECONDS:g} s")
        if reply.closed:
            raise TaskClosed(reply.error)
        if reply.error:
            if reply.unreadable:
                raise ObjectUnreadable(fields.get("name") or "", reply.error, gone=reply.gone)
            raise ObjectRefused(reply.error)
        return reply

    async def open(self) -> None:
        """TaskClosed where the task is no longer to run (its job was cancelled while it waited)."""
        await self._ask("open")

    async def pages(self, name: str, on_size: Callable[[int], None] = lambda size: None
                    ) -> AsyncIterator[list[bytes]]:
        """The input `name`, page by page; `on_size` hears its size first. ObjectUnreadable where
        what came is not the whole object."""
        reply = await self._ask("read", name=name)
        on_size(reply.size)
        digest, got = hashlib.sha256(), 0
        while True:
            for chunk in reply.chunks:
                digest.update(chunk)
                got += len(chunk)
            yield reply.chunks
            if not reply.cursor or got >= reply.size:
                break
            reply = await self._ask("read", name=name, cursor=reply.cursor)
        if got != reply.size or base64.urlsafe_b64encode(digest.digest()).decode() != reply.digest:
            raise ObjectUnreadable(name, f"came with {got} of its {reply.size} bytes, or not as written", gone=True)

    async def read_into(self, name: str, sink: IO[bytes]) -> None:
        loop = asyncio.get_running_loop()
        async for chunks in self.pages(name):
            # In a thread: the sink may be a file.
            await loop.run_in_executor(None, _write_all, sink, chunks)

    async def write(self, name: str, data: bytes | IO[bytes]) -> str:
        """Store `data` (bytes, or a file read in chunks) as the task's output `name`."""
        source = io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else data
        in_memory = isinstance(source, io.BytesIO)
        upload, digest, size = secrets.token_hex(12), hashlib.sha256(), 0
        while True:
            page = []
            while len(page) < TASK_OBJECT_PAGE and (chunk := (
                    source.read(TASK_OBJECT_CHUNK) if in_memory
                    else await asyncio.to_thread(source.read, TASK_OBJECT_CHUNK))):
                page.append(chunk)
            if not page:
                break
            for chunk in page:
                digest.update(chunk)
                size += len(chunk)
            await self._ask("write", name=name, upload=upload, chunks=page)
        await self._ask("seal", name=name, upload=upload, size=size,
                        digest=base64.urlsafe_b64encode(digest.digest()).decode())
        return name


def _write_all(sink: IO[bytes], chunks: list[bytes]) -> None:
    for chunk in chunks:
        sink.write(chunk)
