"""Data sets and models for the accuracy and compression benchmarks (``benchmarks/accuracy.py``).

Every data set loads offline and writes no file (see ``../shared/DATASETS.md``):

* **two-spirals**: generated from a fixed seed, independent of the training seed, so every
  run of every variant sees the same points;
* **MNIST-1D**: regenerated with ``mnist1d.data.make_dataset`` (never ``get_dataset``, which
  tries to download and writes a pickle into the working directory). ``make_dataset`` reseeds
  Python's and NumPy's global RNGs, so the data is generated before the run is seeded;
* **Fashion-MNIST**: the Debian package ``dataset-fashion-mnist`` (gz IDX files), read with numpy.

Each data set keeps an in-memory copy per process (no cache on disk), split once into
train/val/test with a fixed seed: validation decides (dendrite cycles, early stopping), test only
reports. Each model is a :class:`~pb_lightning.PerforatedModule` with the same training logic
(cross-entropy, accuracy, Adam over :meth:`dendrite_parameter_groups`), so a variant differs from
another only in its width or its dendrites.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torchmetrics
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from pb_lightning import DendriteConfig, PerforatedModule

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, y_train, x_test, y_test


# ---------------------------------------------------------------------------------------------- data
@cache
def spirals_arrays(n_per_class: int = 1000, noise: float = 0.03, turns: float = 2.0, seed: int = 1234) -> Arrays:
    """Two interleaved spirals (the classic Cascade-Correlation task), 2-D points, 2 classes.

    ``turns`` turns each, the radius growing linearly to 1, so neighbouring arms of the two classes
    lie ``1 / (2 * turns)`` apart; Gaussian noise of standard deviation ``noise`` on each
    coordinate keeps a little irreducible error. Points are drawn uniformly over the area (square
    root of a uniform), so the dense centre is not over-represented. The test part is the first
    20% of a fixed permutation; the seed is the data's own, never the training seed.
    """
    rng = np.random.default_rng(seed)
    t = np.sqrt(rng.uniform(0.0, 1.0, size=2 * n_per_class)) * turns * 2 * np.pi
    labels = np.repeat([0, 1], n_per_class)
    angle = t + np.pi * labels
    radius = t / (turns * 2 * np.pi)
    x = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    x += rng.normal(scale=noise, size=x.shape)
    order = rng.permutation(len(labels))
    x, labels = x[order].astype(np.float32), labels[order]
    n_test = len(labels) // 5
    return x[n_test:], labels[n_test:], x[:n_test], labels[:n_test]


@cache
def mnist1d_arrays() -> Arrays:
    """MNIST-1D as published (4000 train, 1000 test, length 40), generated offline.

    The global Python/NumPy RNG state is saved and restored around ``make_dataset``, which
    reseeds both.
    """
    import random

    from mnist1d.data import get_dataset_args, make_dataset

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return (
        data["x"].astype(np.float32),
        np.asarray(data["y"]),
        data["x_test"].astype(np.float32),
        np.asarray(data["y_test"]),
    )


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@cache
def fashion_arrays() -> Arrays:
    """Fashion-MNIST 60k/10k from the Debian package, pixels scaled to [0, 1], shape [N, 1, 28, 28]."""
    if not FASHION_ROOT.is_dir():
        raise FileNotFoundError(
            f"{FASHION_ROOT} is missing: `apt-get update && apt-get install -y dataset-fashion-mnist`"
        )

    def images(name: str) -> np.ndarray:
        return (_read_idx(FASHION_ROOT / name).astype(np.float32) / 255.0)[:, None]

    return (
        images("train-images-idx3-ubyte.gz"),
        _read_idx(FASHION_ROOT / "train-labels-idx1-ubyte.gz").astype(np.int64),
        images("t10k-images-idx3-ubyte.gz"),
        _read_idx(FASHION_ROOT / "t10k-labels-idx1-ubyte.gz").astype(np.int64),
    )


@cache
def digits_arrays() -> Arrays:
    """scikit-learn digits split 80/20 (train+val / test) with a fixed seed, pixels in [0, 1]."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = (x[order] / 16.0).astype(np.float32), y[order]
    n_test = len(y) // 5
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def _test_first(x: np.ndarray, y: np.ndarray) -> Arrays:
    """Real-valued targets as float32, the first 20% held out as the test part."""
    x, y = x.astype(np.float32), y.astype(np.float32)
    n_test = len(y) // 5
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


@cache
def friedman_arrays(n: int = 3000, noise: float = 1.0, seed: int = 1234) -> Arrays:
    """Friedman #1 regression (``sklearn.datasets.make_friedman1``): 10 uniform inputs, 5 of them used.

    ``y = 10 sin(pi x1 x2) + 20 (x3 - 0.5)^2 + 10 x4 + 5 x5 + noise``: a multiplicative interaction,
    a quadratic and linear terms, the classic test of adaptive regression methods (MARS). The
    targets stay real numbers (float32); the test part is the first 20%; the seed is the data's own.
    """
    from sklearn.datasets import make_friedman1

    return _test_first(*make_friedman1(n_samples=n, n_features=10, noise=noise, random_state=seed))


@cache
def friedman3_arrays(n: int = 3000, noise: float = 0.1, seed: int = 1234) -> Arrays:
    """Friedman #3 regression (``sklearn.datasets.make_friedman3``): 4 inputs on physical ranges.

    ``y = arctan((x2 x3 - 1 / (x2 x4)) / x1) + noise`` (the phase angle of an AC circuit): a
    smooth, strongly nonlinear target of all four inputs. The target's standard deviation is about
    0.32, so ``noise = 0.1`` leaves roughly 9% of the variance unexplainable. Split as
    :func:`friedman_arrays`.
    """
    from sklearn.datasets import make_friedman3

    return _test_first(*make_friedman3(n_samples=n, noise=noise, random_state=seed))


