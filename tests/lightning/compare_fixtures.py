"""A tiny user project for the ``pb-lightning compare`` tests: a PerforatedModule with a width
argument and synthetic data modules with and without a test split (a fit takes about a second)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from pb_lightning import PerforatedModule


class TinyDataNoTest(pl.LightningDataModule):
    """Three classes of noisy points in 8 dimensions; train and validation splits only."""

    def __init__(self, size: int = 384) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        centres = torch.randn(3, 8, generator=generator)
        y = torch.randint(0, 3, (size,), generator=generator)
        x = centres[y] + 1.2 * torch.randn(size, 8, generator=generator)
        third = size // 3
        self.splits = {
            "train": TensorDataset(x[:third], y[:third]),
            "val": TensorDataset(x[third : 2 * third], y[third : 2 * third]),
            "test": TensorDataset(x[2 * third :], y[2 * third :]),
        }

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["train"], batch_size=32, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=256)


class TinyData(TinyDataNoTest):
    """The same data, with a test split."""

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=256)


class TinyMLP(PerforatedModule):
    """8 → width → 3, with a width argument for ``--width-arg model.init_args.width``."""

    def __init__(self, width: int = 4, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 3))
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.dendrite_parameter_groups(), lr=self.lr)
