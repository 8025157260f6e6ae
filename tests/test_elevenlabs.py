"""ElevenLabs' speech-to-text API (`/v1/speech-to-text`) through the official `elevenlabs`
client on the session stack (real faster-whisper tiny.en), audio fetched from a URL on a
loopback HTTP server, and the response shaping as units."""

from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import httpx
import msgspec
import pytest
from elevenlabs import ElevenLabs
from elevenlabs.core.api_error import ApiError
from elevenlabs.errors import UnprocessableEntityError

from dalston.contracts import Segment, Transcript, Word
from dalston.elevenlabs_shape import _speaker_id, speech_to_text, whisper_language
from tests.stack import AUDIO, free_port, wait_for, wait_ok, words

SPEAKER1 = words("That was hilarious, I can't believe you said that.")
SPEAKER2 = words("What do you mean? I was really serious about it.")


@pytest.fixture(scope="module")
def client(stack):
    return ElevenLabs(base_url=stack.url, api_key="unused", timeout=300)


def convert(client, path=AUDIO / "dialogue.wav", **kwargs):
    with open(path, "rb") as audio:
        return client.speech_to_text.convert(model_id=kwargs.pop("model_id", "scribe_v1"), file=audio, **kwargs)


def spoken(result) -> list[str]:
    return words(" ".join(w.text for w in result.words if w.type == "word"))


def test_dialogue_comes_back_with_word_timestamps(client):
    result = convert(client)
    assert spoken(result) == SPEAKER1 + SPEAKER2
    assert result.language_code == "eng" and 0.0 < result.language_probability <= 1.0
    timed = [w for w in result.words if w.type == "word"]
    assert all(w.start is not None and w.start <= w.end for w in timed)
    assert [w.start for w in timed] == sorted(w.start for w in timed)
    assert timed[-1].end > 4.0  # speaker2 talks from about 2.5 s to 5.6 s
    # A spacing between every two words, and log-probabilities as ElevenLabs gives them.
    assert [w.type for w in result.words] == ["word", "spacing"] * (len(timed) - 1) + ["word"]
    assert all(w.logprob <= 0.0 for w in result.words)
    assert result.transcription_id and result.audio_duration_secs == pytest.approx(5.6, abs=0.2)


def test_character_timings_keyterms_and_additional_formats(stack, client):
    result = convert(client, AUDIO / "speaker1.wav", model_id="faster-whisper-tiny.en",
                     timestamps_granularity="character", language_code="eng", keyterms=["hilarious"],
                     additional_formats=[{"format": "srt"}, {"format": "txt"}, {"format": "segmented_json"}])
    options = httpx.get(f"{stack.url}/v1/jobs/{result.transcription_id}").json()["options"]
    assert (options["language"], options["hotwords"]) == ("en", "hilarious")
    word = next(w for w in result.words if w.type == "word")
    assert "".join(c.text for c in word.characters) == word.text
    assert word.characters[0].start == word.start and word.characters[-1].end == pytest.approx(word.end, abs=0.002)
    srt, txt, segmented = result.additional_formats
    assert (srt.requested_format, srt.file_extension, txt.file_extension) == ("srt", "srt", "txt")
    assert srt.content.startswith("1\n00:00:0") and words(txt.content) == SPEAKER1
    assert words(" ".join(s["text"] for s in msgspec.json.decode(segmented.content)["segments"])) == SPEAKER1


def test_without_timestamps(client):
    result = convert(client, AUDIO / "speaker1.wav", timestamps_granularity="none", tag_audio_events=True)
    assert spoken(result) == SPEAKER1
    assert all(w.start is None and w.end is None for w in result.words)


def test_multichannel_gives_one_transcript_per_channel(client):
    result = convert(client, AUDIO / "dialogue_stereo.wav", use_multi_channel=True)
    assert [t.channel_index for t in result.transcripts] == [0, 1]
    assert [spoken(t) for t in result.transcripts] == [SPEAKER1, SPEAKER2]
    assert {w.channel_index for w in result.transcripts[1].words} == {1}


