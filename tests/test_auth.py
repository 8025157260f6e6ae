"""API keys at the gateway: `dalston keys`, both header styles, admin routes, OpenAI's error
shape, keys kept out of the logs, and jobs kept to the key that submitted them."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import openai
import pytest
from elevenlabs import ElevenLabs
from elevenlabs.core.api_error import ApiError as ElevenLabsError

from dalston.config import load_settings
from dalston.services.gateway.auth import auth_required
from tests.stack import AUDIO, DIALOGUE_WORDS, TestStack, words

MODEL = "faster-whisper-tiny.en"
# No nemo engine runs in these tests: a parakeet job waits for one (DALSTON_ENGINE_WAIT).
WAITING_MODEL = "parakeet-ctc-0.6b"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """NATS and a gateway that demands keys although it listens on loopback (debug logs, so that
    a key logged at any level would be found). No engine runs: the gateway's own start counts as
    a sighting of one for DALSTON_ENGINE_WAIT, long enough here that a job submitted late in the
    module (a loaded machine) is still taken, not refused for want of an engine."""
    system = TestStack(tmp_path_factory.mktemp("auth"), DALSTON_REQUIRE_AUTH="true",
                       DALSTON_LOG_LEVEL="DEBUG", DALSTON_ENGINE_WAIT="600")
    system.start_nats()
    system.start("gateway", "gateway")
    system.wait_http()
    # User keys run installed models only: the default one is, as a stand-in (no engine runs it here).
    stand_in = system.root / "stand-in"
    stand_in.mkdir()
    for name in ("model.bin", "config.json", "tokenizer.json"):
        (stand_in / name).write_text("{}")
    dalston(system, "models", "import", MODEL, str(stand_in))
    yield system
    system.close()


def dalston(system: TestStack, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "dalston", *args], env=system.env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def keys(gateway) -> dict[str, str]:
    return {"user": dalston(gateway, "keys", "create", "alice").strip(),
            "other user": dalston(gateway, "keys", "create", "bob").strip(),
            "admin": dalston(gateway, "keys", "create", "ops", "--admin").strip()}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_openai_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("env,required", [
    ({}, False),
    ({"DALSTON_HTTP_HOST": "localhost"}, False),
    ({"DALSTON_HTTP_HOST": "::1"}, False),
    ({"DALSTON_HTTP_HOST": "0.0.0.0"}, True),
    ({"DALSTON_HTTP_HOST": "10.0.0.5"}, True),
    ({"DALSTON_REQUIRE_AUTH": "true"}, True),
])
def test_keys_are_required_beyond_loopback(env, required):
    assert auth_required(load_settings(env)) is required


def test_keys_look_right_and_list_without_secrets(gateway, keys):
    assert all(key.startswith("dsk_") and len(key) > 40 for key in keys.values())
    listed = dalston(gateway, "keys", "list", "--json")
    assert {(k["name"], k["role"]) for k in json.loads(listed)} == {
        ("alice", "user"), ("bob", "user"), ("ops", "admin")}
    assert not any(key in listed for key in keys.values())


def test_a_name_is_taken_once(gateway, keys):
    done = subprocess.run([sys.executable, "-m", "dalston", "keys", "create", "alice"], env=gateway.env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "exists" in done.stderr


def test_health_stays_open(gateway):
    for path in ("/healthz", "/readyz"):
        assert httpx.get(gateway.url + path).status_code == 200


@pytest.mark.parametrize("headers,code", [
    ({}, "missing_api_key"),
    (bearer("dsk_not-a-real-key"), "invalid_api_key"),
    ({"xi-api-key": "dsk_not-a-real-key"}, "invalid_api_key"),
    (bearer("sk-openai-style"), "invalid_api_key"),
])
def test_no_key_or_a_wrong_one_is_401(gateway, keys, headers, code):
    assert_openai_error(httpx.get(f"{gateway.url}/v1/models", headers=headers), 401, code)
    with (AUDIO / "dialogue.wav").open("rb") as audio:
        assert_openai_error(httpx.post(f"{gateway.url}/v1/jobs", files={"file": audio}, headers=headers),
                            401, code)


@pytest.mark.parametrize("style", ["bearer", "xi-api-key"])
def test_the_right_key_works_in_either_header(gateway, keys, style):
    headers = bearer(keys["user"]) if style == "bearer" else {"xi-api-key": keys["user"]}
    assert httpx.get(f"{gateway.url}/v1/models", headers=headers).status_code == 200
    with (AUDIO / "dialogue.wav").open("rb") as audio:
        response = httpx.post(f"{gateway.url}/v1/jobs", files={"file": audio}, headers=headers)
    assert response.status_code == 202, response.text


def test_admin_routes_need_an_admin_key(gateway, keys):
    model = f"{gateway.url}/v1/models/faster-whisper-tiny"
    assert_openai_error(httpx.delete(model, headers=bearer(keys["user"])), 403, "admin_required")
    assert_openai_error(httpx.post(f"{model}/pull", headers=bearer(keys["user"])), 403, "admin_required")
    assert_openai_error(httpx.delete(model), 401, "missing_api_key")
    response = httpx.delete(model, headers={"xi-api-key": keys["admin"]})
    assert response.status_code == 200 and response.json()["deleted"] is False  # never pulled


def test_openai_client_sends_its_api_key(gateway, keys):
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=keys["user"])
    assert any(m.id == "faster-whisper-tiny.en" for m in client.models.list())
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused").models.list()


def test_a_revoked_key_stops_working(gateway):
    key = dalston(gateway, "keys", "create", "temp").strip()
    assert httpx.get(f"{gateway.url}/v1/models", headers=bearer(key)).status_code == 200
    dalston(gateway, "keys", "revoke", "temp")
    assert_openai_error(httpx.get(f"{gateway.url}/v1/models", headers=bearer(key)), 401, "invalid_api_key")
    assert "temp" not in dalston(gateway, "keys", "list")


def test_keys_never_reach_the_logs(gateway, keys):
    for key in keys.values():
        for headers in (bearer(key), {"xi-api-key": key}):
            httpx.get(f"{gateway.url}/v1/models", headers=headers)
            httpx.delete(f"{gateway.url}/v1/models/faster-whisper-tiny", headers=headers)
    httpx.get(f"{gateway.url}/v1/models", headers=bearer("dsk_wrong-key-in-a-log"))
    logs = "".join(path.read_text(errors="replace") for path in gateway.logs.glob("*.log"))
    for secret in [*keys.values(), "dsk_wrong-key-in-a-log"]:
        assert secret not in logs


def test_the_cli_sends_its_key(gateway, keys):
    env = {**gateway.env, "DALSTON_SERVER": gateway.url}
    done = subprocess.run([sys.executable, "-m", "dalston", "engines", "--json"],
                          env={**env, "DALSTON_API_KEY": keys["user"]},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
    denied = subprocess.run([sys.executable, "-m", "dalston", "engines"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert denied.returncode != 0 and "dalston keys create" in denied.stderr


def test_a_job_not_yet_recorded_is_its_owners_alone(gateway, keys):
    """No orchestrator runs here: a job is only its stored audio, and still its owner's alone."""
    with (AUDIO / "dialogue.wav").open("rb") as audio:
        submitted = httpx.post(f"{gateway.url}/v1/jobs", files={"file": audio}, headers=bearer(keys["user"]))
    assert submitted.status_code == 202, submitted.text
    job = f"{gateway.url}/v1/jobs/{submitted.json()['id']}"
    assert httpx.get(job, headers=bearer(keys["other user"])).status_code == 404
    assert httpx.delete(job, headers=bearer(keys["other user"])).status_code == 404
    for key in (keys["user"], keys["admin"]):
        response = httpx.get(job, headers=bearer(key))
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "queued" and response.json()["owner"] == "alice"


