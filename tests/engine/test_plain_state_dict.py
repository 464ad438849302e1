"""A trained network without dendrites: perforating it keeps its function, and its plain state
dict loads into the perforated model (issue 26: dendrites on a trained network)."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable

import pytest
import torch
from torch import nn

import pb_lightning as pb

_Make = Callable[[], nn.Module]


class _Block(nn.Module):
    """A ResNet-like block whose norm is an attribute (paired by tracing), with a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn1(self.conv1(x))).mean((2, 3)))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _trained(make: _Make, x: torch.Tensor) -> nn.Module:
    """A network with non-default weights and running statistics, as a trained one has."""
    torch.manual_seed(1)
    model = make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    return model


_CASES = [
    pytest.param(_mlp, torch.randn(16, 4), {"with_norm": True}, id="sequential-norm"),
    pytest.param(_mlp, torch.randn(16, 4), {}, id="sequential"),
    pytest.param(_Block, torch.randn(6, 1, 5, 5), {"with_norm": True}, id="traced-norm"),
    pytest.param(
        lambda: nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), nn.Linear(8, 3)),
        torch.randn(2, 5, 8),
        {},
        id="attention",
    ),
]


def _same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    """Outputs agree in eval mode and in train mode (batch statistics; norms then update alike)."""
    for train in (False, True):
        a.train(train)
        b.train(train)
        with torch.no_grad():
            torch.testing.assert_close(a(x), b(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("make", "x", "options"), _CASES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_perforating_a_trained_network_keeps_its_function(
    make: _Make, x: torch.Tensor, options: dict, mode: str
) -> None:
    plain = _trained(make, x)
    model = copy.deepcopy(plain).train(mode == "train")  # whatever mode it was left in
    pb.perforate(model, **options)
    _same_outputs(model, plain, x)


@pytest.mark.parametrize(("make", "x", "options"), _CASES)
def test_a_plain_state_dict_loads_after_perforation(make: _Make, x: torch.Tensor, options: dict) -> None:
    plain = _trained(make, x)
    torch.manual_seed(2)
    model = pb.perforate(make(), **options)
    result = model.load_state_dict(plain.state_dict())  # strict: every key found its place
    assert not result.missing_keys
    assert not result.unexpected_keys
    if options.get("with_norm"):  # the norm really moved into a layer, so its keys were mapped
        assert any(layer.norm is not None for layer in pb.perforated_layers(model))
    _same_outputs(model, plain, x)
    # The perforated model's own state dict still round-trips untouched.
    fresh = pb.perforate(make(), **options)
    fresh.load_state_dict(model.state_dict())
    _same_outputs(fresh, plain, x)


def test_the_mapping_survives_deepcopy_and_pickle_and_works_from_a_submodule() -> None:
    x = torch.randn(16, 4)
    plain = _trained(_mlp, x)
    model = pb.perforate(nn.Sequential(_mlp()), with_norm=True)  # the network one level down
    for copy_of in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        copy_of[0].load_state_dict(plain.state_dict())  # loaded into the submodule itself
        _same_outputs(copy_of[0], plain, x)
    model.load_state_dict({f"0.{k}": v for k, v in plain.state_dict().items()})  # and from the root
    _same_outputs(model[0], plain, x)


def test_a_plain_state_dict_replaces_accepted_dendrites() -> None:
    # Loading the plain network's weights gives the plain network, as any state dict of a layer
    # without dendrites does (the rollback of a rejected cycle relies on the same rule).
    x = torch.randn(16, 4)
    plain = _trained(_mlp, x)
    model = pb.perforate(_mlp(), with_norm=True)
    pb.start_dendrite_phase(model)
    pb.accept_dendrites(model)
    assert [layer.num_dendrites for layer in pb.perforated_layers(model)] == [1, 1]
    model.load_state_dict(plain.state_dict())
    assert [layer.num_dendrites for layer in pb.perforated_layers(model)] == [0, 0]
    _same_outputs(model, plain, x)


def test_a_plain_state_dict_of_another_shape_fails_as_in_torch() -> None:
    model = pb.perforate(_mlp())
    wrong = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2)).state_dict()
    with pytest.raises(RuntimeError, match=r"size mismatch for 0\.module\.weight"):
        model.load_state_dict(wrong)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "9\.weight"'):
        model.load_state_dict({**_mlp().state_dict(), "9.weight": torch.zeros(1)})


class _Holder(nn.Module):
    """A custom module whose child is called ``module``, like the perforated layer's own."""

    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def test_a_plain_key_that_names_the_layers_own_parts_is_refused_with_what_to_do() -> None:
    plain = nn.Sequential(_Holder())
    model = pb.perforate(nn.Sequential(_Holder()), include=[_Holder], neuron_axes={_Holder: -1})
    with pytest.raises(RuntimeError, match=r"plain keys \['0.module.bias', '0.module.weight'\] .* before perforating"):
        model.load_state_dict(plain.state_dict())
    # Loaded before perforation, the same weights just work.
    fresh = nn.Sequential(_Holder())
    fresh.load_state_dict(plain.state_dict())
    pb.perforate(fresh, include=[_Holder], neuron_axes={_Holder: -1})
    x = torch.randn(2, 4)
    torch.testing.assert_close(fresh(x), plain(x), rtol=0, atol=0)


def test_parameters_frozen_before_perforation_stay_frozen_through_a_cycle() -> None:
    # Fine-tuning often freezes part of the trained network; a dendrite cycle unfreezes only what
    # it froze itself.
    model = _mlp()
    model[0].requires_grad_(False)
    pb.perforate(model, with_norm=True)
    pb.start_dendrite_phase(model)
    pb.accept_dendrites(model)
    frozen = sorted(name for name, p in model.named_parameters() if not p.requires_grad)
    assert [n for n in frozen if ".module." in n] == ["0.module.bias", "0.module.weight"]
    assert model[3].module.weight.requires_grad
