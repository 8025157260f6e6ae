"""How long a fresh clone's `make up` takes to be ready, for two commits side by side (it needs
PyPI and minutes, so it is not part of `make bench`):

    python scripts/fresh_up_time.py BEFORE AFTER [--order before,after,before,after]

Each run clones this repository at the commit, runs `make up` with a fresh DALSTON_HOME and free
ports, and prints seconds from the start to the venv installed, /readyz answering, and every
engine live (idle; the faster-whisper engines with the default model loaded), with the size of
the venv's site-packages. Then it runs the README's `dalston transcribe --diarize` there (not
timed into readiness) and stops the stack. Interleave the order: the machine's load drifts."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXPECTED = {"audio-prepare", "merge", "faster-whisper"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.read() if response.status == 200 else None
    except OSError:
        return None


def site_packages_mb(clone: Path) -> int:
    done = subprocess.run(["du", "-sm", *clone.glob(".venv/lib/python*/site-packages")],
                          capture_output=True, text=True)
    return int(done.stdout.split()[0])


def all_live(port: int) -> bool:
    body = get(f"http://127.0.0.1:{port}/v1/engines")
    if body is None:
        return False
    engines = json.loads(body)["data"]
    idle = {e["runtime"] for e in engines if e["status"] == "idle"}
    whisper = [e for e in engines if e["runtime"] == "faster-whisper"]
    runtimes = {e["runtime"] for e in engines}
    return (idle >= EXPECTED and idle == runtimes and all(e["loaded_models"] for e in whisper))


def run(commit: str, root: Path) -> dict:
    clone = root / commit[:12]
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", commit], check=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(DALSTON_HOME=str(clone / "home"), DALSTON_HTTP_PORT=str(port),
               DALSTON_NATS_PORT=str(free_port()), HF_HUB_OFFLINE="1")
    result: dict = {"commit": commit[:12]}
    with open(clone / "up.log", "w") as log:
        start = time.monotonic()
        make = subprocess.Popen(["make", "up"], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            while time.monotonic() - start < 900 and make.poll() is None and "live" not in result:
                now = round(time.monotonic() - start, 1)
                if "installed" not in result and (clone / ".venv/.installed").exists():
                    result.update(installed=now, site_packages_mb=site_packages_mb(clone))
                elif "installed" in result and "readyz" not in result and get(f"http://127.0.0.1:{port}/readyz"):
                    result["readyz"] = now
                elif "readyz" in result and all_live(port):
                    result["live"] = now
                time.sleep(0.25)
            if "live" in result:
                diarized = subprocess.run([str(clone / ".venv/bin/dalston"), "transcribe", "--diarize",
                                           str(clone / "tests/data/audio/dialogue.wav")],
                                          env=env, capture_output=True, text=True, timeout=300)
                result["diarized"] = diarized.stdout.strip().splitlines() or diarized.stderr.strip()[-300:]
        finally:
            os.killpg(make.pid, signal.SIGTERM)
            make.wait(60)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--order", default="before,after,before,after")
    args = parser.parse_args()
    for label in args.order.split(","):
        with tempfile.TemporaryDirectory(prefix="dalston-fresh-up-") as root:
            print(json.dumps({"label": label, **run(getattr(args, label), Path(root))}), flush=True)


if __name__ == "__main__":
    main()
