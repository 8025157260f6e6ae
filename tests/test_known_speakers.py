"""Known speakers, as OpenAI's diarization API has them: reference clips (data URLs) or enrolled
voices name the speakers of a real telephone call, a stranger's voice names nobody, bad input is
a 400 naming the field, and a key's voices are its own. The real openai client sends the form."""

from __future__ import annotations

import asyncio
import base64
import io
import subprocess
import sys

import httpx
import numpy as np
import openai
import pytest
import soundfile
from openai import OpenAI

from actors.diarize.known_speakers import match
from tests.stack import AUDIO, TestStack, wait_job

MODEL = "faster-whisper-tiny.en"
CONVERSATIONS = AUDIO.parent / "conversations"
CALL = CONVERSATIONS / "call_2spk.flac"
NAMES = "known_speaker_names[]"
REFERENCES = "known_speaker_references[]"


def cut(path, start: float, end: float) -> bytes:
    """Seconds `start`..`end` of a recording, as a 16-bit WAV file."""
    audio, rate = soundfile.read(path, dtype="float32")
    out = io.BytesIO()
    soundfile.write(out, audio[int(start * rate):int(end * rate)], rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def data_url(wav: bytes) -> str:
    return "data:audio/wav;base64," + base64.b64encode(wav).decode()


# One turn of each speaker of the call (tests/data/conversations/call_2spk.rttm), where the
# other does not talk over it; and a stranger: a woman of an AMI meeting (ami_4spk_a, FEE087).
AGENT = cut(CALL, 11.03, 14.49)  # speaker90
CUSTOMER = cut(CALL, 21.78, 27.85)  # speaker91
STRANGER = cut(CONVERSATIONS / "ami_4spk_a.flac", 15.6, 18.41)
WHO = {"speaker90": "agent", "speaker91": "customer"}


def reference_turns() -> list[tuple[float, float, str]]:
    rows = [line.split() for line in (CONVERSATIONS / "call_2spk.rttm").read_text().splitlines()]
    return [(float(r[3]), float(r[3]) + float(r[4]), r[7]) for r in rows]


def agreement(segments) -> float:
    """The share of the named segments' time whose name is that of the speaker who talks most
    in it by the reference turns."""
    agreed = total = 0.0
    for segment in segments:
        talk = {}
        for start, end, speaker in reference_turns():
            talk[speaker] = talk.get(speaker, 0.0) + max(0.0, min(end, segment.end) - max(start, segment.start))
        if not any(talk.values()):
            continue
        length = segment.end - segment.start
        total += length
        agreed += length * (WHO[max(talk, key=talk.get)] == segment.speaker)
    return agreed / total


def client(stack: TestStack, key: str = "unused") -> OpenAI:
    return OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0, timeout=120)


def transcribe(stack: TestStack, **known):
    with open(CALL, "rb") as audio:
        return client(stack).audio.transcriptions.create(
            model=MODEL, file=audio, response_format="diarized_json", **known)


def test_reference_clips_name_both_speakers_of_a_call(stack):
    result = transcribe(stack, known_speaker_names=["agent", "customer"],
                        known_speaker_references=[data_url(AGENT), data_url(CUSTOMER)])
    assert {s.speaker for s in result.segments} == {"agent", "customer"}
    assert agreement(result.segments) >= 0.8


def test_a_strangers_voice_names_nobody(stack):
    result = transcribe(stack, known_speaker_names=["agent", "visitor"],
                        known_speaker_references=[data_url(AGENT), data_url(STRANGER)])
    speakers = {s.speaker for s in result.segments}
    assert "visitor" not in speakers
    assert "agent" in speakers
    assert [s for s in speakers if s != "agent"] and all(s.startswith("SPEAKER_") for s in speakers - {"agent"})


def enroll(stack: TestStack, name: str, clip: bytes, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{stack.url}/v1/voices", data={"name": name}, files={"file": ("clip.wav", clip)},
                      headers=headers, timeout=120)


def test_enrolled_voices_name_speakers_by_name_alone_on_both_forms(stack):
    ids = [enroll(stack, name, clip).json()["id"] for name, clip in (("agent", AGENT), ("customer", CUSTOMER))]
    try:
        listed = httpx.get(f"{stack.url}/v1/voices").json()["data"]
        assert [(v["id"], v["name"]) for v in listed] == list(zip(ids, ["agent", "customer"]))
        assert set(listed[0]) == {"id", "object", "name", "model", "created_at"}  # no audio, no embedding
        result = transcribe(stack, known_speaker_names=["agent", "customer"])
        assert {s.speaker for s in result.segments} == {"agent", "customer"}
        assert agreement(result.segments) >= 0.8
        # The native jobs form takes the same fields.
        with open(CALL, "rb") as audio:
            job_id = httpx.post(f"{stack.url}/v1/jobs", files={"file": audio},
                                data={"model": MODEL, NAMES: ["customer"]}).json()["id"]
        assert asyncio.run(wait_job(stack, job_id))["status"] == "completed"
        verbose = httpx.get(f"{stack.url}/v1/jobs/{job_id}/transcript", params={"format": "verbose_json"}).json()
        named = {s["speaker"] for s in verbose["segments"]}
        assert "customer" in named and "agent" not in named
    finally:
        for voice_id in ids:
            assert httpx.delete(f"{stack.url}/v1/voices/{voice_id}").status_code == 200
    assert httpx.get(f"{stack.url}/v1/voices").json()["data"] == []


