"""One connection to NATS with the handles every service uses."""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import dataclass
from pathlib import Path

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError, NoStreamResponseError, ServiceUnavailableError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

import nats
from dalston.bus.credentials import login
from dalston.bus.layout import ensure_layout
from dalston.config import Settings
from dalston.contracts import ARTIFACTS_BUCKET, JOBS_BUCKET, Contract, encode
from dalston.logs import get_logger

log = get_logger("dalston.bus")
CONNECT_ATTEMPTS = 60
PUBLISH_PATIENCE = 30.0


@dataclass
class Bus:
    nc: Client
    js: JetStreamContext
    jobs: KeyValue
    artifacts: ObjectStore

    async def publish(self, subject: str, message: Contract, *, msg_id: str | None = None,
                      msg_ttl: float | None = None) -> None:
        """Publish to a stream and wait for its ack; `msg_id` makes a retry a no-op.

        While a cluster elects a new stream leader (a node died: about 5 s) the stream does
        not answer; the publish is retried for up to PUBLISH_PATIENCE seconds."""
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        deadline = time.monotonic() + PUBLISH_PATIENCE
        while True:
            try:
                await self.js.publish(subject, encode(message), headers=headers, msg_ttl=msg_ttl)
                return
            except (NoStreamResponseError, ServiceUnavailableError, nats.errors.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def read_object(self, name: str) -> bytes:
        # writeinto avoids nats-py's quadratic concatenation of chunks (nats.py issue 703).
        buffer = io.BytesIO()
        await self.artifacts.get(name, writeinto=buffer)
        return buffer.getvalue()

    async def read_object_to(self, name: str, path: Path) -> None:
        with path.open("wb") as file:
            await self.artifacts.get(name, writeinto=file)

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.drain()


async def connect(settings: Settings, name: str, *, apply_layout: bool = True) -> Bus:
    """Connect (retrying until NATS answers, reconnecting forever) and make sure the layout exists."""
    async def on_error(exc: Exception) -> None:
        log.warning("nats error", error=repr(exc))

    # nats-py does not retry a first connect; services often start before NATS is ready.
    for attempt in range(CONNECT_ATTEMPTS):
        try:
            nc = await nats.connect(
                servers=settings.nats_servers, name=name, max_reconnect_attempts=-1,
                reconnect_time_wait=0.5, connect_timeout=5, allow_reconnect=True, drain_timeout=5,
                error_cb=on_error, **login(settings))
            break
        except (OSError, nats.errors.NoServersError) as exc:
            if attempt == CONNECT_ATTEMPTS - 1:
                raise ConnectionError(f"cannot reach NATS at {', '.join(settings.nats_servers)}: {exc}") from None
            await asyncio.sleep(0.5)
    js = nc.jetstream(timeout=10)
    if apply_layout:
        await _ensure_layout_patiently(js, settings)
    jobs = await js.key_value(JOBS_BUCKET)
    artifacts = await js.object_store(ARTIFACTS_BUCKET)
    return Bus(nc=nc, js=js, jobs=jobs, artifacts=artifacts)


async def _ensure_layout_patiently(js: JetStreamContext, settings: Settings) -> None:
    """A new cluster's JetStream answers only once it has elected its leaders, and a service
    whose NATS user may only read the layout waits for the orchestrator to create it (a refused
    request reads as a timeout): retried as patiently as the connection itself."""
    for attempt in range(CONNECT_ATTEMPTS):
        try:
            await ensure_layout(js, settings)
            return
        except (nats.errors.TimeoutError, ServiceUnavailableError, BadRequestError) as exc:
            # 10005: a new cluster's nodes have not all joined JetStream yet.
            transient = not isinstance(exc, BadRequestError) or exc.err_code == 10005
            if not transient or attempt == CONNECT_ATTEMPTS - 1:
                raise
            log.warning("JetStream layout not ready; retrying", error=repr(exc))
            await asyncio.sleep(0.5)
