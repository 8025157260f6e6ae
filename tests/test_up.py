"""`dalston up`: the one-machine command of the quick start, run for real."""

from __future__ import annotations

import asyncio
import json
import signal
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import nats.errors
import psutil
import pytest
from wyoming.client import AsyncTcpClient
from wyoming.event import Event
from wyoming.info import Describe, Info

import nats
from dalston.bus.credentials import CREDENTIALS_FILE
from dalston.bus.server import HomeLock
from tests.stack import AUDIO, free_port, wait_ok, words

SPEAKER1 = words("That was hilarious, I can't believe you said that.")


def fresh_machine(tmp_path, port: int) -> dict[str, str]:
    """The environment of a machine where Dalston never ran: its own home, free ports."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DALSTON_HOME": str(tmp_path / "home"),
            "DALSTON_HTTP_PORT": str(port), "DALSTON_NATS_PORT": str(free_port()),
            "DALSTON_WYOMING_PORT": str(free_port()),
            "DALSTON_DEFAULT_MODEL": "faster-whisper-tiny.en", "HF_HUB_OFFLINE": "1"}


def running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def dalston(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dalston", *args], env=env, capture_output=True,
                          text=True, timeout=240)


@contextmanager
def dalston_up(tmp_path, env: dict[str, str]):
    """`dalston up` on this machine, ready; stopped (cleanly) on the way out."""
    log = (tmp_path / "up.log").open("w")
    up = subprocess.Popen([sys.executable, "-m", "dalston", "up"], env=env, stdout=log,
                          stderr=subprocess.STDOUT)
    try:
        wait_ok(f"http://127.0.0.1:{env['DALSTON_HTTP_PORT']}/readyz",
                f"dalston up did not come up; see {log.name}", 60, alive=lambda: up.poll() is None)
        yield up
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(30) == 0


def nats_server(up: subprocess.Popen) -> psutil.Process:
    return next(p for p in psutil.Process(up.pid).children() if p.name() == "nats-server")


async def describe_wyoming(port: int) -> Event:
    """The first answer to `describe`, once the Wyoming server listens."""
    deadline = time.monotonic() + 60
    while True:
        try:
            async with AsyncTcpClient("127.0.0.1", port) as client:
                await client.write_event(Describe().event())
                return await asyncio.wait_for(client.read_event(), 60)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def connect_anonymously(port: str) -> None:
    nc = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False, max_reconnect_attempts=0)
    await nc.close()


async def test_up_serves_admits_only_its_own_nats_users_refuses_a_second_and_stops_cleanly(tmp_path):
    port = free_port()
    # With a webhook secret, `up` runs the webhook service too.
    env = {**fresh_machine(tmp_path, port), "DALSTON_WEBHOOK_SECRET": "whsec_" + "A" * 32}
    # An engine that runs elsewhere, added before: `up` lets its user in.
    added = dalston(env, "engines", "add", "remote-1", "--runtime", "faster-whisper")
    assert added.returncode == 0, added.stderr
    remote = dict(line.split("=", 1) for line in added.stdout.splitlines())
    with dalston_up(tmp_path, env) as up:
        with open(AUDIO / "speaker1.wav", "rb") as audio:
            response = httpx.post(f"http://127.0.0.1:{port}/v1/audio/transcriptions",
                                  files={"file": audio}, data={"response_format": "text"}, timeout=120)
        assert words(response.text) == SPEAKER1
        # Home Assistant's Wyoming server came up with it.
        assert Info.is_type((await describe_wyoming(int(env["DALSTON_WYOMING_PORT"]))).type)

        # Another local account, without the passwords, cannot even connect.
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await connect_anonymously(env["DALSTON_NATS_PORT"])
        nc = await nats.connect(remote["DALSTON_NATS_URL"], user=remote["DALSTON_NATS_USER"],
                                password=remote["DALSTON_NATS_PASSWORD"], allow_reconnect=False)
        await nc.close()
        credentials = Path(env["DALSTON_HOME"]) / CREDENTIALS_FILE
        assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
        # Nothing else of NATS listens (a monitoring port would tell anyone who listens where).
        listening = {c.laddr for c in nats_server(up).net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        assert listening == {("127.0.0.1", int(env["DALSTON_NATS_PORT"]))}
        # Each service has its own user, and each engine one of its own, none the admin; the CLI
        # of this account is the admin.
        users = [p.environ().get("DALSTON_NATS_USER") for p in psutil.Process(up.pid).children()
                 if p.name() != "nats-server"]
        engines = [u for u in users if u not in ("gateway", "orchestrator", "webhooks")]
        assert set(users) - set(engines) == {"gateway", "orchestrator", "webhooks"}
        assert {"engine-audio-prepare", "engine-merge", "engine-faster-whisper-0"} <= set(engines)
        assert all(u.startswith("engine-") for u in engines) and len(set(engines)) == len(engines)
        created = dalston(env, "keys", "create", "alice")
        assert created.returncode == 0 and created.stdout.startswith("dsk_"), created.stderr
        listed = dalston(env, "keys", "list", "--json")
        assert [k["name"] for k in json.loads(listed.stdout)] == ["alice"], listed.stderr

        second = dalston(env, "up")
        assert second.returncode == 1 and "already running" in second.stderr

        children = psutil.Process(up.pid).children(recursive=True)
        # nats-server, gateway, orchestrator, webhooks, four engines
        assert len(children) >= 8
    assert not [c for c in children if running(c)]
    assert "Dalston is up" in (tmp_path / "up.log").read_text()


def test_jobs_complete_when_the_nats_server_is_killed(tmp_path):
    """nats-server is SIGKILLed while 20 jobs run (killed once one has completed, so the rest are
    queued or under way): `up` restarts it on its store and port, the services reconnect, and
    every job completes."""
    port = free_port()
    env = fresh_machine(tmp_path, port)
    jobs = 20
    with dalston_up(tmp_path, env) as up, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        job_ids = []
        for _ in range(jobs):
            with open(AUDIO / "speaker1.wav", "rb") as audio:
                response = http.post("/v1/jobs", files={"file": audio})
            assert response.status_code == 202, response.text
            job_ids.append(response.json()["id"])

        def statuses() -> list[str]:
            # Not recorded yet (404), or the gateway waiting out NATS (5xx): not ended.
            replies = [http.get(f"/v1/jobs/{job_id}") for job_id in job_ids]
            return [r.json()["status"] if r.status_code == 200 else "submitted" for r in replies]

        def live_runtimes() -> set[str]:
            engines = http.get("/v1/engines").json()["data"]
            return {e["runtime"] for e in engines if e["status"] in ("idle", "busy")}

        def wait_until(probe, ended, timeout: float, interval: float = 0.5):
            """What `probe()` says once `ended` holds for it, or at `timeout`."""
            deadline = time.monotonic() + timeout
            while not ended(current := probe()) and time.monotonic() < deadline:
                time.sleep(interval)
            return current

        under_way = wait_until(statuses, lambda s: "completed" in s, 120)
        assert 0 < under_way.count("completed") < jobs
        killed = nats_server(up)
        killed.send_signal(signal.SIGKILL)
        # Generous: the restart, the reconnects, then most of the work on a loaded 2-core box.
        # Every 2 s: each look is 20 requests, which would otherwise take CPU from the jobs.
        ended = wait_until(statuses, lambda s: all(status in ("completed", "failed", "cancelled") for status in s),
                           300, interval=2.0)
        failures = [http.get(f"/v1/jobs/{job_id}").json() for job_id, status in zip(job_ids, ended)
                    if status != "completed"]
        assert not failures, f"{len(failures)} of {jobs} jobs did not complete: {failures[:3]}"
        assert nats_server(up).pid != killed.pid
        # The engines beat into the new server (its memory streams are made again): all live
        # within a few beats.
        every = {"audio-prepare", "merge", "diarize", "redact", "faster-whisper"}
        assert wait_until(live_runtimes, lambda live: live == every, 20) == every
    assert "nats-server died; restarting" in (tmp_path / "up.log").read_text()


def test_transcribe_starts_dalston_in_the_background_and_down_stops_it(tmp_path):
    env = fresh_machine(tmp_path, free_port())
    lock = HomeLock(tmp_path / "home")
    try:
        first = dalston(env, "transcribe", str(AUDIO / "speaker1.wav"))
        assert first.returncode == 0, first.stderr
        assert words(first.stdout) == SPEAKER1
        pid = lock.holder()
        assert pid is not None
        # The server outlives the command that started it; the next one just uses it.
        server = psutil.Process(pid)
        services = server.children(recursive=True)
        again = dalston(env, "transcribe", "-f", "srt", str(AUDIO / "speaker1.wav"))
        assert again.returncode == 0 and "00:00:00,000 -->" in again.stdout, again.stderr
        assert lock.holder() == pid
        # The README's example: the default `up` diarizes, no flags, no extras (its engine
        # loads the model on this first use).
        diarized = dalston(env, "transcribe", "--diarize", str(AUDIO / "dialogue.wav"))
        assert diarized.returncode == 0, diarized.stderr
        turns = [line.split(":", 1) for line in diarized.stdout.strip().splitlines()]
        assert [speaker for speaker, _ in turns] == ["SPEAKER_0", "SPEAKER_1"]
        assert words(turns[1][1]) == words("What do you mean? I was really serious about it.")

        down = dalston(env, "down")
        assert down.returncode == 0 and f"Dalston stopped (pid {pid})" in down.stderr
        assert lock.holder() is None
        assert not [p for p in [server, *services] if running(p)]
        assert "not running" in dalston(env, "down").stderr
    finally:
        if (pid := lock.holder()) is not None:
            psutil.Process(pid).kill()


def test_up_starts_one_single_threaded_engine_per_core_on_cpu(monkeypatch):
    """The CPU default that bench/long_audio.py measured: engines x 1 thread, not 1 x cores."""
    from dalston.config import load_settings
    from dalston.services import up as up_module

    monkeypatch.setattr(up_module.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(up_module.Path, "exists", lambda self: False)  # no GPU here
    assert up_module.engine_layout(load_settings({})) == (4, 1)
    assert up_module.engine_layout(load_settings({"DALSTON_CPU_THREADS": "2"})) == (4, None)
    assert up_module.engine_layout(load_settings({"DALSTON_ENGINES": "1"})) == (1, None)
    assert up_module.engine_layout(load_settings({"DALSTON_DEVICE": "cuda"})) == (1, None)


def test_up_shares_the_ram_among_cpu_engines_for_their_models(monkeypatch):
    """Each engine counts its models against its part of the RAM, not all of it."""
    from dalston.config import load_settings
    from dalston.services import up as up_module

    monkeypatch.setattr(up_module.Path, "exists", lambda self: False)  # no GPU here
    monkeypatch.setattr(up_module.psutil, "virtual_memory", lambda: SimpleNamespace(total=24 * 2**30))
    assert up_module.model_memory_share(load_settings({}), 4) == "6.00"
    assert up_module.model_memory_share(load_settings({"DALSTON_MODEL_MEMORY_GB": "3"}), 4) is None
    assert up_module.model_memory_share(load_settings({"DALSTON_DEVICE": "cuda"}), 4) is None
