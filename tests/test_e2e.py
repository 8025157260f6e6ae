"""End to end: the real openai client, the gateway, the orchestrator and engines over a real NATS,
on the real tiny.en weights."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.audio_fixtures import VARIANTS, convert, speak
from tests.stack import AUDIO, DIALOGUE_WORDS, free_port, wait_ok, words

MODEL = "faster-whisper-tiny.en"


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=120)


def transcribe(client, path, **kwargs):
    with open(path, "rb") as audio:
        return client.audio.transcriptions.create(model=kwargs.pop("model", MODEL), file=audio, **kwargs)


def test_openai_client_gets_the_dialogue(client):
    result = transcribe(client, AUDIO / "dialogue.wav")
    assert words(result.text) == DIALOGUE_WORDS


def test_whisper_1_means_the_default_model(client):
    assert words(transcribe(client, AUDIO / "speaker1.wav", model="whisper-1").text) == \
        words("That was hilarious, I can't believe you said that.")


def test_every_response_format_round_trips(client):
    text = transcribe(client, AUDIO / "dialogue.wav", response_format="text")
    assert words(text) == DIALOGUE_WORDS

    srt = transcribe(client, AUDIO / "dialogue.wav", response_format="srt")
    assert srt.startswith("1\n00:00:0") and " --> " in srt
    assert words(" ".join(l for l in srt.splitlines() if l and "-->" not in l and not l.isdigit())) == DIALOGUE_WORDS

    vtt = transcribe(client, AUDIO / "dialogue.wav", response_format="vtt")
    assert vtt.startswith("WEBVTT") and "00:00:0" in vtt

    verbose = transcribe(client, AUDIO / "dialogue.wav", response_format="verbose_json",
                         timestamp_granularities=["word", "segment"])
    assert words(verbose.text) == DIALOGUE_WORDS
    assert verbose.language == "english"
    assert 5.0 < verbose.duration < 6.0
    assert len(verbose.segments) >= 2
    assert [w.word.strip(",.?").lower() for w in verbose.words] == DIALOGUE_WORDS
    starts = [w.start for w in verbose.words]
    assert starts == sorted(starts) and all(w.end >= w.start for w in verbose.words)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_other_formats_and_rates(client, variant, tmp_path):
    suffix, options = VARIANTS[variant]
    path = convert(AUDIO / "dialogue.wav", suffix, tmp_path, **options)
    assert words(transcribe(client, path).text) == DIALOGUE_WORDS


def test_stereo_with_one_speaker_per_channel(client):
    assert words(transcribe(client, AUDIO / "dialogue_stereo.wav").text) == DIALOGUE_WORDS


def test_silence_is_not_hallucinated(client):
    transcribe(client, AUDIO / "speaker1.wav")  # model warm
    started = time.monotonic()
    result = transcribe(client, AUDIO / "tone_no_speech.wav")
    assert result.text == ""
    assert time.monotonic() - started < 3.0  # the tone lasts 3 s


@pytest.mark.parametrize("name, reason", [
    ("empty.wav", "empty"),
    ("truncated_header.wav", "truncated"),
    ("text_as_wav.wav", "text, not audio"),
    ("random_bytes.mp3", "not in an audio format"),
])
def test_invalid_audio_is_a_clear_400(client, name, reason):
    with pytest.raises(openai.BadRequestError) as caught:
        transcribe(client, AUDIO / "invalid" / name)
    message = caught.value.body["message"]
    assert reason in message.lower()
    # And the service keeps serving.
    assert words(transcribe(client, AUDIO / "speaker2.wav").text) == \
        words("What do you mean? I was really serious about it.")


def test_a_language_the_model_lacks_is_a_clear_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        transcribe(client, AUDIO / "speaker1.wav", language="de")
    assert "faster-whisper-tiny.en transcribes en, not 'de'" in caught.value.body["message"]


def test_unknown_model_is_404_listing_valid_ids(client):
    with pytest.raises(openai.NotFoundError) as caught:
        transcribe(client, AUDIO / "speaker1.wav", model="whisper-9000")
    message = caught.value.body["message"]
    assert "whisper-9000" in message and "faster-whisper-tiny.en" in message


def test_a_phone_number_said_is_redacted_in_every_format(client, tmp_path):
    path = speak("Please call me on five five five, two three four, five six seven eight. Thank you.",
                 "en-us", tmp_path, words_per_minute=140)
    plain = transcribe(client, path, response_format="text")
    assert "thank you" in plain.lower() and "[REDACTED]" not in plain
    for fmt in ("text", "srt", "vtt"):
        masked = transcribe(client, path, response_format=fmt, extra_body={"redact": "pii"})
        assert "[REDACTED]" in masked and "thank you" in masked.lower(), (fmt, masked)
        said = "".join(line for line in masked.splitlines() if "-->" not in line and not line.strip().isdigit())
        assert sum(c.isdigit() for c in said) < 7, (fmt, masked)  # the number is gone, cue times aside
    verbose = transcribe(client, path, response_format="verbose_json", timestamp_granularities=["word"],
                         extra_body={"redact": "pii"})
    masked_words = [w for w in verbose.words if w.word.strip().startswith("[REDACTED]")]
    assert masked_words and all(w.end > w.start for w in masked_words)  # the times stay
    with pytest.raises(openai.BadRequestError) as caught:
        transcribe(client, path, extra_body={"redact": "all"})
    assert caught.value.param == "redact"
    with pytest.raises(openai.BadRequestError) as caught:  # streamed text would go out unmasked
        transcribe(client, path, stream=True, extra_body={"redact": "pii"})
    assert caught.value.param == "redact" and "stream" in caught.value.body["message"]


def test_upload_over_the_limit_is_413(stack):
    port = free_port()
    stack.start("gateway-small", "gateway", DALSTON_HTTP_PORT=str(port), DALSTON_MAX_UPLOAD_MB="0.05")
    url = f"http://127.0.0.1:{port}"
    wait_ok(f"{url}/healthz", "the small gateway did not start", 20)
    with open(AUDIO / "dialogue.wav", "rb") as audio:  # 269 kB > 50 kB
        response = httpx.post(f"{url}/v1/audio/transcriptions", files={"file": audio},
                              data={"model": MODEL}, timeout=60)
    assert response.status_code == 413
    assert "DALSTON_MAX_UPLOAD_MB" in response.json()["error"]["message"]
    with open(AUDIO / "speaker1.wav", "rb") as audio:  # 117 kB: still over
        assert httpx.post(f"{url}/v1/audio/transcriptions", files={"file": audio}).status_code == 413
    stack.stop("gateway-small")


def test_native_jobs_api(stack):
    with open(AUDIO / "dialogue.wav", "rb") as audio:
        response = httpx.post(f"{stack.url}/v1/jobs", files={"file": audio}, data={"model": MODEL})
    assert response.status_code == 202
    job_id = response.json()["id"]
    deadline = time.monotonic() + 60
    while (job := httpx.get(f"{stack.url}/v1/jobs/{job_id}").json())["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert job["status"] == "completed"
    assert {t["stage"] for t in job["tasks"].values()} == {"prepare", "transcribe", "merge"}
    transcript = httpx.get(f"{stack.url}/v1/jobs/{job_id}/transcript", params={"format": "json"}).json()
    assert words(transcript["text"]) == DIALOGUE_WORDS
    srt = httpx.get(f"{stack.url}/v1/jobs/{job_id}/transcript", params={"format": "srt"}).text
    assert " --> " in srt
    listed = httpx.get(f"{stack.url}/v1/jobs").json()["data"]
    assert job_id in [j["id"] for j in listed]
    assert httpx.get(f"{stack.url}/v1/jobs/nope").status_code == 404


def test_health_and_openapi(stack):
    assert httpx.get(f"{stack.url}/healthz").json()["status"] == "ok"
    assert httpx.get(f"{stack.url}/readyz").json()["status"] == "ready"
    schema = httpx.get(f"{stack.url}/openapi/openapi.json").json()
    assert "/v1/audio/transcriptions" in schema["paths"]


def test_metrics_show_engines_and_queues(stack, client):
    transcribe(client, AUDIO / "speaker1.wav")
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{stack.url}/metrics").text)}
    assert {"runtime": "faster-whisper", "engine": "fw-a", "status": "idle"} in \
        [s.labels for s in families["dalston_engine_up"].samples if s.value == 1]
    assert sum(s.value for s in families["dalston_engine_tasks_done"].samples) > 0
    assert families["dalston_tasks_queued"].type == "gauge"
