"""Typed access to JetStream's key-value buckets and the artifacts object store.

The rest of Dalston asks for job records and artifacts by name and never sees nats-py's
errors: a missing key is None, an empty bucket has no keys, a lost compare-and-set is False.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

from nats.js.api import ObjectMeta
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError, NotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from nats.js.object_store import ObjectStore

from dalston.contracts import JobRecord, Transcript, decode, encode


class Bucket:
    """A key-value bucket of raw values."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    async def get(self, key: str) -> tuple[bytes, int] | None:
        """The value and its revision, or None for a missing or deleted key."""
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:  # also deleted and purged keys
            return None
        return (entry.value, entry.revision) if entry.value else None

    async def create(self, key: str, value: bytes) -> bool:
        """Store `value` unless the key exists; whether it was stored."""
        try:
            await self._kv.create(key, value)
        except KeyWrongLastSequenceError:
            return False
        return True

    async def update(self, key: str, value: bytes, revision: int) -> bool:
        """Compare-and-set: store `value` if the key is still at `revision`."""
        try:
            await self._kv.update(key, value, last=revision)
        except KeyWrongLastSequenceError:
            return False
        return True

    async def purge(self, key: str) -> None:
        await self._kv.purge(key)

    async def keys(self) -> list[str]:
        try:
            return await self._kv.keys()
        except NoKeysError:
            return []

    async def watch(self) -> AsyncIterator[tuple[str, bytes | None]]:
        """Every key's value, then each change as it happens; None for a deleted key."""
        watcher = await self._kv.watchall()
        try:
            async for entry in watcher:
                if entry is None:  # every existing key delivered; live updates follow
                    continue
                yield entry.key, None if entry.operation in (KV_DEL, KV_PURGE) else entry.value
        finally:
            await watcher.stop()


class JobRecords:
    """The `jobs` bucket: one `JobRecord` per job id, changed by compare-and-set."""

    def __init__(self, kv: KeyValue) -> None:
        self._bucket = Bucket(kv)

    async def load(self, job_id: str) -> tuple[JobRecord, int] | None:
        """The record and its revision, or None if there is none."""
        found = await self._bucket.get(job_id)
        return None if found is None else (decode(found[0], JobRecord), found[1])

    async def get(self, job_id: str) -> JobRecord | None:
        loaded = await self.load(job_id)
        return None if loaded is None else loaded[0]

    async def create(self, record: JobRecord) -> bool:
        return await self._bucket.create(record.id, encode(record))

    async def update(self, record: JobRecord, revision: int) -> bool:
        return await self._bucket.update(record.id, encode(record), revision)

    async def ids(self) -> list[str]:
        return await self._bucket.keys()

    async def watch(self) -> AsyncIterator[tuple[str, JobRecord | None]]:
        """Every job, then each change; None once a record is gone. Undecodable ones are skipped."""
        async for job_id, value in self._bucket.watch():
            try:
                yield job_id, None if value is None else decode(value, JobRecord)
            except ValueError:
                continue


class Artifacts:
    """The `artifacts` object store: uploads, prepared audio, per-stage results, transcripts."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store

    async def put(self, name: str, data: bytes | IO[bytes], headers: dict[str, str] | None = None) -> str:
        """Store `data` (bytes, or a file streamed in chunks) under `name`, with `headers`."""
        # Object headers are lists of values, as NATS's own clients write them.
        meta = ObjectMeta(name=name, headers={k: [v] for k, v in headers.items()}) if headers else None
        await self._store.put(name, data, meta=meta)
        return name

    async def read(self, name: str) -> bytes:
        buffer = io.BytesIO()
        await self.read_into(name, buffer)
        return buffer.getvalue()

    async def read_into(self, name: str, sink: IO[bytes]) -> None:
        """Write the object into `sink` chunk by chunk, as it arrives."""
        # writeinto avoids nats-py's quadratic concatenation of chunks (nats.py issue 703).
        await self._store.get(name, writeinto=sink)

    async def size(self, name: str) -> int:
        return (await self._store.get_info(name)).size

    async def transcript(self, record: JobRecord) -> Transcript:
        """The transcript of a completed job."""
        return decode(await self.read(record.transcript_object), Transcript)

    async def read_to(self, name: str, path: Path) -> None:
        with path.open("wb") as file:
            await self.read_into(name, file)

    async def headers(self, name: str) -> dict[str, str] | None:
        """The object's headers (first value of each), or None if there is no such object."""
        try:
            info = await self._store.get_info(name)
        except NotFoundError:
            return None
        return {k: v[0] if isinstance(v, list) else v for k, v in (info.headers or {}).items()}

    async def exists(self, name: str) -> bool:
        return await self.headers(name) is not None

    async def delete(self, name: str) -> None:
        try:
            await self._store.delete(name)
        except NotFoundError:
            pass
