"""Live turns on real recordings: each conversation in tests/data/conversations is fed at 1x into
an OpenAI Realtime session with server VAD, once per model. Printed per model, over every turn:
how long after the end of its speech (the `speech_stopped` event's `audio_end_ms`) the completed
item came, p50 and p95 (targets: p95 <= 1.5 s on the default model, <= 0.8 s on tiny.en), and
how far the VAD's turn ends lie from the reference turns' (RTTM) speech ends (target <= 0.3 s).
Then the same recordings through ElevenLabs' realtime endpoint, for the stability of interim
results: of the words two successive partial transcripts of a turn both begin with, the share
that the turn's committed text keeps in place (target >= 0.95). Only the words they begin with
count: a word that happens to sit at the same place after the two partials differ is not a word
shown twice, as the words before it changed.

`python -m bench.live_turns --recordings 2 --models faster-whisper-tiny.en` runs a part of it."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
from pathlib import Path

import numpy as np
import soundfile
import tempfile

import websockets

from dalston.loopback import LoopbackStack

CONVERSATIONS = Path(__file__).resolve().parents[1] / "tests" / "data" / "conversations"
MODELS = ["faster-whisper-base", "faster-whisper-tiny.en"]
RATE = 24_000
CHUNK_MS = 100
SILENCE_MS = 500
TAIL_SECONDS = 3.0  # silence after the recording, so its last turn ends
COMPLETED = "conversation.item.input_audio_transcription.completed"


def _pcm(path: Path) -> bytes:
    """The recording as the Realtime API's audio: 16-bit mono PCM at 24 kHz."""
    audio, rate = soundfile.read(path, dtype="float32")
    at = np.arange(0, len(audio) / rate, 1 / RATE)
    resampled = np.interp(at, np.arange(len(audio)) / rate, audio)
    resampled = np.concatenate([resampled, np.zeros(int(TAIL_SECONDS * RATE))])
    return (np.clip(resampled, -1, 1) * 32767).astype("<i2").tobytes()


def _speech_ends(rttm: Path) -> list[float]:
    """Where the reference says someone stopped speaking: every turn's end."""
    return sorted(float(f[3]) + float(f[4]) for f in (line.split() for line in rttm.read_text().splitlines()) if f)


async def _session(url: str, model: str, audio: bytes) -> tuple[list[float], list[float]]:
    """Each completed item's delay after its speech ended, and each turn end (audio seconds)."""
    ends: dict[str, float] = {}
    delays: list[float] = []
    async with websockets.connect(f"{url}/v1/realtime?intent=transcription", max_size=None) as socket:
        await socket.send(json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": RATE}, "transcription": {"model": model},
            "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                               "silence_duration_ms": SILENCE_MS}}}}}))
        started = time.monotonic()

        async def read() -> None:
            async for message in socket:
                event = json.loads(message)
                if event["type"] == "input_audio_buffer.speech_stopped":
                    ends[event["item_id"]] = event["audio_end_ms"] / 1000
                elif event["type"] == COMPLETED and event["item_id"] in ends:
                    delays.append(time.monotonic() - started - ends[event["item_id"]])

        reader = asyncio.create_task(read())
        step = RATE * 2 * CHUNK_MS // 1000
        for number, start in enumerate(range(0, len(audio), step)):
            await socket.send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(audio[start:start + step]).decode()}))
            await asyncio.sleep(max(0.0, started + (number + 1) * CHUNK_MS / 1000 - time.monotonic()))
        deadline = time.monotonic() + 30.0  # the last turns' text; a slow machine lags behind
        while len(delays) < len(ends) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        reader.cancel()
    return delays, sorted(ends.values())


async def _partials(url: str, model: str, audio: bytes) -> tuple[int, int]:
    """Words shown alike by two successive partials of a turn, and how many of them its
    committed text keeps in place."""
    shown = kept = 0
    partials: list[list[str]] = []
    query = f"model_id={model}&audio_format=pcm_{RATE}&commit_strategy=vad&vad_silence_threshold_secs={SILENCE_MS / 1000}"
    async with websockets.connect(f"{url}/v1/speech-to-text/realtime?{query}", max_size=None) as socket:
        async def read() -> None:
            nonlocal shown, kept
            async for message in socket:
                event = json.loads(message)
                if event["message_type"] == "partial_transcript":
                    partials.append(event["text"].split())
                elif event["message_type"] == "committed_transcript":
                    final = event["text"].split()
                    for before, after in zip(partials, partials[1:]):
                        steady = 0
                        while steady < min(len(before), len(after)) and before[steady] == after[steady]:
                            steady += 1
                        shown += steady
                        kept += sum(k < len(final) and final[k] == after[k] for k in range(steady))
                    partials.clear()

        reader = asyncio.create_task(read())
        step = RATE * 2 * CHUNK_MS // 1000
        started = time.monotonic()
        for number, start in enumerate(range(0, len(audio), step)):
            await socket.send(json.dumps({"message_type": "input_audio_chunk", "sample_rate": RATE,
                                          "audio_base_64": base64.b64encode(audio[start:start + step]).decode()}))
            await asyncio.sleep(max(0.0, started + (number + 1) * CHUNK_MS / 1000 - time.monotonic()))
        await asyncio.sleep(10.0)  # the last turn's commit
        reader.cancel()
    return shown, kept


def _p(values: list[float], share: float) -> float:
    return float(np.percentile(values, share * 100)) if values else float("nan")


def run(root: Path, recordings: int | None = None, models: list[str] = MODELS) -> list[str]:
    recordings = sorted(CONVERSATIONS.glob("*.flac"))[:recordings]
    stack = LoopbackStack(root, DALSTON_LOG_LEVEL="WARNING")
    stack.start_nats()
    lines = []
    try:
        stack.start_pipeline()
        stack.start_engine("faster-whisper", "fw")
        stack.wait_engines("audio-prepare", "merge", "fw", timeout=300)
        for model in models:
            delays, offsets = [], []
            asyncio.run(_session(stack.url.replace("http", "ws"), model, _pcm(recordings[0])))  # load, warm
            for path in recordings:
                found, turn_ends = asyncio.run(_session(stack.url.replace("http", "ws"), model, _pcm(path)))
                delays += found
                truth = _speech_ends(path.with_suffix(".rttm"))
                offsets += [min(abs(end - t) for t in truth) for end in turn_ends if truth]
            lines.append(f"live turns, {model}, {len(recordings)} real conversations at 1x: {len(delays)} turns, "
                         f"completed after speech end p50 {_p(delays, .5):.2f} s, p95 {_p(delays, .95):.2f} s; "
                         f"VAD turn end from the reference's p50 {_p(offsets, .5):.2f} s, p95 {_p(offsets, .95):.2f} s")
        for model in models:
            shown = kept = 0
            for path in recordings:
                seen, steady = asyncio.run(_partials(stack.url.replace("http", "ws"), model, _pcm(path)))
                shown, kept = shown + seen, kept + steady
            lines.append(f"partial transcripts, {model}: of {shown} words shown alike by two successive partials, "
                         f"{kept / shown if shown else float('nan'):.3f} kept by the committed text (target >= 0.95)")
    finally:
        stack.close()
    return lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recordings", type=int, help="only the first N recordings")
    parser.add_argument("--models", nargs="+", default=MODELS)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dalston-bench-live_turns-") as root:
        for line in run(Path(root), arguments.recordings, arguments.models):
            print(line, flush=True)
