"""A job record with one task running, its input of the test's choosing: what the orchestrator's
task objects answer for (dalston/services/task_objects.py), for tests that give engines tasks
straight on NATS."""

from __future__ import annotations

from dalston import dag
from dalston.contracts import JobRecord, Task, TaskRecord, now


def running_task(job_id: str, audio: str, key: str = "transcribe-0", runtime: str = "faster-whisper",
                 **fields) -> tuple[JobRecord, Task]:
    """The record (prepare done, its one output `audio`; the one-channel task `key` running) and
    the task message its engine is given."""
    stage = key.split("-", 1)[0]
    record = JobRecord(
        id=job_id, model="faster-whisper-tiny.en", runtime="faster-whisper", runtime_model_id="tiny.en",
        audio_object=f"jobs/{job_id}/audio", status="running", created_at=now(), channels=1, chunks=[0.0],
        tasks={"prepare": TaskRecord(id=dag.task_id(job_id, "prepare", 1), stage="prepare", runtime="audio-prepare",
                                     attempt=1, grant=dag.new_grant(), status="completed", outputs=[audio]),
               key: TaskRecord(id=dag.task_id(job_id, key, 1), stage=stage, runtime=runtime, channel=0,
                               chunk=0 if stage == "transcribe" else None, attempt=1, grant=dag.new_grant(),
                               status="running")},
        **fields)
    return record, dag.task_message(record, key)