@cache
def diabetes_arrays() -> Arrays:
    """scikit-learn's diabetes data (bundled, real): 442 patients, 10 baseline variables, disease
    progression after one year; shuffled with a fixed seed, the test part the first 20%."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    return _test_first(x[order], y[order])


LOADERS: dict[str, Callable[[], Arrays]] = {
    "digits": digits_arrays,
    "friedman": friedman_arrays,
    "friedman3": friedman3_arrays,
    "diabetes": diabetes_arrays,
    "spirals": spirals_arrays,
    "mnist1d": mnist1d_arrays,
    "fashion": fashion_arrays,
}


class ArrayDataModule(pl.LightningDataModule):
    """Train/val/test loaders over one of :data:`LOADERS`' data sets.

    The validation part is the last ``val_fraction`` of the training arrays (their order is
    already a fixed permutation, or the data set's own fixed order), so it never changes with
    the training seed. Inputs are standardised with the training part's statistics (per feature
    for vectors, one global mean/std for images); real-valued (regression) targets are
    standardised the same way, integer class labels are kept.

    Args:
        name: a key of :data:`LOADERS`.
        batch_size: training batch size.
        val_fraction: share of the training arrays held out for validation.
        image_shape: reshape the inputs to this per-example shape (e.g. ``(1, 40)`` for a 1-D CNN).
        limit_train: keep only the first N training examples (Fashion-MNIST on a small budget).
    """

    def __init__(
        self,
        name: str,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        image_shape: Sequence[int] | None = None,
        limit_train: int | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self.limit_train = limit_train
        self._splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        x_train, y_train, x_test, y_test = LOADERS[self.name]()
        n_val = int(len(y_train) * self.val_fraction)
        x_fit, y_fit = x_train[:-n_val], y_train[:-n_val]
        x_val, y_val = x_train[-n_val:], y_train[-n_val:]
        if self.limit_train is not None:
            x_fit, y_fit = x_fit[: self.limit_train], y_fit[: self.limit_train]
        if x_fit.ndim == 2:
            mean, std = x_fit.mean(0), x_fit.std(0) + 1e-6
        else:
            mean, std = x_fit.mean(), x_fit.std() + 1e-6

        regression = np.issubdtype(np.asarray(y_fit).dtype, np.floating)
        y_mean, y_std = (float(y_fit.mean()), float(y_fit.std())) if regression else (0.0, 1.0)

        def tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
            inputs = torch.from_numpy(((x - mean) / std).astype(np.float32))
            if self.image_shape is not None:
                inputs = inputs.reshape(-1, *self.image_shape)
            if regression:
                return TensorDataset(inputs, torch.from_numpy(((y - y_mean) / y_std).astype(np.float32)))
            return TensorDataset(inputs, torch.from_numpy(np.asarray(y, dtype=np.int64)))

        self._splits = {
            "train": tensors(x_fit, y_fit),
            "val": tensors(x_val, y_val),
            "test": tensors(x_test, y_test),
        }

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._splits["train"], batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._splits["val"], batch_size=1024)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._splits["test"], batch_size=1024)


# -------------------------------------------------------------------------------------------- models
class BenchClassifier(PerforatedModule):
    """Shared training logic of every benchmark model: cross-entropy, accuracy, Adam.

    Candidates learn at ``10 * lr`` (ALGORITHM.md §7); dendrite output weights never get weight
    decay (``dendrite_parameter_groups``). The optimizer is rebuilt from the current parameters
    on every call, as :class:`~pb_lightning.PerforatedCallback` requires.
    """

    def __init__(self, net: nn.Module, num_classes: int, lr: float, dendrites: DendriteConfig | None) -> None:
        super().__init__(dendrite_config=dendrites, with_norm=_has_norm(net))
        self.net = net
        self.lr = lr
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.dendrite_parameter_groups(candidate_lr=10 * self.lr), lr=self.lr)


def _has_norm(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


class MLP(BenchClassifier):
    """``in_features → hidden × depth → num_classes`` with ReLU: the narrow MLPs of the benchmark.

    Args:
        in_features: input size.
        hidden: width of every hidden layer.
        depth: number of hidden layers.
        num_classes: output size.
        lr: Adam learning rate (candidates use ten times it).
        dendrites: the dendrite configuration (``None``: the default correlation learning).
    """

    def __init__(
        self,
        in_features: int,
        hidden: int,
        depth: int = 2,
        num_classes: int = 10,
        lr: float = 1e-2,
        dendrites: DendriteConfig | None = None,
    ) -> None:
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        super().__init__(nn.Sequential(*layers), num_classes, lr, dendrites)


class CNN1D(BenchClassifier):
    """The MNIST-1D reference CNN (greydanus/mnist1d ``notebooks/models.py``) at a chosen width.

    Conv1d(1, c, 5, s2, p1) → Conv1d(c, c, 3, s2, p1) ×2 → Linear(5c, 10), ReLU between.
    ``channels=25`` is the reference (5,210 parameters).
    """

    def __init__(
        self, channels: int = 25, num_classes: int = 10, lr: float = 1e-2, dendrites: DendriteConfig | None = None
    ) -> None:
        net = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(5 * channels, num_classes),
        )
        super().__init__(net, num_classes, lr, dendrites)


class FashionCNN(BenchClassifier):
    """A small Fashion-MNIST conv net: two conv + max-pool blocks and a linear head."""

    def __init__(
        self, channels: int = 8, num_classes: int = 10, lr: float = 1e-3, dendrites: DendriteConfig | None = None
    ) -> None:
        net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * channels * 7 * 7, num_classes),
        )
        super().__init__(net, num_classes, lr, dendrites)
