"""`dalston serve wyoming` end to end: the `wyoming` package's client, called exactly as Home
Assistant's Wyoming speech-to-text calls it, against a real Dalston (NATS, gateway, orchestrator,
faster-whisper tiny.en); and hostile clients on raw sockets, after which the server still serves."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event, async_read_event
from wyoming.info import Describe, Info

from dalston.keys import KeyStore
from dalston.synthetic_speech import word_error_rate
from tests.audio_fixtures import DIALOGUE, DIALOGUE_TEXT, convert, speak
from tests.stack import AUDIO, TestStack, free_port

MODEL = "faster-whisper-tiny.en"
# What Home Assistant sends (homeassistant/components/wyoming/const.py).
RATE, WIDTH, CHANNELS = 16_000, 2, 1
CHUNK_BYTES = 2048
# The strict server's bounds, small enough to reach in a test.
STRICT_SECONDS, STRICT_CONNECTIONS, STRICT_IDLE = 3, 8, 3
# A guard against a hung test, never a measurement.
PATIENCE = 120.0


def pcm(path: Path, tmp: Path) -> bytes:
    """`path` as Home Assistant streams it: 16-bit mono PCM at 16 kHz."""
    return convert(path, ".raw", tmp, rate=RATE, channels=CHANNELS, args=("-f", "s16le")).read_bytes()


def wait_wyoming(stack: TestStack, name: str, port: int, timeout: float = 60.0) -> None:
    """Until the server `name` answers `describe`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stack.processes[name].poll() is not None:
            raise RuntimeError(f"{name} died:\n{stack.log_text(name)[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.sendall(b'{"type": "describe"}\n')
                if b'"info"' in sock.recv(4096):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{name} not answering; see {stack.logs}/{name}.log")


def start_wyoming(stack: TestStack, name: str, **env: str) -> int:
    port = free_port()
    stack.start(name, "wyoming", DALSTON_WYOMING_PORT=str(port), **env)
    wait_wyoming(stack, name, port)
    return port


@pytest.fixture(scope="module")
def wyoming(stack) -> int:
    """A Wyoming server on the shared Dalston, with the default bounds."""
    port = start_wyoming(stack, "wyoming")
    yield port
    stack.stop("wyoming")


@pytest.fixture(scope="module")
def strict(stack) -> int:
    """A Wyoming server with small bounds: audio, connections, and time without a byte."""
    port = start_wyoming(stack, "wyoming-strict", DALSTON_MAX_AUDIO_SECONDS=str(STRICT_SECONDS),
                         DALSTON_WYOMING_MAX_CONNECTIONS=str(STRICT_CONNECTIONS),
                         DALSTON_SESSION_IDLE_SECONDS=str(STRICT_IDLE),
                         # A runtime without an engine is refused at once, not waited for.
                         DALSTON_ENGINE_WAIT="0")
    yield port
    stack.stop("wyoming-strict")


@pytest.fixture(scope="module")
def audio(tmp_path_factory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("wyoming")
    return {"dialogue": pcm(DIALOGUE, tmp), "speaker1": pcm(AUDIO / "speaker1.wav", tmp),
            "command": pcm(speak("Turn on the kitchen lights.", "en-us", tmp), tmp)}


async def home_assistant(port: int, audio: bytes, language: str | None = "en", model: str | None = None
                         ) -> list[Event]:
    """What Home Assistant's `async_process_audio_stream` does (which names no model): every
    event up to the transcript (or an error)."""
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Transcribe(name=model, language=language).event())
        await client.write_event(AudioStart(rate=RATE, width=WIDTH, channels=CHANNELS).event())
        for start in range(0, len(audio), CHUNK_BYTES):
            await client.write_event(AudioChunk(rate=RATE, width=WIDTH, channels=CHANNELS,
                                                audio=audio[start:start + CHUNK_BYTES]).event())
        await client.write_event(AudioStop().event())
        events = []
        while not events or not (Transcript.is_type(events[-1].type) or Error.is_type(events[-1].type)):
            event = await asyncio.wait_for(client.read_event(), PATIENCE)
            assert event is not None, f"connection lost after {[e.type for e in events]}"
            events.append(event)
        return events


def text_of(events: list[Event]) -> str:
    assert Transcript.is_type(events[-1].type), events[-1]
    return Transcript.from_event(events[-1]).text


async def describe(port: int) -> Info:
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Describe().event())
        event = await asyncio.wait_for(client.read_event(), PATIENCE)
        assert event is not None and Info.is_type(event.type)
        return Info.from_event(event)


