"""Streamed transcription end to end: the real openai client with `stream=True` against the real
gateway, orchestrator and faster-whisper engines; and a NATS client following the same deltas."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from dalston.contracts import TRANSCRIPT_SUBJECT, TranscriptDelta
from tests.audio_fixtures import speak
from tests.stack import AUDIO, DIALOGUE_WORDS, wait_job, words

MODEL = "faster-whisper-tiny.en"
# Distinct sentences: a looped clip makes Whisper fall back to sampling on its repetitive
# windows, and two runs of the same request would then differ.
STORY = (
    "The morning train left the station a few minutes late. Most passengers were reading "
    "newspapers or staring out of the windows at the grey fields. A young woman near the door was "
    "writing a letter to her brother, who lived on a farm in the north. She told him about her "
    "new job at the library, where she sorted old maps and repaired torn books. Her manager was a "
    "patient man who loved jazz and collected antique clocks. Every Friday he brought a cake for "
    "the whole team. The train stopped at a small town with a red church and a busy market. A "
    "farmer climbed aboard carrying a basket of apples and a sleepy dog. The dog curled up under "
    "a seat and began to snore quietly. Outside, the clouds opened and sunlight poured across the "
    "hills. Children waved from a bridge as the carriages rolled past. The woman finished her "
    "letter and folded it into an envelope. She decided to buy a stamp at the next stop and post "
    "it before lunch. Later that afternoon she planned to visit a museum about the history of "
    "ships. Her grandfather had been a sailor, and she still kept his compass in a drawer at "
    "home. When the train finally reached the city, the platform was crowded with tourists and "
    "students. She walked quickly through the hall, past a man selling flowers and a musician "
    "playing the violin. The air smelled of coffee and fresh bread. At the corner she found a "
    "post office with a blue door. The clerk smiled, weighed the envelope, and wished her a "
    "pleasant day. Then she crossed the square, where pigeons gathered around a fountain, and "
    "went inside the museum to begin her afternoon."
)


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def two_minutes(tmp_path_factory):
    """About 2 minutes of speech: several of Whisper's 30 s windows."""
    return speak(STORY, "en-us", tmp_path_factory.mktemp("stream"), words_per_minute=130)


def streamed(client, path):
    """(seconds after the request, delta) of every delta, and (seconds, event) of the done event."""
    deltas, done = [], None
    started = time.monotonic()
    with open(path, "rb") as audio:
        for event in client.audio.transcriptions.create(model=MODEL, file=audio, stream=True):
            at = time.monotonic() - started
            if event.type == "transcript.text.delta":
                deltas.append((at, event.delta))
            elif event.type == "transcript.text.done":
                done = (at, event)
    return deltas, done


def test_deltas_come_while_decoding_and_add_up_to_the_text(client, two_minutes):
    with open(two_minutes, "rb") as audio:
        plain = client.audio.transcriptions.create(model=MODEL, file=audio)  # also warms the model
    deltas, done = streamed(client, two_minutes)
    assert done is not None
    total, final = done
    assert len(deltas) >= 3
    # The first delta comes once the first chunk (DALSTON_CHUNK_SECONDS, 60 s of the two
    # minutes) is decoded: its speech windows are decoded in one batch, and a streamed job's
    # chunks one after the other. Before it come fixed costs: preparing the audio, reading
    # back the chunk.
    assert deltas[0][0] < 0.7 * total, (deltas[0][0], total)
    assert "".join(delta for _, delta in deltas) == final.text  # every segment, in text order
    assert final.text == plain.text
    assert final.usage.output_tokens > 0 and final.usage.input_tokens > 0


def test_a_failed_job_ends_the_stream_with_its_error(client):
    with pytest.raises(openai.APIError, match="text, not audio"):
        streamed(client, AUDIO / "invalid" / "text_as_wav.wav")


def test_a_client_gone_mid_stream_breaks_neither_job_nor_gateway(stack, client, two_minutes):
    with open(two_minutes, "rb") as audio, httpx.stream(
            "POST", f"{stack.url}/v1/audio/transcriptions", files={"file": audio},
            data={"model": MODEL, "stream": "true"}, timeout=300) as response:
        assert response.status_code == 200
        job_id = response.headers["dalston-job-id"]
        for line in response.iter_lines():
            if line.startswith("data:"):
                break  # the first delta, then hang up
    record = asyncio.run(wait_job(stack, job_id, timeout=300))
    assert record["status"] == "completed"
    deltas, (_, final) = streamed(client, AUDIO / "dialogue.wav")
    assert words(final.text) == DIALOGUE_WORDS
    assert "Traceback" not in stack.log_text("gateway")


async def test_a_nats_client_follows_the_segments(stack):
    """The subject documented for NATS clients carries every segment of a job as it is decoded."""
    bus = await stack.bus()
    received: list[TranscriptDelta] = []

    async def on_delta(delta: TranscriptDelta) -> None:
        received.append(delta)

    subscription = await bus.subscribe(TRANSCRIPT_SUBJECT.format(job_id="*"), on_delta, kind=TranscriptDelta)
    try:
        async with httpx.AsyncClient(timeout=120) as http:
            with open(AUDIO / "dialogue.wav", "rb") as audio:
                response = await http.post(f"{stack.url}/v1/jobs", files={"file": audio},
                                           data={"model": MODEL})
            job_id = response.json()["id"]
        assert (await wait_job(stack, job_id))["status"] == "completed"
        await asyncio.sleep(0.5)
    finally:
        await subscription.unsubscribe()
        await bus.close()
    mine = [d for d in received if d.job_id == job_id]
    assert [d.seq for d in mine] == list(range(len(mine)))
    assert words(" ".join(d.segment.text for d in mine)) == DIALOGUE_WORDS
