"""Small NeMo models with random weights, built with nemo_toolkit itself and saved as `.nemo`.

Real Parakeet archives are gigabytes on the Hugging Face Hub; these restore through the same
`ASRModel.restore_from` in a fraction of a second. Their transcripts are nonsense, but
deterministic and made of words with timestamps: a small vocabulary makes the space frequent.
"""

from __future__ import annotations

from pathlib import Path

import torch
from nemo.collections.asr.models import EncDecCTCModel, EncDecSpeakerLabelModel
from omegaconf import OmegaConf

# Two vocabularies with no letter in common, so a transcript shows which model made it.
LABELS_A = [" ", "a", "e", "o", "n", "s", "t"]
LABELS_B = [" ", "d", "i", "l", "m", "r", "u"]

_FEATURES = 32
_PREPROCESSOR = {
    "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
    "sample_rate": 16000, "features": _FEATURES, "window_size": 0.025, "window_stride": 0.01,
    "dither": 0.0,
}


def _encoder(filters: int, blocks: int) -> dict:
    """A Jasper-style convolutional encoder: 4x subsampling, then `blocks - 1` more layers."""
    block = {"repeat": 1, "kernel": [11], "dilation": [1], "dropout": 0.0, "residual": False,
             "filters": filters}
    return {"_target_": "nemo.collections.asr.modules.ConvASREncoder", "feat_in": _FEATURES,
            "activation": "relu",
            "jasper": [{**block, "stride": [4]}] + [{**block, "stride": [1]}] * (blocks - 1)}


def ctc_model(path: Path, labels: list[str], *, filters: int = 32, blocks: int = 1,
              seed: int = 0) -> Path:
    """A character CTC model (the shape of parakeet-ctc) saved at `path`."""
    torch.manual_seed(seed)
    model = EncDecCTCModel(cfg=OmegaConf.create({
        "sample_rate": 16000, "labels": labels, "preprocessor": _PREPROCESSOR,
        "encoder": _encoder(filters, blocks),
        "decoder": {"_target_": "nemo.collections.asr.modules.ConvASRDecoder", "feat_in": filters,
                    "num_classes": len(labels), "vocabulary": labels},
    }))
    model.save_to(str(path))
    return path


def speaker_model(path: Path) -> Path:
    """A valid `.nemo` that is not speech recognition: a speaker-embedding model."""
    model = EncDecSpeakerLabelModel(cfg=OmegaConf.create({
        "sample_rate": 16000, "preprocessor": _PREPROCESSOR, "encoder": _encoder(16, 1),
        "decoder": {"_target_": "nemo.collections.asr.modules.SpeakerDecoder", "feat_in": 16,
                    "num_classes": 2, "emb_sizes": 8, "pool_mode": "xvector"},
        "loss": {"_target_": "nemo.collections.asr.losses.angularloss.AngularSoftmaxLoss"},
    }))
    model.save_to(str(path))
    return path


def truncated(src: Path, path: Path) -> Path:
    """The first half of `src`: what an interrupted copy leaves."""
    data = src.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def build_set(folder: Path) -> dict[str, Path]:
    """The test set: two working models, a corrupt archive and a non-ASR one, by name."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny_a = ctc_model(folder / "tiny-a.nemo", LABELS_A, filters=32, seed=0)
    return {
        "tiny-a": tiny_a,
        "tiny-b": ctc_model(folder / "tiny-b.nemo", LABELS_B, filters=48, seed=1),
        "corrupt": truncated(tiny_a, folder / "corrupt.nemo"),
        "not-asr": speaker_model(folder / "not-asr.nemo"),
    }
