"""Webhooks: a job's end POSTed to its webhook_url by the webhook service, signed as Standard
Webhooks says, retried from JetStream until accepted (across a SIGKILL), and targets inside the
network refused. End to end on the session stack, with the webhook service as a real
`dalston serve webhooks` process and a receiver on 127.0.0.1; the URL checks also as units."""

from __future__ import annotations

import base64
import signal
import socket
import threading
import time

import httpx
import pytest
from standardwebhooks import Webhook

from dalston.bus.consumers import consumer_state
from dalston.config import ConfigError, load_settings
from dalston.contracts import DEADLETTER_STREAM, EVENTS_STREAM, WEBHOOKS_CONSUMER, DeadLetter, decode
from dalston.services.webhooks import (
    LONGEST_RETRY_SECONDS,
    MAX_DELIVERIES_PER_TARGET,
    check_timeout,
    retry_delay,
    signer,
)
from dalston.webhook_targets import RefusedTarget, check_target, is_public
from tests.stack import AUDIO, free_port, wait_for, wait_job, wait_ok, words
from tests.webhook_receiver import Receiver

SECRET = "whsec_" + base64.b64encode(b"dalston-test-webhook-secret-32by").decode()
# The receiver is on loopback.
WEBHOOK_ENV = {"DALSTON_WEBHOOK_SECRET": SECRET, "DALSTON_WEBHOOK_ALLOW_PRIVATE": "true"}


@pytest.fixture(scope="module")
def hooks(stack):
    """On the session stack: the webhook service, and a gateway that takes webhooks (with the
    loopback receiver allowed); yields that gateway's URL."""
    port = free_port()
    stack.start("gateway-hooks", "gateway", DALSTON_HTTP_PORT=str(port), **WEBHOOK_ENV)
    start_webhooks(stack)
    url = f"http://127.0.0.1:{port}"
    wait_ok(f"{url}/readyz", "webhook gateway not ready")
    yield url
    for name in ("gateway-hooks", "webhooks"):
        if name in stack.processes:
            stack.stop(name)


def start_webhooks(stack, sig: int = signal.SIGTERM, **env: str) -> None:
    """The webhook service, (re)started with `env` on top of WEBHOOK_ENV; a running one is
    stopped with `sig` first."""
    if "webhooks" in stack.processes:
        stack.stop("webhooks", sig=sig)
    stack.start("webhooks", "webhooks", **WEBHOOK_ENV, **env)


def submit(gateway: str, webhook_url: str, path=AUDIO / "speaker1.wav", **form) -> httpx.Response:
    with open(path, "rb") as audio:
        return httpx.post(f"{gateway}/v1/jobs", files={"file": audio},
                          data={"model": "faster-whisper-tiny.en", "webhook_url": webhook_url, **form})


async def settled(stack) -> bool:
    """Whether the webhook service has nothing left to deliver or retry."""
    bus = await stack.bus()
    try:
        state = await consumer_state(bus, EVENTS_STREAM, WEBHOOKS_CONSUMER)
    finally:
        await bus.close()
    return state.pending == 0 and state.unacked == 0


async def test_refused_twice_then_accepted_exactly_once_and_signed(stack, hooks):
    receiver = Receiver(503, 503)
    try:
        response = submit(hooks, receiver.url)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]

        async def accepted():
            return receiver.accepted()
        await wait_for(accepted, 120)
        await wait_for(lambda: settled(stack), 60)

        assert [d.status for d in receiver.deliveries] == [503, 503, 200]
        delivery = receiver.accepted()[0]
        payload = Webhook(SECRET).verify(delivery.body, delivery.headers)
        assert delivery.headers["webhook-signature"].startswith("v1,")
        # One message, however many tries: one id a receiver can drop repeats by.
        assert {d.headers["webhook-id"] for d in receiver.deliveries} == {delivery.headers["webhook-id"]}
        assert payload["type"] == "job.completed"
        data = payload["data"]
        assert (data["job_id"], data["status"], data["failure"]) == (job_id, "completed", None)
        assert words(data["transcript"]["text"]) == words("That was hilarious, I can't believe you said that.")
        assert data["transcript_url"].endswith(f"/v1/jobs/{job_id}/transcript")
        # A body altered on the way no longer verifies.
        with pytest.raises(Exception, match="signature"):
            Webhook(SECRET).verify(delivery.body.replace(b"completed", b"failed"), delivery.headers)
    finally:
        receiver.close()


