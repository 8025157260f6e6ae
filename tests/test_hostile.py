"""Hostile input: requests and messages meant to take Dalston down. After each, the service
keeps its processes and serves a normal job within seconds."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
import uuid
from urllib.parse import quote

import httpx
import pytest

from dalston.config import load_settings
from dalston.contracts import DEAD_LETTER_EXCERPT, Task, TaskEvent, encode, task_subject
from dalston.services.orchestrator import Orchestrator
from tests.stack import AUDIO, TestStack, job, wait_for, wait_job, words
from tests.test_resilience import dead_letters

MODEL = "faster-whisper-tiny.en"
SPEAKER1 = words("That was hilarious, I can't believe you said that.")
SERVICES = ("gateway", "orchestrator", "audio-prepare", "merge", "fw-a", "fw-b")


def pids(stack: TestStack) -> dict[str, int]:
    return {name: stack.processes[name].pid for name in SERVICES}


def assert_serving(stack: TestStack, before: dict[str, int], within: float = 30.0) -> None:
    """Every service kept its pid, and a normal transcription is answered within `within` s."""
    for name, pid in before.items():
        process = stack.processes[name]
        assert process.pid == pid and process.poll() is None, f"{name} died"
    started = time.monotonic()
    with open(AUDIO / "speaker1.wav", "rb") as audio:
        response = httpx.post(f"{stack.url}/v1/audio/transcriptions", files={"file": audio},
                              data={"model": MODEL, "response_format": "text"}, timeout=within)
    assert response.status_code == 200, response.text
    assert words(response.text) == SPEAKER1
    assert time.monotonic() - started < within


def abandoned_request(port: int, request: bytes) -> None:
    """Send `request` and close the socket at once, before the answer comes."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)


def test_clients_that_hang_up_early_do_not_kill_the_gateway(stack):
    before = pids(stack)
    requests = [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /openapi/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /no/such/route HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",  # a 400
    ]
    for n in range(20):
        abandoned_request(stack.http_port, requests[n % len(requests)])
    time.sleep(1)
    assert httpx.get(f"{stack.url}/healthz").status_code == 200
    assert_serving(stack, before)


@pytest.mark.parametrize("temperature", ["nan", "inf", "-inf", "2", "warm"])
def test_non_finite_or_out_of_range_temperature_is_a_400(stack, temperature):
    with open(AUDIO / "speaker1.wav", "rb") as audio:
        response = httpx.post(f"{stack.url}/v1/jobs", files={"file": audio},
                              data={"model": MODEL, "temperature": temperature})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "temperature"


def multipart(*parts: tuple[str, str, bytes]) -> tuple[bytes, dict[str, str]]:
    """A multipart body of (extra Content-Disposition and Content-Type lines, name, value) parts."""
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"{extra}\r\n\r\n".encode()
                    + value + b"\r\n" for extra, name, value in parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


AUDIO_PART = ('; filename="s.wav"\r\nContent-Type: audio/wav', "file", (AUDIO / "speaker1.wav").read_bytes())


