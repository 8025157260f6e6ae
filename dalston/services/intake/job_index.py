"""Which jobs there are, per owner, oldest to newest: the index a page of `GET /v1/jobs` is cut
from, so listing reads the records of one page, never every job of a key.

It is kept from the records the admission follows (the `jobs` bucket replayed, then each
change, pushed by NATS): a job is indexed once recorded, and dropped when its record expires.
Each owner's jobs, and everyone's (what an admin key sees), are lists sorted by (created_at,
id): a new job goes at the end, and a page is a slice.
"""

from __future__ import annotations

import bisect

from dalston.contracts import JobRecord

Entry = tuple[float, str]  # (created_at, job id)


class UnknownCursor(LookupError):
    """A page asked for jobs after one that is not listed (another owner's, or expired)."""


class JobIndex:
    def __init__(self) -> None:
        self._everyone: list[Entry] = []
        self._by_owner: dict[str, list[Entry]] = {}
        self._entries: dict[str, tuple[str | None, Entry]] = {}  # job id -> its owner and entry

    def __len__(self) -> int:
        return len(self._entries)

    def observe(self, job_id: str, record: JobRecord | None) -> None:
        """A record seen in the bucket (None: it expired)."""
        if record is None:
            self._drop(job_id)
        elif job_id not in self._entries:
            entry = (record.created_at, job_id)
            self._entries[job_id] = (record.owner, entry)
            bisect.insort(self._everyone, entry)
            if record.owner is not None:
                bisect.insort(self._by_owner.setdefault(record.owner, []), entry)

    def _drop(self, job_id: str) -> None:
        found = self._entries.pop(job_id, None)
        if found is None:
            return
        owner, entry = found
        lists = [self._everyone] + ([self._by_owner[owner]] if owner is not None else [])
        for entries in lists:
            at = bisect.bisect_left(entries, entry)
            if at < len(entries) and entries[at] == entry:
                del entries[at]
        if owner is not None and not self._by_owner[owner]:
            del self._by_owner[owner]

    def newest(self, owner: str | None, limit: int, after: str | None = None) -> list[str]:
        """Up to `limit` ids of `owner`'s jobs (None: everyone's), newest first, starting
        after the job `after` (the last of the previous page); UnknownCursor if that is not
        among them."""
        entries = self._everyone if owner is None else self._by_owner.get(owner, [])
        end = len(entries)
        if after is not None:
            found = self._entries.get(after)
            if found is None or (owner is not None and found[0] != owner):
                raise UnknownCursor(after)
            end = bisect.bisect_left(entries, found[1])
        return [job_id for _, job_id in reversed(entries[max(0, end - limit):end])]
