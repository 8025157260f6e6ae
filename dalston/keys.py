"""API keys of the gateway.

A key is `dsk_` and 32 random bytes, shown once when created. Only its SHA-256 is kept, as the
key of its record in the `apikeys` KV bucket, so checking a key is one lookup. A salted slow
hash would buy nothing here: the keys are random, not passwords a dictionary could guess.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import Annotated, Literal

import msgspec

from dalston.bus.buckets import Bucket
from dalston.bus.connection import Bus
from dalston.contracts import now

BUCKET = "apikeys"
PREFIX = "dsk_"
Role = Literal["admin", "user"]
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


class KeyNameError(ValueError):
    """A key name that is taken, unknown or malformed; the text says which."""


class ApiKey(msgspec.Struct, kw_only=True):
    """A key's record: never the key itself."""

    name: str
    role: Role
    digest: str
    created_at: float
    # The key's share: jobs queued or running at once (None: half of DALSTON_MAX_QUEUED_JOBS,
    # the gateway's admission), and live sessions at once (None: half of the session slots).
    max_jobs: Annotated[int, msgspec.Meta(ge=0)] | None = None
    max_sessions: Annotated[int, msgspec.Meta(ge=0)] | None = None


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket

    @classmethod
    async def open(cls, bus: Bus) -> KeyStore:
        return cls(await bus.bucket(BUCKET))

    async def list(self) -> list[ApiKey]:
        records = [await self._record(name) for name in await self.bucket.keys()]
        return sorted((r for r in records if r), key=lambda r: r.created_at)

    async def create(self, name: str, role: Role = "user", *, max_jobs: int | None = None,
                     max_sessions: int | None = None) -> str:
        """A new key for `name`; the only time the key itself is seen. `max_jobs` and
        `max_sessions` set its share (None: the default, half)."""
        if not _NAME.match(name):
            raise KeyNameError(f"a key name is 1-64 letters, digits or _.@- (not {name!r})")
        if any(record.name == name for record in await self.list()):
            raise KeyNameError(f"a key named {name!r} exists; revoke it first")
        key = PREFIX + secrets.token_urlsafe(32)
        for limit, option in ((max_jobs, "max_jobs"), (max_sessions, "max_sessions")):
            if limit is not None and limit < 0:
                raise KeyNameError(f"{option} must be 0 or more (not {limit})")
        record = ApiKey(name=name, role=role, digest=digest(key), created_at=now(), max_jobs=max_jobs,
                        max_sessions=max_sessions)
        await self.bucket.create(record.digest, msgspec.json.encode(record))
        return key

    async def revoke(self, name: str) -> None:
        for record in await self.list():
            if record.name == name:
                await self.bucket.purge(record.digest)
                return
        raise KeyNameError(f"no key named {name!r}")

    async def verify(self, key: str) -> ApiKey | None:
        """The record of a valid key, else None."""
        if not key.startswith(PREFIX):
            return None
        wanted = digest(key)
        record = await self._record(wanted)
        # Lookup time can only tell about the digest, never the key; the record must still
        # hold that very digest (compared in constant time), not merely be filed under it.
        if record is None or not hmac.compare_digest(record.digest, wanted):
            return None
        return record

    async def _record(self, key_digest: str) -> ApiKey | None:
        found = await self.bucket.get(key_digest)
        return None if found is None else msgspec.json.decode(found[0], type=ApiKey)