@pytest.mark.parametrize("route, parts, param", [
    # Languages no model of the catalog speaks: each was a 500 from the engine.
    ("/v1/jobs", [("", "model", b"faster-whisper-tiny"), ("", "language", b"xx")], "language"),
    ("/v1/jobs", [("", "model", b"faster-whisper-tiny"), ("", "language", b"en-ZZZZZZZZ")], "language"),
    ("/v1/speech-to-text", [("", "model_id", b"scribe_v1"), ("", "language_code", b"xx")], "language_code"),
    # A charset Python does not know.
    ("/v1/jobs", [("\r\nContent-Type: text/plain; charset=bogus-x", "prompt", b"hello")], "prompt"),
    # A second file is refused, not spooled.
    ("/v1/jobs", [('; filename="t.wav"', "extra", b"RIFF" * 1000)], "extra"),
    # JSON nested past any recursion limit, and a format asked for twice.
    ("/v1/speech-to-text", [("", "model_id", b"scribe_v1"),
                            ("", "additional_formats", b"[" * 10_000 + b"]" * 10_000)], "additional_formats"),
    ("/v1/speech-to-text", [("", "model_id", b"scribe_v1"),
                            ("", "additional_formats", b'[{"format": "srt"}, {"format": "srt"}]')],
     "additional_formats"),
    ("/v1/jobs", [("", "chunking_strategy", b'{"a": ' * 10_000 + b"1" + b"}" * 10_000)], "chunking_strategy"),
    # A diarization model does not transcribe (it answered 200 with no text).
    ("/v1/audio/transcriptions", [("", "model", b"resemblyzer-ge2e")], "model"),
    ("/v1/speech-to-text", [("", "model_id", b"resemblyzer-ge2e")], "model_id"),
])
def test_client_errors_are_4xx_naming_the_field(stack, route, parts, param):
    before = pids(stack)
    body, headers = multipart(AUDIO_PART, *parts)
    response = httpx.post(f"{stack.url}{route}", content=body, headers=headers, timeout=60)
    if route == "/v1/speech-to-text":  # ElevenLabs' shape for a field at fault
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["body", param]
    else:
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
    assert_serving(stack, before)


def test_an_oversized_prompt_is_a_400_and_intake_goes_on(stack):
    before = pids(stack)
    with open(AUDIO / "speaker1.wav", "rb") as audio:
        response = httpx.post(f"{stack.url}/v1/jobs", files={"file": audio}, timeout=60,
                              data={"model": MODEL, "temperature": "nan", "prompt": "x" * 6_500_000})
    assert response.status_code == 400
    with open(AUDIO / "speaker1.wav", "rb") as audio:
        response = httpx.post(f"{stack.url}/v1/jobs", files={"file": audio}, timeout=60,
                              data={"model": MODEL, "prompt": "word " * 1000})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "prompt" and "2048" in error["message"]
    assert_serving(stack, before)


async def test_garbage_on_every_subject_is_dead_lettered_and_intake_goes_on(stack):
    before = pids(stack)
    garbage = b"\xff" * 7_000_000
    job_id = uuid.uuid4().hex
    # What a NaN temperature becomes in JSON (null), beside a prompt of 6.5 MB.
    poisoned = json.dumps({"id": job_id, "model": MODEL, "prompt": "x" * 6_500_000,
                           "options": {"temperature": None},
                           "audio": base64.b64encode((AUDIO / "speaker1.wav").read_bytes()).decode()})
    bus = await stack.bus()
    try:
        seq = (await bus.js.stream_info("DEADLETTER")).state.last_seq
        await bus.js.publish("jobs.submit", garbage)
        await bus.js.publish("events.task.x", garbage)
        await bus.js.publish("jobs.submit", poisoned.encode())
        await bus.js.publish("tasks.audio-prepare.none", garbage)

        async def four_letters():
            letters = await dead_letters(bus, seq)
            return letters if len(letters) >= 4 else None
        letters = await wait_for(four_letters, 30)
        assert sorted(letter.subject for letter in letters) == sorted(
            ["jobs.submit", "events.task.x", "jobs.submit", "tasks.audio-prepare.none"])
        for letter in letters:
            assert len(letter.payload) <= DEAD_LETTER_EXCERPT
            assert letter.payload_size >= 6_500_000
    finally:
        await bus.close()
    assert job(stack, job_id)["status"] is None  # never became a job
    assert_serving(stack, before)


@pytest.mark.parametrize("job_id", ["*", ">", "a.*", "a b", "é", "$KV", "\x00", "a" * 65])
def test_job_ids_that_are_not_ids_are_404(stack, job_id):
    path = quote(job_id, safe="")
    for method, url in (("GET", f"/v1/jobs/{path}"), ("GET", f"/v1/jobs/{path}/transcript"),
                        ("DELETE", f"/v1/jobs/{path}")):
        response = httpx.request(method, stack.url + url)
        assert response.status_code == 404, (method, url, response.text)


