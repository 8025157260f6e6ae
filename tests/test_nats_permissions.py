"""nats/accounts.conf, as compose runs it: each service's NATS user can do its job, and is refused
where it would overstep into another service's."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import subprocess
import sys
import time

import httpx
import msgspec
import nats.errors
import pytest
import yaml
from standardwebhooks import Webhook

import nats
from dalston import dag
from dalston.bus.connection import connect
from dalston.bus.credentials import inbox_prefix
from dalston.bus.permissions import COMPOSE_ENGINES, SERVICE_USERS, engine_user, password_variable
from dalston.config import load_settings
from dalston.contracts import DeadLetter, Heartbeat, TaskEvent, decode, encode, heartbeat_subject
from dalston.engines import EngineWatch
from dalston.sdk.objects import ObjectRefused, TaskClosed
from dalston.sdk.objects import TaskObjects as EngineObjects
from dalston.services.layout import apply_layout
from dalston.services.task_objects import TaskObjects
from tests.nats_nodes import NATS_DIR, NatsNode
from tests.task_records import running_task
from tests.stack import AUDIO, DIALOGUE_WORDS, TestStack, free_port, wait_for, wait_ok, words
from tests.webhook_receiver import Receiver

# Compose's users: the services' and one per engine service (nats/users.conf).
USERS = (*SERVICE_USERS, *map(engine_user, COMPOSE_ENGINES))
PASSWORDS = {user: f"pw-{user}-7f3a" for user in USERS}
ENGINE = engine_user("faster-whisper-1")  # the engine user the attacks below are tried as
OTHER_ENGINE = engine_user("merge")
REPLICA = engine_user("faster-whisper-2")  # another engine of ENGINE's runtime
# The compose engine service (its user) of each runtime the tests below start an engine of.
SERVICE_OF = {"audio-prepare": "audio-prepare", "merge": "merge", "faster-whisper": "faster-whisper-1"}


def credentials(user: str) -> dict[str, str]:
    return {"DALSTON_NATS_USER": user, "DALSTON_NATS_PASSWORD": PASSWORDS[user]}


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    """nats-server with compose's config, and a TestStack whose default user is admin."""
    root = tmp_path_factory.mktemp("locked")
    node = NatsNode(root, "nats", NATS_DIR / "compose.conf", {password_variable(u): p for u, p in PASSWORDS.items()})
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
    (ENGINE, "publish", "jobs.submit", "submit jobs"),
    (ENGINE, "publish", "$KV.jobs.some-job", "rewrite a job record"),
    (ENGINE, "publish", "$KV.apikeys.some-digest", "mint an API key"),
    (ENGINE, "publish", "$JS.API.STREAM.PURGE.TASKS", "empty the task queue"),
    (ENGINE, "publish", "events.job.some-job", "announce a job done"),
    # Engines touch no object and no job record: the orchestrator hands a task its own.
    (ENGINE, "publish", "$JS.API.DIRECT.GET.KV_jobs.$KV.jobs.some-job", "read a job record: its webhook, grants"),
    (ENGINE, "publish", "$JS.API.STREAM.MSG.GET.KV_jobs", "read any job record by sequence"),
    (ENGINE, "publish", "$JS.API.CONSUMER.CREATE.KV_jobs", "list every job"),
    (ENGINE, "publish", "$JS.API.DIRECT.GET.OBJ_artifacts.$O.artifacts.M.c29tZQ==", "read any object's info"),
    (ENGINE, "publish", "$JS.API.STREAM.MSG.GET.OBJ_artifacts", "read any job's audio or transcript"),
    (ENGINE, "publish", "$JS.API.CONSUMER.CREATE.OBJ_artifacts", "list and read every object"),
    (ENGINE, "publish", "$O.artifacts.C.somenuid", "write chunks into the store"),
    (ENGINE, "publish", "$O.artifacts.M.c29tZQ==", "overwrite a transcript"),
    (ENGINE, "subscribe", "tasks.>", "see every task, with its grant"),
    (ENGINE, "subscribe", "events.job.*", "hear every job's webhook URL"),
    (ENGINE, "subscribe", "ring.tasks.merge.*", "hear another runtime's queue"),
    # Live sessions: an engine hears and speaks only on its own sessions' subjects.
    (ENGINE, "subscribe", "session.*.*.in", "hear every live session"),
    (ENGINE, "subscribe", f"session.{OTHER_ENGINE}.*.in", "hear another engine's sessions"),
    (ENGINE, "publish", f"session.{OTHER_ENGINE}.some-session.out", "inject into another engine's session"),
    (ENGINE, "publish", "session.gateway.some-session.in", "feed a session as the gateway"),
    (ENGINE, "publish", f"heartbeat.merge.{OTHER_ENGINE}.some-engine", "beat as another runtime's engine"),
    (ENGINE, "publish", f"heartbeat.faster-whisper.{REPLICA}.some-engine", "beat as another engine of its runtime"),
    (ENGINE, "publish", "heartbeat.faster-whisper.some-engine", "beat outside its own subjects"),
    # Task queues: an engine takes and settles tasks only from its own runtime's.
    (ENGINE, "publish", "$JS.API.CONSUMER.MSG.NEXT.TASKS.tasks-merge-none", "take another runtime's tasks"),
    (ENGINE, "publish", "$JS.API.CONSUMER.MSG.NEXT.TASKS.tasks-nemo-nvidia_parakeet-tdt-0_6b-v2",
     "take another runtime's tasks"),
    (ENGINE, "publish", "$JS.ACK.TASKS.tasks-merge-none.1.1.1.1700000000000000000.0", "settle another runtime's task"),
    (ENGINE, "publish", "$JS.API.CONSUMER.MSG.NEXT.TASKS.*", "take from every queue"),
    # Dead letters name who wrote them: an engine writes only its own.
    (ENGINE, "publish", "deadletter.events.orchestrator", "dead-letter as the orchestrator"),
    (ENGINE, "publish", f"deadletter.tasks.{REPLICA}", "dead-letter as another engine"),
    (ENGINE, "publish", "deadletter.tasks", "dead-letter without its name"),
    ("webhooks", "publish", "deadletter.events.orchestrator", "dead-letter as the orchestrator"),
    ("orchestrator", "publish", "deadletter.events.webhooks", "dead-letter as the webhook service"),
    (ENGINE, "subscribe", "sessions.merge.*", "claim another runtime's sessions"),
    ("gateway", "publish", "transcript.some-job", "forge a job's streamed text"),
    # Enrolled voices are the gateway's: a job carries the embeddings of its own known speakers.
    (ENGINE, "publish", "$JS.API.DIRECT.GET.KV_voices.$KV.voices.some-voice", "read any key's voices"),
    (ENGINE, "publish", "$JS.API.CONSUMER.CREATE.KV_voices", "list every key's voices"),
    (ENGINE, "publish", "$KV.voices.some-voice", "enroll or overwrite a voice"),
    (ENGINE, "publish", "voices.embed.diarize", "ask for embeddings as if it were the gateway"),
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
    (ENGINE, "subscribe", "_INBOX.>", "read every reply of every user"),
    (ENGINE, "subscribe", "_INBOX_gateway.>", "read the keys, records and transcripts the gateway reads"),
    (ENGINE, "subscribe", "_INBOX_orchestrator.>", "read the job records the orchestrator reads"),
    (ENGINE, "subscribe", f"_INBOX_{OTHER_ENGINE}.>", "receive another engine's objects and deliveries"),
    (ENGINE, "subscribe", ">", "hear everything"),
    ("gateway", "subscribe", "_INBOX_webhooks.>", "read the transcripts the webhook service sends"),
    ("webhooks", "subscribe", "_INBOX_gateway.>", "read the API keys the gateway reads"),
    ("orchestrator", "subscribe", f"_INBOX_{ENGINE}.>", "read the tasks engines take"),
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