@pytest.fixture(scope="module")
def owners(tmp_path_factory):
    """A whole Dalston that demands keys, one faster-whisper engine, and clients for the user keys
    `alice` and `bob` and the admin key `ops`."""
    system = TestStack(tmp_path_factory.mktemp("owners"), DALSTON_REQUIRE_AUTH="true",
                       DALSTON_ENGINE_WAIT="600")
    system.start_nats()
    system.start_pipeline()
    system.start_engine("faster-whisper", "fw")
    # A user key runs installed models only: the one it uses is pulled (from the installed
    # package), and the waiting model is one too, with no engine to run it.
    dalston(system, "models", "pull", MODEL)
    nemo = system.root / "parakeet.nemo"
    nemo.write_bytes(b"not really a model, but a file the store accepts")
    dalston(system, "models", "import", WAITING_MODEL, str(nemo))
    clients = {name: httpx.Client(base_url=system.url, timeout=30, headers=bearer(
        dalston(system, "keys", "create", name, *(["--admin"] if name == "ops" else [])).strip()))
        for name in ("alice", "bob", "ops")}
    system.wait_engines("audio-prepare", "merge", "fw", headers=clients["ops"].headers)
    yield system, clients
    for client in clients.values():
        client.close()
    system.close()


def submit_as(client: httpx.Client, model: str) -> str:
    with (AUDIO / "dialogue.wav").open("rb") as audio:
        response = client.post("/v1/jobs", files={"file": audio}, data={"model": model})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def listed(client: httpx.Client) -> dict[str, dict]:
    response = client.get("/v1/jobs", params={"limit": 1000})
    assert response.status_code == 200, response.text
    return {job["id"]: job for job in response.json()["data"]}