async def test_messages_whose_ids_would_be_subjects_are_dead_lettered(stack):
    before = pids(stack)
    job_id = uuid.uuid4().hex
    bad_tasks = [Task(id=f"{job_id}-prepare-1", job_id=bad, stage="prepare", runtime="audio-prepare",
                      inputs=["jobs/x/audio"], output="jobs/x/prepared") for bad in ("", "a b")]
    bad_events = [TaskEvent(task_id="t-1", job_id=bad, kind="completed", engine="e")
                  for bad in ("*", "a.>")]
    bus = await stack.bus()
    try:
        seq = (await bus.js.stream_info("DEADLETTER")).state.last_seq
        for task in bad_tasks:
            await bus.js.publish("tasks.audio-prepare.none", encode(task))
        for event in bad_events:
            await bus.js.publish("events.task.x", encode(event))

        async def letters():
            found = await dead_letters(bus, seq)
            return found if len(found) >= 4 else None
        found = await wait_for(letters, 30)
        assert all("job_id" in letter.reason for letter in found), [f.reason for f in found]

        async def queues_empty():
            info = await bus.js.stream_info("TASKS")
            return info.state.messages == 0
        await wait_for(queues_empty, 15)
    finally:
        await bus.close()
    assert_serving(stack, before)


async def test_readiness_says_when_no_orchestrator_takes_jobs(stack):
    stack.stop("orchestrator")
    try:
        with open(AUDIO / "speaker1.wav", "rb") as audio:
            job_id = httpx.post(f"{stack.url}/v1/jobs", files={"file": audio},
                                data={"model": MODEL}).json()["id"]

        async def unready():
            response = httpx.get(f"{stack.url}/readyz")
            return response if response.status_code == 503 else None
        response = await wait_for(unready, 20)
        assert "no orchestrator" in " ".join(response.json()["problems"])
    finally:
        stack.start("orchestrator", "orchestrator")
    assert (await wait_job(stack, job_id, 60))["status"] == "completed"
    stack.wait_http()


async def test_an_orchestrator_whose_loop_dies_exits(stack, monkeypatch):
    """Exiting is what gets it restarted (by `dalston up` or compose); a live process with a
    dead loop would accept jobs that never start."""
    async def dies(self):
        raise RuntimeError("boom")
    monkeypatch.setattr(Orchestrator, "_sweep_forever", dies)
    orchestrator = Orchestrator(load_settings({k: v for k, v in stack.env.items()
                                               if k.startswith("DALSTON_")}))
    with pytest.raises(RuntimeError, match="consume loop ended.*boom"):
        await asyncio.wait_for(orchestrator.run(), 30)


async def test_an_engine_refuses_a_task_its_runtime_cannot_run(stack):
    """A transcribe task with the diarization model, straight on the diarize engine's subject."""
    bus = await stack.bus()
    try:
        job_id = uuid.uuid4().hex
        events = await bus.js.subscribe(f"events.task.{job_id}")
        task = Task(id=f"{job_id}-transcribe-0-1", job_id=job_id, stage="transcribe", runtime="diarize",
                    model="resemblyzer-ge2e", runtime_model_id="resemblyzer-ge2e", inputs=["nothing"], output="x")
        # Its queue, as the orchestrator makes sure of before it publishes a task.
        await bus.task_consumers.ensure("diarize", "resemblyzer-ge2e")
        await bus.js.publish(task_subject("diarize", "resemblyzer-ge2e"), encode(task))
        while (event := json.loads((await events.next_msg(timeout=30)).data))["kind"] != "failed":
            pass
        assert event["failure"]["code"] == "wrong_runtime" and "not transcribe" in event["failure"]["message"]
    finally:
        await bus.close()
    assert stack.processes["dz"].poll() is None
