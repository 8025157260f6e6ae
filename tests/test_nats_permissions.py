"""nats/accounts.conf, as compose runs it: each service's NATS user can do its job, and is refused
where it would overstep into another service's."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import sys
import time

import httpx
import nats.errors
import pytest
import yaml
from standardwebhooks import Webhook

import nats
from dalston.bus.connection import connect
from dalston.bus.credentials import inbox_prefix
from dalston.config import load_settings
from dalston.contracts import HEARTBEAT_SUBJECT, DeadLetter, Heartbeat, TaskEvent, decode, encode
from dalston.services.layout import apply_layout
from tests.nats_nodes import NATS_DIR, NatsNode
from tests.stack import AUDIO, DIALOGUE_WORDS, TestStack, free_port, wait_for, wait_ok, words
from tests.webhook_receiver import Receiver

USERS = ("admin", "orchestrator", "gateway", "engine", "webhooks")
PASSWORDS = {user: f"pw-{user}-7f3a" for user in USERS}


def credentials(user: str) -> dict[str, str]:
    return {"DALSTON_NATS_USER": user, "DALSTON_NATS_PASSWORD": PASSWORDS[user]}


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    """nats-server with compose's config, and a TestStack whose default user is admin."""
    root = tmp_path_factory.mktemp("locked")
    node = NatsNode(root, "nats", NATS_DIR / "compose.conf",
                    {f"DALSTON_NATS_{u.upper()}_PASSWORD": p for u, p in PASSWORDS.items()})
    node.start()
    node.wait_healthy()
    system = TestStack(root / "stack", DALSTON_NATS_URL=node.url, **credentials("admin"))
    asyncio.run(apply_layout(system.settings))  # the admin step of `dalston up` and compose
    yield system
    system.close()
    node.stop()


async def connect_as(system: TestStack, user: str, errors: list[str]) -> nats.aio.client.Client:
    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    return await nats.connect(system.env["DALSTON_NATS_URL"], user=user, password=PASSWORDS[user],
                              inbox_prefix=inbox_prefix(user), error_cb=on_error, allow_reconnect=False)


async def until_error(errors: list[str], timeout: float = 3.0) -> str:
    deadline = time.monotonic() + timeout
    while not errors and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return " ".join(errors)


# (user, publish or subscribe, subject, what it would let the user do)
REFUSED = [
    ("gateway", "publish", "tasks.faster-whisper.base", "queue a task past the orchestrator"),
    ("gateway", "publish", "$JS.API.CONSUMER.MSG.NEXT.TASKS.tasks-faster-whisper-base", "take a task"),
    ("gateway", "subscribe", "tasks.>", "see every task"),
    ("gateway", "publish", "$KV.jobs.some-job", "rewrite a job record"),
    ("gateway", "publish", "$KV.apikeys.some-digest", "mint itself an API key"),
    ("gateway", "publish", "$JS.API.STREAM.DELETE.JOBS", "drop every queued job"),
    ("engine", "publish", "jobs.submit", "submit jobs"),
    ("engine", "publish", "$KV.jobs.some-job", "rewrite a job record"),
    ("engine", "publish", "$KV.apikeys.some-digest", "mint an API key"),
    ("engine", "publish", "$JS.API.STREAM.PURGE.TASKS", "empty the task queue"),
    ("engine", "publish", "events.job.some-job", "announce a job done"),
    ("gateway", "publish", "transcript.some-job", "forge a job's streamed text"),
    # Enrolled voices are the gateway's: a job carries the embeddings of its own known speakers.
    ("engine", "publish", "$JS.API.DIRECT.GET.KV_voices.$KV.voices.some-voice", "read any key's voices"),
    ("engine", "publish", "$JS.API.CONSUMER.CREATE.KV_voices", "list every key's voices"),
    ("engine", "publish", "$KV.voices.some-voice", "enroll or overwrite a voice"),
    ("engine", "publish", "voices.embed.diarize", "ask for embeddings as if it were the gateway"),
    ("orchestrator", "publish", "$JS.API.DIRECT.GET.KV_voices.$KV.voices.some-voice", "read voices"),
    ("webhooks", "publish", "$JS.API.DIRECT.GET.KV_voices.$KV.voices.some-voice", "read voices"),
    ("gateway", "subscribe", "voices.embed.*", "answer embed requests in an engine's place"),
    ("orchestrator", "publish", "$KV.apikeys.some-digest", "mint an API key"),
    ("webhooks", "publish", "jobs.submit", "submit jobs"),
    ("webhooks", "publish", "events.job.some-job", "announce a job done"),
    ("webhooks", "publish", "$KV.jobs.some-job", "rewrite a job record"),
    ("webhooks", "publish", "$O.artifacts.jobs.some-job.transcript", "rewrite a transcript"),
    ("webhooks", "publish", "$JS.API.CONSUMER.MSG.NEXT.TASKS.tasks-faster-whisper-base", "take a task"),
    ("webhooks", "publish", "$JS.API.CONSUMER.MSG.NEXT.EVENTS.orchestrator-events", "take the orchestrator's events"),
    ("webhooks", "publish", "$JS.API.STREAM.PURGE.EVENTS", "drop every event"),
    ("webhooks", "subscribe", "events.>", "read every job's events live"),
    # Each user's replies (JetStream deliveries, KV and object reads) go to its own inboxes.
    ("engine", "subscribe", "_INBOX.>", "read every reply of every user"),
    ("engine", "subscribe", "_INBOX_gateway.>", "read the keys, records and transcripts the gateway reads"),
    ("engine", "subscribe", "_INBOX_orchestrator.>", "read the job records the orchestrator reads"),
    ("engine", "subscribe", ">", "hear everything"),
    ("gateway", "subscribe", "_INBOX_webhooks.>", "read the transcripts the webhook service sends"),
    ("webhooks", "subscribe", "_INBOX_gateway.>", "read the API keys the gateway reads"),
    ("orchestrator", "subscribe", "_INBOX_engine.>", "read the tasks engines take"),
]


