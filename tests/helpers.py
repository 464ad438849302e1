"""Small modules shared by several test files."""

from __future__ import annotations

import torch
from torch import nn


class Mixer(nn.Module):
    """A custom module (not Linear/Conv): pb_lightning must be told its neuron axis.

    Its dendrites are fresh copies of it, run together with ``torch.func.vmap``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x))
