"""The job DAG as pure functions: no NATS, milliseconds. (The order in which the orchestrator
commits and publishes is tested on the in-memory bus: test_inprocess.py.)"""

from __future__ import annotations

import msgspec

from dalston import dag
from dalston.contracts import DiarizeOptions, Failure, JobRecord, ModelRef, TaskEvent, TranscribeOptions, decode


def new_job() -> JobRecord:
    job = JobRecord(id="j1", model="faster-whisper-tiny.en", runtime="faster-whisper",
                    runtime_model_id="tiny.en", audio_object="jobs/j1/audio")
    dag.start(job)
    return job


def report(job: JobRecord, key: str, kind: str, **fields) -> bool:
    event = TaskEvent(task_id=job.tasks[key].id, job_id=job.id, kind=kind, engine="e", **fields)
    return dag.apply_event(job, event, max_attempts=3)


def test_a_job_grows_from_prepare_to_one_transcribe_per_channel_to_merge():
    job = new_job()
    assert dag.advance(job) == ["prepare"]
    assert dag.advance(job) == []  # queued once
    assert report(job, "prepare", "completed", outputs=["a", "b"], channels=2, duration=3.0)
    assert dag.advance(job) == ["transcribe-0", "transcribe-1"]
    assert job.status == "running" and job.duration == 3.0
    assert dag.task_message(job, "transcribe-1").inputs == ["b"]
    assert report(job, "transcribe-0", "completed", outputs=["t0"], language="en")
    assert dag.advance(job) == []  # merge waits for every channel
    assert report(job, "transcribe-1", "completed", outputs=["t1"])
    assert dag.advance(job) == ["merge"]
    assert dag.task_message(job, "merge").inputs == ["t0", "t1"]
    assert report(job, "merge", "completed", outputs=["jobs/j1/transcript.json"])
    assert dag.advance(job) == [] and job.status == "completed"
    assert job.transcript_object == "jobs/j1/transcript.json" and job.language == "en"


def test_a_transient_failure_retries_under_a_new_id_and_stale_reports_are_ignored():
    job = new_job()
    dag.advance(job)
    first = job.tasks["prepare"].id
    assert report(job, "prepare", "failed", failure=Failure(code="internal", message="x", retryable=True))
    assert dag.advance(job) == ["prepare"]
    assert job.tasks["prepare"].id != first and job.tasks["prepare"].attempt == 2
    stale = TaskEvent(task_id=first, job_id="j1", kind="completed", engine="e")
    assert not dag.apply_event(job, stale, max_attempts=3)
    assert not dag.is_early(job, stale)


def test_a_user_error_fails_the_job_and_cancels_the_rest():
    job = new_job()
    dag.advance(job)
    assert report(job, "prepare", "failed", failure=Failure(code="invalid_audio", message="not audio"))
    dag.advance(job)
    assert job.status == "failed" and job.failure.code == "invalid_audio"


def test_reports_on_tasks_not_listed_yet_are_early():
    job = new_job()
    dag.advance(job)
    later_attempt = TaskEvent(task_id="j1-prepare-2", job_id="j1", kind="started", engine="e")
    later_stage = TaskEvent(task_id="j1-transcribe-0-1", job_id="j1", kind="started", engine="e")
    assert dag.is_early(job, later_attempt) and dag.is_early(job, later_stage)
    assert not dag.apply_event(job, later_stage, max_attempts=3)
    listed = TaskEvent(task_id="j1-prepare-1", job_id="j1", kind="started", engine="e")
    assert not dag.is_early(job, listed)


