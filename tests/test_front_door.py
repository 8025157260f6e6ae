"""The bounded front door: past DALSTON_MAX_QUEUED_JOBS (and DALSTON_MAX_CONCURRENT_UPLOADS) the
gateway refuses with Retry-After, a job published straight to NATS fails `overloaded`, an
accepted job always runs; and the metrics people graph."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import Counter

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dalston.contracts import (
    SUBMIT_SUBJECT,
    TERMINAL,
    CancelRequest,
    JobEvent,
    JobRecord,
    JobRequest,
    TaskRecord,
)
from dalston.services.gateway.form import MAX_FIELD_BYTES
from dalston.services.gateway.metrics import _worked_seconds
from dalston.services.intake.admission import Admission, Refused
from tests.stack import AUDIO, TestStack, wait_for, wait_job, words

MODEL = "faster-whisper-tiny.en"
# A model whose runtime (nemo) has no engine here: its jobs stay queued.
STUCK_MODEL = "parakeet-ctc-0.6b"
MAX_QUEUED = 20
MAX_UPLOADS = 8
SPEAKER1 = words("That was hilarious, I can't believe you said that.")


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    system = TestStack.running(tmp_path_factory.mktemp("front"), "fw",
                               DALSTON_MAX_QUEUED_JOBS=str(MAX_QUEUED),
                               DALSTON_MAX_CONCURRENT_UPLOADS=str(MAX_UPLOADS),
                               DALSTON_ENGINE_WAIT="600")
    yield system
    system.close()


async def scrape(client: httpx.AsyncClient) -> dict:
    """/metrics, parsed: metric families by name."""
    text = (await client.get("/metrics")).text
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(families: dict, name: str, sample: str, **labels: str) -> list[float]:
    """The values of `sample` of family `name` whose labels include `labels`."""
    return [s.value for s in families[name].samples
            if s.name == sample and labels.items() <= s.labels.items()]


def assert_refusal(response: httpx.Response) -> None:
    assert response.status_code in (429, 503), response.text
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert error["code"] == ("overloaded" if response.status_code == 429 else "uploads_busy")
    assert error["message"]


# --- the bound, the pure parts ---------------------------------------------------------------


def test_admission_refuses_past_the_bound_and_frees_a_released_place():
    admission = Admission(bus=None, max_queued_jobs=2, max_concurrent_uploads=1, on_ended=print)
    admission.reserve("a")
    admission.reserve("b")
    with pytest.raises(Refused) as refused:
        admission.reserve("c")
    assert (refused.value.status, refused.value.code) == (429, "overloaded")
    assert refused.value.retry_after == 60  # no job ended lately: the longest wait
    admission.release("a")
    admission.reserve("c")
    assert admission.unfinished == 2


async def test_admission_bounds_uploads_in_flight():
    admission = Admission(bus=None, max_queued_jobs=10, max_concurrent_uploads=1, on_ended=print,
                          upload_wait=0.05)
    async with admission.receiving():
        with pytest.raises(Refused) as refused:
            async with admission.receiving():
                pass
    assert (refused.value.status, refused.value.code) == (503, "uploads_busy")
    async with admission.receiving():  # the slot came back
        pass


def _recorded(job_id: str, owner: str | None, runtime: str = "fw", status: str = "queued",
              created_at: float | None = None) -> JobRecord:
    return JobRecord(id=job_id, status=status, model="m", runtime=runtime, runtime_model_id="m",
                     audio_object="a", owner=owner, created_at=time.time() if created_at is None else created_at,
                     finished_at=time.time() if status in TERMINAL else None)


def test_one_key_holds_at_most_half_the_queue_unless_its_record_says_otherwise():
    admission = Admission(bus=None, max_queued_jobs=4, max_concurrent_uploads=4)
    admission.reserve("a1", "alice")
    admission.reserve("a2", "alice")
    with pytest.raises(Refused) as refused:
        admission.reserve("a3", "alice")
    assert (refused.value.status, refused.value.code) == (429, "key_quota")
    assert "alice" in str(refused.value)
    admission.reserve("b1", "bob")  # the other half is bob's
    admission.reserve("b2", "bob")
    with pytest.raises(Refused):
        admission.reserve("c1", "carol", max_jobs=10)  # a bigger share, but the queue is full
    fresh = Admission(bus=None, max_queued_jobs=4, max_concurrent_uploads=4)
    for n in range(3):
        fresh.reserve(f"c{n}", "carol", max_jobs=3)
    with pytest.raises(Refused):
        fresh.reserve("c3", "carol", max_jobs=3)
    # Without keys (one user) there is no share: the whole queue.
    anonymous = Admission(bus=None, max_queued_jobs=4, max_concurrent_uploads=4)
    for n in range(4):
        anonymous.reserve(f"j{n}")


def test_jobs_no_engine_serves_count_against_their_key_only_and_retry_after_says_when_they_fail():
    admission = Admission(bus=None, max_queued_jobs=4, max_concurrent_uploads=4,
                          served=lambda runtime: runtime != "nemo", engine_wait=120)
    created = time.time() - 100  # 20 s before DALSTON_ENGINE_WAIT fails the oldest
    for n in range(4):
        admission.observe(f"m{n}", _recorded(f"m{n}", "mallory", runtime="nemo", created_at=created + n))
    assert admission.unfinished == 4
    with pytest.raises(Refused) as refused:
        admission.reserve("m4", "mallory", max_jobs=10)  # the queue is full for mallory
    assert refused.value.code == "overloaded" and 19 <= refused.value.retry_after <= 21
    with pytest.raises(Refused) as refused:
        admission.reserve("m5", "mallory")  # and past her own share
    assert refused.value.code == "key_quota" and 19 <= refused.value.retry_after <= 21
    for n in range(2):  # every other key goes on as if those jobs were not there
        admission.reserve(f"b{n}", "bob")
    # Once an engine serves them they count again.
    admission._served = lambda runtime: True
    with pytest.raises(Refused):
        admission.reserve("c0", "carol")


def test_retry_after_of_a_key_follows_its_own_job_ends():
    admission = Admission(bus=None, max_queued_jobs=4, max_concurrent_uploads=4)
    for n in range(2):
        admission.observe(f"a{n}", _recorded(f"a{n}", "alice"))
    for n in range(6):  # alice's earlier jobs ended: about one every 10 s
        admission.observe(f"done{n}", _recorded(f"done{n}", "alice"))
        admission.observe(f"done{n}", _recorded(f"done{n}", "alice", status="completed"))
    with pytest.raises(Refused) as refused:
        admission.reserve("a2", "alice")
    assert refused.value.retry_after == 10


def test_an_expired_or_ended_record_frees_its_place():
    admission = Admission(bus=None, max_queued_jobs=2, max_concurrent_uploads=1)
    admission.reserve("a", "alice")
    admission.observe("a", _recorded("a", "alice"))
    admission.release("a")  # recorded: no longer the gateway's to give back
    assert admission.unfinished == 1
    admission.observe("a", None)
    assert admission.unfinished == 0


async def test_one_key_holds_at_most_half_the_upload_slots():
    admission = Admission(bus=None, max_queued_jobs=10, max_concurrent_uploads=4, upload_wait=0.05)
    async with admission.receiving("alice"), admission.receiving("alice"):
        with pytest.raises(Refused) as refused:
            async with admission.receiving("alice"):
                pass
        assert (refused.value.status, refused.value.code) == (503, "uploads_busy")
        assert "alice" in str(refused.value)
        async with admission.receiving("bob"), admission.receiving("bob"):
            with pytest.raises(Refused):  # every slot is taken
                async with admission.receiving("carol"):
                    pass
    async with admission.receiving("alice") as slot:
        slot.release_shared()  # a URL being fetched: alice's slot held, the shared one back
        async with admission.receiving("bob"), admission.receiving("bob"), admission.receiving("carol"):
            pass
        async with admission.receiving("alice"):
            with pytest.raises(Refused):
                async with admission.receiving("alice"):
                    pass
    assert admission._uploads == 0 and not admission._owner_uploads


async def test_a_waiting_upload_gets_the_slot_given_back():
    admission = Admission(bus=None, max_queued_jobs=10, max_concurrent_uploads=2, upload_wait=5)
    first = admission.receiving("alice")
    await first.__aenter__()
    waiting = asyncio.create_task(admission.receiving("alice").__aenter__())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await first.__aexit__(None, None, None)
    await asyncio.wait_for(waiting, 1)


def test_queue_wait_counts_parallel_tasks_once():
    def task(start, end):
        return TaskRecord(id=f"t{start}", stage="transcribe", runtime="x", started_at=start, finished_at=end)
    record = JobRecord(id="j", model="m", runtime="x", runtime_model_id="m", audio_object="a",
                       tasks={"a": task(1, 3), "b": task(2, 5), "c": task(4, 6), "d": task(8, 9)})
    assert _worked_seconds(record) == 6  # 1..6 and 8..9


# --- the real thing ------------------------------------------------------------------------------


async def test_a_flood_gets_answers_or_refusals_and_every_accepted_job_runs(front):
    audio = (AUDIO / "speaker1.wav").read_bytes()
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    engine = front.processes["fw"]
    async with httpx.AsyncClient(base_url=front.url, timeout=300, limits=limits) as client:
        async def one(i: int) -> httpx.Response:
            route = "/v1/audio/transcriptions" if i % 2 else "/v1/jobs"
            return await client.post(route, files={"file": ("speaker1.wav", audio)}, data={"model": MODEL})

        # The engine clears short jobs faster than one gateway on two cores takes them in: it
        # is paused while the flood comes, so the queue fills up.
        engine.send_signal(signal.SIGSTOP)
        try:
            flood = [asyncio.create_task(one(i)) for i in range(100)]  # 5x the queue's bound
            # Every /v1/jobs request is answered (202 or refused) without waiting for its job.
            await asyncio.wait(flood[::2], timeout=300)
        finally:
            engine.send_signal(signal.SIGCONT)
        responses = await asyncio.gather(*flood)  # any exception (a reset connection) fails the test
        accepted = []
        for response in responses:
            if response.status_code == 200:
                assert words(response.json()["text"]) == SPEAKER1
            elif response.status_code == 202:
                accepted.append(response.json()["id"])
            else:
                assert_refusal(response)
        codes = Counter(r.status_code for r in responses)
        assert codes[429] > 0 and codes[200] + codes[202] > 0, codes
        # Nothing finished while the engine was paused: no more were accepted than the bound.
        assert codes[200] + codes[202] <= MAX_QUEUED, codes
        # Accepted is never dropped: every 202 ends completed with the right words.
        for job_id in accepted:
            record = await wait_job(front, job_id, timeout=600)
            assert record["status"] == "completed", record
            transcript = await client.get(f"/v1/jobs/{job_id}/transcript", params={"format": "text"})
            assert words(transcript.text) == SPEAKER1
        # And afterwards the service answers as ever.
        after = await one(1)
        assert after.status_code == 200 and words(after.json()["text"]) == SPEAKER1


async def test_too_many_uploads_at_once_are_refused_before_their_body_is_read(front):
    audio = (AUDIO / "speaker1.wav").read_bytes()
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{MODEL}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"s.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode() + audio + f"\r\n--{boundary}--\r\n".encode()
    go_on = asyncio.Event()

    async def slow_body():
        yield body[:1000]
        await go_on.wait()
        yield body[1000:]

    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    async with httpx.AsyncClient(base_url=front.url, timeout=120) as client:
        slow = [asyncio.create_task(client.post("/v1/jobs", content=slow_body(), headers=headers))
                for _ in range(MAX_UPLOADS)]

        probes = []

        async def refused() -> httpx.Response | None:
            response = await client.post("/v1/jobs", files={"file": ("s.wav", audio)}, data={"model": MODEL})
            probes.append(response)  # accepted until every slot is held
            return response if response.status_code == 503 else None

        try:
            assert_refusal(await wait_for(refused, 60, 0.2))
        finally:
            go_on.set()
        for response in [*await asyncio.gather(*slow), *probes[:-1]]:
            assert response.status_code == 202, response.text
            assert (await wait_job(front, response.json()["id"], timeout=300))["status"] == "completed"


async def test_form_fields_are_bounded_so_they_are_not_held_whole_in_memory(front):
    async with httpx.AsyncClient(base_url=front.url, timeout=60) as client:
        response = await client.post("/v1/jobs", files={"file": ("s.wav", b"RIFF")},
                                     data={"model": MODEL, "language": "x" * (MAX_FIELD_BYTES + 1)})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "language"
        response = await client.post("/v1/jobs", content=b"model=x", headers={
            "Content-Type": "application/x-www-form-urlencoded"})
        assert response.status_code == 400 and "multipart/form-data" in response.json()["error"]["message"]


async def test_metrics_are_prometheus_text_with_jobs_refusals_and_queues(front):
    async with httpx.AsyncClient(base_url=front.url, timeout=120) as client:
        response = await client.post("/v1/audio/transcriptions", data={"model": MODEL},
                                     files={"file": ("s.wav", (AUDIO / "speaker1.wav").read_bytes())})
        assert response.status_code == 200, response.text

        async def observed():  # the gateway sees the job end just after it answers
            families = await scrape(client)
            counts = samples(families, "dalston_job_duration_seconds", "dalston_job_duration_seconds_count",
                             model=MODEL)
            return counts and families
        families = await wait_for(observed, 30)

    for histogram in ("dalston_job_duration_seconds", "dalston_job_queue_wait_seconds"):
        assert families[histogram].type == "histogram"
        assert samples(families, histogram, f"{histogram}_count", model=MODEL)[0] >= 1
        assert samples(families, histogram, f"{histogram}_bucket", model=MODEL, le="3600.0")
    assert samples(families, "dalston_real_time_factor", "dalston_real_time_factor_count",
                   model=MODEL, runtime="faster-whisper")[0] >= 1
    assert samples(families, "dalston_audio_seconds", "dalston_audio_seconds_total", model=MODEL)[0] >= 2.4
    assert samples(families, "dalston_jobs", "dalston_jobs_total", model=MODEL, status="completed")[0] >= 1
    assert families["dalston_tasks_queued"].type == "gauge"
    assert samples(families, "dalston_engine_up", "dalston_engine_up", engine="fw")
    assert len(samples(families, "dalston_jobs_unfinished", "dalston_jobs_unfinished")) == 1
    assert samples(families, "dalston_max_queued_jobs", "dalston_max_queued_jobs") == [MAX_QUEUED]


async def test_a_nats_job_past_the_bound_fails_overloaded(front):
    bus = await front.bus()
    audio = (AUDIO / "speaker1.wav").read_bytes()
    stuck = [uuid.uuid4().hex for _ in range(MAX_QUEUED)]
    try:
        # Fill the queue with jobs no engine can run (no nemo engine here).
        for job_id in stuck:
            await bus.publish(SUBMIT_SUBJECT, JobRequest(id=job_id, model=STUCK_MODEL, audio=audio))

        async def all_recorded():
            records = [await bus.jobs.get(job_id) for job_id in stuck]
            return all(r is not None for r in records) and records
        for record in await wait_for(all_recorded, 120):
            assert record.status not in TERMINAL, record.failure

        events: asyncio.Queue[JobEvent] = asyncio.Queue()

        refused_id = uuid.uuid4().hex
        subscription = await bus.subscribe(f"events.job.{refused_id}", events.put, kind=JobEvent)
        await bus.publish(SUBMIT_SUBJECT, JobRequest(id=refused_id, model=MODEL, audio=audio))
        event = await asyncio.wait_for(events.get(), 60)
        await subscription.unsubscribe()
        assert event.status == "failed"
        assert event.failure.code == "overloaded" and "DALSTON_MAX_QUEUED_JOBS" in event.failure.message

        # The gateway counts the same jobs: HTTP is refused too, before the upload is stored.
        async with httpx.AsyncClient(base_url=front.url, timeout=60) as client:
            async def counted():
                families = await scrape(client)
                return samples(families, "dalston_jobs_unfinished", "dalston_jobs_unfinished") == [MAX_QUEUED]
            await wait_for(counted, 30)
            response = await client.post("/v1/jobs", files={"file": ("s.wav", audio)}, data={"model": MODEL})
            assert_refusal(response)
            assert response.status_code == 429
            families = await scrape(client)
        assert samples(families, "dalston_refusals", "dalston_refusals_total", via="nats") == [1]
        assert samples(families, "dalston_refusals", "dalston_refusals_total",
                       reason="overloaded", via="http")
    finally:
        for job_id in stuck:
            await bus.publish("jobs.cancel", CancelRequest(id=job_id))
        await bus.close()
    # Cancelled, they free the queue: a job is accepted again.
    async def accepted():
        response = httpx.post(f"{front.url}/v1/jobs", files={"file": ("s.wav", audio)},
                              data={"model": MODEL})
        return response.status_code == 202 and response.json()["id"]
    assert (await wait_job(front, await wait_for(accepted, 60, 0.5), timeout=120))["status"] == "completed"
