"""A fair share per key (issue 17): one key cannot lock the others out of the gateway. A real
Dalston that demands keys, with a small queue and few upload slots; raw sockets for uploads
that stall, and a server on loopback whose audio drips. The admission's logic is tested in
milliseconds in test_front_door.py; here it is the real thing over HTTP."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from dalston.services.gateway.audio_url import FETCH_GRACE_SECONDS
from tests.stack import AUDIO, TestStack, words
from tests.test_auth import WAITING_MODEL, bearer, dalston

MODEL = "faster-whisper-tiny.en"
MAX_QUEUED = 6
MAX_UPLOADS = 4
BODY_TIMEOUT = 2
ENGINE_WAIT = 600
SPEAKER1 = words("That was hilarious, I can't believe you said that.")


@pytest.fixture(scope="module")
def fair(tmp_path_factory):
    """The Dalston, and clients for the user keys alice, bob and dave, carol (a user key whose
    share is the whole queue) and the admin key ops."""
    system = TestStack(tmp_path_factory.mktemp("fair"), DALSTON_REQUIRE_AUTH="true",
                       DALSTON_ENGINE_WAIT=str(ENGINE_WAIT), DALSTON_MAX_QUEUED_JOBS=str(MAX_QUEUED),
                       DALSTON_MAX_CONCURRENT_UPLOADS=str(MAX_UPLOADS), DALSTON_BODY_TIMEOUT=str(BODY_TIMEOUT),
                       DALSTON_FETCH_ALLOW_PRIVATE="true")
    system.start_nats()
    system.start_pipeline()
    system.start_engine("faster-whisper", "fw")
    dalston(system, "models", "pull", MODEL)
    nemo = system.root / "parakeet.nemo"  # installed, and no engine runs it: its jobs wait
    nemo.write_bytes(b"not really a model, but a file the store accepts")
    dalston(system, "models", "import", WAITING_MODEL, str(nemo))
    options = {"alice": [], "bob": [], "dave": [], "carol": ["--max-jobs", str(MAX_QUEUED)], "ops": ["--admin"]}
    keys = {name: dalston(system, "keys", "create", name, *extra).strip() for name, extra in options.items()}
    clients = {name: httpx.Client(base_url=system.url, timeout=60, headers=bearer(key)) for name, key in keys.items()}
    system.wait_engines("audio-prepare", "merge", "fw", headers=clients["ops"].headers)
    yield system, keys, clients
    for client in clients.values():
        client.close()
    system.close()


def post_job(client: httpx.Client, model: str = MODEL) -> httpx.Response:
    with (AUDIO / "speaker1.wav").open("rb") as audio:
        return client.post("/v1/jobs", files={"file": audio}, data={"model": model})


def waiting(client: httpx.Client, job_id: str, *statuses: str, timeout: float = 120) -> dict:
    """The job's record once it is recorded (the gateway then counts it by its runtime) and,
    with `statuses`, in one of them."""
    deadline = time.monotonic() + timeout
    while True:
        record = client.get(f"/v1/jobs/{job_id}").json()
        if record["tasks"] and (not statuses or record["status"] in statuses):
            return record
        assert time.monotonic() < deadline, record
        time.sleep(0.2)


def stalled_upload(port: int, key: str) -> socket.socket:
    """An upload that sends its headers and 1 KB of a 1 MB body, then nothing."""
    boundary = uuid.uuid4().hex
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 1000000\r\n\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"s.wav\"\r\n\r\n")
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(head.encode() + b"\0" * 1024)
    return sock


def answer(sock: socket.socket, timeout: float) -> bytes:
    """All the server sends until it closes the connection."""
    sock.settimeout(timeout)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def test_a_stalled_body_is_cut_and_holds_up_its_own_key_only(fair):
    system, keys, client = fair
    started = time.monotonic()
    stalled = [stalled_upload(system.http_port, keys["alice"]) for _ in range(MAX_UPLOADS // 2)]
    try:
        time.sleep(0.5)  # they hold alice's half of the upload slots
        # Bob uploads as if nothing were stalled.
        response = post_job(client["bob"])
        assert response.status_code == 202, response.text
        assert time.monotonic() - started < BODY_TIMEOUT
        bobs = response.json()["id"]
        # Cut after DALSTON_BODY_TIMEOUT of silence: a 408, and the connection closed.
        for sock in stalled:
            received = answer(sock, BODY_TIMEOUT + 10)
            assert received.startswith(b"HTTP/1.1 408"), received
        assert time.monotonic() - started < BODY_TIMEOUT + 5
    finally:
        for sock in stalled:
            sock.close()
    # Alice's slots came back.
    response = post_job(client["alice"])
    assert response.status_code == 202, response.text
    for job_id in (bobs, response.json()["id"]):
        assert waiting(client["ops"], job_id, "completed", "failed", "cancelled")["status"] == "completed"


def test_a_key_holds_half_the_queue_and_jobs_no_engine_runs_hold_up_only_their_key(fair):
    _, _, client = fair
    dave, bob, carol, ops = client["dave"], client["bob"], client["carol"], client["ops"]
    mine = [post_job(dave, WAITING_MODEL).json()["id"] for _ in range(MAX_QUEUED // 2)]
    refused = post_job(dave, WAITING_MODEL)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "key_quota", refused.text
    # His jobs run nowhere: he can succeed once DALSTON_ENGINE_WAIT fails the oldest.
    assert ENGINE_WAIT - 60 < int(refused.headers["retry-after"]) <= ENGINE_WAIT
    for job_id in mine:  # recorded: the gateway knows what runs them (not yet: they count)
        waiting(ops, job_id)
    # Carol's key may fill the whole queue, with jobs no engine runs...
    carols = [post_job(carol, WAITING_MODEL) for _ in range(MAX_QUEUED)]
    assert [r.status_code for r in carols] == [202] * MAX_QUEUED, carols[-1].text
    assert post_job(carol, WAITING_MODEL).status_code == 429
    for response in carols:
        waiting(ops, response.json()["id"])
    # ...and bob's jobs still come in and run: 9 unfinished jobs, none of which hold him up.
    with (AUDIO / "speaker1.wav").open("rb") as audio:
        response = bob.post("/v1/audio/transcriptions", files={"file": audio}, data={"model": MODEL})
    assert response.status_code == 200, response.text
    assert words(response.json()["text"]) == SPEAKER1
    for job_id in [*mine, *(r.json()["id"] for r in carols)]:
        ops.delete(f"/v1/jobs/{job_id}")


class Dripping:
    """A server on loopback whose audio comes at 100 bytes a second."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("content-length", "100000")
                self.end_headers()
                try:
                    for _ in range(1000):
                        self.wfile.write(b"\0" * 10)
                        self.wfile.flush()
                        time.sleep(0.1)
                except OSError:  # cut
                    pass

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/audio.wav"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_url_that_drips_is_cut_below_the_floor_rate(fair):
    _, _, client = fair
    dripping = Dripping()
    try:
        started = time.monotonic()
        response = client["alice"].post("/v1/speech-to-text", data={"model_id": "scribe_v1", "source_url": dripping.url},
                                        files={"unused": ("", b"")})
        assert response.status_code == 400, response.text
        assert "DALSTON_FETCH_MIN_KB_PER_SECOND" in response.json()["detail"]["message"]
        assert time.monotonic() - started < FETCH_GRACE_SECONDS + 5
    finally:
        dripping.close()