def test_a_report_must_present_its_tasks_grant_and_name_only_its_jobs_objects():
    job = JobRecord(id="j", model="m", runtime="r", runtime_model_id="r", audio_object="jobs/j/audio")
    dag.start(job)
    task = job.tasks["prepare"]
    assert len(task.grant) == 32 and dag.task_message(job, "prepare").grant == task.grant

    def report(grant: str, outputs=("jobs/j/prepared/ch0/00000.f32",), task_id=task.id) -> TaskEvent:
        return TaskEvent(task_id=task_id, job_id="j", kind="completed", engine="e", outputs=list(outputs),
                         grant=grant)

    assert dag.refusal(job, report(task.grant)) is None
    assert "grant" in dag.refusal(job, report(""))
    assert "grant" in dag.refusal(job, report("f" * 32))
    assert "outside job j" in dag.refusal(job, report(task.grant, ["jobs/other/transcript.json"]))
    assert dag.refusal(job, report("", task_id="j-prepare-9")) is None  # not listed: stale or early


def test_a_retried_task_gets_a_new_grant():
    job = JobRecord(id="j", model="m", runtime="r", runtime_model_id="r", audio_object="jobs/j/audio")
    dag.start(job)
    first = job.tasks["prepare"].grant
    dag.apply_event(job, TaskEvent(task_id=job.tasks["prepare"].id, job_id="j", kind="failed", engine="e",
                                   failure=Failure(code="internal", message="x", retryable=True)), 3)
    again = job.tasks["prepare"]
    assert again.attempt == 2 and again.grant and again.grant != first
    assert not dag.presents_grant(job, again.id, first)


def run_job(job: JobRecord) -> list[list[str]]:
    """Drive a job to its end, every ready task completing at once: the waves of tasks."""
    waves = []
    while ready := dag.advance(job):
        waves.append(ready)
        for key in ready:
            fields = {"channels": 1, "duration": 2.0} if key == "prepare" else {}
            report(job, key, "completed", outputs=[dag.task_message(job, key).output], **fields)
    return waves


def test_a_redacted_job_redacts_the_merged_transcript_last_and_its_output_is_the_transcript():
    job = new_job()
    job.options = TranscribeOptions(redact="pii")
    assert run_job(job) == [["prepare"], ["transcribe-0"], ["merge"], ["redact"]]
    assert dag.task_message(job, "redact").inputs == ["jobs/j1/transcript.json"]
    assert job.status == "completed" and job.transcript_object == "jobs/j1/transcript-redact.json"


def test_a_diarized_redacted_job_merges_after_both_audio_stages():
    job = new_job()
    job.options = TranscribeOptions(redact="pii", diarize=DiarizeOptions())
    job.models = {"diarize": ModelRef(model="ge2e", runtime="diarize", runtime_model_id="ge2e")}
    assert run_job(job) == [["prepare"], ["transcribe-0", "diarize-0"], ["merge"], ["redact"]]
    merge = dag.task_message(job, "merge")
    assert merge.inputs == ["jobs/j1/transcribe/ch0.json"] and merge.speakers == ["jobs/j1/diarize/ch0.json"]
    assert dag.task_message(job, "diarize-0").runtime_model_id == "ge2e"
    assert dag.task_message(job, "transcribe-0").options.word_timestamps  # speakers go onto words
    assert dag.runtimes(job) == ["audio-prepare", "faster-whisper", "diarize", "merge", "redact"]


def test_a_plain_job_ends_at_merge():
    job = new_job()
    assert run_job(job) == [["prepare"], ["transcribe-0"], ["merge"]]
    assert "redact" not in job.tasks and job.transcript_object == "jobs/j1/transcript.json"


def test_a_record_stored_before_the_stage_table_keeps_its_diarizer():
    old = {"id": "j", "model": "m", "runtime": "r", "runtime_model_id": "r", "audio_object": "jobs/j/audio",
           "diarizer": {"model": "ge2e", "runtime": "diarize", "runtime_model_id": "ge2e"}}
    job = decode(msgspec.json.encode(old), JobRecord)
    assert job.models == {"diarize": ModelRef(model="ge2e", runtime="diarize", runtime_model_id="ge2e")}
    assert "diarize" in dag.runtimes(job) and job.diarizer is None
