"""What every runtime on PyTorch shares: the device it runs on, and its CPU threads."""

from __future__ import annotations

import torch

from dalston.config import Settings
from dalston.sdk import ModelActor


def use_torch(settings: Settings) -> str:
    """Applies the configured CPU threads to torch; the device to run on."""
    if settings.cpu_threads > 0:
        torch.set_num_threads(settings.cpu_threads)
    if settings.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return settings.device


class TorchActor(ModelActor):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._device = use_torch(settings)

    @property
    def device(self) -> str:
        return self._device
