"""Run every benchmark: `python -m bench` (or `make bench`)."""

import tempfile
from pathlib import Path

from bench import (diarization, diarization_diagnosis, job_list, known_speakers, latency, live_turns, long_audio,
                   memory, models, noisy_turns, wyoming_vs_http)

BENCHMARKS = {"latency": latency.run, "models": models.run, "memory": memory.run,
              "long_audio": long_audio.run, "diarization": diarization.run,
              "diarization_diagnosis": diarization_diagnosis.run,
              "job_list": job_list.run, "wyoming_vs_http": wyoming_vs_http.run, "live_turns": live_turns.run,
              "noisy_turns": noisy_turns.run,
              "known_speakers": known_speakers.run}

if __name__ == "__main__":
    for name, run in BENCHMARKS.items():
        with tempfile.TemporaryDirectory(prefix=f"dalston-bench-{name}-") as root:
            for line in run(Path(root)):
                print(line, flush=True)