@pytest.mark.parametrize("user,action,subject,why", REFUSED, ids=[f"{u}-{w}" for u, _, _, w in REFUSED])
async def test_refused(locked, user, action, subject, why):
    errors: list[str] = []
    nc = await connect_as(locked, user, errors)
    try:
        if action == "publish":
            await nc.publish(subject, b"{}")
        else:
            await nc.subscribe(subject)
        await nc.flush()
        error = await until_error(errors)
    finally:
        await nc.close()
    assert f'permissions violation for {"publish to" if action == "publish" else "subscription to"} "{subject.lower()}"' in error


async def test_refused_task_never_reaches_the_queue(locked):
    bus = await locked.bus()  # admin: creates the layout
    try:
        errors: list[str] = []
        nc = await connect_as(locked, "gateway", errors)
        await nc.publish("tasks.faster-whisper.base", b"{}")
        await nc.flush()
        await until_error(errors)
        await nc.close()
        assert (await bus.js.stream_info("TASKS")).state.messages == 0
    finally:
        await bus.close()


async def test_wrong_password_is_refused(locked):
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(locked.env["DALSTON_NATS_URL"], user="gateway", password=PASSWORDS["engine"],
                           allow_reconnect=False, max_reconnect_attempts=0)


async def test_an_engine_may_rewrite_its_outputs(locked):
    """A task run again writes the same objects again, without purging the old chunks (only
    admin may purge): the write completes and readers get the second run."""
    bus = await locked.bus()
    engine = await connect(load_settings({**locked.env, **credentials("engine")}), name="test-engine")
    try:
        for attempt in (b"first run", b"second run"):
            await asyncio.wait_for(engine.artifacts.put("jobs/rewritten/prepare/ch0/00000.f32", attempt), 5)
        assert (await bus.artifacts.read("jobs/rewritten/prepare/ch0/00000.f32")) == b"second run"
        assert (await engine.artifacts.read("jobs/rewritten/prepare/ch0/00000.f32")) == b"second run"
    finally:
        await engine.close()
        await bus.close()


# What no user but admin may do to the layout: create, update, purge or delete a stream (a KV
# bucket, an object store), or create, update or delete a durable consumer.
LAYOUT_CHANGES = [
    ("$JS.API.STREAM.CREATE.STOLEN", "create a stream (one that sources KV_apikeys' subjects, say)"),
    ("$JS.API.STREAM.UPDATE.KV_apikeys", "add a source or subject transform into the API keys"),
    ("$JS.API.STREAM.UPDATE.OBJ_artifacts", "change the artifacts' retention"),
    ("$JS.API.STREAM.PURGE.OBJ_artifacts", "purge every artifact"),
    ("$JS.API.STREAM.PURGE.KV_jobs", "purge every job record"),
    ("$JS.API.STREAM.DELETE.EVENTS", "delete the events"),
    ("$JS.API.STREAM.MSG.DELETE.OBJ_artifacts", "delete one chunk of an object"),
    ("$JS.API.CONSUMER.DURABLE.CREATE.EVENTS.webhooks", "rewrite the webhook service's consumer"),
    ("$JS.API.CONSUMER.CREATE.TASKS.tasks-faster-whisper-base.tasks.faster-whisper.base",
     "rewrite a task queue"),
    ("$JS.API.CONSUMER.CREATE.EVENTS", "read every event through a consumer of its own"),
    ("$JS.API.CONSUMER.DELETE.TASKS.tasks-faster-whisper-base", "delete a task queue"),
]
SERVICE_USERS = ("orchestrator", "gateway", "engine", "webhooks")