async def test_an_engine_takes_tasks_only_from_its_runtimes_queues(locked):
    """A task queued for nemo: a faster-whisper engine's user cannot fetch it, nor can merge's;
    the nemo engine's user fetches it, and dead-letters it on a subject that names it."""
    bus = await locked.bus()
    nemo = await connect(load_settings({**locked.env, **credentials(engine_user("nemo"))}), name="test-nemo")
    queue = "tasks-nemo-nvidia_parakeet-tdt-0_6b-v2"
    try:
        await bus.js.publish("tasks.nemo.nvidia_parakeet-tdt-0_6b-v2", b"not a task")
        for user in (ENGINE, OTHER_ENGINE):
            errors: list[str] = []
            nc = await connect_as(locked, user, errors)
            try:
                pull = await nc.jetstream().pull_subscribe_bind(queue, stream="TASKS")
                with pytest.raises(nats.errors.TimeoutError):
                    await pull.fetch(1, timeout=2)
                assert f'publish to "$js.api.consumer.msg.next.tasks.{queue}"' in await until_error(errors)
            finally:
                await nc.close()
        assert (await bus.js.consumer_info("TASKS", queue)).num_pending == 1
        [taken] = await (await nemo.pull(queue, "TASKS")).fetch(1, timeout=5)
        await nemo.dead_letter(taken, "not a task")
        letter = decode(await bus.last("DEADLETTER", f"deadletter.tasks.{engine_user('nemo')}"), DeadLetter)
        assert letter.payload == b"not a task"
        info = await bus.js.consumer_info("TASKS", queue)
        assert info.num_pending == 0 and info.num_ack_pending == 0
    finally:
        await nemo.close()
        await bus.close()


