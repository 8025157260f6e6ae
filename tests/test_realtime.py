"""Live transcription sessions end to end: the real openai client's Realtime API against the real
gateway and faster-whisper engines over NATS, audio fed at 1x speed."""

from __future__ import annotations

import asyncio
import base64
import signal
import time
from pathlib import Path

import numpy as np
import openai
import pytest

from dalston.synthetic_speech import word_edits
from tests.audio_fixtures import convert, speak
from tests.heard import Heard, paced
from tests.stack import AUDIO, TestStack, words

MODEL = "faster-whisper-tiny.en"
RATE = 24_000
CHUNK_MS = 100
SILENCE_MS = 500
SENTENCES = [
    "The weather today is sunny with a light breeze from the west.",
    "Please remember to buy milk and fresh fruit on your way home.",
    "Our meeting has been moved to Thursday afternoon at three o'clock.",
]


def pcm(path: Path, tmp: Path) -> bytes:
    """`path` as the Realtime API's audio: 16-bit mono PCM at 24 kHz."""
    return convert(path, ".raw", tmp, rate=RATE, channels=1, args=("-f", "s16le")).read_bytes()


@pytest.fixture(scope="module")
def sentences(tmp_path_factory) -> list[tuple[Path, bytes]]:
    tmp = tmp_path_factory.mktemp("live")
    return [(wav, pcm(wav, tmp)) for wav in (speak(s, "en-us", tmp) for s in SENTENCES)]


def connect(stack: TestStack):
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0,
                                websocket_base_url=f"ws://127.0.0.1:{stack.http_port}/v1")
    return client.realtime.connect(extra_query={"intent": "transcription"})


def session(turn_detection: dict | None = None, **audio_input) -> dict:
    return {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": RATE}, "transcription": {"model": MODEL},
        "turn_detection": turn_detection, **audio_input}}}


SERVER_VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": SILENCE_MS}


