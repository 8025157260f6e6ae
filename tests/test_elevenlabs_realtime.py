"""ElevenLabs' Scribe Realtime (`/v1/speech-to-text/realtime`) end to end: the official
`elevenlabs` client's `speech_to_text.realtime.connect` against the real gateway and
faster-whisper engines over NATS, with a real recording of a phone call."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
import time
from pathlib import Path

import pytest
import websockets
from elevenlabs import AsyncElevenLabs, AudioFormat, CommitStrategy, RealtimeEvents

from dalston.synthetic_speech import word_error_rate
from tests.audio_fixtures import convert
from tests.heard import Heard, paced
from tests.stack import AUDIO, TestStack, words

CONVERSATIONS = Path(__file__).parent / "data" / "conversations"
CALL = CONVERSATIONS / "call_2spk.flac"  # a phone call: 22 s of talk without a pause
MEETING = CONVERSATIONS / "ami_2spk_b.flac"  # a meeting: 15 s of talk in four turns
SPEAKER1 = "That was hilarious, I can't believe you said that."
CHUNK_MS = 100


def pcm(path: Path, rate: int, tmp: Path) -> bytes:
    """`path` as 16-bit mono PCM at `rate`."""
    return convert(path, ".raw", tmp, rate=rate, channels=1, args=("-f", "s16le")).read_bytes()


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scribe")
    return lambda path, rate: pcm(path, rate, tmp)


@pytest.fixture(scope="module")
def batch(stack):
    """A recording as ElevenLabs' batch API transcribes it (the same default model)."""
    async def transcribe(path: Path) -> str:
        client = AsyncElevenLabs(base_url=stack.url, api_key="unused", timeout=300)
        with open(path, "rb") as file:
            return (await client.speech_to_text.convert(model_id="scribe_v2", file=file)).text
    return transcribe


