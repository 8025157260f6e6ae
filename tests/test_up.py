"""`dalston up`: the one-machine command of the quick start, run for real."""

from __future__ import annotations

import signal
import subprocess
import sys

import httpx
import psutil

from tests.stack import AUDIO, free_port, wait_ok, words


def test_up_serves_refuses_a_second_and_stops_cleanly(tmp_path):
    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DALSTON_HOME": str(tmp_path / "home"),
           "DALSTON_HTTP_PORT": str(port), "DALSTON_NATS_PORT": str(free_port()),
           "DALSTON_DEFAULT_MODEL": "faster-whisper-tiny.en", "HF_HUB_OFFLINE": "1"}
    log = (tmp_path / "up.log").open("w")
    up = subprocess.Popen([sys.executable, "-m", "dalston", "up"], env=env, stdout=log,
                          stderr=subprocess.STDOUT)
    try:
        wait_ok(f"http://127.0.0.1:{port}/readyz", f"dalston up did not come up; see {log.name}", 60,
                alive=lambda: up.poll() is None)
        with open(AUDIO / "speaker1.wav", "rb") as audio:
            response = httpx.post(f"http://127.0.0.1:{port}/v1/audio/transcriptions",
                                  files={"file": audio}, data={"response_format": "text"}, timeout=120)
        assert words(response.text) == words("That was hilarious, I can't believe you said that.")

        second = subprocess.run([sys.executable, "-m", "dalston", "up"], env=env,
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and "already running" in second.stderr

        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 6  # nats-server, gateway, orchestrator and three engines
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(30) == 0
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert "Dalston is up" in (tmp_path / "up.log").read_text()
