"""`dalston listen [FILE]`: live transcription. Audio goes into a realtime session at 1x speed;
each turn's text shows as it is decoded (on a self-rewriting line where stderr is a terminal)
and is printed on stdout when the turn is done."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import websockets

from dalston.audio import InvalidAudio, decode
from dalston.cli.client import add_server_option, connect
from dalston.cli.output import CliError, StatusLine, error
from dalston.config import Settings
from dalston.contracts import SESSION_SAMPLE_RATE
from dalston.pcm import DTYPE, SAMPLE_RATE, resample, to_pcm16

CHUNK_MS = 100
CHUNK_BYTES = SESSION_SAMPLE_RATE * 2 * CHUNK_MS // 1000
# After the source ends: silence that closes a turn still open, and time for its commit to come.
TAIL_SILENCE_MS = 1000
COMMIT_GRACE_SECONDS = 1.0


def register(commands) -> None:
    parser = commands.add_parser(
        "listen", help="transcribe live audio as it comes",
        description="Stream audio into a live session at 1x speed and show the text as it is heard: "
                    "an audio file, or raw 16-bit mono PCM at 24 kHz on stdin (`-`, e.g. from "
                    "`arecord -f S16_LE -r 24000 -c 1 -t raw`).")
    parser.add_argument("source", nargs="?", default="-", metavar="FILE",
                        help="an audio file, or - (the default) for raw PCM on stdin")
    parser.add_argument("-m", "--model", default="", help="a model id of `dalston models` (default: the server's)")
    parser.add_argument("-l", "--language", default="", help="language code, e.g. en")
    parser.add_argument("--silence-ms", type=int, default=500, help="silence that ends a turn (default 500)")
    add_server_option(parser)
    parser.set_defaults(func=run)


def run(args, settings: Settings) -> int:
    chunks = _stdin_chunks() if args.source == "-" else _file_chunks(Path(args.source))
    client = connect(args, settings, start=True)
    url = client.url.replace("http", "ws", 1) + "/v1/realtime?intent=transcription"
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    try:
        return asyncio.run(_listen(url, headers, chunks, args))
    except KeyboardInterrupt:
        return 130
    except (OSError, websockets.exceptions.WebSocketException) as exc:
        raise CliError(f"the live session with {client.url} failed: {exc}") from None


def _file_chunks(path: Path) -> Iterator[bytes]:
    if not path.is_file():
        raise CliError(f"no such file: {path}", code=2)
    with tempfile.TemporaryDirectory(prefix="dalston-listen-") as tmp:
        try:
            audio = decode(path, Path(tmp))
        except InvalidAudio as exc:
            raise CliError(f"{path}: {exc}") from None
        samples = np.fromfile(audio.channels[0], dtype=DTYPE)
    pcm = to_pcm16(resample(samples, SAMPLE_RATE, SESSION_SAMPLE_RATE))
    return (pcm[start:start + CHUNK_BYTES] for start in range(0, len(pcm), CHUNK_BYTES))


def _stdin_chunks() -> Iterator[bytes]:
    while chunk := sys.stdin.buffer.read(CHUNK_BYTES):
        yield chunk


async def _listen(url: str, headers: dict[str, str], chunks: Iterator[bytes], args) -> int:
    turn_detection = {"type": "server_vad", "silence_duration_ms": args.silence_ms}
    transcription = {k: v for k, v in (("model", args.model), ("language", args.language)) if v}
    async with websockets.connect(url, additional_headers=headers, max_size=None) as socket:
        await socket.send(json.dumps({"type": "session.update", "session": {
            "type": "transcription", "audio": {"input": {
                "format": {"type": "audio/pcm", "rate": SESSION_SAMPLE_RATE},
                "transcription": transcription, "turn_detection": turn_detection}}}}))
        sender = asyncio.create_task(_send(socket, chunks))
        failed = await _show(socket, sender)
        await sender
    return 1 if failed else 0


async def _send(socket, chunks: Iterator[bytes]) -> float:
    """Send the chunks at 1x speed, then the tail silence; when the last went."""
    started, sent_ms = time.monotonic(), 0
    silence = iter([bytes(CHUNK_BYTES)] * (TAIL_SILENCE_MS // CHUNK_MS))
    for source in (chunks, silence):
        # A live source blocks until it has audio: read it beside the event loop.
        while (chunk := await asyncio.to_thread(next, source, None)) is not None:
            await socket.send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(chunk).decode()}))
            sent_ms += len(chunk) * 1000 // (2 * SESSION_SAMPLE_RATE)
            await asyncio.sleep(max(0.0, started + sent_ms / 1000 - time.monotonic()))
    return time.monotonic()


async def _show(socket, sender: asyncio.Task) -> bool:
    """Show partials and print finished turns until every committed turn is done after the
    audio ended; whether the server reported an error."""
    partial: dict[str, str] = {}
    failed = False
    with StatusLine() as line:
        while True:
            if sender.done() and not partial and time.monotonic() > sender.result() + COMMIT_GRACE_SECONDS:
                return failed
            try:
                raw = await asyncio.wait_for(socket.recv(), 0.2)
            except TimeoutError:
                continue
            event = json.loads(raw)
            kind, item = event.get("type"), event.get("item_id", "")
            if kind == "input_audio_buffer.committed":
                partial.setdefault(item, "")
            elif kind == "conversation.item.input_audio_transcription.delta":
                partial[item] = partial.get(item, "") + event.get("delta", "")
                line.show(partial[item])
            elif kind == "conversation.item.input_audio_transcription.completed":
                partial.pop(item, None)
                line.clear()
                print(event.get("transcript", ""), flush=True)
            elif kind == "error":
                failed = True
                line.clear()
                problem = event.get("error", {})
                error(problem.get("message", "the server reported an error"))
                if problem.get("code") in ("engine_lost", "session_failed"):
                    partial.clear()  # those turns will not be completed
