"""The forward pass of a perforated layer, checked against a naive reference written here.

ALGORITHM.md §2 defines what a layer with D accepted dendrite sets computes::

    z_d = L_d(x̂) + Σ_{e<d} c_{d,e} ⊙ a_e
    a_d = f(z_d)
    y'  = y + Σ_d w_d ⊙ a_d

The package computes all D operations ``L_d`` as ONE fused operation (interleaved conv groups,
``N·out`` output features, ``vmap`` over module copies) and reads the per-neuron scalars out of
flat, stacked tensors. Those are exactly the places where an indexing mistake yields a layer that
runs, trains and is silently wrong. So every test here rebuilds the layer's output the slow and
obvious way, one dendrite at a time with ``F.linear``/``F.convNd``/``functional_call`` on the
weights of one set, and compares. The reference reads only the documented storage layout:

* ``layer.dendrites.weight[d]``: ``[out, in]`` (Linear) or ``[out, in/groups, *kernel]`` (Conv);
  ``layer.dendrites.bias[d]``: ``[out]``; custom modules: each parameter ``name`` stacked as
  ``layer.dendrites.<name with '.' → '__'>`` of shape ``[D, *param.shape]``.
* ``layer.cascade_weight``: ``[D(D-1)/2, out]``; dendrite d's weights on dendrites ``0..d-1``
  are rows ``d(d-1)/2 .. d(d-1)/2 + d - 1``.
* ``layer.output_weight``: ``[D, out]``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pb_lightning.engine.cascade as cascade_module
from pb_lightning import (
    DendriteConfig,
    PerforatedLayer,
    accept_dendrites,
    perforate,
    perforated_layers,
    start_dendrite_phase,
    trainable_parameters,
)

_ACTIVATION: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
}
_CONV_FN: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TYPE: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
# Small spatial sizes per conv dimensionality, large enough for kernel 3 with dilation 2.
_SPATIAL: dict[int, tuple[int, ...]] = {1: (11,), 2: (7, 8), 3: (5, 6, 5)}
# Float32 throughout: the fused and the per-dendrite ops sum in different orders, nothing more.
_TOL: dict[str, float] = {"rtol": 1e-5, "atol": 1e-5}


# --------------------------------------------------------------------------- building models
def _grow(model: nn.Module, num_dendrites: int) -> None:
    """Give every perforated layer ``num_dendrites`` accepted sets through the public phase API.

    With no candidate training in between, the accepted sets are just freshly initialised
    candidates; their values do not matter because :func:`_randomise` overwrites them.
    """
    for _ in range(num_dendrites):
        start_dendrite_phase(model, num_candidates=2)
        accept_dendrites(model)


def _randomise(model: nn.Module, std: float = 0.5) -> None:
    """Overwrite every accepted-dendrite tensor with noise.

    Right after acceptance the output weights are exactly 0 and the cascade weights of a set
    accepted without training are 0 too, which would make the dendrite part of the output vanish
    and every comparison pass trivially. Noise makes each stored scalar visible in the output.
    """
    with torch.no_grad():
        for layer in perforated_layers(model):
            for p in layer.dendrite_parameters():
                p.normal_(0.0, std)


def _perforated(module: nn.Module, x: Tensor, num_dendrites: int, config: DendriteConfig, **kw: Any) -> PerforatedLayer:
    """``module`` perforated inside a Sequential, run once, grown to D sets and randomised."""
    model = perforate(nn.Sequential(module), config=config, **kw)
    model(x)  # a custom module learns its neuron count from its first forward
    _grow(model, num_dendrites)
    _randomise(model)
    layer = model[0]
    assert isinstance(layer, PerforatedLayer)
    assert layer.num_dendrites == num_dendrites
    return layer


# --------------------------------------------------------------------------- the reference
def _per_neuron(v: Tensor, axis: int, ndim: int) -> Tensor:
    """A ``[out]`` vector shaped to broadcast along ``axis`` of an ``ndim``-D output."""
    return v.reshape([-1 if i == axis else 1 for i in range(ndim)])


def _explicit_padding(conv: nn.Module) -> list[int]:
    """``conv``'s padding written out for ``F.pad`` (last spatial axis first, (left, right)).

    Computed from ``padding``/``kernel_size``/``dilation`` rather than read from the module's
    private cache, so the reference does not share a possible mistake with the package.
    """
    pads: list[int] = []
    for i in reversed(range(len(conv.kernel_size))):
        if conv.padding == "same":
            total = conv.dilation[i] * (conv.kernel_size[i] - 1)
            pads += [total // 2, total - total // 2]
        else:
            pads += [conv.padding[i], conv.padding[i]]
    return pads


def _builtin_op(module: nn.Module, weight: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    """``module``'s own operation (Linear or ConvNd, same hyper-parameters) with other weights."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    conv = _CONV_FN[weight.dim() - 2]
    padding: Any = module.padding
    if module.padding_mode != "zeros":
        x = F.pad(x, _explicit_padding(module), mode=module.padding_mode)
        padding = 0
    return conv(x, weight, bias, module.stride, padding, module.dilation, module.groups)


