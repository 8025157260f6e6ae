"""API keys at the gateway: `dalston keys`, both header styles, admin routes, OpenAI's error
shape, and keys kept out of the logs."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import openai
import pytest

from dalston.config import load_settings
from dalston.services.gateway.auth import auth_required
from tests.stack import AUDIO, TestStack


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """NATS and a gateway that demands keys although it listens on loopback (debug logs, so that
    a key logged at any level would be found)."""
    system = TestStack(tmp_path_factory.mktemp("auth"), DALSTON_REQUIRE_AUTH="true",
                       DALSTON_LOG_LEVEL="DEBUG")
    system.start_nats()
    system.start("gateway", "gateway")
    system.wait_http()
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
    assert {(k["name"], k["role"]) for k in json.loads(listed)} == {("alice", "user"), ("ops", "admin")}
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