@pytest.mark.parametrize("user", SERVICE_USERS)
@pytest.mark.parametrize("subject,why", LAYOUT_CHANGES, ids=[w for _, w in LAYOUT_CHANGES])
async def test_only_admin_changes_the_layout(locked, user, subject, why):
    errors: list[str] = []
    nc = await connect_as(locked, user, errors)
    try:
        await nc.publish(subject, b"{}", reply="_INBOX.unanswered")
        await nc.flush()
        assert f'permissions violation for publish to "{subject.lower()}"' in await until_error(errors)
    finally:
        await nc.close()


@pytest.mark.parametrize("user", SERVICE_USERS)
async def test_an_ephemeral_consumer_request_makes_no_durable(locked, user):
    """The one consumer request the services may send, $JS.API.CONSUMER.CREATE.<stream>, is
    for ephemeral consumers: the server refuses one that names itself durable."""
    stream = {"orchestrator": "KV_jobs", "gateway": "KV_jobs"}.get(user, "OBJ_artifacts")
    nc = await connect_as(locked, user, [])
    bus = await locked.bus()
    try:
        request = {"stream_name": stream, "config": {"durable_name": f"kept-{user}", "ack_policy": "explicit"}}
        answer = await nc.request(f"$JS.API.CONSUMER.CREATE.{stream}", json.dumps(request).encode(), timeout=5)
        assert "error" in json.loads(answer.data), answer.data
        assert f"kept-{user}" not in [c.name for c in await bus.js.consumers_info(stream)]
    finally:
        await nc.close()
        await bus.close()


async def test_streams_open_to_ephemeral_consumers_hold_no_durable_one(locked):
    """Through $JS.API.CONSUMER.CREATE.<stream>, a consumer request naming an existing consumer
    updates it: the streams where services may send it must hold none to update."""
    conf = (NATS_DIR / "accounts.conf").read_text()
    open_streams = set(re.findall(r'"\$JS\.API\.CONSUMER\.CREATE\.(\w+)"', conf))
    assert open_streams == {"KV_jobs", "KV_voices", "OBJ_artifacts", "HEARTBEATS"}
    bus = await locked.bus()
    try:
        for stream in open_streams:
            durable = [c.name for c in await bus.js.consumers_info(stream) if c.config.durable_name]
            assert not durable, (stream, durable)
    finally:
        await bus.close()


async def test_the_orchestrator_cannot_mint_an_api_key(locked):
    """The attack that worked: the orchestrator's user sources EVENTS into KV_apikeys with a
    subject transform, then publishes a key record as a job event. Refused: KV_apikeys is
    unchanged and holds no key."""
    bus = await locked.bus()
    errors: list[str] = []
    nc = await connect_as(locked, "orchestrator", errors)
    try:
        config = (await bus.js.stream_info("KV_apikeys")).config.as_dict()
        config["sources"] = [{"name": "EVENTS", "subject_transforms": [
            {"src": "events.job.minted", "dest": "$KV.apikeys.0123456789abcdef"}]}]
        with pytest.raises(nats.errors.TimeoutError):
            await nc.request("$JS.API.STREAM.UPDATE.KV_apikeys", json.dumps(config).encode(), timeout=2)
        assert 'publish to "$js.api.stream.update.kv_apikeys"' in await until_error(errors)
        await nc.jetstream().publish("events.job.minted", b'{"name": "minted", "admin": true}')
        info = await bus.js.stream_info("KV_apikeys")
        assert not info.config.sources and info.state.messages == 0
        with pytest.raises(nats.errors.TimeoutError):
            await nc.jetstream(timeout=2).publish("$KV.apikeys.0123456789abcdef", b"{}")
        assert (await bus.js.stream_info("KV_apikeys")).state.messages == 0
    finally:
        await nc.close()
        await bus.close()


