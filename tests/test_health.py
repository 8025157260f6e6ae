"""`dalston health`, compose.yaml's health checks, against a real nats-server: a service is not
ready until it is at work."""

from __future__ import annotations

import asyncio
import socket

from dalston.bus.connection import connect
from dalston.cli import main
from dalston.config import load_settings
from dalston.contracts import heartbeat_subject, nats_identity, subject_token


def health(monkeypatch, env: dict[str, str], service: str) -> int:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return main(["health", service])


def test_an_engine_is_ready_once_its_beat_is_there(nats_env, monkeypatch):
    env = {**nats_env, "DALSTON_RUNTIME": "faster-whisper"}
    assert health(monkeypatch, env, "engine") == 1

    async def beat() -> None:
        bus = await connect(load_settings(nats_env), name="test")
        try:
            engine = subject_token(f"{socket.gethostname()}-1")  # the container's PID 1
            identity = nats_identity(load_settings(nats_env).nats_user)
            await bus.js.publish(heartbeat_subject("faster-whisper", identity, engine), b"{}")
        finally:
            await bus.close()

    asyncio.run(beat())
    assert health(monkeypatch, env, "engine") == 0


def test_no_orchestrator_no_webhooks_no_gateway_means_not_ready(nats_env, monkeypatch, capsys):
    for service in ("orchestrator", "webhooks", "gateway"):
        assert health(monkeypatch, {**nats_env, "DALSTON_HTTP_PORT": "1"}, service) == 1
    assert "not ready" in capsys.readouterr().out