async def feed(connection, audio: bytes) -> float:
    """Send `audio` at 1x speed; the time its last piece went."""
    return await paced(lambda piece: connection.input_audio_buffer.append(audio=base64.b64encode(piece).decode()),
                       audio, RATE * 2 * CHUNK_MS // 1000, CHUNK_MS)


def silence(ms: int) -> bytes:
    return bytes(RATE * 2 * ms // 1000)


class Events(Heard):
    """Every event of a connection, with when it came: (time, event)."""

    def __init__(self, connection) -> None:
        super().__init__(lambda heard: heard[1].type)
        self._task = asyncio.create_task(self._read(connection))

    async def _read(self, connection) -> None:
        async for event in connection:
            self.heard.append((time.monotonic(), event))

    def stop(self) -> None:
        self._task.cancel()


def wer(reference: list[str], hypothesis: list[str]) -> float:
    return word_edits(reference, hypothesis) / max(1, len(reference))


COMPLETED = "conversation.item.input_audio_transcription.completed"


async def configured(connection, turn_detection: dict | None = SERVER_VAD) -> Events:
    """The connection's events, once the session is configured with `turn_detection`."""
    events = Events(connection)
    await connection.session.update(session=session(turn_detection))
    await events.until("session.updated")
    return events


async def test_three_sentences_give_three_items_soon_after_each_turn(stack, sentences):
    batch_client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=120)
    batch = []
    for wav, _ in sentences:
        with open(wav, "rb") as audio:
            batch.append(batch_client.audio.transcriptions.create(model=MODEL, file=audio).text)
    async with connect(stack) as connection:
        events = await configured(connection)
        turn_ends = []
        for _, audio in sentences:
            # The turn ends once the silence that closes it has been heard.
            turn_ends.append(await feed(connection, audio) + SILENCE_MS / 1000)
            await feed(connection, silence(1000))
        completed = await events.until(COMPLETED, 3)
        events.stop()
    assert len(events.of(COMPLETED)) == 3
    assert len(events.of("input_audio_buffer.speech_started")) == 3
    assert len(events.of("input_audio_buffer.speech_stopped")) == 3
    committed = [e.item_id for _, e in events.of("input_audio_buffer.committed")]
    assert committed == [e.item_id for _, e in completed]
    deltas = events.of("conversation.item.input_audio_transcription.delta")
    assert {e.item_id for _, e in deltas} == set(committed)
    live = [e.transcript for _, e in completed]
    assert wer(words(" ".join(batch)), words(" ".join(live))) <= 0.1, (batch, live)
    latencies = [at - end for (at, _), end in zip(completed, turn_ends)]
    stopped = {e.item_id: at for at, e in events.of("input_audio_buffer.speech_stopped")}
    # How soon is bench/latency.py's to measure (a loaded machine is slow): here, only in order.
    print("after the turn's end", [round(l, 3) for l in latencies],
          "after speech_stopped", [round(at - stopped[e.item_id], 3) for at, e in completed])
    # Each item comes after server VAD heard its speech stop (which may be before the sentence's
    # file ends: espeak-ng pads it with silence).
    assert all(at >= stopped[e.item_id] for at, e in completed), (latencies, stopped)


async def test_client_commits_turns_without_turn_detection(stack, sentences):
    async with connect(stack) as connection:
        events = await configured(connection, None)
        audio = sentences[0][1]
        step = RATE * 2  # a second at a time: no pacing needed without server VAD
        for start in range(0, len(audio), step):
            await connection.input_audio_buffer.append(audio=base64.b64encode(audio[start:start + step]).decode())
        await connection.input_audio_buffer.commit()
        (_, completed), = await events.until(COMPLETED)
        events.stop()
    assert words(completed.transcript) == words(SENTENCES[0])
    assert not events.of("input_audio_buffer.speech_started")


@pytest.mark.parametrize("event, code", [
    ({"type": "no.such.event"}, "unknown_event"),
    ({"type": "input_audio_buffer.append", "audio": "not base64!"}, "invalid_base64"),
    ({"type": "session.update", "session": session(None, format={"type": "audio/pcm", "rate": 16000})},
     "unsupported_rate"),
    ({"type": "session.update", "session": session(None, format={"type": "audio/pcmu"})}, "unsupported_format"),
    ({"type": "session.update", "session": session({"type": "semantic_vad"})}, "unsupported_turn_detection"),
    ({"type": "session.update", "session": session({**SERVER_VAD, "silence_duration_ms": 0})}, "invalid_turn_detection"),
    ({"type": "session.update", "session": {"type": "transcription", "audio": "loud"}}, "invalid_event"),
    ({"type": "input_audio_buffer.commit"}, "input_audio_buffer_commit_empty"),
    # Nested 1,000 deep: sent as text, since no JSON encoder goes that deep either.
    ('{"type": "session.update", "session": ' + '{"a": ' * 1000 + '1' + '}' * 1001, "invalid_json"),
])
async def test_a_bad_event_gets_an_error_and_the_session_stays_open(stack, event, code):
    async with connect(stack) as connection:
        events = Events(connection)
        await (connection.send_raw(event) if isinstance(event, str) else connection.send(event))
        (_, error), = await events.until("error")
        assert error.error.code == code and error.error.message
        await connection.session.update(session=session(SERVER_VAD))
        await events.until("session.updated")
        events.stop()


async def test_four_sessions_on_two_engines(stack, sentences):
    async def one(number: int) -> str:
        async with connect(stack) as connection:
            events = await configured(connection)
            await feed(connection, sentences[number % 3][1] + silence(1000))
            (_, completed), = await events.until(COMPLETED)
            events.stop()
            return completed.transcript

    transcripts = await asyncio.gather(*(one(n) for n in range(4)))
    for number, transcript in enumerate(transcripts):
        assert wer(words(SENTENCES[number % 3]), words(transcript)) <= 0.1, transcript


@pytest.fixture(scope="module")
def lone(tmp_path_factory):
    """A Dalston with one faster-whisper engine, whose death a session survives."""
    system = TestStack.running(tmp_path_factory.mktemp("lone"), "fw-first")
    yield system
    system.close()


async def test_a_killed_engine_gives_an_error_and_the_session_moves_on(lone, sentences):
    async with connect(lone) as connection:
        events = await configured(connection)
        await feed(connection, sentences[0][1] + silence(1000))
        await events.until(COMPLETED)
        lone.start_engine("faster-whisper", "fw-second")
        lone.wait_engines("fw-second")
        lone.stop("fw-first", sig=signal.SIGKILL)
        await feed(connection, sentences[1][1][: RATE])  # speech cut off by the engine's death
        (_, error), = await events.until("error", timeout=30)
        assert error.error.code == "engine_lost"
        await feed(connection, sentences[2][1] + silence(1000))
        completed = await events.until(COMPLETED, 2, timeout=60)
        events.stop()
    assert wer(words(SENTENCES[2]), words(completed[-1][1].transcript)) <= 0.1


async def test_batch_jobs_go_on_beside_a_session(stack, sentences):
    """A session leases its model on one engine (its heartbeat counts it); batch jobs, for that
    model and for another, are served meanwhile rather than waiting for the session to end."""
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=90)
    async with connect(stack) as connection:
        events = await configured(connection)
        await feed(connection, sentences[0][1] + silence(1000))
        await events.until(COMPLETED)
        engines = (await client.get("/engines", cast_to=object))["data"]
        assert sorted(e["sessions"] for e in engines if e["runtime"] == "faster-whisper")[-1] == 1
        for model in ("faster-whisper-base", MODEL):
            with open(AUDIO / "speaker1.wav", "rb") as audio:
                result = await client.audio.transcriptions.create(model=model, file=audio)
            assert words(result.text) == words("That was hilarious, I can't believe you said that.")
        await feed(connection, sentences[1][1] + silence(1000))
        await events.until(COMPLETED, 2)
        events.stop()


def noise(kind: str, seconds: float) -> bytes:
    """`seconds` of a signal that holds no speech, as 16-bit PCM at RATE, about -20 dBFS."""
    size = int(RATE * seconds)
    rng = np.random.default_rng(0)
    if kind == "silence":
        signal_ = np.zeros(size)
    elif kind == "white":
        signal_ = rng.standard_normal(size)
    elif kind == "pink":  # white noise shaped to 1/f power in the frequency domain
        spectrum = np.fft.rfft(rng.standard_normal(size))
        spectrum[1:] /= np.sqrt(np.arange(1, len(spectrum)))
        signal_ = np.fft.irfft(spectrum, size)
    else:  # a 440 Hz tone
        signal_ = np.sin(2 * np.pi * 440 * np.arange(size) / RATE)
    peak = np.abs(signal_).max() or 1.0
    return (signal_ / peak * 0.1 * 32767).astype("<i2").tobytes()


@pytest.mark.parametrize("kind", ["silence", "white", "pink", "tone"])
async def test_a_minute_without_speech_gives_no_text(stack, kind):
    # Just under the session's buffer bound (DALSTON_MAX_SESSION_BUFFER_SECONDS, 60 s).
    audio = noise(kind, 59)
    async with connect(stack) as connection:
        events = await configured(connection, None)
        step = RATE * 2
        for start in range(0, len(audio), step):
            await connection.input_audio_buffer.append(audio=base64.b64encode(audio[start:start + step]).decode())
        await connection.input_audio_buffer.commit()
        (_, completed), = await events.until(COMPLETED)
        events.stop()
    assert completed.transcript == ""