def test_diarized_dialogue_has_two_speakers(client):
    result = convert(client, diarize=True, num_speakers=2)
    speakers = [w.speaker_id for w in result.words if w.type == "word"]
    assert set(speakers) == {"speaker_0", "speaker_1"}
    # Speaker 1's sentence, then speaker 2's.
    assert speakers[0] != speakers[-1]


async def test_webhook_answers_at_once_and_the_transcript_is_fetched_later(client):
    accepted = convert(client, AUDIO / "speaker1.wav", webhook=True)
    assert accepted.request_id and accepted.transcription_id

    async def transcript():
        try:
            return client.speech_to_text.transcripts.get(accepted.transcription_id)
        except ApiError as exc:
            assert exc.status_code == 409, exc.body  # not ready yet
            return None
    result = await wait_for(transcript, 120)
    assert spoken(result) == SPEAKER1 and result.transcription_id == accepted.transcription_id
    assert all(w.start is not None for w in result.words)


def test_unknown_transcript_is_404(client):
    with pytest.raises(ApiError) as missing:
        client.speech_to_text.transcripts.get("0" * 32)
    assert missing.value.status_code == 404 and missing.value.body["detail"]["status"] == "transcript_not_found"


@pytest.mark.parametrize(("form", "field"), [
    ({"model_id": "scribe_v1", "timestamps_granularity": "syllable"}, "timestamps_granularity"),
    ({"model_id": "no-such-model"}, "model_id"),
    ({"model_id": "scribe_v1", "num_speakers": "33"}, "num_speakers"),
    ({"model_id": "scribe_v1", "diarization_threshold": "1.5"}, "diarization_threshold"),
    ({"model_id": "scribe_v1", "language_code": "english!"}, "language_code"),
    ({"model_id": "scribe_v1", "additional_formats": '[{"format": "docx"}]'}, "additional_formats"),
    ({"model_id": "scribe_v1", "diarize": "maybe"}, "diarize"),
    ({}, "model_id"),
])
def test_invalid_fields_are_422_in_elevenlabs_shape(stack, form, field):
    with open(AUDIO / "speaker1.wav", "rb") as audio:
        response = httpx.post(f"{stack.url}/v1/speech-to-text", files={"file": audio}, data=form)
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", field] and error["msg"] and error["type"] == "value_error"


def test_the_client_sees_validation_errors(client):
    with pytest.raises(UnprocessableEntityError):
        convert(client, additional_formats=[{"format": "pdf"}])


