"""Small modules and helpers shared by several test files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
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


def fast_trainer(root: Path, callbacks: list[pl.Callback], max_epochs: int, **kwargs: Any) -> pl.Trainer:
    """A quiet Trainer for tests: no logger, bar, summary, sanity check or checkpoints unless asked."""
    options: dict[str, Any] = {
        "default_root_dir": root,
        "max_epochs": max_epochs,
        "callbacks": callbacks,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
    }
    options.update(kwargs)
    return pl.Trainer(**options)
