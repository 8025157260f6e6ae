"""Hostile audio against a real Dalston, at the default limits: small files of ten hours, and
files of many channels. They fail fast with the reason or are transcribed; nothing runs out of
memory or crashes, and other users' jobs go on."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from dalston.config import Settings
from tests.audio_fixtures import long_opus, silence, spread_stereo
from tests.stack import AUDIO, DIALOGUE_WORDS, TestStack, submit, wait_job, words

MODEL = "faster-whisper-tiny.en"
TEN_HOURS = 36000
GiB = 1 << 30


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("hostile")
    return {
        "opus-10h": long_opus(tmp, TEN_HOURS),  # about 9 MB
        # 1 kHz: a FLAC's header states its length only when it is encoded whole, and at 8 kHz
        # that was 14 s of CPU for ten hours.
        "flac-10h-5.1": silence(tmp, TEN_HOURS, ".flac", layout="5.1", rate=1000),  # about 6 MB
        "wav-8ch": spread_stereo(tmp, 8),
        "wav-16ch": spread_stereo(tmp, 16),
    }


@pytest.fixture(scope="module")
def limits_stack(tmp_path_factory):
    """A Dalston of its own (one faster-whisper engine), so each process's peak memory is this
    module's alone; the limits are the defaults."""
    system = TestStack.running(tmp_path_factory.mktemp("limits"), "fw")
    assert not any(k in system.env for k in ("DALSTON_MAX_AUDIO_SECONDS", "DALSTON_MAX_CHANNELS"))
    yield system
    system.close()


def peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def transcript_words(stack: TestStack, job_id: str) -> list[str]:
    return words(httpx.get(f"{stack.url}/v1/jobs/{job_id}/transcript").json()["text"])


async def test_hours_of_audio_fail_fast_and_a_short_job_beside_them_completes(limits_stack, files):
    stack = limits_stack
    limit = Settings().max_audio_seconds
    long_jobs = {name: submit(stack, files[name], MODEL) for name in ("opus-10h", "flac-10h-5.1")}
    submitted = time.monotonic()
    short_job = submit(stack, AUDIO / "dialogue.wav", MODEL)
    short = await wait_job(stack, short_job, 120)
    short_seconds = time.monotonic() - submitted
    assert short["status"] == "completed", short
    assert transcript_words(stack, short_job) == DIALOGUE_WORDS

    for name, job_id in long_jobs.items():
        record = await wait_job(stack, job_id, 120)
        assert record["status"] == "failed", (name, record)
        assert record["failure"]["code"] == "invalid_audio"
        message = record["failure"]["message"]
        assert f"lasts {TEN_HOURS} seconds" in message, message
        assert f"limit of {limit:.0f} seconds" in message and "DALSTON_MAX_AUDIO_SECONDS" in message
        prepare = record["tasks"]["prepare"]
        # Refused from the header at the first attempt: not decoded, never crashed an engine.
        assert prepare["attempt"] == 1
        assert not any(task["stage"] == "transcribe" for task in record["tasks"].values())
        print(f"{name}: refused after {prepare['finished_at'] - prepare['started_at']:.2f} s of prepare")
        assert prepare["finished_at"] - prepare["started_at"] < 60

    # Behind two ten-hour files in the one audio-prepare engine: seconds, not minutes.
    print(f"short job beside them: {short_seconds:.1f} s")
    assert short_seconds < 60
    peaks = {name: peak_rss(process.pid) for name, process in stack.processes.items()}
    print("peak RSS MB:", {name: peak // (1 << 20) for name, peak in peaks.items()})
    assert all(peak < GiB for peak in peaks.values()), peaks


async def test_files_of_8_and_16_channels_are_transcribed_and_prepare_never_crashes(limits_stack, files):
    stack = limits_stack
    prepare_engine = stack.processes["audio-prepare"]
    pid = prepare_engine.pid
    jobs = {name: submit(stack, files[name], MODEL) for name in ("wav-8ch", "wav-16ch")}
    records = {name: await wait_job(stack, job_id, 120) for name, job_id in jobs.items()}
    for name, record in records.items():
        assert record["status"] == "completed", (name, record)
    # Eight channels: its two distinct ones, one per speaker, transcribed apart and merged.
    assert records["wav-8ch"]["channels"] == 2
    assert transcript_words(stack, jobs["wav-8ch"]) == DIALOGUE_WORDS
    # Sixteen, over the default cap of 8: mixed down to one channel that holds both speakers
    # (tiny.en hears a "but" before them in the mix).
    assert records["wav-16ch"]["channels"] == 1
    assert " ".join(DIALOGUE_WORDS) in " ".join(transcript_words(stack, jobs["wav-16ch"]))
    assert prepare_engine.poll() is None and stack.processes["audio-prepare"].pid == pid
