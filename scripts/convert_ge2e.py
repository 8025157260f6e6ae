"""Convert Resemblyzer's GE2E speaker encoder (`pretrained.pt`, from the Resemblyzer package on
PyPI) into the ONNX graph the diarize runtime runs without torch:
catalog/weights/resemblyzer-ge2e/ge2e.onnx, which the resemblyzer-ge2e model's catalog source
installs into the model store. Run once, where the `diarize` extra (torch, Resemblyzer) is
installed: `python scripts/convert_ge2e.py [pretrained.pt]`.

The graph takes mel frames (batch, frames, 40) and returns unit-length embeddings (batch, 256):
Resemblyzer's forward pass (3-layer LSTM, last hidden state, linear, ReLU, L2 norm)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from resemblyzer import VoiceEncoder

OUTPUT = Path(__file__).resolve().parent.parent / "catalog" / "weights" / "resemblyzer-ge2e" / "ge2e.onnx"


def convert(weights: Path | None, output: Path) -> None:
    encoder = VoiceEncoder("cpu", verbose=False, weights_fpath=weights).eval()
    # Batch 1 in the example: the exporter then leaves the LSTM's initial state out of the
    # graph (zeros), so any batch size runs.
    example = torch.rand(1, 160, 40)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(encoder, (example,), str(output), dynamo=False, opset_version=17,
                      input_names=["mels"], output_names=["embeddings"],
                      dynamic_axes={"mels": {0: "batch", 1: "frames"}, "embeddings": {0: "batch"}})


if __name__ == "__main__":
    convert(Path(sys.argv[1]) if len(sys.argv) > 1 else None, OUTPUT)
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size} bytes)")
