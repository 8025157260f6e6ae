"""Several orchestrators on one bus: each job's record is committed before its tasks go out, so
whichever orchestrator takes an engine's report finds the task it is about."""

from __future__ import annotations

import asyncio

import httpx

from tests.stack import AUDIO, TestStack, wait_for

JOBS = 200


async def test_two_orchestrators_and_a_fast_engine_stall_no_job(tmp_path):
    stack = TestStack(tmp_path)
    try:
        stack.start_nats()
        stack.start_pipeline()
        stack.start("orchestrator-2", "orchestrator")
        stack.start_engine("faster-whisper", "fw")
        stack.wait_engines("audio-prepare", "merge", "fw")
        # A tone: the VAD finds no speech, so each transcription is nearly free and the jobs'
        # events race through both orchestrators.
        audio = (AUDIO / "tone_no_speech.wav").read_bytes()
        async with httpx.AsyncClient(base_url=stack.url, timeout=60) as client:
            async def submit(_):
                response = await client.post("/v1/jobs", files={"file": ("tone.wav", audio)},
                                             data={"model": "faster-whisper-tiny.en"})
                assert response.status_code == 202, response.text
                return response.json()["id"]
            ids = set()
            for batch in range(0, JOBS, 20):
                ids |= set(await asyncio.gather(*(submit(n) for n in range(batch, batch + 20))))

            async def all_ended():
                listed = (await client.get("/v1/jobs", params={"limit": JOBS * 2})).json()["data"]
                ended = {j["id"]: j["status"] for j in listed
                         if j["id"] in ids and j["status"] in ("completed", "failed", "cancelled")}
                return ended if len(ended) == JOBS else None
            try:
                ended = await wait_for(all_ended, 240, 1.0)
            except TimeoutError:
                listed = (await client.get("/v1/jobs", params={"limit": JOBS * 2})).json()["data"]
                stalled = [(j["id"], j["status"]) for j in listed if j["id"] in ids
                           and j["status"] not in ("completed", "failed", "cancelled")]
                raise AssertionError(f"{len(stalled)} jobs stalled: {stalled[:5]}") from None
        assert set(ended.values()) == {"completed"}
        for name in ("orchestrator", "orchestrator-2"):
            assert stack.processes[name].poll() is None
    finally:
        stack.close()