def bad_requests() -> list[tuple[str, dict, str]]:
    good = data_url(AGENT)
    names, references = "known_speaker_names", "known_speaker_references"
    return [
        ("not audio", {names: ["a"], references: ["data:audio/wav;base64," + base64.b64encode(b"no sound " * 99).decode()]},
         REFERENCES),
        ("not a data URL", {names: ["a"], references: ["https://example.com/agent.wav"]}, REFERENCES),
        ("five references", {names: list("abcde"), references: [good] * 5}, REFERENCES),
        ("five names", {names: list("abcde")}, NAMES),
        ("a clip of one second", {names: ["a"], references: [data_url(cut(CALL, 11.0, 12.0))]}, REFERENCES),
        ("a clip of twelve seconds", {names: ["a"], references: [data_url(cut(CALL, 6.0, 18.0))]}, REFERENCES),
        ("a name of 65 characters", {names: ["x" * 65], references: [good]}, NAMES),
        ("a name with a control character", {names: ["agent\x07"], references: [good]}, NAMES),
        ("two names, one reference", {names: ["a", "b"], references: [good]}, REFERENCES),
        ("a reference without a name", {references: [good]}, REFERENCES),
        ("a name an unnamed speaker has", {names: ["SPEAKER_1"], references: [good]}, NAMES),
        ("a name twice", {names: ["a", "a"], references: [good, good]}, NAMES),
        ("a name no voice was enrolled under", {names: ["nobody"]}, NAMES),
    ]


@pytest.mark.parametrize("why, known, param", bad_requests(), ids=[why for why, _, _ in bad_requests()])
def test_bad_known_speakers_are_a_400_naming_the_field(stack, why, known, param):
    with pytest.raises(openai.BadRequestError) as refused:
        transcribe(stack, **known)
    assert refused.value.param == param


@pytest.mark.parametrize("name, clip, param", [
    ("agent", cut(CALL, 11.0, 12.0), "file"), ("agent", b"RIFF but no audio at all" * 20, "file"),
    ("", AGENT, "name"), ("a\nb", AGENT, "name"),
])
def test_a_bad_enrollment_is_a_400_naming_the_field(stack, name, clip, param):
    response = enroll(stack, name, clip)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """A gateway that demands keys, with a diarize engine to embed voices; two user keys."""
    system = TestStack(tmp_path_factory.mktemp("voices"), DALSTON_REQUIRE_AUTH="true")
    system.start_nats()
    system.start("gateway", "gateway")
    system.wait_http()
    keys = {name: subprocess.run([sys.executable, "-m", "dalston", "keys", "create", name, *flags], env=system.env,
                                 capture_output=True, text=True, timeout=60, check=True).stdout.strip()
            for name, flags in (("alice", ()), ("bob", ()), ("ops", ("--admin",)))}
    system.start_engine("diarize", "dz")
    system.wait_engines("dz", headers=bearer(keys["ops"]))
    yield system, keys
    system.close()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_voice_is_its_keys_alone(keyed):
    system, keys = keyed
    alice, bob, admin = (bearer(keys[k]) for k in ("alice", "bob", "ops"))
    voice = enroll(system, "agent", AGENT, alice).json()
    assert httpx.get(f"{system.url}/v1/voices", headers=bob).json()["data"] == []
    assert [v["id"] for v in httpx.get(f"{system.url}/v1/voices", headers=alice).json()["data"]] == [voice["id"]]
    assert httpx.delete(f"{system.url}/v1/voices/{voice['id']}", headers=bob).status_code == 404
    # Bob cannot name Alice's voice in his jobs: to him there is no such voice.
    with open(AUDIO / "speaker1.wav", "rb") as audio:
        response = httpx.post(f"{system.url}/v1/audio/transcriptions", files={"file": audio}, headers=bob,
                              data={"model": MODEL, "response_format": "diarized_json", NAMES: ["agent"]})
    assert response.status_code == 400 and response.json()["error"]["param"] == NAMES
    # Names are a key's own: Bob may enroll an `agent` of his; Alice may not enroll a second one.
    assert enroll(system, "agent", AGENT, bob).status_code == 201
    assert enroll(system, "agent", AGENT, alice).status_code == 409
    assert {v["name"] for v in httpx.get(f"{system.url}/v1/voices", headers=admin).json()["data"]} == {"agent"}
    assert len(httpx.get(f"{system.url}/v1/voices", headers=admin).json()["data"]) == 2
    assert httpx.delete(f"{system.url}/v1/voices/{voice['id']}", headers=alice).status_code == 200
    assert httpx.get(f"{system.url}/v1/voices", headers=alice).json()["data"] == []


def unit(*values: float) -> np.ndarray:
    vector = np.array(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def test_each_voice_names_one_speaker_at_most_and_a_faint_likeness_none():
    near, nearer, far = unit(1, 0.3, 0), unit(1, 0.1, 0), unit(0, 0, 1)
    voices = {"SPEAKER_0": near, "SPEAKER_1": nearer, "SPEAKER_2": far}
    # Two speakers are like "agent" (cosines 0.98, 1.0): the closer one alone takes the name.
    assert match(voices, [("agent", unit(1, 0.1, 0))]) == {"SPEAKER_1": "agent"}
    # Pairs go most alike first: "boss" is most like SPEAKER_1 too, but "agent" is more so and
    # takes it; "boss" names the next best speaker left.
    assert match(voices, [("boss", unit(1, 0.12, 0)), ("agent", unit(1, 0.1, 0))]) == \
        {"SPEAKER_1": "agent", "SPEAKER_0": "boss"}
    assert match(voices, [("stranger", unit(0, 1, 0.2))]) == {}  # nobody above MATCH_THRESHOLD