class Scribe(Heard):
    """A session through the official client, and every message it heard."""

    def __init__(self, connection) -> None:
        super().__init__(lambda message: message["message_type"], timeout=120.0)
        self.connection = connection
        for event in RealtimeEvents:
            if event not in (RealtimeEvents.OPEN, RealtimeEvents.ERROR, RealtimeEvents.CLOSE):
                connection.on(event, self.heard.append)
        # Errors of a type the client has no event for come as ERROR alone.
        connection.on(RealtimeEvents.ERROR, lambda data: data.get("message_type") == "error" and self.heard.append(data))
        connection.on(RealtimeEvents.CLOSE, lambda info: self.heard.append({"message_type": "close", **info}))

    @classmethod
    async def open(cls, system: TestStack, api_key: str = "unused", **options) -> Scribe:
        client = AsyncElevenLabs(base_url=system.url, api_key=api_key)
        rate = options.pop("sample_rate", 16_000)
        connection = await client.speech_to_text.realtime.connect({
            "model_id": "scribe_v2_realtime", "audio_format": AudioFormat(f"pcm_{rate}"), "sample_rate": rate,
            **options})
        return cls(connection)

    async def until_said(self, word: str, timeout: float = 180.0) -> list[dict]:
        """The committed transcripts, once one says `word`."""
        deadline = time.monotonic() + timeout
        while not any(word in words(m["text"]) for m in self.of("committed_transcript")):
            assert time.monotonic() < deadline, f"{word!r} not committed; heard {self.heard}"
            await asyncio.sleep(0.05)
        return self.of("committed_transcript")

    async def send(self, audio: bytes, chunk_ms: int = CHUNK_MS, rate: int = 16_000, real_time: bool = True) -> None:
        """`audio` in chunks; at 1x speed where `real_time` (else as fast as the gateway takes it)."""
        await paced(lambda piece: self.connection.send({"audio_base_64": base64.b64encode(piece).decode()}),
                    audio, rate * 2 * chunk_ms // 1000, chunk_ms, real_time)

    async def close(self) -> None:
        await self.connection.close()


def committed_text(messages: list[dict]) -> str:
    return " ".join(m["text"] for m in messages if m["text"].strip())


async def vad_session(system: TestStack, audio, recording: Path, real_time: bool,
                     **options) -> tuple[Scribe, list[dict]]:
    """`recording` through a VAD session, then a sentence of its own: turns are transcribed in
    order, so once the sentence's transcript is in, so are all the recording's. The session and
    its committed transcripts, the sentence's last. Server VAD needs no real time: without it the
    audio goes as fast as the gateway takes it (it paces past a burst)."""
    scribe = await Scribe.open(system, commit_strategy=CommitStrategy.VAD, **options)
    await scribe.until("session_started")
    pause = bytes(16_000 * 2 * 2)  # longer than the default vad_silence_threshold_secs
    await scribe.send(audio(recording, 16_000) + pause + audio(AUDIO / "speaker1.wav", 16_000) + pause,
                      chunk_ms=CHUNK_MS if real_time else 500, real_time=real_time)
    committed = await scribe.until_said("hilarious")
    assert words(committed[-1]["text"]) == words(SPEAKER1)
    return scribe, committed


async def test_vad_commits_the_call_as_the_batch_api_transcribes_it(stack, audio, batch):
    # Live, at 1x, with ElevenLabs' default VAD parameters: partials while the call goes on.
    scribe, committed = await vad_session(stack, audio, CALL, real_time=True)
    await scribe.close()
    config = scribe.of("session_started")[0]["config"]
    assert (config["commit_strategy"], config["sample_rate"], config["vad_silence_threshold_secs"],
            config["vad_threshold"], config["min_speech_duration_ms"]) == ("vad", 16_000, 1.5, 0.4, 100)
    live, batch_text = committed_text(committed[:-1]), await batch(CALL)
    error = word_error_rate(batch_text, live)
    print(f"vad, call: {len(committed) - 1} turns, WER against batch {error:.3f}")
    assert error <= 0.1, (batch_text, live)
    assert scribe.of("partial_transcript")
    assert not scribe.of("committed_transcript_with_timestamps")  # not asked for


async def test_vad_cuts_a_meeting_into_turns_with_word_times_on_the_session_clock(stack, audio, batch):
    scribe, committed = await vad_session(stack, audio, MEETING, real_time=False, vad_silence_threshold_secs=0.5,
                                          vad_threshold=0.5, min_speech_duration_ms=100,
                                          min_silence_duration_ms=150, include_timestamps=True)
    timed = await scribe.until("committed_transcript_with_timestamps", len(committed))
    await scribe.close()
    assert scribe.of("session_started")[0]["config"]["vad_silence_threshold_secs"] == 0.5
    assert len(committed) - 1 >= 3, committed  # the meeting's pauses cut it into turns
    # Shorter pieces than the batch API's decode differ more on far-field audio: measured, not bound.
    live, batch_text = committed_text(committed[:-1]), await batch(MEETING)
    print(f"vad, meeting: {len(committed) - 1} turns, WER against batch {word_error_rate(batch_text, live):.3f}")
    # Each turn's words are its text, in order on the session's clock: the meeting's within its
    # 30 s, the sentence's after them and 2 s of silence (Whisper times a turn's first word
    # early, into the 300 ms of audio kept from before the speech).
    spoken = [[w for w in m["words"] if w["type"] == "word"] for m in timed]
    assert [words(" ".join(w["text"] for w in turn)) for turn in spoken] == [words(m["text"]) for m in committed]
    starts = [w["start"] for turn in spoken for w in turn]
    assert starts == sorted(starts) and all(w["start"] <= w["end"] for turn in spoken for w in turn)
    assert all(w["end"] <= 30.0 for turn in spoken[:-1] for w in turn)
    assert 32.0 - 0.4 <= spoken[-1][0]["start"] and spoken[-1][-1]["end"] <= 32.0 + 3.5
    assert {m["language_code"] for m in timed} == {"eng"}


async def test_manual_commits_at_24_khz(stack, audio, batch):
    call = audio(CALL, 24_000)
    scribe = await Scribe.open(stack, sample_rate=24_000)  # the client's default: manual commits
    (started,) = await scribe.until("session_started")
    assert started["config"]["commit_strategy"] == "manual" and started["config"]["audio_format"] == "pcm_24000"
    # As fast as the gateway takes it (it paces past a burst); no commit, no transcript.
    await scribe.send(call, chunk_ms=500, rate=24_000, real_time=False)
    await scribe.until("partial_transcript")
    assert not scribe.of("committed_transcript")
    await scribe.connection.commit()
    (committed,) = await scribe.until("committed_transcript", timeout=180)
    await scribe.close()
    batch_text = await batch(CALL)
    error = word_error_rate(batch_text, committed["text"])
    print(f"manual, call at 24 kHz: WER against batch {error:.3f}")
    assert error <= 0.1, (batch_text, committed["text"])
    assert not scribe.of("committed_transcript_with_timestamps")  # not asked for


async def test_hostile_messages_get_clear_errors_and_the_session_goes_on(stack, audio):
    scribe = await Scribe.open(stack, include_language_detection=True)
    await scribe.until("session_started")
    socket = scribe.connection.websocket  # the client's own WebSocket, for what its send() never sends
    hostile = [
        ("{not json", "input_error", "invalid_json"),
        ('{"message_type": "input_audio_chunk", "audio_base_64": ' + '[' * 1000 + ']' * 1000 + '}', "input_error",
         "invalid_json"),
        ('["input_audio_chunk"]', "input_error", "invalid_event"),
        ('{"message_type": "begin_transcription"}', "input_error", "unknown_event"),
        ('{"message_type": "input_audio_chunk", "audio_base_64": "not base64!"}', "input_error", "invalid_base64"),
        ('{"message_type": "input_audio_chunk", "audio_base_64": 7}', "input_error", "invalid_audio"),
        ('{"message_type": "input_audio_chunk", "audio_base_64": "AAAA", "sample_rate": 8000}', "input_error",
         "invalid_audio"),
        ('{"message_type": "input_audio_chunk", "audio_base_64": "AA=="}', "input_error", "invalid_audio"),  # one byte
        ('{"message_type": "input_audio_chunk", "audio_base_64": "", "commit": true}', "input_error",
         "input_audio_buffer_commit_empty"),
    ]
    for number, (raw, kind, code) in enumerate(hostile, 1):
        await socket.send(raw)
        errors = await scribe.until(kind, sum(k == kind for _, k, _ in hostile[:number]))
        assert errors[-1]["code"] == code and errors[-1]["error"], (raw[:80], errors[-1])
    # Eleven seconds of audio in one chunk: past what one may hold.
    await scribe.connection.send({"audio_base_64": base64.b64encode(bytes(16_000 * 2 * 11)).decode()})
    (oversize,) = await scribe.until("chunk_size_exceeded")
    assert "at most 10 s" in oversize["error"]
    await socket.send(f'{{"message_type": "input_audio_chunk", "audio_base_64": "{"A" * 2_000_000}"}}')
    await scribe.until("chunk_size_exceeded", 2)
    # The session still serves: speech in, its text out.
    await scribe.send(audio(AUDIO / "speaker1.wav", 16_000), chunk_ms=500, real_time=False)
    await scribe.connection.send({"audio_base_64": "", "previous_text": "too late"})
    late = (await scribe.until("input_error", sum(kind == "input_error" for _, kind, _ in hostile) + 1))[-1]
    assert late["code"] == "invalid_event" and "first audio chunk" in late["error"]
    await scribe.connection.commit()
    (committed,) = await scribe.until("committed_transcript")
    await scribe.close()
    assert words(committed["text"]) == words(SPEAKER1) and committed["language_code"] == "eng"


@pytest.mark.parametrize("options, param", [
    ({"audio_format": AudioFormat.ULAW_8000, "sample_rate": 8000}, "audio_format"),
    ({"audio_format": AudioFormat.PCM_44100, "sample_rate": 44100}, "audio_format"),
    ({"vad_silence_threshold_secs": 0.1}, "vad_silence_threshold_secs"),
    ({"vad_threshold": 1.5}, "vad_threshold"),
    ({"min_speech_duration_ms": 10_000}, "min_speech_duration_ms"),
    ({"language_code": "xx-ZZZZZZZZZ"}, "language_code"),
    ({"language_code": "de"}, "language_code"),  # tiny.en speaks English alone
    ({"model_id": "no-such-model"}, "model_id"),
    ({"entity_redaction": "pii"}, "entity_redaction"),
])
async def test_a_session_it_cannot_serve_is_refused_with_the_reason(stack, options, param):
    client = AsyncElevenLabs(base_url=stack.url, api_key="unused")
    connection = await client.speech_to_text.realtime.connect({
        "model_id": "scribe_v2_realtime", "audio_format": AudioFormat.PCM_16000, "sample_rate": 16000, **options})
    scribe = Scribe(connection)
    (refusal,) = await scribe.until("invalid_request")
    (closed,) = await scribe.until("close")
    assert refusal["param"] == param and refusal["error"] and closed["code"] == 1008
    assert not scribe.of("session_started")


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    """NATS and a gateway that demands keys, keeps two sessions open at most and closes idle ones
    after 4 s (no engine: what these tests ask of a session comes before its first audio);
    and an admin key (allowed any model)."""
    system = TestStack(tmp_path_factory.mktemp("scribe-auth"), DALSTON_REQUIRE_AUTH="true",
                       DALSTON_MAX_REALTIME_CONNECTIONS="2", DALSTON_SESSION_IDLE_SECONDS="4")
    system.start_nats()
    system.start("gateway", "gateway")
    system.wait_http()
    created = subprocess.run([sys.executable, "-m", "dalston", "keys", "create", "ops", "--admin"],
                             env=system.env, capture_output=True, text=True, timeout=60, check=True)
    yield system, created.stdout.strip()
    system.close()


async def test_a_full_gateway_refuses_one_more_session_and_an_idle_one_is_closed(locked):
    system, key = locked
    first, second = [await Scribe.open(system, api_key=key) for _ in range(2)]
    third = await Scribe.open(system, api_key=key)
    (refusal,) = await third.until("resource_exhausted")
    (closed,) = await third.until("close")
    assert refusal["code"] == "too_many_sessions" and closed["code"] == 1008
    # Neither sends audio: each is closed as idle, and its place is free again.
    for scribe in (first, second):
        (idle,) = await scribe.until("insufficient_audio_activity", timeout=30)
        (closed,) = await scribe.until("close")
        assert idle["code"] == "session_idle" and closed["code"] == 1008
    fourth = await Scribe.open(system, api_key=key)
    await fourth.until("session_started")
    await fourth.close()


async def test_a_wrong_key_is_refused_at_the_handshake(locked):
    system, key = locked
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        await Scribe.open(system, api_key="dsk_not-a-real-key")
    assert refused.value.response.status_code in (401, 403)
    with pytest.raises(websockets.exceptions.InvalidStatus):  # no key at all
        await websockets.connect(f"ws://127.0.0.1:{system.http_port}/v1/speech-to-text/realtime")
    # The gateway goes on serving the right key.
    scribe = await Scribe.open(system, api_key=key)
    (started,) = await scribe.until("session_started")
    await scribe.close()
    assert started["session_id"]
