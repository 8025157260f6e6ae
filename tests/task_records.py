"""A job record whose transcribe task is running, with an input of the test's choosing: what the
orchestrator's task objects answer for (dalston/services/task_objects.py)."""

from __future__ import annotations

from dalston import dag
from dalston.contracts import JobRecord, Task, TaskRecord, now


def running_transcribe(job_id: str, audio: str) -> tuple[JobRecord, Task]:
    """The record (prepare done, its one output `audio`; transcribe running) and the task message
    its engine was given."""
    record = JobRecord(
        id=job_id, model="faster-whisper-tiny.en", runtime="faster-whisper", runtime_model_id="tiny.en",
        audio_object=f"jobs/{job_id}/audio", status="running", created_at=now(), channels=1, chunks=[0.0],
        tasks={"prepare": TaskRecord(id=dag.task_id(job_id, "prepare", 1), stage="prepare", runtime="audio-prepare",
                                     attempt=1, grant=dag.new_grant(), status="completed", outputs=[audio]),
               "transcribe-0": TaskRecord(id=dag.task_id(job_id, "transcribe-0", 1), stage="transcribe",
                                          runtime="faster-whisper", channel=0, chunk=0, attempt=1,
                                          grant=dag.new_grant(), status="running")})
    return record, dag.task_message(record, "transcribe-0")
