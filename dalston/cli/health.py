"""`dalston health <service>`: exit 0 when this container's service is ready, 1 when not. The
health checks of compose.yaml; plain words, so every compose implementation passes them on
unchanged."""

from __future__ import annotations

import asyncio
import socket
import urllib.request

from dalston.bus.connection import connect
from dalston.bus.consumers import consumer_state_at
from dalston.config import Settings
from dalston.contracts import (EVENTS_STREAM, HEARTBEATS_STREAM, JOBS_STREAM, ORCHESTRATOR_JOBS_CONSUMER,
                               WEBHOOKS_CONSUMER, heartbeat_subject, nats_identity, subject_token)

TIMEOUT = 3.0


def register(commands) -> None:
    health = commands.add_parser("health", help="exit 0 when this container's service is ready (health checks)")
    health.add_argument("service", choices=sorted(CHECKS))
    health.set_defaults(func=_health)


def _health(args, settings: Settings) -> int:
    try:
        ready = asyncio.run(CHECKS[args.service](settings))
    except Exception as exc:  # noqa: BLE001 - any failure is "not ready", said once
        print(f"not ready: {exc}")
        return 1
    if not ready:
        print("not ready")
    return 0 if ready else 1


async def _gateway(settings: Settings) -> bool:
    """Its /readyz: NATS connected and the streams there."""
    url = f"http://127.0.0.1:{settings.http_port}/readyz"
    answer = await asyncio.to_thread(urllib.request.urlopen, url, timeout=TIMEOUT)
    return answer.status == 200


async def _fetching(settings: Settings, stream: str, consumer: str) -> bool:
    """A pull request of the service waits on its consumer: it is connected and at work."""
    state = await consumer_state_at(settings, stream, consumer, TIMEOUT)
    return state is not None and state.waiting > 0


async def _orchestrator(settings: Settings) -> bool:
    return await _fetching(settings, JOBS_STREAM, ORCHESTRATOR_JOBS_CONSUMER)


async def _webhooks(settings: Settings) -> bool:
    return await _fetching(settings, EVENTS_STREAM, WEBHOOKS_CONSUMER)


async def _engine(settings: Settings) -> bool:
    """Its last heartbeat is in JetStream (a beat expires three intervals after it was sent). The
    engine is the container's PID 1 and names itself <hostname>-1 unless DALSTON_ENGINE_ID says."""
    bus = await connect(settings, "health", apply_layout=False)
    try:
        name = subject_token(settings.engine_id or f"{socket.gethostname()}-1")
        subject = heartbeat_subject(settings.runtime, nats_identity(settings.nats_user), name)
        return await bus.last(HEARTBEATS_STREAM, subject) is not None
    finally:
        await bus.close()


async def _layout(settings: Settings) -> bool:
    """The layout is there, its memory stream of heartbeats too (which it puts back)."""
    bus = await connect(settings, "health", apply_layout=False)
    try:
        return not await bus.stream_problem(HEARTBEATS_STREAM)
    finally:
        await bus.close()


async def _wyoming(settings: Settings) -> bool:
    """It takes connections on its port."""
    _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", settings.wyoming_port), TIMEOUT)
    writer.close()
    return True


CHECKS = {"gateway": _gateway, "orchestrator": _orchestrator, "webhooks": _webhooks, "engine": _engine,
          "layout": _layout, "wyoming": _wyoming}
