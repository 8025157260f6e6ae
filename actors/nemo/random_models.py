"""Small NeMo models with random weights, built with nemo_toolkit itself and saved as `.nemo`:
for the tests, and for `scripts/gpu_swap_check.py`, which needs no download either.

Real Parakeet archives are gigabytes on the Hugging Face Hub; these restore through the same
`ASRModel.restore_from` in a fraction of a second. Their transcripts are nonsense, but
deterministic and made of words with timestamps: a small vocabulary makes the space frequent.
Two decoder families are covered: character CTC (parakeet-ctc) and Parakeet TDT's own shape
(FastConformer encoder, SentencePiece BPE tokenizer, token-and-duration transducer); and a
speaker-embedding model, a valid `.nemo` that the runtime must refuse.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece
import torch
from nemo.collections.asr.models import EncDecCTCModel, EncDecRNNTBPEModel, EncDecSpeakerLabelModel
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


def tdt_model(path: Path, letters: list[str], *, seed: int = 0) -> Path:
    """A Parakeet-TDT-shaped model (8x depthwise-striding FastConformer, BPE over `letters`,
    TDT joint with durations 0-4) saved at `path`."""
    tokenizer = path.parent / f"{path.stem}-tokenizer"
    tokenizer.mkdir(exist_ok=True)
    words = ["".join(letters[(i * 3 + j) % len(letters)] for j in range(2 + i % 3)) for i in range(40)]
    (tokenizer / "text.txt").write_text(" ".join(words) + "\n")
    sentencepiece.SentencePieceTrainer.train(
        input=str(tokenizer / "text.txt"), model_prefix=str(tokenizer / "tokenizer"), vocab_size=16,
        model_type="bpe", character_coverage=1.0, bos_id=-1, eos_id=-1, minloglevel=2)
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer / "tokenizer.model"))
    (tokenizer / "vocab.txt").write_text("\n".join(map(pieces.id_to_piece, range(len(pieces)))) + "\n")
    durations = [0, 1, 2, 3, 4]
    torch.manual_seed(seed)
    model = EncDecRNNTBPEModel(cfg=OmegaConf.create({
        "sample_rate": 16000, "tokenizer": {"dir": str(tokenizer), "type": "bpe"},
        "preprocessor": _PREPROCESSOR,
        "encoder": {"_target_": "nemo.collections.asr.modules.ConformerEncoder", "feat_in": _FEATURES,
                    "n_layers": 1, "d_model": 32, "n_heads": 2, "ff_expansion_factor": 2,
                    "subsampling": "dw_striding", "subsampling_factor": 8,
                    "subsampling_conv_channels": 32, "self_attention_model": "rel_pos",
                    "conv_kernel_size": 9, "dropout": 0.0, "dropout_pre_encoder": 0.0,
                    "dropout_emb": 0.0, "dropout_att": 0.0},
        "model_defaults": {"enc_hidden": 32, "pred_hidden": 16, "tdt_durations": durations,
                           "num_tdt_durations": len(durations)},
        "decoder": {"_target_": "nemo.collections.asr.modules.RNNTDecoder", "blank_as_pad": True,
                    "normalization_mode": None, "random_state_sampling": False,
                    "prednet": {"pred_hidden": 16, "pred_rnn_layers": 1}},
        "joint": {"_target_": "nemo.collections.asr.modules.RNNTJoint", "log_softmax": None,
                  "preserve_memory": False, "fuse_loss_wer": False, "num_extra_outputs": len(durations),
                  "jointnet": {"joint_hidden": 16, "activation": "relu", "dropout": 0.0}},
        "decoding": {"strategy": "greedy_batch", "model_type": "tdt", "durations": durations,
                     "greedy": {"max_symbols": 5}},
        "loss": {"loss_name": "tdt", "tdt_kwargs": {"durations": durations, "sigma": 0.02, "omega": 0.1}},
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
