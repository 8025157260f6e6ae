"""What every runtime on PyTorch shares: the device it runs on, and its CPU threads."""

from __future__ import annotations

import torch

from dalston.config import Settings
from dalston.sdk import ModelActor


class TorchActor(ModelActor):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        if settings.cpu_threads > 0:
            torch.set_num_threads(settings.cpu_threads)

    @property
    def device(self) -> str:
        wanted = self.settings.device
        if wanted == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return wanted
