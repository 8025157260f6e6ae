"""Bad messages, dying processes and NATS-only clients: nothing is lost, nothing runs twice."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

import httpx
from nats.js.api import DeliverPolicy

from dalston.contracts import (
    DEADLETTER_STREAM,
    TERMINAL,
    DeadLetter,
    JobEvent,
    JobRequest,
    Task,
    Transcript,
    decode,
    encode,
)
from dalston.synthetic_speech import word_error_rate
from tests.stack import AUDIO, DIALOGUE_WORDS, job, submit, wait_for, wait_job, words

MODEL = "faster-whisper-tiny.en"


async def wait_running(stack, job_id, stage_key="transcribe-0") -> str:
    """The engine running the job's task `stage_key`, once it runs."""
    async def running():
        task = job(stack, job_id)["tasks"].get(stage_key)
        return task and task["status"] == "running" and task["engine"]
    return await wait_for(running, 60, 0.05)


async def job_events(bus, job_id) -> list[JobEvent]:
    events: list[JobEvent] = []
    subscription = await bus.js.subscribe(f"events.job.{job_id}", ordered_consumer=True,
                                          deliver_policy=DeliverPolicy.ALL)
    try:
        while True:
            events.append(decode((await subscription.next_msg(timeout=1)).data, JobEvent))
    except TimeoutError:
        return events
    finally:
        await subscription.unsubscribe()


async def dead_letters(bus, since_seq: int) -> list[DeadLetter]:
    info = await bus.js.stream_info(DEADLETTER_STREAM)
    letters = []
    for seq in range(since_seq + 1, info.state.last_seq + 1):
        letters.append(decode((await bus.js.get_msg(DEADLETTER_STREAM, seq)).data, DeadLetter))
    return letters


async def test_malformed_messages_are_dead_lettered_and_services_live_on(stack):
    bus = await stack.bus()
    try:
        before = (await bus.js.stream_info(DEADLETTER_STREAM)).state.last_seq
        await bus.js.publish("jobs.submit", b"\x00not json")
        await bus.js.publish("jobs.submit", b'{"model": "faster-whisper-tiny.en"}')  # no id
        # A model's queue is made by whoever publishes its tasks (the orchestrator does).
        for model in ("tiny.en", "no_such_model"):
            await bus.task_consumers.ensure("faster-whisper", model)
        await bus.js.publish("tasks.faster-whisper.tiny_en", b"[1, 2, 3]")
        await bus.js.publish("tasks.faster-whisper.no_such_model", b'{"id": 5}')

        async def four_letters():
            letters = await dead_letters(bus, before)
            return letters if len(letters) >= 4 else None
        letters = await four_letters() or await wait_for(four_letters, 30)
        job_reasons = [l.reason for l in letters if l.subject == "jobs.submit"]
        assert len(job_reasons) == 2 and all("not a valid JobRequest" in r for r in job_reasons)
        assert any("`id`" in r for r in job_reasons)
        task_letters = {l.subject: l for l in letters if l.subject.startswith("tasks.")}
        assert "not a valid Task" in task_letters["tasks.faster-whisper.tiny_en"].reason
        assert task_letters["tasks.faster-whisper.no_such_model"].payload == b'{"id": 5}'

        # Terminated, not retried: the work queues hold nothing of them.
        async def queues_empty():
            tasks = await bus.js.stream_info("TASKS")
            jobs = await bus.js.stream_info("JOBS")
            return tasks.state.messages == 0 and jobs.state.messages == 0
        await wait_for(queues_empty, 15)

        # A task of another runtime published on this runtime's subject fails cleanly.
        job_id = uuid.uuid4().hex
        wrong = Task(id=f"{job_id}-x-1", job_id=job_id, stage="transcribe", runtime="nemo",
                     runtime_model_id="nvidia/parakeet-tdt-1.1b", output="x")
        await bus.js.publish("tasks.faster-whisper.tiny_en", encode(wrong))
        await wait_for(queues_empty, 15)
    finally:
        await bus.close()
    for name in ("orchestrator", "fw-a", "fw-b"):
        assert stack.processes[name].poll() is None, f"{name} died"
    with open(AUDIO / "speaker1.wav", "rb") as audio:
        response = httpx.post(f"{stack.url}/v1/audio/transcriptions", files={"file": audio},
                              data={"model": MODEL, "response_format": "text"}, timeout=60)
    assert words(response.text) == words("That was hilarious, I can't believe you said that.")


async def test_a_killed_engine_loses_no_job(stack, long_audio):
    job_id = submit(stack, long_audio, MODEL)
    victim = await wait_running(stack, job_id)
    stack.processes[victim].send_signal(signal.SIGKILL)
    stack.processes.pop(victim).wait()
    try:
        record = await wait_job(stack, job_id)
        assert record["status"] == "completed", record
        survivor = record["tasks"]["transcribe-0"]["engine"]
        assert survivor != victim
        transcript = httpx.get(f"{stack.url}/v1/jobs/{job_id}/transcript").json()
        # The whole file's text, not a lost or doubled chunk (a word may differ where windows do).
        said = " ".join(words(transcript["text"])[:len(DIALOGUE_WORDS)])
        assert word_error_rate(" ".join(DIALOGUE_WORDS), said) <= 0.1, said
        bus = await stack.bus()
        try:
            statuses = [e.status for e in await job_events(bus, job_id)]
        finally:
            await bus.close()
        assert statuses.count("completed") == 1, statuses
    finally:
        stack.start_engine("faster-whisper", victim)


async def test_orchestrator_restart_mid_job(stack, long_audio):
    job_id = submit(stack, long_audio, MODEL)
    await wait_running(stack, job_id)
    stack.processes["orchestrator"].send_signal(signal.SIGKILL)
    stack.processes.pop("orchestrator").wait()
    time.sleep(1)  # the transcription finishes while nobody orchestrates
    stack.start("orchestrator", "orchestrator")
    record = await wait_job(stack, job_id)
    assert record["status"] == "completed", record
    assert record["tasks"]["merge"]["status"] == "completed"


async def test_a_job_published_straight_to_nats(stack):
    """What the README shows: no gateway, just NATS."""
    bus = await stack.bus()
    try:
        job_id = uuid.uuid4().hex
        ended = asyncio.get_running_loop().create_future()

        async def on_event(msg):
            event = decode(msg.data, JobEvent)
            if event.status in TERMINAL and not ended.done():
                ended.set_result(event)

        await bus.nc.subscribe(f"events.job.{job_id}", cb=on_event)
        request = JobRequest(id=job_id, model=MODEL, audio=(AUDIO / "dialogue.wav").read_bytes())
        await bus.js.publish("jobs.submit", encode(request))
        event = await asyncio.wait_for(ended, 60)
        assert event.status == "completed"
        transcript = decode(await bus.artifacts.read(event.transcript_object), Transcript)
        assert words(transcript.text) == DIALOGUE_WORDS
    finally:
        await bus.close()


async def test_unknown_model_over_nats_fails_the_job_with_the_reason(stack):
    bus = await stack.bus()
    try:
        job_id = uuid.uuid4().hex
        await bus.js.publish("jobs.submit", encode(JobRequest(
            id=job_id, model="nope", audio=(AUDIO / "speaker1.wav").read_bytes())))
        record = await wait_job(stack, job_id, 30)
        assert record["status"] == "failed"
        assert record["failure"]["code"] == "unknown_model"
        assert "faster-whisper-tiny.en" in record["failure"]["message"]
    finally:
        await bus.close()
