"""A service told to stop while it cannot reach NATS stops after its grace (the runner's), not
once its connect has been retried for minutes: a real `dalston serve` process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from dalston.services.runner import STOP_GRACE_SECONDS


def test_a_service_that_cannot_reach_nats_stops_when_told(tmp_path):
    with socket.socket() as silent:
        # Takes connections into its backlog and never answers: each connect waits its timeout.
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        env = {**os.environ, "DALSTON_NATS_URL": f"nats://127.0.0.1:{silent.getsockname()[1]}",
               "DALSTON_HOME": str(tmp_path), "DALSTON_LOG_LEVEL": "WARNING"}
        service = subprocess.Popen([sys.executable, "-m", "dalston", "serve", "orchestrator"], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(3)  # into its connect attempts (60, up to 5.5 s each)
            assert service.poll() is None
            service.send_signal(signal.SIGTERM)
            service.wait(timeout=STOP_GRACE_SECONDS + 60)
        finally:
            service.kill()
        said = service.stderr.read()
        assert service.returncode == 0 and "not stopped in time" in said, said
