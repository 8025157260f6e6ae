"""Benchmarks: `python -m bench` runs them all and prints ratios measured side by side."""

from pathlib import Path

# The speech files the benchmarks transcribe: those the repository ships for its tests.
AUDIO = Path(__file__).resolve().parents[1] / "tests" / "data" / "audio"