def _dendrite_op(layer: PerforatedLayer, d: int) -> Callable[[Tensor], Tensor]:
    """``L_d``: the wrapped module's operation with the weights of dendrite set ``d``."""
    module, bank = layer.module, layer.dendrites
    assert bank is not None
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        bias = None if bank.bias is None else bank.bias[d]
        return lambda x: _builtin_op(module, bank.weight[d], bias, x)
    skeleton = copy.deepcopy(module)
    params = {name: getattr(bank, name.replace(".", "__"))[d] for name, _ in module.named_parameters()}
    return lambda x: torch.func.functional_call(skeleton, params, (x,))


def _reference(layer: PerforatedLayer, x: Tensor, *, base: Tensor | None = None) -> Tensor:
    """ALGORITHM.md §2, one dendrite and one cascade term at a time.

    ``base`` is ``y`` (the wrapped module's, or module+norm's, output); by default it is the
    layer's own module applied to ``x``.
    """
    y = layer.module(x) if base is None else base
    axis = layer.neuron_axis % y.dim()
    f = _ACTIVATION[layer.config.activation]
    acts: list[Tensor] = []
    for d in range(layer.num_dendrites):
        z = _dendrite_op(layer, d)(x)
        if layer.config.cascade:
            assert layer.cascade_weight is not None
            for e in range(d):
                z = z + _per_neuron(layer.cascade_weight[d * (d - 1) // 2 + e], axis, z.dim()) * acts[e]
        acts.append(f(z))
    out = y
    assert layer.output_weight is not None
    for d, a in enumerate(acts):
        out = out + _per_neuron(layer.output_weight[d], axis, y.dim()) * a
    return out


def _compare_with_reference(layer: PerforatedLayer, x: Tensor) -> Tensor:
    """The layer's forward against :func:`_reference`, without and with gradients; returns the reference.

    With gradients, the outputs and every gradient (input and each trainable parameter) must
    match too: the no-grad path may take a different (fused, in-place) route than training does.
    Under ``perforation`` the reference's dendrites see ``x.detach()``, as the layer's do.
    """
    module = layer.module
    with torch.no_grad():
        expected = _reference(layer, x)
        torch.testing.assert_close(layer(x), expected, **_TOL)
    x = x.detach().clone().requires_grad_(True)
    named = [(name, p) for name, p in layer.named_parameters() if p.requires_grad]
    dendrite_ids = {id(p) for p in layer.dendrite_parameters()}
    assert any(id(p) in dendrite_ids for _, p in named)  # some dendrite weight trains in this phase
    out = layer(x)
    ref = _reference(layer, x.detach() if layer.config.perforation else x, base=module(x))
    torch.testing.assert_close(out, ref, **_TOL)
    g = torch.randn_like(out)
    inputs = [x, *(p for _, p in named)]
    got = torch.autograd.grad(out, inputs, g, allow_unused=True)
    want = torch.autograd.grad(ref, inputs, g, allow_unused=True)
    for name, a, b in zip(["input", *(n for n, _ in named)], got, want, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, **_TOL, msg=lambda m, name=name: f"gradient of {name}: {m}")
    return expected


def _check_layout(layer: PerforatedLayer, num_neurons: int) -> None:
    """The storage layout the reference relies on (and the docs promise)."""
    d = layer.num_dendrites
    assert layer.output_weight is not None
    assert layer.output_weight.shape == (d, num_neurons)
    if layer.config.cascade:
        assert layer.cascade_weight is not None
        assert layer.cascade_weight.shape == (d * (d - 1) // 2, num_neurons)
    else:
        assert layer.cascade_weight is None


# --------------------------------------------------------------------------- 1. Linear and Conv
def _builtin(kind: str, bias: bool, **conv_kw: Any) -> tuple[nn.Module, Tensor]:
    """A small Linear or ConvNd and an input batch for it."""
    if kind == "linear":
        return nn.Linear(4, 6, bias=bias), torch.randn(3, 4)
    dims = int(kind[-2])
    conv_kw.setdefault("kernel_size", 3)
    module = _CONV_TYPE[dims](4, 6, bias=bias, **conv_kw)
    return module, torch.randn(2, 4, *_SPATIAL[dims])


def _check_forward(kind: str, num_dendrites: int, config: DendriteConfig, bias: bool = True) -> None:
    """Build the layer, check its storage layout, and compare its forward with the reference."""
    module, x = _builtin(kind, bias)
    layer = _perforated(module, x, num_dendrites, config)
    _check_layout(layer, 6)
    bank = layer.dendrites
    assert bank is not None
    assert bank.weight.shape == (num_dendrites, *module.weight.shape)
    assert (bank.bias is None) == (not bias)
    if bias:
        assert bank.bias.shape == (num_dendrites, 6)
    expected = _compare_with_reference(layer, x)
    with torch.no_grad():
        assert not torch.allclose(expected, module(x), **_TOL)  # the dendrites are visible


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "conv3d"])
@pytest.mark.parametrize("num_dendrites", [1, 2, 3, 5])
@pytest.mark.parametrize("cascade", [True, False], ids=["cascade", "no_cascade"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("train_accepted", [False, True], ids=["frozen", "train_accepted"])
def test_forward_matches_per_dendrite_loop(
    kind: str, num_dendrites: int, cascade: bool, bias: bool, train_accepted: bool
) -> None:
    """The fused forward equals the per-dendrite loop for every module type, D, and bias/cascade,
    with gradients too, whether the accepted dendrites are frozen or keep training."""
    config = DendriteConfig(cascade=cascade, train_accepted_dendrites=train_accepted)
    _check_forward(kind, num_dendrites, config, bias)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "conv3d"])
@pytest.mark.parametrize("cascade", [True, False], ids=["cascade", "no_cascade"])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
def test_forward_matches_per_dendrite_loop_for_each_activation(kind: str, cascade: bool, activation: str) -> None:
    """Every activation option is the one applied, at every step of the cascade (D = 3).

    The cascade feeds f(z) of earlier dendrites into later ones, so a wrong f shows twice.
    """
    _check_forward(kind, 3, DendriteConfig(activation=activation, cascade=cascade))  # type: ignore[arg-type]


# Each variant is a function of the number of spatial dims (for per-axis tuples).
_CONV_VARIANTS: dict[str, Callable[[int], dict[str, Any]]] = {
    "groups2": lambda dims: {"groups": 2},
    "stride2": lambda dims: {"stride": 2, "padding": 1},
    "dilation2": lambda dims: {"dilation": 2, "padding": 2},
    "reflect": lambda dims: {"padding": 1, "padding_mode": "reflect"},
    "circular": lambda dims: {"padding": 1, "padding_mode": "circular"},
    # Different padding per axis: catches a padding list applied in the wrong axis order.
    "reflect_per_axis": lambda dims: {"padding": (2, 1, 0)[:dims], "padding_mode": "reflect"},
    "same": lambda dims: {"padding": "same"},
    "same_dilated_reflect": lambda dims: {"padding": "same", "dilation": 2, "padding_mode": "reflect"},
    # An even kernel makes "same" padding asymmetric (one more on the right).
    "same_even_kernel": lambda dims: {"kernel_size": 4, "padding": "same"},
    "same_even_kernel_circular": lambda dims: {"kernel_size": 4, "padding": "same", "padding_mode": "circular"},
    "all_at_once": lambda dims: {"groups": 2, "stride": 2, "dilation": 2, "padding": 2, "padding_mode": "circular"},
}


# The reference's own F.conv with an even kernel and padding="same" warns that it copies the input.
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("kind", ["conv1d", "conv2d", "conv3d"])
@pytest.mark.parametrize("variant", list(_CONV_VARIANTS))
@pytest.mark.parametrize("num_dendrites", [2, 3])
@pytest.mark.parametrize("cascade", [True, False], ids=["cascade", "no_cascade"])
def test_conv_hyperparameters_carry_over_to_dendrites(
    kind: str, variant: str, num_dendrites: int, cascade: bool
) -> None:
    """Dendrites copy the conv's groups/stride/dilation/padding/padding_mode, not just its kernel.

    ``groups=2`` is the subtle one: the fused conv must interleave the D sets inside each group,
    so a wrong layout mixes input channels of one group into another group's neurons.
    """
    module, x = _builtin(kind, True, **_CONV_VARIANTS[variant](int(kind[-2])))
    layer = _perforated(module, x, num_dendrites, DendriteConfig(cascade=cascade, activation="tanh"))
    _check_layout(layer, 6)
    expected = _compare_with_reference(layer, x)
    assert expected.shape == module(x).shape


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("variant", ["plain", "groups2", "stride2", "same_even_kernel_circular", "all_at_once"])
@pytest.mark.parametrize("sets_per_chunk", [1, 2])
@pytest.mark.parametrize("cascade", [True, False], ids=["cascade", "no_cascade"])
def test_accepted_conv_sets_computed_in_chunks_match_the_reference(
    variant: str, sets_per_chunk: int, cascade: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without autograd a wide conv bank runs in chunks of sets; the result must not change.

    The chunk limit is lowered so that these small layers are split (one or two sets per chunk,
    with a last chunk that is shorter), and the chunks really are used.
    """
    kw = {} if variant == "plain" else _CONV_VARIANTS[variant](2)
    module, x = _builtin("conv2d", True, **kw)
    layer = _perforated(module, x, 5, DendriteConfig(cascade=cascade, activation="tanh"))
    assert layer.dendrites is not None
    one_set = 2 * 6 * x[0, 0].numel() * 4 // math.prod(module.stride)  # the bank's own estimate
    monkeypatch.setattr(cascade_module, "CHUNK_BYTES", sets_per_chunk * one_set)
    chunks: list[int] = []
    original = type(layer.dendrites).forward_chunks

    def spy(self: Any, *args: Any, **kwargs: Any) -> list[Tensor]:
        out = original(self, *args, **kwargs)
        chunks.extend(c.shape[1] for c in out)
        return out

    monkeypatch.setattr(type(layer.dendrites), "forward_chunks", spy)
    with torch.no_grad():
        expected = _reference(layer, x)
        torch.testing.assert_close(layer(x), expected, **_TOL)
    assert chunks == [sets_per_chunk] * (5 // sets_per_chunk) + [1] * (5 % sets_per_chunk)


@pytest.mark.parametrize("cascade", [True, False], ids=["cascade", "no_cascade"])
def test_linear_on_sequence_input(cascade: bool) -> None:
    """A Linear on ``[B, T, F]``: neurons are the last axis, scalars broadcast over batch and time."""
    module, x = nn.Linear(4, 6), torch.randn(2, 5, 4)
    layer = _perforated(module, x, 3, DendriteConfig(cascade=cascade))
    expected = _compare_with_reference(layer, x)
    assert expected.shape == (2, 5, 6)


# --------------------------------------------------------------------------- 2. custom modules
class LinearTanh(nn.Module):
    """A custom module made of a submodule (nested parameter names) and a nonlinearity."""

    def __init__(self, n_in: int = 4, n_out: int = 6) -> None:
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.linear(x))


class ScaledSquare(nn.Module):
    """A custom module with its own parameters and ``reset_parameters()`` (no submodules)."""

    def __init__(self, n_in: int = 4, n_out: int = 6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in))
        self.scale = nn.Parameter(torch.empty(n_out))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.5)
        nn.init.uniform_(self.scale, 0.5, 1.5)

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.weight.T) ** 2 * self.scale - 1.0


class ChannelMixer(nn.Module):
    """A custom module whose output is ``[B, C, L]`` with neurons (channels) on axis 1."""

    def __init__(self, c_in: int = 4, c_out: int = 6) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.empty(c_out, c_in))
        self.shift = nn.Parameter(torch.empty(c_out))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.mix, std=0.5)
        nn.init.normal_(self.shift)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(torch.einsum("oc,bcl->bol", self.mix, x)) + self.shift[:, None]


_CUSTOM: dict[str, tuple[Callable[[], nn.Module], int, tuple[int, ...]]] = {
    # name: (factory, neuron axis, input shape)
    "linear_tanh": (LinearTanh, -1, (3, 4)),
    "linear_tanh_seq": (LinearTanh, -1, (2, 5, 4)),
    "scaled_square": (ScaledSquare, -1, (3, 4)),
    "channel_mixer": (ChannelMixer, 1, (2, 4, 7)),
}


@pytest.mark.parametrize("custom", list(_CUSTOM))
@pytest.mark.parametrize("num_dendrites", [1, 3])
@pytest.mark.parametrize("cascade", [True, False], ids=["cascade", "no_cascade"])
@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
@pytest.mark.parametrize("train_accepted", [False, True], ids=["frozen", "train_accepted"])
def test_custom_module_forward_matches_functional_call_loop(
    custom: str, num_dendrites: int, cascade: bool, activation: str, train_accepted: bool
) -> None:
    """A custom module's D copies (one ``vmap``) equal D ``functional_call``s, one per set.

    Also pins the naming contract of the stacked parameters: ``linear.weight`` is stored as
    ``dendrites.linear__weight`` with a leading set axis.
    """
    factory, axis, shape = _CUSTOM[custom]
    module, x = factory(), torch.randn(*shape)
    config = DendriteConfig(
        cascade=cascade,
        activation=activation,  # type: ignore[arg-type]
        train_accepted_dendrites=train_accepted,
    )
    kind = type(module)
    layer = _perforated(module, x, num_dendrites, config, include=[kind], neuron_axes={kind: axis})
    assert layer.num_neurons == 6
    _check_layout(layer, 6)
    for name, p in module.named_parameters():
        stacked = getattr(layer.dendrites, name.replace(".", "__"))
        assert stacked.shape == (num_dendrites, *p.shape)
    expected = _compare_with_reference(layer, x)
    with torch.no_grad():
        assert not torch.allclose(expected, module(x), **_TOL)


# --------------------------------------------------------------------------- 3. zero dendrites, dendrite phase
def _two_layer(kind: str, bias: bool = True) -> tuple[nn.Sequential, Tensor, Tensor]:
    """A two-layer network (no dropout), an input batch and a regression target."""
    if kind == "linear":
        net = nn.Sequential(nn.Linear(4, 6, bias=bias), nn.Tanh(), nn.Linear(6, 3, bias=bias))
        return net, torch.randn(8, 4), torch.randn(8, 3)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=bias), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1, bias=bias))
    return net, torch.randn(4, 3, 6, 6), torch.randn(4, 2, 4, 4)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_zero_dendrites_is_the_original_module_exactly(kind: str, bias: bool) -> None:
    """Perforating without accepting anything changes no bit of the output, in train or eval mode."""
    original, x, _ = _two_layer(kind, bias)
    model = perforate(copy.deepcopy(original))
    assert len(perforated_layers(model)) == 2
    for train in (True, False):
        original.train(train)
        model.train(train)
        assert torch.equal(model(x), original(x))
        with torch.no_grad():
            assert torch.equal(model(x), original(x))


def _candidate_tensors(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for layer in perforated_layers(model) for p in layer.candidates.parameters()]  # type: ignore[union-attr]


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("num_dendrites", [0, 2])
def test_outputs_and_loss_are_flat_through_a_dendrite_phase(kind: str, num_dendrites: int) -> None:
    """Candidates train but never reach the output: outputs and loss stay bit-identical.

    ALGORITHM.md §3 names this as the check that the dendrite phase is sound (a flat validation
    score). Checked in train mode (where the correlation tap and candidates run) and in eval.
    """
    original, x, target = _two_layer(kind)
    model = perforate(copy.deepcopy(original), config=DendriteConfig(warmup_steps=0, num_candidates=2))
    model(x)
    _grow(model, num_dendrites)
    if num_dendrites:
        _randomise(model)
    else:
        for train in (True, False):
            assert torch.equal(model.train(train)(x), original.train(train)(x))

    with torch.no_grad():
        before_eval = model.eval()(x)
        before_train = model.train()(x)
    loss_before = F.mse_loss(before_train, target)

    start_dendrite_phase(model)
    optimizer = torch.optim.SGD(trainable_parameters(model), lr=0.5)
    initial = _candidate_tensors(model)
    for _ in range(4):
        model.train()
        out = model(x)
        loss = F.mse_loss(out, target)
        assert torch.equal(out, before_train)
        assert torch.equal(loss, loss_before)
        if not num_dendrites:  # candidates only: still exactly the unperforated network
            with torch.no_grad():
                assert torch.equal(out, original.train()(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            assert torch.equal(model.eval()(x), before_eval)
            assert torch.equal(model.train()(x), before_train)
    # The phase did something: otherwise "outputs unchanged" would prove nothing.
    assert any(not torch.equal(a, b) for a, b in zip(initial, _candidate_tensors(model), strict=True))


# --------------------------------------------------------------------------- 4. with_norm
def _bn_reference(layer: PerforatedLayer, x: Tensor) -> Tensor:
    """``bn(conv(x)) + Σ_d w_d a_d`` in eval mode, the BN written out from its running statistics.

    Dendrites see the conv's input ``x`` and add after the norm.
    """
    conv, bn = layer.module, layer.norm
    assert isinstance(conv, nn.Conv2d)
    assert isinstance(bn, nn.BatchNorm2d)
    y = F.conv2d(x, conv.weight, conv.bias)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    y = (y - bn.running_mean[:, None, None]) * scale[:, None, None] + bn.bias[:, None, None]
    return _reference(layer, x, base=y)


def _randomise_bn(bn: nn.BatchNorm2d) -> None:
    """Non-trivial running statistics and affine parameters, so BN(y) ≠ y."""
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()


@pytest.mark.parametrize("num_dendrites", [1, 3])
def test_with_norm_in_sequential_adds_dendrites_after_the_norm(num_dendrites: int) -> None:
    """``with_norm=True`` wraps Conv+BN; the output is ``bn(conv(x)) + Σ w a`` (then the ReLU)."""
    conv, bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
    model = perforate(nn.Sequential(conv, bn, nn.ReLU()), with_norm=True)
    assert isinstance(model[1], nn.Identity)
    layer = model[0]
    assert isinstance(layer, PerforatedLayer)
    assert layer.module is conv
    assert layer.norm is bn
    x = torch.randn(2, 3, 6, 6)
    model(x)
    _grow(model, num_dendrites)
    _randomise(model)
    _randomise_bn(bn)
    model.eval()
    with torch.no_grad():
        expected = _bn_reference(layer, x)
        torch.testing.assert_close(layer(x), expected, **_TOL)
        torch.testing.assert_close(model(x), torch.relu(expected), **_TOL)


class ConvBnNet(nn.Module):
    """A model that calls its conv and BN in ``forward`` (no Sequential to pair them by position)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(self.conv(x)))


def test_with_norm_mapping_on_custom_model() -> None:
    """``with_norm={"conv": "bn"}`` pairs by name; ``net.bn`` becomes an Identity."""
    net = ConvBnNet()
    conv, bn = net.conv, net.bn
    perforate(net, with_norm={"conv": "bn"})
    assert isinstance(net.bn, nn.Identity)
    assert isinstance(net.conv, PerforatedLayer)
    assert net.conv.norm is bn
    assert net.conv.module is conv
    x = torch.randn(2, 3, 6, 6)
    net(x)
    _grow(net, 2)
    _randomise(net)
    _randomise_bn(bn)
    net.eval()
    with torch.no_grad():
        expected = _bn_reference(net.conv, x)
        torch.testing.assert_close(net(x), torch.relu(expected), **_TOL)


# --------------------------------------------------------------------------- 5. perforation
def _mlp_with_dendrites_on_second_layer(perforation: bool) -> tuple[nn.Sequential, Tensor, Tensor]:
    """Linear(5,7)→Tanh→Linear(7,3) with D=2 random dendrites (nonzero w) on the second layer only.

    Built from a fixed seed, so the models for both perforation settings hold identical weights.
    """
    torch.manual_seed(1234)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    perforate(model, include=["2"], config=DendriteConfig(perforation=perforation, activation="tanh"))
    x, target = torch.randn(6, 5), torch.randn(6, 3)
    model(x)
    _grow(model, 2)
    _randomise(model)
    assert isinstance(model[0], nn.Linear)
    assert isinstance(model[2], PerforatedLayer)
    assert model[2].output_weight is not None
    assert bool((model[2].output_weight != 0).all())
    assert model[2].output_weight.requires_grad  # neuron phase
    return model, x, target


def _loss(y: Tensor, target: Tensor) -> Tensor:
    return ((y - target) ** 2).sum()


def _reference_output(layer: PerforatedLayer, h: Tensor, *, detach: bool) -> Tensor:
    """Layer 2 by hand: the module sees ``h``; the dendrites see ``h`` or ``h.detach()``."""
    module = layer.module
    assert isinstance(module, nn.Linear)
    base = F.linear(h, module.weight, module.bias)
    hd = h.detach() if detach else h
    # _reference applies the module itself to its input; hand it the base computed from h.
    return _reference(layer, hd, base=base)


def test_perforation_detaches_the_dendrite_input() -> None:
    """With perforation the first layer's gradient ignores the dendrites; without it, it does not.

    Also: no gradient reaches layer 2's input through its dendrites when perforation is on.
    """
    grads: dict[bool, Tensor] = {}
    input_grads: dict[bool, Tensor] = {}
    references: dict[bool, Tensor] = {}
    states: dict[bool, dict[str, Tensor]] = {}
    for perforation in (True, False):
        model, x, target = _mlp_with_dendrites_on_second_layer(perforation)
        states[perforation] = model.state_dict()
        first, layer = model[0], model[2]
        grads[perforation] = torch.autograd.grad(_loss(model(x), target), first.weight)[0]

        h_ref = torch.tanh(F.linear(x, first.weight, first.bias))
        references[perforation] = torch.autograd.grad(
            _loss(_reference_output(layer, h_ref, detach=perforation), target), first.weight
        )[0]

        h = torch.tanh(first(x)).detach().requires_grad_(True)
        input_grads[perforation] = torch.autograd.grad(_loss(layer(h), target), h)[0]
        h2 = h.detach().clone().requires_grad_(True)
        expected_input_grad = torch.autograd.grad(_loss(_reference_output(layer, h2, detach=perforation), target), h2)[
            0
        ]
        torch.testing.assert_close(input_grads[perforation], expected_input_grad, **_TOL)
        if perforation:
            # Only the module's own path: dL/dy' @ W2.
            with torch.no_grad():
                through_module = (2 * (layer(h) - target)) @ layer.module.weight
            torch.testing.assert_close(input_grads[perforation], through_module, **_TOL)

    # Same weights in both models: only the perforation option differs.
    assert states[True].keys() == states[False].keys()
    assert all(torch.equal(states[True][k], states[False][k]) for k in states[True])
    torch.testing.assert_close(grads[True], references[True], **_TOL)
    torch.testing.assert_close(grads[False], references[False], **_TOL)
    # The two settings really differ here, so the comparisons above can tell them apart.
    assert not torch.allclose(references[True], references[False], **_TOL)
    assert not torch.allclose(input_grads[True], input_grads[False], **_TOL)


# --------------------------------------------------------------------------- 6. function preservation
def _preservation_model(kind: str) -> tuple[nn.Module, Tensor, Tensor]:
    if kind == "custom":
        model = perforate(
            nn.Sequential(LinearTanh(4, 6), nn.Linear(6, 3)),
            include=[LinearTanh],
            neuron_axes={LinearTanh: -1},
            config=DendriteConfig(warmup_steps=0, num_candidates=2),
        )
        return model, torch.randn(8, 4), torch.randn(8, 3)
    net, x, target = _two_layer(kind)
    return perforate(net, config=DendriteConfig(warmup_steps=0, num_candidates=2)), x, target


@pytest.mark.parametrize("kind", ["linear", "conv2d", "custom"])
@pytest.mark.parametrize("num_before", [0, 1])
def test_accepting_dendrites_preserves_the_function(kind: str, num_before: int) -> None:
    """After candidates trained a few steps, accepting them leaves outputs unchanged (w_new = 0).

    With ``num_before=1`` the candidates also cascade from an existing (random) dendrite, so their
    trained cascade weights enter the accepted set too.
    """
    model, x, target = _preservation_model(kind)
    model(x)
    _grow(model, num_before)
    _randomise(model)

    start_dendrite_phase(model)
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=0.05)
    initial = _candidate_tensors(model)
    model.train()
    for _ in range(5):
        optimizer.zero_grad()
        F.mse_loss(model(x), target).backward()
        optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(initial, _candidate_tensors(model), strict=True))

    model.eval()
    with torch.no_grad():
        before = model(x)
    accept_dendrites(model)
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=0.0, atol=1e-6)
    for layer in perforated_layers(model):
        assert layer.num_dendrites == num_before + 1
        assert layer.output_weight is not None
        assert torch.equal(layer.output_weight[-1], torch.zeros_like(layer.output_weight[-1]))
        if num_before:
            # The new set's cascade rows are what the candidates learned from their zero start,
            # so the preservation above held with a non-trivial cascade.
            assert layer.cascade_weight is not None
            assert bool(layer.cascade_weight[-num_before:].ne(0).any())
    # The accepted set is not an untouched zero function: with w forced to 1 it shows up.
    layer = perforated_layers(model)[0]
    with torch.no_grad():
        layer.output_weight[-1].fill_(1.0)
        assert not torch.allclose(model(x), before, **_TOL)
