"""A minute without speech (silence, white and pink noise, a tone) gives no text in a live
session with server VAD (issue 20, must-hold 5; a client-committed minute is pinned by
tests/test_realtime.py, the batched path by tests/test_read_speech.py). The audio goes as fast as the session
takes it: server VAD counts audio, not wall time."""

from __future__ import annotations

import base64
import subprocess

import pytest

from tests.heard import paced
from tests.test_realtime import CHUNK_MS, COMPLETED, RATE, configured, connect

SOUNDS = {
    "silence": ["-n", "trim", "0", "60"],
    "white-noise": ["-n", "synth", "60", "whitenoise", "vol", "0.3"],
    "pink-noise": ["-n", "synth", "60", "pinknoise", "vol", "0.3"],
    "tone": ["-n", "synth", "60", "sine", "440", "vol", "0.3"],
}
DELTA = "conversation.item.input_audio_transcription.delta"


def sound(name: str, tmp_path) -> bytes:
    path = tmp_path / f"{name}.raw"
    command = SOUNDS[name]
    subprocess.run(["sox", "-r", str(RATE), "-c", "1", *command[:1], "-b", "16", "-e", "signed-integer",
                    str(path), *command[1:]], check=True, capture_output=True, timeout=60)
    return path.read_bytes()


async def append_all(connection, audio: bytes) -> None:
    await paced(lambda piece: connection.input_audio_buffer.append(audio=base64.b64encode(piece).decode()),
                audio, RATE * 2 * CHUNK_MS // 1000 * 10, CHUNK_MS * 10, real_time=False)


@pytest.mark.parametrize("name", list(SOUNDS))
async def test_a_minute_without_speech_gives_no_text_with_server_vad(stack, tmp_path, name):
    async with connect(stack) as connection:
        events = await configured(connection)
        await append_all(connection, sound(name, tmp_path))
        # The session takes its input in order: once the clear is answered, every turn the
        # audio held has been committed, and each gets its completed item.
        await connection.input_audio_buffer.clear()
        await events.until("input_audio_buffer.cleared")
        committed = len(events.of("input_audio_buffer.committed"))
        completed = await events.until(COMPLETED, committed, timeout=120)
        events.stop()
    assert [e.transcript for _, e in completed] == [""] * committed
    assert [e.delta for _, e in events.of(DELTA) if e.delta.strip()] == []
