"""Ready-made models and data for the main job, the examples and the tests.

scikit-learn's handwritten digits (1,797 8×8 images, bundled with scikit-learn, no download)
with an MLP and a small conv net, both :class:`~pb_lightning.lightning.module.PerforatedModule`\\ s.
scikit-learn is imported only when the data is set up (``pip install pb_lightning[examples]``).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from pb_lightning.engine.config import DendriteConfig
from pb_lightning.errors import invalid
from pb_lightning.lightning.module import PerforatedModule


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's digits, split 60/20/20 with a fixed seed, pixels scaled to [0, 1].

    Args:
        batch_size: training batch size.
        flat: give ``[B, 64]`` vectors (MLP) instead of ``[B, 1, 8, 8]`` images (conv net).
        seed: the split's seed (independent of the training seed).
    """

    def __init__(self, batch_size: int = 64, flat: bool = True, seed: int = 0) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise invalid("batch_size", batch_size, "an int >= 1")
        self.batch_size = batch_size
        self.flat = flat
        self.seed = seed
        self._splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        inputs = torch.tensor(x / 16.0, dtype=torch.float32)
        if not self.flat:
            inputs = inputs.view(-1, 1, 8, 8)
        targets = torch.tensor(y, dtype=torch.long)
        order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(self.seed))
        n_train, n_val = int(0.6 * len(order)), int(0.2 * len(order))
        parts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
        self._splits = {k: TensorDataset(inputs[i], targets[i]) for k, i in parts.items()}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._splits["train"], batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._splits["val"], batch_size=512)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._splits["test"], batch_size=512)


class DigitsClassifier(PerforatedModule):
    """Shared training logic: cross-entropy, accuracy, Adam over the current phase's groups.

    Candidates train with ``candidate_lr`` (default ten times ``lr``, as docs/ALGORITHM.md §7 found).
    """

    def __init__(
        self,
        net: nn.Module,
        lr: float,
        candidate_lr: float | None,
        weight_decay: float,
        dendrites: DendriteConfig | None,
        with_norm: bool = False,
    ) -> None:
        super().__init__(dendrite_config=dendrites, with_norm=with_norm)
        for name, value in (("lr", lr), ("weight_decay", weight_decay)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise invalid(name, value, "a float >= 0")
        self.net = net
        self.lr = lr
        self.candidate_lr = 10 * lr if candidate_lr is None else candidate_lr
        self.weight_decay = weight_decay
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=10)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=10)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self) -> Any:
        groups = self.dendrite_parameter_groups(weight_decay=self.weight_decay, candidate_lr=self.candidate_lr)
        return torch.optim.Adam(groups, lr=self.lr)


class DigitsMLP(DigitsClassifier):
    """64 → hidden → hidden → 10 MLP. Narrow widths are where dendrites help most (docs/ALGORITHM.md §7).

    Args:
        hidden: width of the two hidden layers.
        lr: Adam learning rate of the neuron phase.
        candidate_lr: Adam learning rate of the candidates (default ``10 * lr``).
        weight_decay: weight decay (never applied to dendrite output weights).
        dendrites: the dendrite configuration.
    """

    def __init__(
        self,
        hidden: int = 16,
        lr: float = 1e-3,
        candidate_lr: float | None = None,
        weight_decay: float = 0.0,
        dendrites: DendriteConfig | None = None,
    ) -> None:
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise invalid("hidden", hidden, "an int >= 1")
        net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )
        super().__init__(net, lr, candidate_lr, weight_decay, dendrites)
        self.save_hyperparameters()


class DigitsConvNet(DigitsClassifier):
    """A small conv net on the 8×8 digit images: two Conv2d + BatchNorm blocks and a linear head.

    Each conv is perforated together with its BatchNorm (dendrites are added after the norm).

    Args:
        channels: channels of both conv layers.
        lr, candidate_lr, weight_decay, dendrites: as for :class:`DigitsMLP`.
    """

    def __init__(
        self,
        channels: int = 8,
        lr: float = 1e-3,
        candidate_lr: float | None = None,
        weight_decay: float = 0.0,
        dendrites: DendriteConfig | None = None,
    ) -> None:
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise invalid("channels", channels, "an int >= 1")
        net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(4 * channels, 10),
        )
        super().__init__(net, lr, candidate_lr, weight_decay, dendrites, with_norm=True)
        self.save_hyperparameters()