def wait_status(client: httpx.Client, job_id: str, *statuses: str, timeout: float = 120) -> dict:
    """The job's record once its status is one of `statuses` (a recorded job, not a submission)."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/v1/jobs/{job_id}")
        if response.status_code == 200 and response.json()["status"] in statuses and response.json()["tasks"]:
            return response.json()
        assert time.monotonic() < deadline, response.text
        time.sleep(0.2)


def test_a_user_key_sees_reads_and_cancels_only_its_own_jobs(owners):
    _, client = owners
    alice, bob, ops = client["alice"], client["bob"], client["ops"]
    finished, waiting = submit_as(alice, MODEL), submit_as(alice, WAITING_MODEL)
    bobs_finished, bobs_waiting = submit_as(bob, MODEL), submit_as(bob, WAITING_MODEL)
    for user, job_id in ((alice, waiting), (bob, bobs_waiting)):
        wait_status(user, job_id, "queued", "running")
    for user, job_id in ((alice, finished), (bob, bobs_finished)):
        assert wait_status(user, job_id, "completed", "failed", "cancelled")["status"] == "completed"

    # Bob finds nothing of Alice's: the same 404 as for a job that does not exist.
    assert set(listed(bob)) >= {bobs_finished, bobs_waiting}
    assert not set(listed(bob)) & {finished, waiting}
    for job_id in (finished, waiting, "no-such-job"):
        for response in (bob.get(f"/v1/jobs/{job_id}"), bob.get(f"/v1/jobs/{job_id}/transcript"),
                         bob.delete(f"/v1/jobs/{job_id}")):
            assert response.status_code == 404, response.text

    # Alice has hers, and Bob's cancelling did not touch them.
    assert {finished, waiting} <= set(listed(alice)) and not set(listed(alice)) & {bobs_finished, bobs_waiting}
    assert all(job["owner"] == "alice" for job in listed(alice).values())
    assert alice.get(f"/v1/jobs/{waiting}").json()["status"] in ("queued", "running")
    assert words(alice.get(f"/v1/jobs/{finished}/transcript", params={"format": "text"}).text) == DIALOGUE_WORDS
    assert alice.delete(f"/v1/jobs/{waiting}").status_code == 202
    assert wait_status(alice, waiting, "completed", "failed", "cancelled")["status"] == "cancelled"

    # The admin key sees, reads and cancels everyone's.
    everyone = listed(ops)
    assert {finished, waiting, bobs_finished, bobs_waiting} <= set(everyone)
    assert everyone[bobs_finished]["owner"] == "bob" and everyone[finished]["owner"] == "alice"
    for job_id in (finished, bobs_finished):
        assert ops.get(f"/v1/jobs/{job_id}").status_code == 200
        assert words(ops.get(f"/v1/jobs/{job_id}/transcript", params={"format": "text"}).text) == DIALOGUE_WORDS
    assert ops.delete(f"/v1/jobs/{bobs_waiting}").status_code == 202
    assert wait_status(bob, bobs_waiting, "completed", "failed", "cancelled")["status"] == "cancelled"


@pytest.mark.parametrize("name", ["alice", "bob"])
def test_the_openai_endpoint_transcribes_as_the_key_that_asks(owners, name):
    system, client = owners
    before = set(listed(client[name]))
    api = openai.OpenAI(base_url=f"{system.url}/v1", api_key=client[name].headers["authorization"].split()[1])
    with (AUDIO / "dialogue.wav").open("rb") as audio:
        assert words(api.audio.transcriptions.create(model=MODEL, file=audio).text) == DIALOGUE_WORDS
    new = {job_id: job for job_id, job in listed(client[name]).items() if job_id not in before}
    assert [(job["owner"], job["filename"]) for job in new.values()] == [(name, "dialogue.wav")]
    other = client["bob" if name == "alice" else "alice"]
    assert not set(new) & set(listed(other))


def test_elevenlabs_client_sends_its_api_key(gateway, keys):
    def fetch(key: str) -> ElevenLabsError:
        client = ElevenLabs(base_url=gateway.url, api_key=key, timeout=30)
        with pytest.raises(ElevenLabsError) as refused:
            client.speech_to_text.transcripts.get("0" * 32)
        return refused.value

    # ElevenLabs' error shape on its routes; past the key, the transcript is simply not there.
    wrong = fetch("dsk_not-a-real-key")
    assert wrong.status_code == 401 and wrong.body["detail"]["status"] == "invalid_api_key"
    assert fetch(keys["user"]).status_code == 404


def test_a_user_key_runs_installed_models_only_and_an_admin_key_any(owners):
    _, client = owners
    not_installed = "faster-whisper-large-v3"  # never pulled here
    for route in ("/v1/jobs", "/v1/audio/transcriptions"):
        with (AUDIO / "speaker1.wav").open("rb") as audio:
            response = client["alice"].post(route, files={"file": audio}, data={"model": not_installed})
        assert_openai_error(response, 403, "model_not_installed")
        assert "admin" in response.json()["error"]["message"] and response.json()["error"]["param"] == "model"
    with (AUDIO / "speaker1.wav").open("rb") as audio:
        refused = client["alice"].post("/v1/speech-to-text", files={"file": audio},
                                       data={"model_id": not_installed})
    assert refused.status_code == 403 and refused.json()["detail"]["status"] == "model_not_installed"
    # The admin's job is taken (its engine would pull the model); cancelled before it does.
    with (AUDIO / "speaker1.wav").open("rb") as audio:
        accepted = client["ops"].post("/v1/jobs", files={"file": audio}, data={"model": not_installed})
    assert accepted.status_code == 202, accepted.text
    client["ops"].delete(f"/v1/jobs/{accepted.json()['id']}")


def test_jobs_are_listed_a_page_at_a_time(owners):
    _, client = owners
    mine = [submit_as(client["bob"], WAITING_MODEL) for _ in range(3)]
    for job_id in mine:
        wait_status(client["bob"], job_id, "queued", "running")
    first = client["bob"].get("/v1/jobs", params={"limit": 2}).json()
    assert [job["id"] for job in first["data"]] == mine[:0:-1] and first["has_more"]
    assert first["last_id"] == mine[1]
    second = client["bob"].get("/v1/jobs", params={"limit": 2, "after": first["last_id"]}).json()
    assert second["data"][0]["id"] == mine[0]
    # A cursor of another key's job reveals nothing of it.
    alices = submit_as(client["alice"], WAITING_MODEL)
    wait_status(client["alice"], alices, "queued", "running")
    for params in ({"after": alices}, {"limit": 0}, {"limit": 1001}):
        response = client["bob"].get("/v1/jobs", params=params)
        assert response.status_code == 400 and response.json()["error"]["param"] in params, response.text
    for job_id in (*mine, alices):
        client["ops"].delete(f"/v1/jobs/{job_id}")
