"""The JetStream layout on a real nats-server: job records and artifacts expire after the
retention, together, and a changed retention reaches buckets made before it; a restarted NATS
gets its memory stream back."""

from __future__ import annotations

import asyncio
import contextlib

from dalston.bus.connection import connect
from dalston.bus.credentials import home_passwords, service_environment
from dalston.bus.server import EmbeddedNats
from dalston.catalog import Catalog
from dalston.config import load_settings
from dalston.contracts import HEARTBEATS_STREAM, TASKS_STREAM, JobRecord, task_consumer
from dalston.loopback import free_port
from dalston.services.layout import LayoutKeeper, apply_layout
from tests.stack import wait_for


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


async def test_a_restarted_nats_gets_its_memory_stream_back(tmp_path):
    """HEARTBEATS lives in memory, so a single NATS restarted on its store comes back without it;
    the layout keeper (compose's `layout` service, as admin) puts it back, and those who follow
    the beats follow the new stream."""
    passwords = home_passwords(tmp_path / "home")
    server = EmbeddedNats(tmp_path / "nats", free_port(), passwords)
    server.start()
    keeper = LayoutKeeper(load_settings({"DALSTON_NATS_URL": server.url, **service_environment(passwords, "admin")}))
    keeping = asyncio.create_task(keeper.run())
    bus = await connect(load_settings({"DALSTON_NATS_URL": server.url, **service_environment(passwords, "admin")}),
                        name="test")

    async def heartbeats_there() -> bool:
        try:
            await bus.js.stream_info(HEARTBEATS_STREAM)
            return True
        except Exception:  # noqa: BLE001 - gone, or NATS still restarting
            return False

    heard: list[bytes | None] = []

    async def on_beat(subject: str, data: bytes | None) -> None:
        heard.append(data)

    follower = await bus.follow_last_per_subject(HEARTBEATS_STREAM, "heartbeat.>", on_beat)
    try:
        assert await heartbeats_there()
        # Many beats before: the old stream's sequence is far ahead of the new one's.
        for _ in range(100):
            await bus.js.publish("heartbeat.test.before", b"1")
        await wait_for(lambda: asyncio.sleep(0, b"1" in heard))
        server.stop()
        server.start()
        await wait_for(heartbeats_there)
        # Its followers follow the new stream: a beat published after the restart is heard.
        async def after() -> bool:
            with contextlib.suppress(Exception):
                await bus.js.publish("heartbeat.test.after", b"2")
            return b"2" in heard
        await wait_for(after, timeout=30, interval=1.0)
    finally:
        await follower.unsubscribe()
        await bus.close()
        keeper.stop()
        await keeping
        server.stop()
