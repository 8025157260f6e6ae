"""`dalston up`: the one-machine command of the quick start, run for real."""

from __future__ import annotations

import signal
import subprocess
import sys

import httpx
import psutil

from dalston.bus.server import HomeLock
from tests.stack import AUDIO, free_port, wait_ok, words

SPEAKER1 = words("That was hilarious, I can't believe you said that.")


def fresh_machine(tmp_path, port: int) -> dict[str, str]:
    """The environment of a machine where Dalston never ran: its own home, free ports."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DALSTON_HOME": str(tmp_path / "home"),
            "DALSTON_HTTP_PORT": str(port), "DALSTON_NATS_PORT": str(free_port()),
            "DALSTON_DEFAULT_MODEL": "faster-whisper-tiny.en", "HF_HUB_OFFLINE": "1"}


def running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def dalston(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dalston", *args], env=env, capture_output=True,
                          text=True, timeout=240)


def test_up_serves_refuses_a_second_and_stops_cleanly(tmp_path):
    port = free_port()
    env = fresh_machine(tmp_path, port)
    log = (tmp_path / "up.log").open("w")
    up = subprocess.Popen([sys.executable, "-m", "dalston", "up"], env=env, stdout=log,
                          stderr=subprocess.STDOUT)
    try:
        wait_ok(f"http://127.0.0.1:{port}/readyz", f"dalston up did not come up; see {log.name}", 60,
                alive=lambda: up.poll() is None)
        with open(AUDIO / "speaker1.wav", "rb") as audio:
            response = httpx.post(f"http://127.0.0.1:{port}/v1/audio/transcriptions",
                                  files={"file": audio}, data={"response_format": "text"}, timeout=120)
        assert words(response.text) == SPEAKER1

        second = dalston(env, "up")
        assert second.returncode == 1 and "already running" in second.stderr

        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 6  # nats-server, gateway, orchestrator and three engines
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(30) == 0
    assert not [c for c in children if running(c)]
    assert "Dalston is up" in (tmp_path / "up.log").read_text()


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

        down = dalston(env, "down")
        assert down.returncode == 0 and f"Dalston stopped (pid {pid})" in down.stderr
        assert lock.holder() is None
        assert not [p for p in [server, *services] if running(p)]
        assert "not running" in dalston(env, "down").stderr
    finally:
        if (pid := lock.holder()) is not None:
            psutil.Process(pid).kill()
