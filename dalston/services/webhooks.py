"""The webhook service: tells a job's webhook that the job ended.

It follows job events through its own durable consumer (nats/streams.yaml). A job that ended
with a `webhook_url` gets one POST: its id, status, transcript (inline up to
INLINE_TRANSCRIPT_BYTES, and always as a link) and failure, signed as Standard Webhooks says
(`webhook-id`, `webhook-timestamp`, `webhook-signature`) with DALSTON_WEBHOOK_SECRET. An answer
other than 2xx, or none in DALSTON_WEBHOOK_TIMEOUT, leaves the event unacknowledged in
JetStream, redelivered with doubling delays until DALSTON_WEBHOOK_MAX_AGE after the job ended;
a 2xx acknowledges it, and nothing more is sent. Deliveries run at once, a few per target at
most (more wait their turn in JetStream). Restartable at any moment.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from datetime import datetime, timezone
from urllib.parse import urlsplit

import httpx
from standardwebhooks import Webhook

from dalston import __version__, tracing
from dalston.bus.buckets import ObjectUnreadable
from dalston.bus.connection import Bus, connect
from dalston.bus.consumers import consume
from dalston.bus.delivery import Delivery, GiveUp, HandleLater
from dalston.bus.layout import load_layout
from dalston.config import ConfigError, Settings
from dalston.contracts import EVENTS_STREAM, TERMINAL, WEBHOOKS_CONSUMER, JobEvent, now
from dalston.logs import get_logger
from dalston.loops import until_stopped
from dalston.webhook_targets import RESOLVE_TIMEOUT_SECONDS, RefusedTarget, check_target

log = get_logger("dalston.webhooks")

INLINE_TRANSCRIPT_BYTES = 256 * 1024
# Of a receiver's answer only the status matters: the rest is read this far and dropped.
RESPONSE_READ_BYTES = 64 * 1024
FIRST_RETRY_SECONDS = 1.0
LONGEST_RETRY_SECONDS = 600.0
# Deliveries under way at once, in all and to one target (scheme, host and port): receivers
# that hang hold up their own deliveries, not everyone's.
MAX_DELIVERIES = 64
MAX_DELIVERIES_PER_TARGET = 4


def retry_delay(deliveries: int) -> float:
    """Seconds before the next try, after `deliveries` tries: 1, 2, 4, ... up to 10 minutes."""
    return min(FIRST_RETRY_SECONDS * 2 ** max(deliveries - 1, 0), LONGEST_RETRY_SECONDS)


def check_timeout(settings: Settings) -> None:
    """An attempt must end well within the consumer's ack wait, or its event would be handed
    out again while the attempt still runs."""
    ack_wait = load_layout()["consumers"][EVENTS_STREAM][WEBHOOKS_CONSUMER]["ack_wait"]
    timeout = settings.webhook_timeout
    if not (timeout > 0 and timeout + RESOLVE_TIMEOUT_SECONDS < ack_wait):
        raise ConfigError(f"DALSTON_WEBHOOK_TIMEOUT must be above 0 and below "
                          f"{ack_wait - RESOLVE_TIMEOUT_SECONDS:g} s (the webhooks consumer's ack wait, "
                          f"less {RESOLVE_TIMEOUT_SECONDS:g} s to resolve the host)")


def signer(settings: Settings) -> Webhook:
    if not settings.webhook_secret:
        raise ConfigError("DALSTON_WEBHOOK_SECRET is not set: webhooks are signed with it "
                          "(`whsec_` and base64 of 24 to 64 random bytes)")
    try:
        return Webhook(settings.webhook_secret)
    except Exception as exc:  # noqa: BLE001 - bad base64, empty: all the same to the user
        raise ConfigError(f"DALSTON_WEBHOOK_SECRET is not a `whsec_` base64 key: {exc}") from None


class WebhookService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        check_timeout(settings)
        self._signer = signer(settings)
        self._public_url = (settings.public_url or
                            f"http://{settings.http_host}:{settings.http_port}").rstrip("/")
        self._bus: Bus | None = None
        self._http: httpx.AsyncClient | None = None
        self._stopping = asyncio.Event()
        self._under_way: Counter[str] = Counter()  # deliveries under way per target

    async def run(self, bus: Bus | None = None) -> None:
        """Serve until stopped, on `bus` (the in-memory one, say) or a new NATS connection."""
        self._bus = bus or await connect(self.settings, name="dalston-webhooks")
        # Redirects are not followed: each hop would be a new, unchecked target.
        self._http = httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                       timeout=self.settings.webhook_timeout)
        log.info("webhook service started")
        try:
            await until_stopped(self._stopping, consume(self._bus, EVENTS_STREAM, WEBHOOKS_CONSUMER,
                                                        self._on_job_event, kind=JobEvent,
                                                        concurrent=MAX_DELIVERIES))
        finally:
            await self._http.aclose()
            if bus is None:
                await self._bus.close()

    def stop(self) -> None:
        self._stopping.set()

    async def _on_job_event(self, delivery: Delivery[JobEvent]) -> None:
        event = delivery.payload
        if event.status not in TERMINAL or not event.webhook_url:
            return
        target = urlsplit(event.webhook_url)._replace(path="", query="", fragment="").geturl()
        if self._under_way[target] >= MAX_DELIVERIES_PER_TARGET:
            raise HandleLater(f"webhook of job {event.job_id}: {MAX_DELIVERIES_PER_TARGET} deliveries to "
                              f"{target} are under way", delay=self.settings.webhook_timeout)
        self._under_way[target] += 1
        try:
            with tracing.span("webhook delivery", job=event.job_id, attempt=delivery.attempt, target=target):
                problem = await self._deliver(event, await self._body(event))
        finally:
            self._under_way[target] -= 1
            if not self._under_way[target]:
                del self._under_way[target]
        if problem is None:
            log.info("webhook delivered", job=event.job_id, attempts=delivery.attempt)
            return
        left = self.settings.webhook_max_age - (now() - event.at)
        if left <= 0:
            raise GiveUp(f"webhook of job {event.job_id} not accepted within "
                         f"{self.settings.webhook_max_age:g} s (DALSTON_WEBHOOK_MAX_AGE): {problem}")
        raise HandleLater(f"webhook of job {event.job_id}: {problem}",
                          delay=min(retry_delay(delivery.attempt), left))

    async def _body(self, event: JobEvent) -> bytes:
        data: dict = {"job_id": event.job_id, "status": event.status, "transcript": None,
                      "transcript_url": None,
                      "failure": None if event.failure is None else {
                          "code": event.failure.code, "message": event.failure.message}}
        if event.status == "completed" and event.transcript_object:
            data["transcript_url"] = f"{self._public_url}/v1/jobs/{event.job_id}/transcript"
            try:
                transcript = await self._bus.artifacts.read(event.transcript_object)
            except ObjectUnreadable as exc:  # it will not come back: no retry can deliver it
                raise GiveUp(f"webhook of job {event.job_id}: its transcript is unreadable: {exc}") from None
            if len(transcript) <= INLINE_TRANSCRIPT_BYTES:
                data["transcript"] = json.loads(transcript)
        return json.dumps({
            "type": f"job.{event.status}",
            "timestamp": datetime.fromtimestamp(event.at, timezone.utc).isoformat(),
            "data": data,
        }).encode()

    async def _deliver(self, event: JobEvent, body: bytes) -> str | None:
        """One signed POST of `body`; None once it is accepted, else what went wrong."""
        try:
            target = await check_target(event.webhook_url, self.settings.webhook_allow_private)
        except RefusedTarget as exc:
            return f"target refused: {exc}"
        sent_at = datetime.now(timezone.utc)
        # One id for every try of one message, so a receiver can drop repeats.
        webhook_id = f"{event.job_id}_{event.status}"
        headers = {
            "host": target.netloc,
            "content-type": "application/json",
            "user-agent": f"Dalston/{__version__}",
            "webhook-id": webhook_id,
            "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": self._signer.sign(webhook_id, sent_at, body.decode()),
        }
        try:
            async with asyncio.timeout(self.settings.webhook_timeout):
                # To the address just checked, with TLS checked against the name.
                async with self._http.stream("POST", target.pinned_url, content=body, headers=headers,
                                             extensions={"sni_hostname": target.host}) as response:
                    read = 0
                    async for chunk in response.aiter_raw():
                        read += len(chunk)
                        if read >= RESPONSE_READ_BYTES:
                            break
        except TimeoutError:
            return f"no answer within {self.settings.webhook_timeout:g} s"
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if 200 <= response.status_code < 300:
            return None
        return f"answered {response.status_code}"