def test_file_and_url_together_are_refused(stack):
    with open(AUDIO / "speaker1.wav", "rb") as audio:
        response = httpx.post(f"{stack.url}/v1/speech-to-text", files={"file": audio},
                              data={"model_id": "scribe_v1", "source_url": "https://example.com/a.wav"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "file"]


# --- audio from a URL ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def audio_server():
    """The test audio over HTTP on 127.0.0.1."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(AUDIO))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def fetching_gateway(stack):
    """A gateway of the session stack that may fetch from loopback, uploads up to 0.2 MB."""
    port = free_port()
    stack.start("gateway-fetch", "gateway", DALSTON_HTTP_PORT=str(port), DALSTON_FETCH_ALLOW_PRIVATE="true",
                DALSTON_MAX_UPLOAD_MB="0.2")
    url = f"http://127.0.0.1:{port}"
    wait_ok(f"{url}/readyz", "fetching gateway not ready")
    yield url
    stack.stop("gateway-fetch")


def test_audio_fetched_from_a_url(fetching_gateway, audio_server):
    client = ElevenLabs(base_url=fetching_gateway, api_key="unused", timeout=300)
    result = client.speech_to_text.convert(model_id="scribe_v2", cloud_storage_url=f"{audio_server}/speaker1.wav")
    assert spoken(result) == SPEAKER1
    result = client.speech_to_text.convert(model_id="scribe_v2", source_url=f"{audio_server}/speaker2.wav")
    assert spoken(result) == SPEAKER2


@pytest.mark.parametrize(("name", "status", "says"), [("dialogue.wav", 413, "larger than"),
                                                     ("missing.wav", 400, "answered 404"),
                                                     ("invalid", 400, "redirect")])  # to invalid/
def test_a_url_too_large_missing_or_redirected_is_refused(fetching_gateway, audio_server, name, status, says):
    response = httpx.post(f"{fetching_gateway}/v1/speech-to-text",
                          data={"model_id": "scribe_v1", "source_url": f"{audio_server}/{name}"},
                          files={"unused": ("", b"")})
    assert response.status_code == status, response.text
    assert says in response.json()["detail"]["message"]


@pytest.mark.parametrize("host", ["127.0.0.1", "[::127.0.0.1]", "[::ffff:0:7f00:1]", "[64:ff9b::7f00:1]",
                                  "[2002:7f00:1::]", "[fec0::1]"])
def test_loopback_urls_are_refused_by_default(client, audio_server, host):
    port = audio_server.rsplit(":", 1)[1]
    with pytest.raises(UnprocessableEntityError) as refused:
        client.speech_to_text.convert(model_id="scribe_v1", cloud_storage_url=f"http://{host}:{port}/speaker1.wav")
    assert "DALSTON_FETCH_ALLOW_PRIVATE" in refused.value.body["detail"][0]["msg"]


# --- the response shape, as units ---------------------------------------------------------------

def _transcript(*segments: Segment, channels: int = 1) -> Transcript:
    return Transcript(job_id="j", text=" ".join(s.text.strip() for s in segments), language="de",
                      language_probability=0.9, duration=4.0, channels=channels, segments=list(segments))


HELLO = Segment(start=0.0, end=2.0, text=" Hallo Welt", words=[
    Word(start=0.0, end=0.5, word=" Hallo", probability=0.5),
    Word(start=1.0, end=2.0, word=" Welt", logprob=-0.25)])
SECOND_CHANNEL = Segment(start=0.5, end=1.0, text=" Ja", channel=1, words=[Word(start=0.5, end=1.0, word=" Ja")])


def test_words_spacing_and_logprobs():
    result = speech_to_text(_transcript(HELLO), transcription_id="j")
    assert (result["language_code"], result["language_probability"], result["text"]) == ("deu", 0.9, "Hallo Welt")
    assert [(w["text"], w["start"], w["end"], w["type"]) for w in result["words"]] == [
        ("Hallo", 0.0, 0.5, "word"), (" ", 0.5, 1.0, "spacing"), ("Welt", 1.0, 2.0, "word")]
    assert [w["logprob"] for w in result["words"]] == [pytest.approx(-0.6931, abs=1e-4), 0.0, -0.25]
    assert "channel_index" not in result["words"][0] and result["audio_duration_secs"] == 4.0


def test_characters_share_the_word_evenly():
    welt = speech_to_text(_transcript(HELLO), granularity="character")["words"][2]
    assert [(c["text"], c["start"], c["end"]) for c in welt["characters"]] == [
        ("W", 1.0, 1.25), ("e", 1.25, 1.5), ("l", 1.5, 1.75), ("t", 1.75, 2.0)]


def test_multichannel_groups_by_channel_including_a_silent_one():
    result = speech_to_text(_transcript(HELLO, SECOND_CHANNEL, channels=3), multichannel=True)
    assert [(t["channel_index"], t["text"]) for t in result["transcripts"]] == [(0, "Hallo Welt"), (1, "Ja"),
                                                                                (2, "")]
    assert {w["channel_index"] for w in result["transcripts"][1]["words"]} == {1}


def test_untimed_segments_still_have_their_words():
    plain = msgspec.structs.replace(HELLO, words=[])
    result = speech_to_text(_transcript(plain), granularity="none")
    assert [(w["text"], w["start"]) for w in result["words"]] == [("Hallo", None), (" ", None), ("Welt", None)]


def test_speaker_ids_and_language_codes():
    assert _speaker_id(SimpleNamespace(speaker="SPEAKER_1")) == "speaker_1"
    assert _speaker_id(HELLO) is None
    assert [whisper_language(c) for c in ("eng", "en", "yue", "zh-Hant", "deu")] == ["en", "en", "yue", "zh-Hant",
                                                                                      "de"]
