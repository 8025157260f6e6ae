"""The per-owner index a page of `GET /v1/jobs` is cut from, in-process (the listing over HTTP is
tested in test_auth.py; bench/job_list.py times it with 10,000 jobs against a scan)."""

from __future__ import annotations

import pytest

from dalston.contracts import JobRecord
from dalston.services.intake.job_index import JobIndex, UnknownCursor


def record(job_id: str, owner: str | None, created_at: float) -> JobRecord:
    return JobRecord(id=job_id, model="m", runtime="r", runtime_model_id="m", audio_object="a",
                     owner=owner, created_at=created_at)


def filled(jobs: int) -> JobIndex:
    """`jobs` jobs of alice and bob in turn, j0 the oldest, seen in no particular order."""
    index = JobIndex()
    for n in sorted(range(jobs), key=lambda n: (n * 7919) % jobs):
        index.observe(f"j{n}", record(f"j{n}", "alice" if n % 2 else "bob", float(n)))
    return index


def test_a_page_is_the_newest_jobs_of_the_owner_and_the_next_one_follows_it():
    index = filled(10)
    assert index.newest("alice", 2) == ["j9", "j7"]
    assert index.newest("alice", 2, after="j7") == ["j5", "j3"]
    assert index.newest("alice", 5, after="j3") == ["j1"]
    assert index.newest("alice", 5, after="j1") == []
    assert index.newest(None, 3) == ["j9", "j8", "j7"]  # an admin sees everyone's
    assert index.newest("nobody", 3) == []


def test_a_cursor_of_another_owners_job_or_an_unknown_one_is_refused():
    index = filled(10)
    for cursor in ("j8", "no-such-job"):
        with pytest.raises(UnknownCursor):
            index.newest("alice", 2, after=cursor)
    assert index.newest(None, 1, after="j8") == ["j7"]


def test_changes_to_a_record_keep_one_entry_and_an_expired_job_leaves():
    index = filled(4)
    index.observe("j3", record("j3", "alice", 3.0))  # its next status
    assert index.newest("alice", 10) == ["j3", "j1"] and len(index) == 4
    index.observe("j3", None)
    index.observe("j1", None)
    index.observe("never-seen", None)
    assert index.newest("alice", 10) == [] and index.newest(None, 10) == ["j2", "j0"]
    assert "alice" not in index._by_owner


def test_ten_thousand_jobs_give_a_page_without_a_scan():
    index = filled(10_000)
    page = index.newest("bob", 50, after="j9000")
    assert page == [f"j{n}" for n in range(8998, 8898, -2)]
