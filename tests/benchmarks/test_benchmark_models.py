"""The accuracy benchmark's conv models and data loaders, checked without running the benchmark.

The CI suite runs ``accuracy.py --quick`` on digits and spirals only (MNIST-1D needs the ``bench``
extra and Fashion-MNIST a Debian package). These tests keep the other benchmarks' models honest
on random inputs — each grows a dendrite set through its ``PerforatedModule`` and stays
function-preserving — and check the loaders' shapes wherever their data is installed.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import pb_lightning as pb

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

models = pytest.importorskip("models")


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: models.CNN1D(channels=4), (5, 1, 40)),
        (lambda: models.FashionCNN(channels=4), (5, 1, 28, 28)),
        (lambda: models.MLP(40, 8, depth=2), (5, 40)),
    ],
)
def test_benchmark_model_grows_a_dendrite_set_without_changing_its_outputs(
    make: Callable[[], torch.nn.Module], shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    model = make()
    model.configure_model()  # what the Trainer calls: swaps in the perforated layers
    x = torch.randn(shape)
    model.eval()
    before = model(x)
    assert before.shape == (shape[0], 10)
    layers = pb.perforated_layers(model)
    assert len(layers) >= 3  # every conv/linear layer, the head included
    pb.start_dendrite_phase(model, num_candidates=2)
    model.train()
    optimizer = model.configure_optimizers()  # rebuilt after the restructure, as the callback does
    target = torch.arange(shape[0]) % 10
    for _ in range(pb.DendriteConfig().warmup_steps + 3):  # candidates learn once the warm-up is over
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "no candidate learned anything"
        pb.accept_dendrites(model)
    model.eval()
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    assert all(layer.num_dendrites == 1 for layer in layers)


@pytest.mark.skipif(not models.FASHION_ROOT.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fashion_loader_reads_the_debian_package() -> None:
    x_train, y_train, x_test, y_test = models.fashion_arrays()
    assert x_train.shape == (60000, 1, 28, 28)
    assert x_test.shape == (10000, 1, 28, 28)
    assert float(x_train.min()) >= 0.0
    assert float(x_train.max()) <= 1.0
    assert sorted(set(y_train.tolist())) == list(range(10))
    assert (y_test == 0).sum() == 1000  # the test set is balanced: 1,000 per class


@pytest.mark.skipif(importlib.util.find_spec("mnist1d") is None, reason="mnist1d (the bench extra) is not installed")
def test_mnist1d_loader_generates_the_published_split_and_restores_global_rngs() -> None:
    import random

    import numpy as np

    random.seed(7)
    np.random.seed(7)
    expected = (random.random(), np.random.rand())
    random.seed(7)
    np.random.seed(7)
    models.mnist1d_arrays.cache_clear()
    x_train, y_train, x_test, y_test = models.mnist1d_arrays()
    assert (random.random(), np.random.rand()) == expected
    assert x_train.shape == (4000, 40)
    assert x_test.shape == (1000, 40)
    assert sorted(set(y_train.tolist())) == list(range(10))
