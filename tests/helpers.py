"""Small modules and helpers shared by several test files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

_REPO = Path(__file__).resolve().parents[1]


class Mixer(nn.Module):
    """A custom module (not Linear/Conv): pb_lightning must be told its neuron axis.

    Its dendrites are fresh copies of it, run together with ``torch.func.vmap``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x))


def run_benchmark(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``benchmarks/<script>`` with this interpreter and assert that it exited cleanly."""
    result = subprocess.run(
        [sys.executable, str(_REPO / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result