async def test_an_engine_cannot_purge_the_artifacts(locked):
    """The attack that worked: the engine user purged OBJ_artifacts, and every transcript
    before it answered 500. Refused: the object is still whole."""
    bus = await locked.bus()
    errors: list[str] = []
    nc = await connect_as(locked, "engine", errors)
    try:
        await bus.artifacts.put("jobs/kept/transcript", b'{"text": "still here"}')
        with pytest.raises(nats.errors.TimeoutError):
            await nc.jetstream(timeout=2).purge_stream("OBJ_artifacts")
        assert 'publish to "$js.api.stream.purge.obj_artifacts"' in await until_error(errors)
        assert await bus.artifacts.read("jobs/kept/transcript") == b'{"text": "still here"}'
    finally:
        await nc.close()
        await bus.close()


def test_every_service_does_its_job_with_its_own_user(locked):
    """With the layout applied by admin (the fixture), every service, which may only read it,
    starts and runs a job end to end without one permission violation."""
    locked.start("orchestrator", "orchestrator", **credentials("orchestrator"))
    deadline = time.monotonic() + 30
    while "orchestrator started" not in locked.log_text("orchestrator"):
        assert time.monotonic() < deadline, locked.log_text("orchestrator")
        time.sleep(0.1)
    locked.start("gateway", "gateway", **credentials("gateway"))
    for runtime in ("audio-prepare", "merge", "faster-whisper"):
        locked.start_engine(runtime, **credentials("engine"))
    locked.wait_http()
    locked.wait_engines("audio-prepare", "merge", "faster-whisper")

    with (AUDIO / "dialogue.wav").open("rb") as audio:
        response = httpx.post(f"{locked.url}/v1/audio/transcriptions", files={"file": audio},
                              data={"model": "faster-whisper-tiny.en"}, timeout=120)
    assert response.status_code == 200, response.text
    assert words(response.json()["text"]) == DIALOGUE_WORDS
    assert httpx.get(f"{locked.url}/v1/jobs").status_code == 200
    # The gateway follows the job records with its own user (the bound on jobs, the metrics).
    deadline = time.monotonic() + 30
    while 'dalston_jobs_total{model="faster-whisper-tiny.en",status="completed"}' \
            not in httpx.get(f"{locked.url}/metrics").text:
        assert time.monotonic() < deadline, locked.log_text("gateway")
        time.sleep(0.2)

    for name in ("orchestrator", "gateway", "audio-prepare", "merge", "faster-whisper"):
        assert "violation" not in locked.log_text(name).lower(), name


async def test_the_webhook_service_delivers_as_its_own_user(locked):
    """The webhook service with the webhooks user reads a finished job's events and transcript
    and acknowledges its delivery, without one permission violation."""
    if "faster-whisper" not in locked.processes:
        pytest.skip("needs the running system of the test above")
    secret = "whsec_" + base64.b64encode(b"permissions-test-webhook-secret!").decode()
    hooks = {"DALSTON_WEBHOOK_SECRET": secret, "DALSTON_WEBHOOK_ALLOW_PRIVATE": "true"}
    port = free_port()
    locked.start("gateway-hooks", "gateway", DALSTON_HTTP_PORT=str(port), **credentials("gateway"), **hooks)
    locked.start("webhooks", "webhooks", **credentials("webhooks"), **hooks)
    receiver = Receiver()
    try:
        wait_ok(f"http://127.0.0.1:{port}/readyz", "webhook gateway not ready")
        with (AUDIO / "speaker1.wav").open("rb") as audio:
            response = httpx.post(f"http://127.0.0.1:{port}/v1/jobs", files={"file": audio},
                                  data={"model": "faster-whisper-tiny.en", "webhook_url": receiver.url})
        assert response.status_code == 202, response.text

        async def accepted():
            return receiver.accepted()
        await wait_for(accepted, 90)
        data = Webhook(secret).verify(receiver.accepted()[0].body, receiver.accepted()[0].headers)["data"]
        assert data["status"] == "completed" and data["transcript"]["text"]
    finally:
        receiver.close()
        locked.stop("gateway-hooks")
        locked.stop("webhooks")
    assert "violation" not in locked.log_text("webhooks").lower()


