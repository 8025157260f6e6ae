"""One long recording (about 10 minutes of espeak-ng reading the Harvard sentences), in the shape
of faster-whisper's README table: faster-whisper in-process against Dalston with one and with
two engines, and engines x threads per engine, so the CPU defaults come from a measurement.
Target: two engines at least 1.6x faster than one (DALSTON_CPU_THREADS=1 each)."""

from __future__ import annotations

import multiprocessing
import resource
import time
from pathlib import Path

import httpx
import soundfile

from dalston.loopback import LoopbackStack
from dalston.synthetic_speech import lecture, word_error_rate

MODEL, MODEL_ID = "faster-whisper-tiny.en", "tiny.en"
SECONDS = 600


def _in_process(path: str, model_dir: str, threads: int, out) -> None:
    from faster_whisper import WhisperModel

    model = WhisperModel(model_dir, device="cpu", compute_type="int8", cpu_threads=threads)
    started = time.perf_counter()
    text = " ".join(s.text for s in model.transcribe(path, beam_size=5, vad_filter=True)[0])
    out.send((time.perf_counter() - started, text,
              resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))


def in_process(path: Path, model_dir: Path, threads: int) -> tuple[float, str, int]:
    """faster-whisper alone in a fresh process: (seconds, text, peak RSS bytes)."""
    receive, send = multiprocessing.Pipe(duplex=False)
    child = multiprocessing.get_context("spawn").Process(
        target=_in_process, args=(str(path), str(model_dir), threads, send))
    child.start()
    result = receive.recv()
    child.join()
    return result


def through_dalston(root: Path, path: Path, engines: int, threads: int) -> tuple[float, str, int]:
    """One job through a fresh Dalston with `engines` engines of `threads` threads: (seconds,
    text, the largest engine's peak RSS)."""
    stack = LoopbackStack(root, DALSTON_LOG_LEVEL="WARNING", DALSTON_CPU_THREADS=str(threads))
    stack.start_nats()
    try:
        stack.start_pipeline()
        names = [f"fw-{n}" for n in range(engines)]
        for name in names:
            stack.start_engine("faster-whisper", name, DALSTON_PRELOAD_MODEL=MODEL)
        stack.wait_engines("audio-prepare", "merge", *names)
        with httpx.Client(timeout=1800) as client, path.open("rb") as audio:
            started = time.perf_counter()
            response = client.post(f"{stack.url}/v1/audio/transcriptions", files={"file": audio},
                                   data={"model": MODEL, "response_format": "json"})
            seconds = time.perf_counter() - started
        response.raise_for_status()
        return seconds, response.json()["text"], max(_peak_rss(stack.processes[n].pid) for n in names)
    finally:
        stack.close()


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run(root: Path) -> list[str]:
    audio, text = lecture(root, SECONDS)
    duration = float(soundfile.info(str(audio)).duration)
    models = root / "models"
    rows = []
    # The model store is filled by the first stack; the in-process runs read the same weights.
    for engines, threads in ((1, 1), (2, 1), (1, 2)):
        seconds, said, peak = through_dalston(root / f"d{engines}x{threads}", audio, engines, threads)
        rows.append((f"Dalston, {engines} engine{'s' * (engines > 1)} x {threads} thread{'s' * (threads > 1)}",
                     seconds, said, peak))
        models = root / f"d{engines}x{threads}" / "models"
    for threads in (1, 2):
        seconds, said, peak = in_process(audio, models / "faster-whisper" / MODEL_ID, threads)
        rows.append((f"faster-whisper in-process, {threads} thread{'s' * (threads > 1)}", seconds, said, peak))
    lines = [f"long audio: {duration / 60:.1f} min of speech, {MODEL}, int8, beam 5, VAD on",
             f"  {'implementation':<40} {'wall':>8} {'RTF':>7} {'WER':>6} {'peak RSS':>9}"]
    for name, seconds, said, peak in rows:
        lines.append(f"  {name:<40} {seconds:7.1f}s {seconds / duration:7.4f} "
                     f"{word_error_rate(text, said):6.3f} {peak / 2**20:7.0f}MB")
    one, two = rows[0][1], rows[1][1]
    lines.append(f"long audio: 2 engines vs 1 (1 thread each): speedup {one / two:4.2f}x (target >= 1.6)")
    return lines