async def test_a_beat_unlike_its_subject_is_ignored(locked):
    """An engine may beat only on its own subjects; there, a beat that says it is of another
    runtime or another engine (to make the gateway think a nemo engine runs, say) is ignored."""
    bus = await locked.bus()
    engine = await connect(load_settings({**locked.env, **credentials(ENGINE)}), name="test-engine")
    watch = EngineWatch()
    await watch.start(bus)
    try:
        beats = {"forged-nemo": Heartbeat(runtime="nemo", engine="forged-nemo", identity=ENGINE, host="h",
                                          status="idle", version="0"),
                 "forged-replica": Heartbeat(runtime="faster-whisper", engine="forged-replica", identity=REPLICA,
                                             host="h", status="idle", version="0"),
                 "true": Heartbeat(runtime="faster-whisper", engine="true", identity=ENGINE, host="h",
                                   status="idle", version="0")}
        for name, beat in beats.items():
            await engine.publish(heartbeat_subject("faster-whisper", ENGINE, name), beat, msg_ttl=2)

        async def heard():
            return "true" in [b.engine for b in watch.live()]
        await wait_for(heard, 10)
        assert not watch.live("nemo") and "forged-replica" not in [b.engine for b in watch.live()]
    finally:
        await watch.stop()
        await engine.close()
        await bus.close()


async def test_wrong_password_is_refused(locked):
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(locked.env["DALSTON_NATS_URL"], user="gateway", password=PASSWORDS[ENGINE],
                           allow_reconnect=False, max_reconnect_attempts=0)


@pytest.fixture
async def task_objects(locked):
    """The orchestrator's answers for tasks' objects, as its own user, and two jobs whose
    transcribe tasks run: engine A is given the first (its Task message), not the second."""
    admin = await locked.bus()
    orchestrator = await connect(load_settings({**locked.env, **credentials("orchestrator")}), name="test-orch")
    engine = await connect(load_settings({**locked.env, **credentials(ENGINE)}), name="test-engine")
    objects = TaskObjects(orchestrator)
    await objects.start()
    jobs = []
    for job_id in (f"mine-{time.monotonic_ns()}", f"theirs-{time.monotonic_ns()}"):
        audio = f"jobs/{job_id}/prepare/ch0/00000.f32"
        await admin.artifacts.put(audio, f"the audio of {job_id}".encode() * 40000)  # several chunks
        record, task = running_task(job_id, audio)
        await admin.jobs.create(record)
        jobs.append((record, task))
    try:
        yield admin, engine, jobs
    finally:
        await objects.stop()
        await engine.close()
        await orchestrator.close()
        await admin.close()


async def test_an_engine_reads_its_inputs_and_writes_its_outputs(task_objects):
    """A task's engine reads its input (in pages: it spans several chunks) and writes its output,
    and again (a task run again), through the orchestrator: readers get the second run."""
    admin, engine, [(record, task), _] = task_objects
    mine = EngineObjects(engine, task)
    await mine.open()
    buffer = io.BytesIO()
    await mine.read_into(task.inputs[0], buffer)
    assert buffer.getvalue() == await admin.artifacts.read(task.inputs[0])
    big = bytes(range(256)) * 4096 * 5  # 5 MB: more than one request's worth
    for attempt in (b"first run", big):
        assert await mine.write(task.output, attempt) == task.output
    assert await admin.artifacts.read(task.output) == big