async def test_a_delivery_survives_the_webhook_service_killed_while_retrying(stack, hooks):
    receiver = Receiver(*[503] * 1000)
    try:
        # translate on an English-only model: refused by the orchestrator, so the job ends at
        # once, failed, and the webhook carries the failure.
        response = submit(hooks, receiver.url, task="translate")
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]

        async def refused_once():
            return receiver.deliveries
        await wait_for(refused_once, 60)
        stack.stop("webhooks", sig=signal.SIGKILL)
        receiver.answers.clear()  # from now on it accepts
        tries_before = len(receiver.deliveries)
        start_webhooks(stack)

        async def accepted():
            return receiver.accepted()
        await wait_for(accepted, 90)
        await wait_for(lambda: settled(stack), 60)
        assert len(receiver.accepted()) == 1 and len(receiver.deliveries) > tries_before
        delivery = receiver.accepted()[0]
        data = Webhook(SECRET).verify(delivery.body, delivery.headers)["data"]
        assert (data["job_id"], data["status"], data["transcript"]) == (job_id, "failed", None)
        assert data["failure"]["code"] == "unsupported_task"
    finally:
        receiver.close()


async def test_a_delivery_never_accepted_is_dead_lettered_after_the_max_age(stack, hooks):
    # The age counts from the job's event: long enough for a service that starts slowly on a
    # loaded machine to try more than once.
    start_webhooks(stack, DALSTON_WEBHOOK_MAX_AGE="10")
    receiver = Receiver(*[503] * 1000)
    bus = await stack.bus()
    subject = "deadletter.events.admin"  # the stack's services connect as admin
    try:
        before = (await bus.messages_by_subject(DEADLETTER_STREAM, subject)).get(subject, 0)
        response = submit(hooks, receiver.url, task="translate")  # refused: ends at once
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]

        async def dead_lettered():
            return (await bus.messages_by_subject(DEADLETTER_STREAM, subject)).get(subject, 0) > before
        await wait_for(dead_lettered, 60)
        letter = decode(await bus.last(DEADLETTER_STREAM, subject), DeadLetter)
        assert job_id in letter.reason and "DALSTON_WEBHOOK_MAX_AGE" in letter.reason
        assert "answered 503" in letter.reason
        await wait_for(lambda: settled(stack), 30)
        assert len(receiver.deliveries) >= 2 and not receiver.accepted()
    finally:
        receiver.close()
        await bus.close()
        start_webhooks(stack)


