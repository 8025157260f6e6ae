"""One spoken file through the Wyoming server, as Home Assistant sends it (16 kHz 16-bit mono PCM
in 2 KiB chunks, once the speech has ended), against the same samples as a WAV file through
`/v1/audio/transcriptions`, both with the model warm. Target: ratio <= 1.2."""

from __future__ import annotations

import asyncio
import io
import statistics
import time
import wave
from pathlib import Path

import httpx
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient

from bench import AUDIO
from dalston.loopback import LoopbackStack, free_port
from dalston.pcm import SAMPLE_RATE, from_pcm16, to_pcm16

FILES = ["speaker1.wav", "dialogue.wav"]
MODEL = "faster-whisper-tiny.en"
ROUNDS = 10
CHUNK_BYTES = 2048


def _pcm16k(path: Path) -> bytes:
    """The file's samples as Home Assistant streams them: 16 kHz, 16-bit, mono."""
    with wave.open(str(path)) as wav:
        assert wav.getnchannels() == 1 and wav.getsampwidth() == 2
        rate, data = wav.getframerate(), wav.readframes(wav.getnframes())
    return to_pcm16(from_pcm16(data, rate))  # from_pcm16 resamples to 16 kHz


def _wav(pcm: bytes) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes(pcm)
    return out.getvalue()


async def _over_wyoming(port: int, pcm: bytes) -> tuple[float, str]:
    started = time.perf_counter()
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=SAMPLE_RATE, width=2, channels=1).event())
        for start in range(0, len(pcm), CHUNK_BYTES):
            await client.write_event(AudioChunk(rate=SAMPLE_RATE, width=2, channels=1,
                                                audio=pcm[start:start + CHUNK_BYTES]).event())
        await client.write_event(AudioStop().event())
        while not Transcript.is_type((event := await client.read_event()).type):
            if event.type == "error":
                raise RuntimeError(event.data)
    return time.perf_counter() - started, Transcript.from_event(event).text


def _over_http(client: httpx.Client, url: str, wav: bytes) -> tuple[float, str]:
    started = time.perf_counter()
    response = client.post(f"{url}/v1/audio/transcriptions", files={"file": ("speech.wav", wav)},
                           data={"model": MODEL, "language": "en", "response_format": "json"})
    response.raise_for_status()
    return time.perf_counter() - started, response.json()["text"]


async def _wait_wyoming(port: int) -> None:
    for _ in range(300):
        try:
            async with AsyncTcpClient("127.0.0.1", port):
                return
        except OSError:
            await asyncio.sleep(0.2)
    raise TimeoutError("the Wyoming server did not come up")


def _medians(port: int, url: str, pcm: bytes) -> tuple[float, float, list[str]]:
    """Median seconds through Wyoming and through HTTP, rounds interleaved so drift hits both
    alike (after one warm-up each: the model loads), and the texts each gave last."""
    wav = _wav(pcm)
    seconds: dict[str, list[float]] = {"wyoming": [], "http": []}
    texts = {}
    with httpx.Client(timeout=120) as client:
        for round_ in range(ROUNDS + 1):
            for way, call in (("wyoming", lambda: asyncio.run(_over_wyoming(port, pcm))),
                              ("http", lambda: _over_http(client, url, wav))):
                took, texts[way] = call()
                if round_:
                    seconds[way].append(took)
    return statistics.median(seconds["wyoming"]), statistics.median(seconds["http"]), list(texts.values())


def run(root: Path) -> list[str]:
    stack = LoopbackStack.running(root, "fw", DALSTON_LOG_LEVEL="WARNING")
    try:
        port = free_port()
        stack.start("wyoming", "wyoming", DALSTON_WYOMING_PORT=str(port))
        asyncio.run(_wait_wyoming(port))
        lines = []
        for name in FILES:
            wyoming, http, (wyoming_text, http_text) = _medians(port, stack.url, _pcm16k(AUDIO / name))
            if wyoming_text.split() != http_text.split():
                lines.append(f"wyoming {name}: texts differ: {wyoming_text!r} vs {http_text!r}")
            lines.append(f"wyoming {name:<14} {MODEL}: wyoming {wyoming * 1000:7.1f} ms, http {http * 1000:7.1f} ms, "
                         f"ratio {wyoming / http:5.2f} (target <= 1.2)")
        return lines
    finally:
        stack.close()
