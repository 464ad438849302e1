"""perforate(with_norm=True): which norms are paired with the module they follow, and which are not."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import Tensor, nn

import pb_lightning as pb

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, written out: norms held as attributes, a residual addition."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class _PreNorm(nn.Module):
    """The norm is registered after the layer but applied before it: pairing would change the function."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.norm(x))


class _SharedOutput(nn.Module):
    """The layer's output feeds its norm and a skip connection: the norm is not applied to it alone."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)

    def forward(self, x: Tensor) -> Tensor:
        y = self.proj(x)
        return self.norm(y) + y


def _outputs(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    model.train()
    train = model(x)
    model.eval()
    with torch.no_grad():
        return train, model(x)


def test_with_norm_true_pairs_the_norms_a_residual_block_applies_to_its_convs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(BasicBlock())
    x = torch.randn(3, 4, 5, 5)
    reference = _outputs(copy.deepcopy(model), x)
    norms = {name: model[0].get_submodule(name) for name in ("bn1", "bn2", "downsample.1")}
    pb.perforate(model, with_norm=True)
    layers = {layer.name: layer for layer in pb.perforated_layers(model)}
    assert layers["0.conv1"].norm is norms["bn1"]
    assert layers["0.conv2"].norm is norms["bn2"]
    assert layers["0.downsample.0"].norm is norms["downsample.1"]
    assert isinstance(model[0].bn1, nn.Identity)
    for got, expected in zip(_outputs(model, x), reference, strict=True):  # the same function
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("block", [_PreNorm, _SharedOutput])
def test_with_norm_true_does_not_pair_what_would_change_the_function(block: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(block())
    x = torch.randn(3, 6)
    reference = _outputs(copy.deepcopy(model), x)
    with pytest.warns(UserWarning, match=r"with_norm=True\) found no normalisation layer to pair"):
        pb.perforate(model, with_norm=True)
    assert pb.perforated_layers(model)[0].norm is None
    assert isinstance(model[0].norm, nn.LayerNorm)
    for got, expected in zip(_outputs(model, x), reference, strict=True):
        torch.testing.assert_close(got, expected)


def test_the_pairs_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="pb_lightning"):
        pb.perforate(nn.Sequential(BasicBlock()), with_norm=True)
    assert "Wrapped together with their norms: 0.conv1 + 0.bn1, 0.conv2 + 0.bn2" in caplog.text
