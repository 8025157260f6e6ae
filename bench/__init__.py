"""Benchmarks: `python -m bench` runs them all and prints ratios measured side by side."""