@pytest.mark.parametrize("forgery", ["no grant", "a made-up grant", "another job's transcript"])
async def test_an_engine_cannot_report_on_a_task_it_was_not_given(locked, forgery):
    """The attack that worked: the engine user published a TaskEvent from a made-up engine that
    completed someone's job with another job's transcript. A report must present the grant the
    task was given with, and name only its own job's objects: otherwise it is dead-lettered and
    the job is untouched."""
    if "faster-whisper" not in locked.processes:
        pytest.skip("needs the running system of the test above")
    bus = await locked.bus()
    nc = await connect_as(locked, "engine", [])
    try:
        # A nemo engine seen a moment ago (as if restarting): the job is taken and its task waits,
        # since no engine runs it now.
        await nc.publish(HEARTBEAT_SUBJECT.format(runtime="nemo", engine="nemo-gone"), encode(Heartbeat(
            runtime="nemo", engine="nemo-gone", host="elsewhere", status="stopping", version="0")))
        await nc.flush()

        async def submitted():
            with (AUDIO / "speaker1.wav").open("rb") as audio:
                response = httpx.post(f"{locked.url}/v1/jobs", files={"file": audio},
                                      data={"model": "parakeet-tdt-0.6b-v2"}, timeout=60)
            return response if response.status_code != 503 else None  # until the gateway heard it
        response = await wait_for(submitted, 10)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]

        async def transcribe_queued():
            record = await bus.jobs.get(job_id)
            return record and next((t for t in record.tasks.values()
                                    if t.stage == "transcribe" and t.status == "queued"), None)
        task = await wait_for(transcribe_queued, 60)
        grant = {"no grant": "", "a made-up grant": "0" * 32}.get(forgery, task.grant)
        letters = (await bus.js.stream_info("DEADLETTER")).state.messages
        forged = TaskEvent(task_id=task.id, job_id=job_id, kind="completed", engine="made-up",
                           outputs=["jobs/0123456789abcdef0123456789abcdef/transcript.json"], grant=grant)
        await nc.jetstream().publish(f"events.task.{job_id}", encode(forged))

        async def dead_lettered():
            return (await bus.js.stream_info("DEADLETTER")).state.messages > letters
        await wait_for(dead_lettered, 20)
        letter = decode((await bus.js.get_last_msg("DEADLETTER", "deadletter.events")).data, DeadLetter)
        assert ("outside job" if forgery == "another job's transcript" else "grant") in letter.reason
        record = await bus.jobs.get(job_id)
        assert record.status != "completed" and record.tasks[next(
            k for k, t in record.tasks.items() if t.id == task.id)].status == "queued"
    finally:
        await nc.close()
        await bus.close()


async def test_streams_and_live_sessions_work_with_the_services_own_users(locked):
    """Streamed text (transcript.<job>) and a live session (claim, input, output) need no
    permission beyond what each service's user has."""
    if "faster-whisper" not in locked.processes:
        pytest.skip("needs the running system of the test above")
    import base64

    import openai

    client = openai.AsyncOpenAI(base_url=f"{locked.url}/v1", api_key="unused", max_retries=0, timeout=120,
                                websocket_base_url=locked.url.replace("http", "ws") + "/v1")
    with (AUDIO / "dialogue.wav").open("rb") as audio:
        stream = await client.audio.transcriptions.create(model="faster-whisper-tiny.en", file=audio, stream=True)
        events = [event async for event in stream]
    assert [e.type for e in events].count("transcript.text.delta") >= 1
    assert words(events[-1].text) == DIALOGUE_WORDS

    pcm = subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(AUDIO / "speaker1.wav"), "-ar", "24000",
                          "-ac", "1", "-f", "s16le", "-"], capture_output=True, check=True).stdout
    async with client.realtime.connect(extra_query={"intent": "transcription"}) as connection:
        await connection.session.update(session={"type": "transcription", "audio": {"input": {
            "transcription": {"model": "faster-whisper-tiny.en"}, "turn_detection": None}}})
        await connection.input_audio_buffer.append(audio=base64.b64encode(pcm).decode())
        await connection.input_audio_buffer.commit()
        async for event in connection:
            assert event.type != "error", event
            if event.type == "conversation.item.input_audio_transcription.completed":
                break
    assert words(event.transcript) == words("That was hilarious, I can't believe you said that.")
    for name in ("gateway", "faster-whisper"):
        assert "violation" not in locked.log_text(name).lower(), name


def test_compose_engine_health_check_passes_as_the_engine_user(locked):
    """The health check compose runs in an engine container, against a live engine (started by
    the test above) with the engine's NATS user."""
    if "faster-whisper" not in locked.processes:
        pytest.skip("needs the running system of the test above")
    check = yaml.safe_load((NATS_DIR.parent / "compose.yaml").read_text())["x-engine-healthcheck"]["test"]
    env = {**locked.env, **credentials("engine"), "DALSTON_RUNTIME": "faster-whisper",
           "DALSTON_ENGINE_ID": "faster-whisper"}
    assert subprocess.run([sys.executable, *check[2:]], env=env, timeout=30).returncode == 0
    env["DALSTON_ENGINE_ID"] = "no-such-engine"
    assert subprocess.run([sys.executable, *check[2:]], env=env, timeout=30,
                          capture_output=True).returncode != 0
