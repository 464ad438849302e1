"""perforate(): which modules it wraps, and the errors it gives when it cannot."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import pytest
import torch
from torch import nn

from pb_lightning import (
    PerforatedLayer,
    PerforationError,
    accept_dendrites,
    perforate,
    perforated_layers,
    perforation_summary,
    start_dendrite_phase,
)
from tests.helpers import Mixer


class Block(nn.Module):
    """A model that calls its layers in forward (no nn.Sequential to infer pairs from)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.ReLU()), nn.Conv1d(1, 2, 3), nn.Linear(8, 2)
    )


def test_default_wraps_every_linear_and_conv_in_a_stable_order() -> None:
    model = perforate(_mlp())
    names = [layer.name for layer in perforated_layers(model)]
    assert names == ["0", "2.0", "3", "4"]
    assert [layer.num_neurons for layer in perforated_layers(model)] == [8, 8, 2, 2]
    assert all(layer.num_dendrites == 0 for layer in perforated_layers(model))
    # Attribute access passes through to the wrapped module.
    assert model[0].out_features == 8
    assert model[0].weight is model[0].module.weight


def test_a_perforated_model_without_dendrites_computes_the_same_function() -> None:
    plain = Block()
    x = torch.randn(2, 3, 6, 6)
    expected = plain(x)
    assert torch.equal(perforate(plain)(x), expected)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"include": nn.Conv2d}, ["conv"]),
        ({"include": "head"}, ["head"]),
        ({"include": ["co*", nn.Linear]}, ["conv", "head"]),
        ({"include": lambda module, name: name.startswith("h")}, ["head"]),
        ({"exclude": "head"}, ["conv"]),
        ({"exclude": [nn.Conv2d]}, ["head"]),
        ({"include": [nn.Conv2d, nn.Linear], "exclude": lambda m, n: isinstance(m, nn.Linear)}, ["conv"]),
    ],
)
def test_include_and_exclude_take_types_globs_and_filters(kwargs: dict, expected: list[str]) -> None:
    model = perforate(Block(), **kwargs)
    assert [layer.name for layer in perforated_layers(model)] == expected


def test_nothing_matched_is_refused() -> None:
    with pytest.raises(PerforationError, match=r"found no module to wrap in Block.*include="):
        perforate(Block(), include="does_not_exist")


def test_a_module_is_never_wrapped_twice() -> None:
    model = perforate(Block(), include="conv")
    perforate(model)  # adds `head`, leaves `conv` alone
    layers = perforated_layers(model)
    assert [layer.name for layer in layers] == ["conv", "head"]
    assert not isinstance(layers[0].module, PerforatedLayer)
    with pytest.raises(PerforationError, match=r"already has 2 perforated layers.*does not wrap a module twice"):
        perforate(model)


def test_the_root_itself_cannot_be_the_layer_to_wrap() -> None:
    with pytest.raises(PerforationError, match=r"model itself \(Linear\).*nn.Sequential"):
        perforate(nn.Linear(3, 3))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"include": 3}, r"`include` must be a module type.*got 3"),
        ({"exclude": [int]}, r"`exclude` must be a module type.*got <class 'int'>"),
        ({"config": {"num_candidates": 2}}, r"`config` must be a pb_lightning.DendriteConfig"),
        ({"with_norm": "auto"}, r"`with_norm` must be a bool or a mapping"),
        ({"with_norm": {"conv": "nope"}}, r"`with_norm` must be qualified names.*'nope'"),
        ({"with_norm": {"conv": "head"}}, r"with_norm\['conv'\].*normalisation layer"),
        ({"include": Mixer}, r"`mix`.*neuron_axes=\{Mixer: -1\}"),
    ],
)
def test_bad_arguments_name_the_argument_and_what_is_valid(kwargs: dict, pattern: str) -> None:
    model = Block()
    model.mix = Mixer()
    with pytest.raises(PerforationError, match=pattern):
        perforate(model, **kwargs)