class Hanging:
    """A receiver that takes connections and never answers; counts those open at once."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.open = self.most = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.open += 1
                self.most = max(self.most, self.open)
            threading.Thread(target=self._hold, args=(connection,), daemon=True).start()

    def _hold(self, connection: socket.socket) -> None:
        with connection:
            while connection.recv(65536):  # read the request, answer nothing, until the peer gives up
                pass
        with self._lock:
            self.open -= 1

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}/hook"

    def close(self) -> None:
        self.listener.close()


async def test_hanging_receivers_hold_up_their_own_deliveries_only(stack, hooks):
    hanging, receiver = Hanging(), Receiver()
    start_webhooks(stack, DALSTON_WEBHOOK_TIMEOUT="20")
    try:
        stuck = [submit(hooks, hanging.url) for _ in range(8)]
        assert all(r.status_code == 202 for r in stuck)
        async def held():
            return hanging.most >= MAX_DELIVERIES_PER_TARGET
        await wait_for(held, 60)  # the first few wait on it, the rest wait their turn
        response = submit(hooks, receiver.url)
        record = await wait_job(stack, response.json()["id"], timeout=120)

        async def delivered():
            return receiver.accepted()
        await wait_for(delivered, 60)
        # Delivered at once, not after the 20 s the hanging ones wait out.
        assert time.time() - record["finished_at"] < 10
        assert hanging.most == MAX_DELIVERIES_PER_TARGET
    finally:
        hanging.close()
        receiver.close()
        start_webhooks(stack)


def test_targets_inside_the_network_are_refused_without_the_flag(stack, hooks):
    port = free_port()
    stack.start("gateway-strict", "gateway", DALSTON_HTTP_PORT=str(port), DALSTON_WEBHOOK_SECRET=SECRET)
    try:
        strict = f"http://127.0.0.1:{port}"
        wait_ok(f"{strict}/readyz", "strict gateway not ready")
        for url in ("http://127.0.0.1:9/hook", "http://localhost/hook", "http://[::1]/hook",
                    "http://169.254.169.254/latest/meta-data", "http://10.0.0.8/hook",
                    # IPv6 spellings of the same (issue 17), each checked by its IPv4 address.
                    "http://[::127.0.0.1]/hook", "http://[64:ff9b::a9fe:a9fe]/hook",
                    "http://[2002:7f00:1::]/hook", "http://[::ffff:0:7f00:1]/hook", "http://[fec0::1]/hook"):
            response = submit(strict, url)
            assert response.status_code == 400, (url, response.text)
            error = response.json()["error"]
            assert error["param"] == "webhook_url" and "DALSTON_WEBHOOK_ALLOW_PRIVATE" in error["message"]
        for url in ("ftp://example.com/hook", "http://user:pw@example.com/", "http://" + "a" * 2100):
            assert submit(strict, url).status_code == 400, url
    finally:
        stack.stop("gateway-strict")
    # A gateway without the secret takes no webhooks at all: nothing would sign them.
    response = submit(stack.url, "https://example.com/hook")
    assert response.status_code == 400 and "DALSTON_WEBHOOK_SECRET" in response.json()["error"]["message"]


# --- units ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("address, public", [
    ("127.0.0.1", False), ("::1", False), ("10.1.2.3", False), ("192.168.0.1", False),
    ("172.16.0.1", False), ("169.254.169.254", False), ("fe80::1", False), ("224.0.0.1", False),
    ("0.0.0.0", False), ("100.64.0.1", False), ("::ffff:127.0.0.1", False), ("fc00::1", False),
    ("8.8.8.8", True), ("2606:4700::1111", True),
    # IPv6 spellings of private IPv4 addresses (issue 17): compatible, NAT64, 6to4, translated.
    ("::127.0.0.1", False), ("::a00:1", False), ("::a9fe:a9fe", False), ("64:ff9b::7f00:1", False),
    ("64:ff9b::a00:1", False), ("2002:7f00:1::", False), ("2002:a00:1::", False),
    ("::ffff:0:7f00:1", False), ("::ffff:a9fe:a9fe", False), ("64:ff9b:1::808:808", False),
    ("64:ff9b:1:a00:1::", False), ("2002:e000:1::", False), ("::240.0.0.1", False),
    # Site-local (deprecated, but routed inside some networks), and the rest of ::/8.
    ("fec0::1", False), ("feff::1", False), ("::", False), ("100::1", False),
    # The same forms around public IPv4 addresses stay public.
    ("64:ff9b::808:808", True), ("2002:808:808::1", True), ("::ffff:8.8.8.8", True),
])
def test_which_addresses_are_public(address, public):
    assert is_public(address) is public


async def test_a_checked_target_is_pinned_to_its_address():
    target = await check_target("https://8.8.8.8:8443/in?x=1#frag", allow_private=False)
    assert (target.address, target.netloc, target.pinned_url) == ("8.8.8.8", "8.8.8.8:8443",
                                                                   "https://8.8.8.8:8443/in?x=1")
    loopback = await check_target("http://[::1]/", allow_private=True)
    assert loopback.pinned_url == "http://[::1]:80/"
    with pytest.raises(RefusedTarget, match="loopback"):
        await check_target("http://127.0.0.1/", allow_private=False)
    with pytest.raises(RefusedTarget, match="resolve"):
        await check_target("http://no-such-host.invalid/", allow_private=True)


def test_retries_back_off_to_a_ceiling():
    assert [retry_delay(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert retry_delay(50) == LONGEST_RETRY_SECONDS


def test_an_attempt_must_end_within_the_ack_wait():
    check_timeout(load_settings({}))
    for timeout in ("0", "60"):
        with pytest.raises(ConfigError, match="DALSTON_WEBHOOK_TIMEOUT"):
            check_timeout(load_settings({"DALSTON_WEBHOOK_TIMEOUT": timeout}))


def test_the_secret_is_required_and_checked():
    with pytest.raises(ConfigError, match="DALSTON_WEBHOOK_SECRET"):
        signer(load_settings({}))
    with pytest.raises(ConfigError, match="DALSTON_WEBHOOK_SECRET"):
        signer(load_settings({"DALSTON_WEBHOOK_SECRET": "whsec_"}))
    assert signer(load_settings({"DALSTON_WEBHOOK_SECRET": SECRET}))


async def test_an_elevenlabs_webhook_request_is_reported_to_its_webhook_url(stack, hooks):
    receiver = Receiver()
    try:
        with open(AUDIO / "speaker1.wav", "rb") as audio:
            response = httpx.post(f"{hooks}/v1/speech-to-text", files={"file": audio},
                                  data={"model_id": "scribe_v1", "webhook": "true", "webhook_url": receiver.url})
        assert response.status_code == 200, response.text
        transcription_id = response.json()["transcription_id"]

        async def accepted():
            return receiver.accepted()
        await wait_for(accepted, 120)
        data = Webhook(SECRET).verify(receiver.accepted()[0].body, receiver.accepted()[0].headers)["data"]
        assert (data["job_id"], data["status"]) == (transcription_id, "completed")
        result = httpx.get(f"{hooks}/v1/speech-to-text/transcripts/{transcription_id}").json()
        assert words(result["text"]) == words("That was hilarious, I can't believe you said that.")
    finally:
        receiver.close()