async def test_an_engine_cannot_touch_another_tasks_objects(task_objects):
    """The attacks that worked with the shared engine user: reading another job's audio, and
    overwriting another job's transcript. Through the orchestrator, a task reads only its
    inputs and writes only its output; another task's grant cannot be guessed."""
    admin, engine, [(record, task), (their_record, theirs)] = task_objects
    mine = EngineObjects(engine, task)
    for name in (theirs.inputs[0], f"jobs/{their_record.id}/audio", f"jobs/{record.id}/audio"):
        with pytest.raises(ObjectRefused, match="not an input"):
            await mine.read_into(name, io.BytesIO())
    for name in (theirs.output, f"jobs/{their_record.id}/transcript.json", f"jobs/{record.id}/transcript.json"):
        with pytest.raises(ObjectRefused, match="not an output"):
            await mine.write(name, b'{"text": "forged"}')
    # Their task's id with my grant, or a made-up grant: refused.
    for grant in (task.grant, "0" * 32, ""):
        forged = EngineObjects(engine, msgspec.structs.replace(theirs, grant=grant))
        with pytest.raises(ObjectRefused, match="grant"):
            await forged.read_into(theirs.inputs[0], io.BytesIO())
    assert not await admin.artifacts.exists(theirs.output)


async def test_a_task_no_longer_running_touches_nothing(task_objects):
    """Once its job ended (cancelled, say), a task's grant opens nothing: it can no longer
    overwrite its output."""
    admin, engine, [(record, task), _] = task_objects
    loaded, revision = await admin.jobs.load(record.id)
    dag.finish(loaded, "cancelled")
    assert await admin.jobs.update(loaded, revision)
    mine = EngineObjects(engine, task)
    with pytest.raises(TaskClosed):
        await mine.open()
    with pytest.raises(TaskClosed):
        await mine.write(task.output, b"too late")
    assert not await admin.artifacts.exists(task.output)


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
SERVICES = ("orchestrator", "gateway", ENGINE, "webhooks")


@pytest.mark.parametrize("user", SERVICES)
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


@pytest.mark.parametrize("user", SERVICES)
async def test_an_ephemeral_consumer_request_makes_no_durable(locked, user):
    """The one consumer request the services may send, $JS.API.CONSUMER.CREATE.<stream>, is
    for ephemeral consumers: the server refuses one that names itself durable."""
    stream = {"orchestrator": "KV_jobs", "gateway": "KV_jobs", ENGINE: "HEARTBEATS"}.get(user, "OBJ_artifacts")
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
    conf = (NATS_DIR / "accounts.conf").read_text() + (NATS_DIR / "users.conf").read_text()
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
    nc = await connect_as(locked, ENGINE, errors)
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
    for runtime, service in SERVICE_OF.items():
        locked.start_engine(runtime, **credentials(engine_user(service)))
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
    nc = await connect_as(locked, ENGINE, [])
    try:
        # A nemo engine seen a moment ago (as if restarting): the job is taken and its task waits,
        # since no engine runs it now.
        await bus.nc.publish(heartbeat_subject("nemo", "admin", "nemo-gone"), encode(Heartbeat(
            runtime="nemo", engine="nemo-gone", identity="admin", host="elsewhere", status="stopping",
            version="0")))
        await bus.nc.flush()

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
        letter = decode((await bus.js.get_last_msg("DEADLETTER", "deadletter.events.orchestrator")).data, DeadLetter)
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


@pytest.mark.parametrize("service", ["engine", "orchestrator", "layout"])
def test_compose_health_checks_pass_as_each_services_user(locked, service):
    """The health checks compose runs (`dalston health <service>`), against the live services
    started by the tests above, each with its own NATS user; an engine that is not there fails."""
    if "faster-whisper" not in locked.processes:
        pytest.skip("needs the running system of the test above")
    check = yaml.safe_load((NATS_DIR.parent / "compose.yaml").read_text())
    assert f"dalston health {service}" in json.dumps(check)
    user = {"engine": ENGINE, "orchestrator": "orchestrator", "layout": "admin"}[service]
    env = {**locked.env, **credentials(user), "DALSTON_RUNTIME": "faster-whisper",
           "DALSTON_ENGINE_ID": "faster-whisper"}
    health = [sys.executable, "-m", "dalston", "health", service]
    done = subprocess.run(health, env=env, timeout=30, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    if service == "engine":
        env["DALSTON_ENGINE_ID"] = "no-such-engine"
        assert subprocess.run(health, env=env, timeout=30, capture_output=True).returncode != 0
