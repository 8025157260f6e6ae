"""Reading an object whose chunks are gone, on a real nats-server: never a hang. The bus raises
ObjectUnreadable at once, the API answers 410, an engine fails the task with `input_gone`, and
the webhook service dead-letters the event instead of retrying it forever."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import httpx
import pytest

from dalston.bus.buckets import ObjectUnreadable
from dalston.bus.connection import Bus, connect
from dalston.config import load_settings
from dalston.contracts import DEADLETTER_STREAM, JOB_EVENT_SUBJECT, JobEvent, JobRecord, now
from dalston.sdk.actor import TaskContext, TaskFailed
from dalston.sdk.objects import TaskObjects as EngineObjects
from dalston.services.task_objects import TaskObjects
from tests.stack import TestStack
from tests.task_records import running_task
from tests.webhook_receiver import Receiver

# Three chunks of 128 KiB and a bit.
DATA = bytes(range(256)) * (3 * 512 + 7)
# Far longer than a read may take: the test fails, rather than hangs, if one does hang.
PATIENCE = 20.0


async def break_object(bus: Bus, name: str, how: str) -> None:
    """Store an object at `name` and take from it what `how` says."""
    await bus.artifacts.put(name, DATA)
    info = await (await bus.js.object_store("artifacts")).get_info(name)
    chunks = f"$O.artifacts.C.{info.nuid}"
    if how == "every chunk purged":
        await bus.js.purge_stream("OBJ_artifacts", subject=chunks)
    elif how == "its last chunk deleted":
        await bus.js.delete_msg("OBJ_artifacts", (await bus.js.get_last_msg("OBJ_artifacts", chunks)).seq)
    elif how == "deleted":
        await bus.artifacts.delete(name)


@pytest.fixture
async def bus(nats_env):
    bus = await connect(load_settings(nats_env), name="test")
    yield bus
    await bus.close()


@pytest.mark.parametrize("how", ["every chunk purged", "its last chunk deleted"])
async def test_an_object_with_chunks_gone_is_unreadable_at_once(bus, how):
    await break_object(bus, "jobs/j/transcript", how)
    with pytest.raises(ObjectUnreadable, match="chunks") as raised:
        await asyncio.wait_for(bus.artifacts.read("jobs/j/transcript"), PATIENCE)
    assert raised.value.gone


async def test_a_deleted_or_missing_object_is_unreadable(bus):
    await break_object(bus, "jobs/j/audio", "deleted")
    assert not await bus.artifacts.exists("jobs/j/audio")
    for name in ("jobs/j/audio", "jobs/never/audio"):
        with pytest.raises(ObjectUnreadable, match="does not exist") as raised:
            await asyncio.wait_for(bus.artifacts.read(name), PATIENCE)
        assert not raised.value.gone


async def test_a_whole_object_reads_back_after_a_rewrite(bus):
    await bus.artifacts.put("jobs/j/out", b"first")
    await bus.artifacts.put("jobs/j/out", DATA)
    assert await bus.artifacts.read("jobs/j/out") == DATA
    assert await bus.artifacts.size("jobs/j/out") == len(DATA)


async def test_an_engine_fails_a_task_whose_input_is_gone(bus):
    """Through the orchestrator's task objects, as engines read."""
    await break_object(bus, "jobs/j/prepare/ch0/00000.f32", "every chunk purged")
    record, task = running_task("j", "jobs/j/prepare/ch0/00000.f32")
    await bus.jobs.create(record)
    objects = TaskObjects(bus)
    await objects.start()
    try:
        ctx = TaskContext(bus=bus, settings=bus.settings, objects=EngineObjects(bus, task))
        with pytest.raises(TaskFailed) as raised:
            await asyncio.wait_for(ctx.read_audio("jobs/j/prepare/ch0/00000.f32"), PATIENCE)
        assert raised.value.code == "input_gone" and "chunks" in raised.value.message
    finally:
        await objects.stop()


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """A gateway and a webhook service on their own nats-server: no engine is needed."""
    secret = "whsec_" + base64.b64encode(b"object-reads-test-webhook-secret").decode()
    system = TestStack(tmp_path_factory.mktemp("reads"), DALSTON_WEBHOOK_SECRET=secret,
                       DALSTON_WEBHOOK_ALLOW_PRIVATE="true")
    system.start_nats()
    system.start("gateway", "gateway")
    system.start("webhooks", "webhooks")
    system.wait_http()
    yield system
    system.close()


async def completed_job(bus: Bus, job_id: str, how: str) -> JobRecord:
    transcript = f"jobs/{job_id}/transcript"
    await break_object(bus, transcript, how)
    record = JobRecord(id=job_id, model="faster-whisper-tiny.en", runtime="faster-whisper",
                       runtime_model_id="tiny.en", audio_object=f"jobs/{job_id}/audio",
                       status="completed", transcript_object=transcript, created_at=now())
    assert await bus.jobs.create(record)
    return record


@pytest.mark.parametrize("how", ["every chunk purged", "its last chunk deleted", "deleted"])
async def test_the_api_answers_410_for_a_transcript_that_is_gone(services, how):
    bus = await services.bus()
    job_id = f"{abs(hash(how)):032x}"[:32]
    try:
        await completed_job(bus, job_id, how)
    finally:
        await bus.close()
    async with httpx.AsyncClient(base_url=services.url, timeout=PATIENCE) as client:
        for path in (f"/v1/jobs/{job_id}/transcript", f"/v1/speech-to-text/transcripts/{job_id}"):
            response = await client.get(path)
            assert response.status_code == 410, (path, response.text)
            assert "no longer available" in response.text
        assert (await client.get("/readyz")).status_code == 200  # and it keeps serving


async def test_the_webhook_service_dead_letters_an_event_whose_transcript_is_gone(services):
    bus = await services.bus()
    receiver = Receiver()
    job_id = "0" * 31 + "w"
    try:
        await completed_job(bus, job_id, "every chunk purged")
        await bus.publish(JOB_EVENT_SUBJECT.format(job_id=job_id), JobEvent(
            job_id=job_id, status="completed", transcript_object=f"jobs/{job_id}/transcript",
            at=now(), webhook_url=receiver.url))
        deadline = time.monotonic() + PATIENCE
        while not (letters := await bus.messages_by_subject(DEADLETTER_STREAM, "deadletter.>")):
            assert time.monotonic() < deadline, services.log_text("webhooks")
            await asyncio.sleep(0.1)
        letter = json.loads((await bus.js.get_last_msg(DEADLETTER_STREAM, next(iter(letters)))).data)
        assert "transcript is unreadable" in json.dumps(letter)
        webhooks = await bus.js.consumer_info("EVENTS", "webhooks")
        assert webhooks.num_ack_pending == 0 and webhooks.num_pending == 0
        assert not receiver.accepted()
    finally:
        receiver.close()
        await bus.close()
