"""`/v1/audio/translations` and what else OpenAI apps send (usage, chunking_strategy,
include[]=logprobs, keywords), through the real openai client and the session stack: German
espeak-ng speech into English on the real faster-whisper-base weights."""

from __future__ import annotations

import math

import httpx
import openai
import pytest

from dalston.catalog import Catalog
from tests.audio_fixtures import speak
from tests.stack import AUDIO, wait_job, words

BASE, TINY_EN = "faster-whisper-base", "faster-whisper-tiny.en"
SPEAKER1 = words("That was hilarious, I can't believe you said that.")


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def german(tmp_path_factory):
    # Two sentences rather than german_clip's greeting: base translates that one only at
    # sampling temperatures (its fallback), so not the same way twice; this it decodes at 0.
    return speak("Das Wetter ist heute sehr schön. Ich trinke gerne Kaffee mit Milch.", "de",
                 tmp_path_factory.mktemp("german"))


def translate(client, path, **kwargs):
    with open(path, "rb") as audio:
        return client.audio.translations.create(model=kwargs.pop("model", BASE), file=audio, **kwargs)


def test_german_speech_comes_out_in_english(client, german):
    english = words(translate(client, german).text)
    assert {"coffee", "with", "milk"} <= set(english), english
    assert not {"wetter", "heute", "trinke", "gerne", "kaffee", "mit", "milch"} & set(english), english


def test_translations_in_every_format(client, german):
    verbose = translate(client, german, response_format="verbose_json")
    assert (verbose.task, verbose.language) == ("translate", "english")
    assert verbose.segments and "coffee" in words(verbose.text)
    for fmt, start in (("text", ""), ("srt", "1\n00:00:0"), ("vtt", "WEBVTT")):
        body = translate(client, german, response_format=fmt)
        assert body.startswith(start) and "coffee" in words(body), (fmt, body)


def test_an_english_only_model_cannot_translate(client, german):
    with pytest.raises(openai.BadRequestError) as refused:
        translate(client, german, model=TINY_EN)
    assert refused.value.body["code"] == "unsupported_task"
    assert "cannot translate" in refused.value.body["message"]


def test_the_catalog_says_which_models_translate():
    """Only multilingual Whisper models translate; English-only ones and NeMo never."""
    catalog = Catalog.load()
    for model in catalog.models.values():
        if model.capabilities.translation:
            assert model.runtime == "faster-whisper" and not model.languages, model.id
    assert catalog.model(BASE).capabilities.translation
    assert not any(m.capabilities.translation for m in catalog.models.values() if m.runtime == "nemo")


def test_usage_in_json_and_verbose_json(client):
    with open(AUDIO / "speaker1.wav", "rb") as audio:
        plain = client.audio.transcriptions.create(model=TINY_EN, file=audio)
    with open(AUDIO / "speaker1.wav", "rb") as audio:
        verbose = client.audio.transcriptions.create(model=TINY_EN, file=audio, response_format="verbose_json")
    for result in (plain, verbose):
        assert result.usage.type == "duration"
        assert result.usage.seconds == math.ceil(verbose.duration) > 0


def test_logprobs_come_back_when_included(client):
    with open(AUDIO / "speaker1.wav", "rb") as audio:
        result = client.audio.transcriptions.create(model=TINY_EN, file=audio, include=["logprobs"])
    assert words(" ".join(p.token for p in result.logprobs)) == SPEAKER1
    assert all(p.logprob <= 0 and bytes(int(b) for b in p.bytes).decode() == p.token for p in result.logprobs)
    with open(AUDIO / "speaker1.wav", "rb") as audio:
        assert client.audio.transcriptions.create(model=TINY_EN, file=audio).logprobs is None


async def test_keywords_and_server_vad_reach_the_job(stack):
    with open(AUDIO / "speaker1.wav", "rb") as audio:
        response = httpx.post(f"{stack.url}/v1/jobs", files={"file": audio}, data={
            "model": TINY_EN, "keywords[]": ["hilarious", "Dalston"],
            "chunking_strategy": '{"type": "server_vad", "threshold": 0.4, "prefix_padding_ms": 300, '
                                 '"silence_duration_ms": 700}'})
    assert response.status_code == 202, response.text
    record = await wait_job(stack, response.json()["id"])
    assert record["status"] == "completed", record
    assert record["options"]["hotwords"] == "hilarious, Dalston"
    assert record["options"]["vad_parameters"] == {"threshold": 0.4, "speech_pad_ms": 300,
                                                   "min_silence_duration_ms": 700}
    transcript = httpx.get(f"{stack.url}/v1/jobs/{record['id']}/transcript").json()
    assert words(transcript["text"]) == SPEAKER1


def test_chunking_strategy_as_the_openai_client_sends_it(client):
    with open(AUDIO / "speaker1.wav", "rb") as audio:
        result = client.audio.transcriptions.create(
            model=TINY_EN, file=audio, chunking_strategy={"type": "server_vad", "threshold": 0.5})
    assert words(result.text) == SPEAKER1
    with open(AUDIO / "speaker1.wav", "rb") as audio:
        assert words(client.audio.transcriptions.create(model=TINY_EN, file=audio,
                                                        chunking_strategy="auto").text) == SPEAKER1


@pytest.mark.parametrize("form, param", [
    ({"include[]": "tokens"}, "include[]"),
    ({"chunking_strategy": "fast"}, "chunking_strategy"),
    ({"chunking_strategy": '{"type": "semantic"}'}, "chunking_strategy"),
    ({"chunking_strategy[type]": "server_vad", "chunking_strategy[threshold]": "2"}, "vad_parameters.threshold"),
    ({"keywords[]": "x" * 3000}, "hotwords"),
])
def test_bad_options_are_a_400_naming_the_field(stack, form, param):
    with open(AUDIO / "speaker1.wav", "rb") as audio:
        response = httpx.post(f"{stack.url}/v1/audio/transcriptions", files={"file": audio},
                              data={"model": TINY_EN, **form})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
