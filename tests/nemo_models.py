"""The NeMo test set: random-weight models (`actors.nemo.random_models`) that work, and
archives that must fail: a truncated one and a model that is not speech recognition."""

from __future__ import annotations

from pathlib import Path

from actors.nemo.random_models import LABELS_A, LABELS_B, ctc_model, speaker_model, tdt_model


def truncated(src: Path, path: Path) -> Path:
    """The first half of `src`: what an interrupted copy leaves."""
    data = src.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def build_set(folder: Path) -> dict[str, Path]:
    """The test set: two working models (CTC and TDT), a corrupt archive and a non-ASR one, by name."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny_a = ctc_model(folder / "tiny-a.nemo", LABELS_A, filters=32, seed=0)
    return {
        "tiny-a": tiny_a,
        "tiny-b": tdt_model(folder / "tiny-b.nemo", LABELS_B[1:], seed=1),
        "corrupt": truncated(tiny_a, folder / "corrupt.nemo"),
        "not-asr": speaker_model(folder / "not-asr.nemo"),
    }