async def raw(port: int, *frames: bytes) -> list[Event]:
    """Send `frames` as they are (a failed write is fine: the server may close first), then every
    event the server answers with until it closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for frame in frames:
            writer.write(frame)
            await writer.drain()
    except ConnectionError:
        pass
    events = []
    try:
        while (event := await asyncio.wait_for(async_read_event(reader), PATIENCE)) is not None:
            events.append(event)
    except ConnectionResetError:  # what came before the reset is what the server said
        pass
    writer.close()
    return events


def frame(event: Event) -> bytes:
    """The bytes of `event` as the wyoming package writes them."""
    header = {"type": event.type, "version": "1.10.2"}
    data = json.dumps(event.data).encode() if event.data else b""
    if data:
        header["data_length"] = len(data)
    if event.payload:
        header["payload_length"] = len(event.payload)
    return json.dumps(header).encode() + b"\n" + data + (event.payload or b"")


def error_code(events: list[Event]) -> str | None:
    return Error.from_event(events[-1]).code if events and Error.is_type(events[-1].type) else None


def error_of(events: list[Event]) -> Error:
    assert events and Error.is_type(events[-1].type), [e.type for e in events]
    return Error.from_event(events[-1])


# --- as Home Assistant uses it ---------------------------------------------------------------

async def test_describe_lists_each_transcription_model_and_its_languages(wyoming):
    info = await describe(wyoming)
    (program,) = info.asr
    models = {model.name: model for model in program.models}
    assert models[MODEL].languages == ["en"]
    assert "de" in models["faster-whisper-base"].languages
    assert "resemblyzer-ge2e" not in models  # tells speakers apart, does not transcribe
    assert program.supports_transcript_streaming


async def test_a_spoken_recording_comes_back_as_its_text(wyoming, audio):
    events = await home_assistant(wyoming, audio["dialogue"])
    text = text_of(events)
    assert word_error_rate(DIALOGUE_TEXT, text) <= 0.1, text
    kinds = [event.type for event in events]
    assert kinds[0] == TranscriptStart().event().type and kinds[-1] == "transcript"
    chunks = "".join(TranscriptChunk.from_event(e).text for e in events if TranscriptChunk.is_type(e.type))
    assert chunks.split() == text.split()


async def test_a_command_and_then_the_stream_ends(wyoming, audio):
    async with AsyncTcpClient("127.0.0.1", wyoming) as client:
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=RATE, width=WIDTH, channels=CHANNELS).event())
        await client.write_event(AudioChunk(rate=RATE, width=WIDTH, channels=CHANNELS,
                                            audio=audio["command"]).event())
        await client.write_event(AudioStop().event())
        events = []
        while not events or not TranscriptStop.is_type(events[-1].type):
            events.append(await asyncio.wait_for(client.read_event(), PATIENCE))
    text = next(Transcript.from_event(e).text for e in events if Transcript.is_type(e.type))
    assert word_error_rate("turn on the kitchen lights", text) <= 0.2, text


async def test_a_language_or_model_it_cannot_serve_is_an_error(wyoming):
    error = error_of(await raw(wyoming, frame(Transcribe(language="de").event())))
    assert error.code == "unsupported_language" and "transcribes en" in error.text
    assert error_of(await raw(wyoming, frame(Transcribe(name="whisper-9").event()))).code == "unknown_model"
    assert error_of(await raw(wyoming, frame(Transcribe(name="resemblyzer-ge2e").event()))).code == "wrong_runtime"
    assert (await describe(wyoming)).asr


# --- hostile clients --------------------------------------------------------------------------

def start_frames(rate: int = RATE, width: int = WIDTH, channels: int = CHANNELS) -> list[bytes]:
    return [frame(Transcribe(language="en").event()),
            frame(AudioStart(rate=rate, width=width, channels=channels).event())]


async def test_a_chunk_over_a_megabyte_is_refused(strict):
    header = json.dumps({"type": "audio-chunk", "data": {"rate": RATE, "width": WIDTH, "channels": CHANNELS},
                         "payload_length": 1024 * 1024 + 2}).encode() + b"\n"
    error = error_of(await raw(strict, *start_frames(), header, b"\0" * (1024 * 1024 + 2)))
    assert error.code == "bad_event" and "over the limit" in error.text


@pytest.mark.parametrize("rate, width, channels", [(8000, WIDTH, CHANNELS), (RATE, 4, CHANNELS), (RATE, WIDTH, 2)])
async def test_a_chunk_unlike_its_audio_start_is_refused(strict, audio, rate, width, channels):
    chunk = AudioChunk(rate=rate, width=width, channels=channels, audio=audio["speaker1"][:CHUNK_BYTES]).event()
    error = error_of(await raw(strict, *start_frames(), frame(chunk)))
    assert error.code == "invalid_audio" and "audio-start said" in error.text


@pytest.mark.parametrize("rate, width, channels", [(0, WIDTH, CHANNELS), (RATE, 9, CHANNELS), (RATE, WIDTH, 0),
                                                   (RATE, WIDTH, 1000), ("16000", WIDTH, CHANNELS)])
async def test_an_impossible_audio_start_is_refused(strict, rate, width, channels):
    start = Event("audio-start", {"rate": rate, "width": width, "channels": channels})
    error = error_of(await raw(strict, frame(start)))
    assert error.code in ("invalid_audio", "invalid_event")


async def test_audio_without_end_is_cut_at_the_longest_audio(strict, audio):
    second = AudioChunk(rate=RATE, width=WIDTH, channels=CHANNELS, audio=b"\0\1" * RATE).event()
    error = error_of(await raw(strict, *start_frames(), *[frame(second)] * (STRICT_SECONDS * 4)))
    assert error.code == "invalid_audio" and "DALSTON_MAX_AUDIO_SECONDS" in error.text


@pytest.mark.parametrize("garbage", [b"{not json\n", b"[1, 2]\n", b'{"type": 7}\n', b"\xff\xfe\n",
                                     b'{"type": "transcribe", "data": "x"}\n', b"{" * 70_000 + b"\n",
                                     b'{"type": "describe", "payload_length": -1}\n'])
async def test_a_malformed_header_is_refused(strict, garbage):
    assert error_of(await raw(strict, garbage)).code == "bad_event"


async def test_a_data_length_that_says_more_than_comes_times_out(strict):
    # The socket stays open: only the server's patience ends the wait.
    reader, writer = await asyncio.open_connection("127.0.0.1", strict)
    writer.write(b'{"type": "transcribe", "data_length": 100}\n{"language": "en"}')
    await writer.drain()
    event = await asyncio.wait_for(async_read_event(reader), PATIENCE)
    writer.close()
    assert Error.is_type(event.type) and Error.from_event(event).code == "timeout"


async def test_a_data_length_that_says_less_than_comes_is_refused(strict):
    error = error_of(await raw(strict, b'{"type": "transcribe", "data_length": 5}\n{"language": "en"}\n'))
    assert error.code == "bad_event"


async def test_audio_out_of_order_is_refused(strict, audio):
    chunk = AudioChunk(rate=RATE, width=WIDTH, channels=CHANNELS, audio=b"\0\0").event()
    assert error_of(await raw(strict, frame(chunk))).code == "invalid_event"
    assert error_of(await raw(strict, frame(AudioStop().event()))).code == "invalid_event"
    assert error_of(await raw(strict, *start_frames(), frame(AudioStop().event()))).code == "no_audio"
    assert error_of(await raw(strict, *start_frames(), frame(Transcribe().event()))).code == "invalid_event"


async def test_two_hundred_connections_at_once_are_served_or_told_busy(strict, audio):
    connections = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", strict) for _ in range(200)))
    for _, writer in connections:
        writer.write(frame(Describe().event()))
    answers = await asyncio.gather(*(asyncio.wait_for(async_read_event(reader), PATIENCE)
                                     for reader, _ in connections))
    for _, writer in connections:
        writer.close()
    await asyncio.gather(*(writer.wait_closed() for _, writer in connections), return_exceptions=True)
    busy = [a for a in answers if a is not None and Error.is_type(a.type) and Error.from_event(a).code == "busy"]
    served = [a for a in answers if a is not None and Info.is_type(a.type)]
    assert len(busy) + len(served) == 200 and busy and served
    # And it keeps serving, a whole transcription included, once it has seen the clients go.
    deadline = time.monotonic() + PATIENCE
    while error_code(events := await home_assistant(strict, audio["speaker1"])) == "busy":
        assert time.monotonic() < deadline, "still busy"
        await asyncio.sleep(0.1)
    text = text_of(events)
    assert word_error_rate("That was hilarious, I can't believe you said that.", text) <= 0.2, text


async def test_a_model_no_engine_runs_is_refused(strict, audio):
    events = await home_assistant(strict, audio["speaker1"], model="parakeet-tdt-0.6b-v2")
    assert error_code(events) == "no_engine" and "nemo" in Error.from_event(events[-1]).text


async def test_the_strict_server_still_serves_after_all_that(strict, audio):
    text = text_of(await home_assistant(strict, audio["speaker1"]))
    assert word_error_rate("That was hilarious, I can't believe you said that.", text) <= 0.2, text


# --- listening beyond loopback ------------------------------------------------------------------

def test_beyond_loopback_it_will_not_start_without_a_key(stack):
    result = subprocess.run([sys.executable, "-m", "dalston", "serve", "wyoming"], capture_output=True, text=True,
                            env={**stack.env, "DALSTON_WYOMING_HOST": "0.0.0.0",
                                 "DALSTON_WYOMING_PORT": str(free_port())}, timeout=PATIENCE)
    assert result.returncode == 2 and "DALSTON_WYOMING_API_KEY" in result.stderr, result.stderr[-3000:]


def test_a_key_that_is_not_valid_stops_it_at_start(stack):
    result = subprocess.run([sys.executable, "-m", "dalston", "serve", "wyoming"], capture_output=True, text=True,
                            env={**stack.env, "DALSTON_WYOMING_HOST": "0.0.0.0",
                                 "DALSTON_WYOMING_PORT": str(free_port()),
                                 "DALSTON_WYOMING_API_KEY": "dsk_not-a-key"}, timeout=PATIENCE)
    assert result.returncode == 2 and "not a valid key" in result.stderr, result.stderr[-3000:]


async def test_with_a_key_beyond_loopback_its_jobs_are_the_keys_until_it_is_revoked(stack, wyoming, audio):
    # A user key runs installed models only: one job on loopback, without a key, installs it.
    text_of(await home_assistant(wyoming, audio["speaker1"]))
    bus = await stack.bus()
    try:
        keys = await KeyStore.open(bus)
        key = await keys.create("home-assistant")
        port = start_wyoming(stack, "wyoming-keyed", DALSTON_WYOMING_HOST="0.0.0.0", DALSTON_WYOMING_API_KEY=key)
        try:
            text = text_of(await home_assistant(port, audio["speaker1"]))
            newest = httpx.get(f"{stack.url}/v1/jobs", params={"limit": 1}).json()["data"][0]
            await keys.revoke("home-assistant")
            revoked = await home_assistant(port, audio["speaker1"])
        finally:
            stack.stop("wyoming-keyed")
    finally:
        await bus.close()
    assert "hilarious" in text.lower()
    assert newest["owner"] == "home-assistant" and newest["model"] == MODEL
    assert error_code(revoked) == "invalid_api_key"
