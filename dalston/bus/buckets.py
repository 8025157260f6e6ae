"""Typed access to JetStream's key-value buckets and the artifacts object store.

The rest of Dalston asks for job records and artifacts by name and never sees nats-py's
errors: a missing key is None, an empty bucket has no keys, a lost compare-and-set is False.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import ObjectInfo, ObjectMetaOptions
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError, NotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from nats.js.object_store import ObjectStore

from dalston.contracts import JobRecord, Transcript, decode, encode

# NATS's own clients' chunk size.
CHUNK_BYTES = 128 * 1024
# How long a read waits for the next chunk of an object before it calls the object gone.
READ_STALL_SECONDS = 10.0


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

    def __init__(self, bucket: Bucket) -> None:
        self._bucket = bucket  # or the in-memory bus's, which has the same methods

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


class ObjectUnreadable(Exception):
    """An object that cannot be read: missing, or (`gone`) listed but with chunks gone."""

    def __init__(self, name: str, reason: str, *, gone: bool) -> None:
        super().__init__(f"object {name!r} {reason}")
        self.reason = reason
        self.gone = gone


def check_digest(name: str, info: ObjectInfo, digest) -> None:
    """Raise ObjectUnreadable where what was read (`digest`, a sha256 of it) is not the object."""
    if base64.urlsafe_b64encode(digest.digest()).decode() != (info.digest or "").partition("=")[2]:
        raise ObjectUnreadable(name, "does not match its digest", gone=True)


class Artifacts:
    """The `artifacts` object store: uploads, prepared audio, per-stage results, transcripts.

    Every read has a deadline: an object whose chunks are gone (expired, purged, a damaged
    store) raises `ObjectUnreadable` at once or after READ_STALL_SECONDS without a chunk, never
    hangs. Writes and deletes never purge (only NATS's admin may): the chunks a rewrite or a
    delete leaves behind expire with the bucket (DALSTON_RETENTION_HOURS)."""

    def __init__(self, js: JetStreamContext, store: ObjectStore, bucket: str) -> None:
        self._js = js
        self._store = store
        self._bucket = bucket
        self._stream = f"OBJ_{bucket}"

    async def put(self, name: str, data: bytes | IO[bytes], headers: dict[str, str] | None = None) -> str:
        """Store `data` (bytes, or a file streamed in chunks) under `name`, with `headers`."""
        source = io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else data
        in_memory = isinstance(source, io.BytesIO)
        nuid = secrets.token_hex(12)
        digest, size = hashlib.sha256(), 0
        while chunk := (source.read(CHUNK_BYTES) if in_memory
                        else await asyncio.to_thread(source.read, CHUNK_BYTES)):
            digest.update(chunk)
            await self.write_chunks(nuid, [chunk])
            size += len(chunk)
        await self.seal(name, nuid, size, base64.urlsafe_b64encode(digest.digest()).decode(), headers)
        return name

    async def write_chunks(self, nuid: str, chunks: list[bytes]) -> None:
        """The next chunks of an object being written (`seal` makes it readable)."""
        for chunk in chunks:
            await self._js.publish(f"$O.{self._bucket}.C.{nuid}", chunk)

    async def seal(self, name: str, nuid: str, size: int, digest: str,
                   headers: dict[str, str] | None = None) -> None:
        """Make the chunks written under `nuid` the object `name` (replacing what it was), of
        `size` bytes and SHA-256 `digest` (base64url): readers check both."""
        info = ObjectInfo(
            name=name, bucket=self._bucket, nuid=nuid, size=size, chunks=await self._held(nuid),
            digest="SHA-256=" + digest, mtime=datetime.now(timezone.utc).isoformat(),
            # Object headers are lists of values, as NATS's own clients write them.
            headers={k: [v] for k, v in headers.items()} if headers else None,
            options=ObjectMetaOptions(max_chunk_size=CHUNK_BYTES))
        await self._publish_meta(name, info)

    async def _held(self, nuid: str) -> int:
        chunk_subject = f"$O.{self._bucket}.C.{nuid}"
        state = (await self._js.stream_info(self._stream, subjects_filter=chunk_subject)).state
        return (state.subjects or {}).get(chunk_subject, 0)

    async def _publish_meta(self, name: str, info: ObjectInfo) -> None:
        meta = f"$O.{self._bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"
        await self._js.publish(meta, json.dumps(info.as_dict()).encode(), headers={"Nats-Rollup": "sub"})

    async def _info(self, name: str) -> ObjectInfo:
        try:
            return await self._store.get_info(name)
        except NotFoundError:  # also ObjectNotFoundError: missing, or deleted
            raise ObjectUnreadable(name, "does not exist", gone=False) from None

    async def read(self, name: str) -> bytes:
        buffer = io.BytesIO()
        await self.read_into(name, buffer)
        return buffer.getvalue()

    async def read_into(self, name: str, sink: IO[bytes]) -> None:
        """Write the object into `sink` chunk by chunk, as it arrives."""
        info = await self._whole(name)
        if not info.size:
            return
        digest, got = hashlib.sha256(), 0
        loop = asyncio.get_running_loop()
        subscription = await self._js.subscribe(f"$O.{self._bucket}.C.{info.nuid}", stream=self._stream,
                                                ordered_consumer=True)
        try:
            while got < info.chunks:
                try:
                    msg = await subscription.next_msg(timeout=READ_STALL_SECONDS)
                except nats.errors.TimeoutError:
                    raise ObjectUnreadable(name, f"sent no chunk for {READ_STALL_SECONDS:g} s after "
                                                 f"{got} of {info.chunks}", gone=True) from None
                # In a thread: the sink may be a file (nats-py's quadratic concatenation of
                # chunks is avoided too: nats.py issue 703).
                await loop.run_in_executor(None, sink.write, msg.data)
                digest.update(msg.data)
                got += 1
                if msg.metadata.num_pending == 0 and got < info.chunks:
                    raise ObjectUnreadable(name, f"ended after {got} of its {info.chunks} chunks", gone=True)
        finally:
            with suppress(nats.errors.Error):
                await subscription.unsubscribe()
        check_digest(name, info, digest)

    async def _whole(self, name: str) -> ObjectInfo:
        """The object's info, once its chunks are known to be all there."""
        info = await self._info(name)
        if info.size and (held := await self._held(info.nuid)) != info.chunks:
            raise ObjectUnreadable(name, f"holds {held} of its {info.chunks} chunks: the rest are gone",
                                   gone=True)
        return info

    async def read_page(self, name: str, cursor: int, most: int) -> tuple[ObjectInfo, list[bytes], int]:
        """The object's info, and up to `most` of its chunks from stream sequence `cursor` on (0:
        its first), one request each, for a reader that pages through it: with the cursor where
        the next page starts, 0 after its last chunk. The reader checks the size and digest."""
        info = await (self._whole(name) if cursor == 0 else self._info(name))
        chunks, subject = [], f"$O.{self._bucket}.C.{info.nuid}"
        while info.size and len(chunks) < most:
            try:
                msg = await self._js.get_msg(self._stream, seq=max(1, cursor), subject=subject, next=True)
            except NotFoundError:
                if chunks or cursor:  # past its last chunk
                    return info, chunks, 0
                raise ObjectUnreadable(name, "has no chunks left", gone=True) from None
            chunks.append(msg.data or b"")
            cursor = msg.seq + 1
        return info, chunks, cursor if info.size else 0

    async def size(self, name: str) -> int:
        return (await self._info(name)).size

    async def transcript(self, record: JobRecord) -> Transcript:
        """The transcript of a completed job."""
        return decode(await self.read(record.transcript_object), Transcript)

    async def read_to(self, name: str, path: Path) -> None:
        with path.open("wb") as file:
            await self.read_into(name, file)

    async def headers(self, name: str) -> dict[str, str] | None:
        """The object's headers (first value of each), or None if there is no such object."""
        try:
            info = await self._info(name)
        except ObjectUnreadable:
            return None
        return {k: v[0] if isinstance(v, list) else v for k, v in (info.headers or {}).items()}

    async def exists(self, name: str) -> bool:
        return await self.headers(name) is not None

    async def delete(self, name: str) -> None:
        """Mark the object deleted: readers find it missing from now on."""
        try:
            info = await self._info(name)
        except ObjectUnreadable:
            return
        info.deleted, info.size, info.chunks, info.digest = True, 0, 0, ""
        info.mtime = datetime.now(timezone.utc).isoformat()
        await self._publish_meta(name, info)
