"""`dalston engines add`: an engine user made by the CLI is let in by the nats-server of `dalston
up` and of compose, with the one template's rights (its runtime's queues, its own heartbeats)."""

from __future__ import annotations

import asyncio
import shutil
import stat
import time

import nats.errors

import nats
from dalston.bus.credentials import inbox_prefix
from dalston.bus.permissions import COMPOSE_ENGINES, SERVICE_USERS, engine_user, password_variable
from dalston.cli import main
from dalston.config import load_settings
from dalston.services.up import embedded_nats
from tests.nats_nodes import NATS_DIR, NatsNode
from tests.stack import free_port


def add(capsys, *args: str) -> dict[str, str]:
    assert main(["engines", "add", *args]) == 0
    return dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())


async def rights(url: str, env: dict[str, str], runtime: str) -> dict[str, bool]:
    """Whether the engine with `env` may publish where its own runtime's engine takes a task and
    beats, and where another runtime's does (each subject: True when allowed)."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    user = env["DALSTON_NATS_USER"]
    nc = await nats.connect(url, user=user, password=env["DALSTON_NATS_PASSWORD"],
                            inbox_prefix=inbox_prefix(user), error_cb=on_error, allow_reconnect=False)
    subjects = [f"heartbeat.{runtime}.{user}.box-1", f"$JS.API.CONSUMER.MSG.NEXT.TASKS.tasks-{runtime}-none",
                "heartbeat.merge.engine-merge.box-1", "$JS.API.CONSUMER.MSG.NEXT.TASKS.tasks-merge-none"]
    try:
        for subject in subjects:
            await nc.publish(subject, b"{}")
        await nc.flush()
        deadline = time.monotonic() + 2
        while len(errors) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await nc.close()
    said = " ".join(errors)
    return {subject: f'publish to "{subject.lower()}"' not in said for subject in subjects}


async def refused(url: str, user: str, password: str) -> bool:
    try:
        await nats.connect(url, user=user, password=password, allow_reconnect=False, max_reconnect_attempts=0)
    except nats.errors.Error:
        return True
    return False


EXPECTED = [True, True, False, False]  # its own beat and queue; not merge's


async def test_dalston_up_lets_an_added_engine_in(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DALSTON_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DALSTON_NATS_PORT", str(free_port()))
    env = add(capsys, "remote-1", "--runtime", "faster-whisper")
    assert env["DALSTON_NATS_USER"] == "engine-remote-1" and env["DALSTON_RUNTIME"] == "faster-whisper"
    kept = tmp_path / "home" / "engines.json"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600  # it holds the password

    assert main(["engines", "add", "faster-whisper-0", "--runtime", "faster-whisper"]) != 0  # `up`'s own

    server = embedded_nats(load_settings(), {"merge": "merge"})  # as `dalston up` makes it
    server.start()
    try:
        assert env["DALSTON_NATS_URL"] == server.url
        assert list((await rights(server.url, env, "faster-whisper")).values()) == EXPECTED
        assert await refused(server.url, "engine-remote-1", "not-its-password")
    finally:
        server.stop()


async def test_compose_lets_an_added_engine_in(tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    shutil.copytree(NATS_DIR, project / "nats")
    users = [*SERVICE_USERS, *map(engine_user, COMPOSE_ENGINES)]
    (project / ".env").write_text("".join(f"{password_variable(u)}=p{i}secret\n"
                                          for i, u in enumerate(users)))
    monkeypatch.setenv("DALSTON_HOME", str(tmp_path / "home"))
    env = add(capsys, "gpu-box", "--runtime", "faster-whisper", "--compose", str(project))
    written = (project / ".env").read_text()
    assert f"{password_variable('engine-gpu-box')}={env['DALSTON_NATS_PASSWORD']}" in written

    # The nats service reads .env (env_file) and the project's nats/ (compose.conf, users.conf).
    variables = dict(line.split("=", 1) for line in (project / ".env").read_text().splitlines())
    node = NatsNode(tmp_path, "nats", project / "nats" / "compose.conf", variables)
    node.start()
    try:
        node.wait_healthy()
        assert list((await rights(node.url, env, "faster-whisper")).values()) == EXPECTED
    finally:
        node.stop()
    # A name of compose.yaml's own engines, or a runtime not in the catalog: refused.
    for args in (["faster-whisper-1", "--runtime", "faster-whisper"], ["x", "--runtime", "no-such"]):
        assert main(["engines", "add", *args, "--compose", str(project)]) != 0