def test_custom_modules_need_reset_parameters_and_no_buffers() -> None:
    class NoReset(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale

    holder = nn.Sequential(NoReset())
    with pytest.raises(PerforationError, match=r"no `reset_parameters\(\)`"):
        perforate(holder, neuron_axes={NoReset: -1})
    with_buffer = nn.Sequential(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    with pytest.raises(PerforationError, match=r"has buffers \['1.running_mean'"):
        perforate(with_buffer, include=["0"], neuron_axes={"0": -1})


def test_custom_module_with_a_named_neuron_axis_learns_its_neuron_count_on_first_forward() -> None:
    model = nn.Sequential(Mixer(), nn.Linear(6, 2))
    perforate(model, include=[Mixer], neuron_axes={Mixer: -1})
    layer = perforated_layers(model)[0]
    assert layer.name == "0"
    assert layer.num_neurons is None
    assert "Mixer: neurons counted at its first forward, 0 dendrite sets" in perforation_summary(model)
    model(torch.randn(3, 5))
    assert layer.num_neurons == 6
    assert "Mixer: 6 neurons" in perforation_summary(model)


def test_lazy_modules_are_refused_until_materialised() -> None:
    with pytest.raises(PerforationError, match=r"lazy module"):
        perforate(nn.Sequential(nn.LazyLinear(3)))


def test_with_norm_pairs_a_module_with_the_norm_after_it() -> None:
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
    bn = seq[1]
    perforate(seq, with_norm=True)
    assert seq[0].norm is bn
    assert isinstance(seq[1], nn.Identity)
    assert seq[3].norm is None  # no norm follows it
    block = Block()
    bn = block.bn
    perforate(block, with_norm={"conv": "bn"})
    assert block.conv.norm is bn
    assert isinstance(block.bn, nn.Identity)
    assert block.head.norm is None


def test_multihead_attention_projections_are_perforated_by_default() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    model.attn = nn.MultiheadAttention(4, 2)
    perforate(model)
    assert [layer.name for layer in perforated_layers(model)] == [
        "0",
        "attn.q_proj",
        "attn.k_proj",
        "attn.v_proj",
        "attn.out_proj",
    ]


class _TwoParents(nn.Module):
    """Two blocks that hold the same Linear (or, with ``container=True``, the same Sequential)."""

    def __init__(self, container: bool = False) -> None:
        super().__init__()
        shared: nn.Module = nn.Linear(4, 4)
        if container:
            shared = nn.Sequential(shared)
        self.a = nn.Sequential(shared, nn.ReLU())
        self.b = nn.Sequential(shared)
        self.head = nn.Linear(4, 2)


class _TwoNames(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = self.first
        self.head = nn.Linear(4, 2)


@pytest.mark.parametrize(
    ("model", "name", "other"),
    [
        (_TwoParents(), "a.0", "b.0"),
        (_TwoParents(container=True), "a.0.0", "b.0.0"),
        (_TwoNames(), "first", "second"),
    ],
    ids=["two-parents", "shared-container", "registered-twice"],
)
def test_a_module_with_two_names_is_refused_naming_both(model: nn.Module, name: str, other: str) -> None:
    before = [type(m) for m in model.modules()]
    with pytest.raises(PerforationError, match=rf"`{name}` is also reachable as `{other}`"):
        perforate(model)
    assert [type(m) for m in model.modules()] == before  # nothing half converted
    assert not any(isinstance(m, PerforatedLayer) for m in model.modules())


def test_a_shared_module_excluded_under_every_name_is_no_error() -> None:
    with pytest.raises(PerforationError, match=r"`a.0` is also reachable as `b.0`"):
        perforate(_TwoParents(), exclude="b.*")  # still selected as a.0
    model = perforate(_TwoParents(), exclude=["a.0", "b.0"])
    assert [layer.name for layer in perforated_layers(model)] == ["head"]


def test_a_norm_with_two_names_or_paired_twice_is_refused() -> None:
    block = Block()
    block.bn_alias = block.bn
    with pytest.raises(PerforationError, match=r"`bn` is also reachable as `bn_alias`"):
        perforate(block, with_norm={"conv": "bn"})
    seq = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(PerforationError, match=r"`with_norm` must be a mapping that pairs each norm with one module"):
        perforate(seq, with_norm={"0": "2", "1": "2"})


class _TupleOut(nn.Module):
    """A custom module that returns more than its neurons, as many blocks do."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.proj(x)
        return y, y.sum()


class _Named(NamedTuple):
    hidden: torch.Tensor
    aux: torch.Tensor


class _NamedTupleOut(_TupleOut):
    def forward(self, x: torch.Tensor) -> _Named:  # type: ignore[override]
        y = self.proj(x)
        return _Named(y, y.sum())


@dataclasses.dataclass
class _Output:
    hidden: torch.Tensor


class _DataclassOut(_TupleOut):
    def forward(self, x: torch.Tensor) -> _Output:  # type: ignore[override]
        return _Output(self.proj(x))


class _ScalarOut(_TupleOut):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.proj(x).sum()


@pytest.mark.parametrize(
    ("module", "described"),
    [
        (_TupleOut, r"tuple of 2 entries"),
        (_NamedTupleOut, r"_Named with fields \['hidden', 'aux'\]"),
        (_DataclassOut, r"_Output with fields \['hidden'\]"),
    ],
)
def test_a_custom_output_that_is_not_a_tensor_names_output_selectors(module: type[nn.Module], described: str) -> None:
    model = perforate(nn.Sequential(module()), include=[module], neuron_axes={module: -1})
    pattern = rf"returned {described}, not a tensor.*output_selectors=\{{{module.__name__}:"
    with pytest.raises(PerforationError, match=pattern):
        model(torch.randn(3, 5))


@pytest.mark.parametrize("module", [_NamedTupleOut, _DataclassOut])
def test_a_field_name_selects_the_neurons_of_a_named_tuple_or_dataclass_output(module: type[nn.Module]) -> None:
    model = perforate(
        nn.Sequential(module()), include=[module], neuron_axes={module: -1}, output_selectors={module: "hidden"}
    )
    x = torch.randn(3, 5)
    model(x)
    start_dendrite_phase(model)
    for _ in range(6):
        model(x).hidden.square().sum().backward()
    accept_dendrites(model)
    perforated_layers(model)[0].output_weight.data.fill_(0.5)
    out = model(x)
    assert type(out) is type(module()(x))
    assert not torch.allclose(out.hidden, model[0].module(x).hidden)  # the dendrites reach the field


def test_a_custom_module_with_a_scalar_output_is_named() -> None:
    model = perforate(nn.Sequential(_ScalarOut()), include=[_ScalarOut], neuron_axes={_ScalarOut: -1})
    with pytest.raises(PerforationError, match=r"`0` \(_ScalarOut\): its output is a scalar .*exclude"):
        model(torch.randn(3, 5))
