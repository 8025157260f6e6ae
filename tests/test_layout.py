"""The JetStream layout on a real nats-server: job records and artifacts expire after the
retention, together, and a changed retention reaches buckets made before it."""

from __future__ import annotations

import asyncio

from dalston.bus.connection import connect
from dalston.catalog import Catalog
from dalston.config import load_settings
from dalston.contracts import TASKS_STREAM, JobRecord, task_consumer
from dalston.services.layout import apply_layout


async def max_ages(nats_env: dict[str, str], retention_hours: float) -> dict[str, float]:
    """Each bucket's max age once a process under this retention has started."""
    bus = await connect(load_settings({**nats_env, "DALSTON_RETENTION_HOURS": str(retention_hours)}),
                        name="test")
    try:
        streams = ("KV_jobs", "OBJ_artifacts", "KV_apikeys")
        return {s: (await bus.js.stream_info(s)).config.max_age or 0.0 for s in streams}
    finally:
        await bus.close()


async def test_retention_applies_to_job_records_and_artifacts_only(nats_env):
    assert await max_ages(nats_env, 2) == {"KV_jobs": 7200, "OBJ_artifacts": 7200, "KV_apikeys": 0}
    # A restart under a new retention moves the existing buckets to it.
    assert await max_ages(nats_env, 1) == {"KV_jobs": 3600, "OBJ_artifacts": 3600, "KV_apikeys": 0}


async def test_a_job_record_and_its_audio_expire(nats_env):
    # One second of retention, so the test sees the server drop both.
    settings = load_settings({**nats_env, "DALSTON_RETENTION_HOURS": str(1 / 3600)})
    bus = await connect(settings, name="test")
    try:
        record = JobRecord(id="job-1", model="m", runtime="r", runtime_model_id="r",
                           audio_object="jobs/job-1/audio")
        assert await bus.jobs.create(record)
        await bus.artifacts.put("jobs/job-1/audio", b"RIFF")
        assert (await bus.jobs.get("job-1")).id == "job-1"
        assert await bus.artifacts.exists("jobs/job-1/audio")
        await asyncio.sleep(2.5)
        assert await bus.jobs.get("job-1") is None
        assert not await bus.artifacts.exists("jobs/job-1/audio")
    finally:
        await bus.close()


async def test_the_admin_step_makes_a_task_queue_for_every_catalog_model(nats_env):
    """Only admin may create consumers: `dalston up` and compose's `layout` service make every
    task queue a published task can land in, so no service needs to create one."""
    settings = load_settings(nats_env)
    await apply_layout(settings)
    bus = await connect(settings, name="test")
    try:
        names = {c.name for c in await bus.js.consumers_info(TASKS_STREAM)}
        catalog = Catalog.load()
        for model in catalog.models.values():
            assert task_consumer(model.runtime, model.runtime_model_id) in names, model.id
        for runtime in ("audio-prepare", "merge"):
            assert task_consumer(runtime, None) in names
    finally:
        await bus.close()
