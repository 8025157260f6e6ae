"""Who spoke, asked through the APIs: the job grows a diarize stage beside transcription, on an
engine of its own, and merge gives every word its speaker. The real openai client parses the
diarized answer."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
import pytest
import soundfile
from openai import OpenAI

from bench.conversations import TWO_VOICES, conversation
from dalston.pcm import SAMPLE_RATE
from tests.stack import AUDIO, TestStack, wait_job, words

MODEL = "faster-whisper-tiny.en"


@pytest.fixture(scope="module")
def diarizing(stack):
    """The shared Dalston: two faster-whisper engines and a diarize engine."""
    return stack


def client(stack: TestStack) -> OpenAI:
    return OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)


def test_the_dialogue_comes_back_with_two_speakers_one_per_sentence(diarizing):
    with open(AUDIO / "dialogue.wav", "rb") as audio:
        result = client(diarizing).audio.transcriptions.create(
            model=MODEL, file=audio, response_format="diarized_json")
    assert type(result).__name__ == "TranscriptionDiarized"
    assert {s.type for s in result.segments} == {"transcript.text.segment"}
    speakers = [s.speaker for s in result.segments]
    assert sorted(set(speakers)) == ["SPEAKER_0", "SPEAKER_1"]
    first = " ".join(s.text for s in result.segments if s.speaker == speakers[0])
    second = " ".join(s.text for s in result.segments if s.speaker != speakers[0])
    assert words(first) == words("That was hilarious, I can't believe you said that.")
    assert words(second) == words("What do you mean? I was really serious about it.")
    assert result.usage.seconds >= 5


def test_one_voice_is_one_speaker_and_the_job_records_its_stages(diarizing):
    with open(AUDIO / "speaker1.wav", "rb") as audio:
        response = httpx.post(f"{diarizing.url}/v1/jobs", files={"file": audio},
                              data={"model": MODEL, "diarize": "true"})
    job_id = response.json()["id"]
    record = asyncio.run(wait_job(diarizing, job_id))
    assert record["status"] == "completed"
    assert record["tasks"]["diarize-0"]["engine"] == "dz"
    assert record["tasks"]["transcribe-0"]["engine"] in ("fw-a", "fw-b")
    verbose = httpx.get(f"{diarizing.url}/v1/jobs/{job_id}/transcript",
                        params={"format": "verbose_json"}).json()
    assert {w["speaker"] for w in verbose["words"]} == {s["speaker"] for s in verbose["segments"]} == {"SPEAKER_0"}
    vtt = httpx.get(f"{diarizing.url}/v1/jobs/{job_id}/transcript", params={"format": "vtt"}).text
    assert "<v SPEAKER_0>" in vtt


def test_a_conversation_of_two_voices_with_a_given_count(diarizing, tmp_path):
    talk = conversation(TWO_VOICES, turns=6, seed=1)
    path = tmp_path / "conversation.wav"
    soundfile.write(path, talk.audio, SAMPLE_RATE)
    with open(path, "rb") as audio:
        result = client(diarizing).audio.transcriptions.create(
            model=MODEL, file=audio, response_format="verbose_json", timestamp_granularities=["word"],
            extra_body={"diarize": "true", "num_speakers": "2"})
    assert len({w.speaker for w in result.words}) == 2


def test_each_channel_of_a_stereo_file_is_diarized_and_named_apart(diarizing):
    with open(AUDIO / "dialogue_stereo.wav", "rb") as audio:
        response = httpx.post(f"{diarizing.url}/v1/audio/transcriptions", files={"file": audio},
                              data={"model": MODEL, "response_format": "verbose_json", "diarize": "true"},
                              timeout=120)
    segments = response.json()["segments"]
    assert {s["speaker"].split("_", 1)[0] for s in segments} == {"CH0", "CH1"}


@pytest.mark.parametrize("form, param", [
    ({"num_speakers": "0"}, "num_speakers"), ({"num_speakers": "33"}, "num_speakers"),
    ({"min_speakers": "3", "max_speakers": "2"}, "diarize"), ({"num_speakers": "two"}, "num_speakers"),
    ({"model": "resemblyzer-ge2e"}, "model"),  # a diarization model does not transcribe (wrong_runtime)
])
def test_bad_speaker_counts_are_a_400_naming_the_field(diarizing, form, param):
    with open(AUDIO / "speaker1.wav", "rb") as audio:
        response = httpx.post(f"{diarizing.url}/v1/jobs", files={"file": audio},
                              data={"model": MODEL, "diarize": "true", **form})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_the_cli_says_who_spoke(diarizing):
    done = subprocess.run([sys.executable, "-m", "dalston", "transcribe", str(AUDIO / "dialogue.wav"),
                           "-m", MODEL, "--diarize", "--speakers", "2"], capture_output=True, text=True,
                          timeout=120, env={**diarizing.env, "DALSTON_SERVER": diarizing.url})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split(":", 1)[0] for line in lines] == ["SPEAKER_0", "SPEAKER_1"]
    assert words(lines[1].split(":", 1)[1]) == words("What do you mean? I was really serious about it.")
