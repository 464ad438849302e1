"""Sparse dendrite banks (``DendriteConfig.fan_in = k``): each neuron's dendrite reads only ``k``
of its inputs, and the connection choice (``connections``, ``prune``); ``make_bank`` picks the
dense or sparse bank for a layer.

The layout is that of :mod:`pb_lightning.engine.banks` plus one stacked buffer ``index [N, out, k]``.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pb_lightning.engine.banks import ConvBank, DendriteBank, LinearBank, ModuleBank
from pb_lightning.engine.stacked_ops import CONV_FUNCTIONS, CONV_TYPES, linear_sets, uniform
from pb_lightning.errors import PerforationError


class SparseBank(DendriteBank):
    """N sets of dendrites that each see only ``k`` of their layer's inputs (limited fan-in).

    A dense dendrite set costs a full copy of its layer's weights, yet each dendrite feeds only
    its own neuron; limited fan-in makes a set cost ``k/in`` of that (Chavlis & Poirazi, Nat.
    Commun. 2025). Only the real connections are stored: ``weight [N, out, k, *kernel]`` (compact)
    and the buffer ``index [N, out, k]``, the input feature (Linear) or input channel of the
    group (Conv) of each connection. A state dict therefore holds exactly what the sets compute
    with, and ``parameter_counts`` counts only real connections.

    The forward pass stays one fused operation for all N sets, by one of two strategies
    (:attr:`strategy`; measured by ``benchmarks/engine_speed.py --fan-in``):

    * ``"masked"``: scatter the compact weights into a dense zero weight and run the dense bank's
      single ``F.linear`` / ``F.convNd``. The FLOPs are those of a dense set.
    * ``"gather"``: compute only the real connections. Linear: one ``F.embedding_bag`` whose table
      is the transposed input and whose bags are the dendrites (each sums its ``k`` inputs
      weighted by its compact weights). Conv: one grouped conv over the gathered input
      channels, a group per dendrite.
    * ``"auto"`` (the default): ``"gather"`` for Linear banks with ``4k <= in``, else
      ``"masked"``. Measured on 2 CPU cores (784-512-512 MLP, batch 256, 4 sets): at ``k/in`` of
      1/50 the gather is 6-20x faster than the masked dense op, at 1/4 about 1.5x, at 1/2
      slower; tiny layers (16-40 inputs) differ by hundredths of a millisecond. For convs the
      masked dense conv was 2-10x faster than the grouped one at ``k/in = 1/4``, so it is used.
    """

    #: How the forward pass is computed: ``"auto"``, ``"masked"`` or ``"gather"`` (see the class
    #: docstring). A class attribute, settable per instance, and not a config field: it changes
    #: speed only, never the result.
    strategy: str = "auto"

    in_size: int  # set in the subclasses' ``__init__``, declared for the type checker

    index: Tensor

    def structure(self) -> dict[str, Tensor]:
        return {"index": self.index}

    @property
    def fan_in(self) -> int:
        """k, the inputs each dendrite sees."""
        return self.index.shape[2]

    def _init(
        self,
        num_sets: int,
        out: int,
        k: int,
        kernel: tuple[int, ...],
        index: Tensor | None,
        init_scale: float,
        like: Tensor,
        bias: bool,
    ) -> None:
        if index is None:  # placeholder wiring of sets whose weights are about to be loaded
            index = torch.zeros((num_sets, out, k), dtype=torch.long)
        if tuple(index.shape) != (num_sets, out, k):
            raise ValueError(f"index must have shape {(num_sets, out, k)}; got {tuple(index.shape)}")
        self.register_buffer("index", index.to(device=like.device, dtype=torch.long))
        # PyTorch's default initialisation bound for the dendrite's real fan-in, scaled.
        bound = init_scale / math.sqrt(k * math.prod(kernel))
        self.weight = nn.Parameter(uniform((num_sets, out, k, *kernel), bound, like))
        self.bias = nn.Parameter(uniform((num_sets, out), bound, like)) if bias else None

    def dense_weight(self) -> Tensor:
        """The compact weights scattered into a dense ``[N, out, in, *kernel]`` zero weight."""
        n, out, k = self.index.shape
        kernel = self.weight.shape[3:]
        index = self.index.view(n, out, k, *([1] * len(kernel))).expand(self.weight.shape)
        return self.weight.new_zeros((n, out, self.in_size, *kernel)).scatter(2, index, self.weight)


class _ContiguousGradient(torch.autograd.Function):
    """The identity, whose backward makes the gradient contiguous.

    The gradient reaching an ``embedding_bag`` output through a transpose is strided; its
    per-sample-weight backward then reads it column by column and was 6x slower (measured:
    61 ms against 11 ms for 2048 dendrites of 16 inputs, batch 256).
    """

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:  # type: ignore[override]
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad.contiguous()


class SparseLinearBank(SparseBank):
    """N sets of ``nn.Linear`` dendrites with ``k`` input features each."""

    def __init__(
        self, template: nn.Linear, num_sets: int, init_scale: float, fan_in: int, index: Tensor | None = None
    ) -> None:
        super().__init__()
        self.in_size = template.in_features
        self._init(
            num_sets, template.out_features, fan_in, (), index, init_scale, template.weight, template.bias is not None
        )

    def forward(self, x: Tensor, neuron_axis: int = -1) -> Tensor:
        n, out, k = self.index.shape
        strategy = self.strategy
        if strategy == "auto":
            strategy = "gather" if 4 * k <= self.in_size else "masked"
        if strategy == "masked":
            return linear_sets(x, self.dense_weight(), self.bias)
        # One bag per dendrite over the rows of the transposed input: bag (n, o) sums rows
        # index[n, o, :] (input features, each a row of all samples) weighted by its weights.
        dtype = torch.promote_types(x.dtype, self.weight.dtype)
        table = x.reshape(-1, self.in_size).t().to(dtype).contiguous()  # (in, M)
        weights = self.weight.reshape(n * out, k).to(dtype)
        y = F.embedding_bag(self.index.reshape(n * out, k), table, per_sample_weights=weights, mode="sum")
        y = _ContiguousGradient.apply(y).t().reshape(*x.shape[:-1], n, out)  # (N*out, M) → (..., N, out)
        return y if self.bias is None else y + self.bias.to(dtype)


class SparseConvBank(SparseBank, ConvBank):
    """N sets of ``nn.Conv`` dendrites with ``k`` input channels (of their group) each, full kernel."""

    def __init__(
        self,
        template: nn.modules.conv._ConvNd,
        num_sets: int,
        init_scale: float,
        fan_in: int,
        index: Tensor | None = None,
    ) -> None:
        ConvBank.__init__(self, template, 0, init_scale)
        w = template.weight
        self.in_size = w.shape[1]
        out = w.shape[0]
        # The first input channel of each output channel's group, to turn group-relative indices
        # into channel numbers (gather strategy).
        group_start = (torch.arange(out) // (out // self.groups)) * self.in_size
        self.register_buffer("_group_start", group_start.to(w.device).view(1, out, 1), persistent=False)
        self._init(num_sets, out, fan_in, tuple(w.shape[2:]), index, init_scale, w, template.bias is not None)

    # One chunk: its weights are built per forward. (ConvBank narrows the signature to one input.)
    forward_chunks = DendriteBank.forward_chunks  # type: ignore[assignment]
    _group_start: Tensor  # a buffer

    def forward(self, x: Tensor, neuron_axis: int = 1) -> Tensor:
        if self.strategy != "gather":  # "auto": the masked dense conv measured faster
            return self._conv_sets(x, self.dense_weight(), self.bias)
        n, out, k = self.index.shape
        # One group per dendrite: its k gathered channels, its own kernel.
        channels = (self.index + self._group_start).flatten()
        x, padding = self._padded(x)
        gathered = x.index_select(1, channels)  # (B, N*out*k, *S)
        bias = None if self.bias is None else self.bias.reshape(n * out)
        weight = self.weight.reshape(n * out, k, *self.weight.shape[3:])
        y = CONV_FUNCTIONS[self.dims](gathered, weight, bias, self.stride, padding, self.dilation, n * out)
        return y.unflatten(1, (n, out))


def make_bank(
    module: nn.Module,
    num_sets: int,
    init_scale: float,
    output_key: int | str | None = None,
    *,
    fan_in: int | None = None,
    index: Tensor | None = None,
) -> DendriteBank:
    """A bank of ``num_sets`` fresh dendrite sets shaped after ``module``'s operation.

    ``output_key`` (modules with tuple outputs only) selects the output entry that holds the
    neurons. With ``fan_in`` the sets are sparse (:class:`SparseBank`) and ``index [num_sets, out,
    k]`` says which inputs each dendrite sees; without ``index`` it is a placeholder of zeros, for
    sets whose wiring is loaded or appended next.
    """
    if fan_in is not None:
        if output_key is None and isinstance(module, nn.Linear):
            return SparseLinearBank(module, num_sets, init_scale, fan_in, index)
        if output_key is None and isinstance(module, CONV_TYPES):
            return SparseConvBank(module, num_sets, init_scale, fan_in, index)  # type: ignore[arg-type]
        raise PerforationError(f"fan_in is only supported for nn.Linear and nn.Conv; got {type(module).__name__}.")
    if output_key is None and isinstance(module, nn.Linear):
        return LinearBank(module, num_sets, init_scale)
    if output_key is None and isinstance(module, CONV_TYPES):
        return ConvBank(module, num_sets, init_scale)  # type: ignore[arg-type]
    return ModuleBank(module, num_sets, init_scale, output_key)


def fan_in_inputs(module: nn.Module) -> int | None:
    """How many inputs a dendrite of ``module`` can see: input features (Linear), input channels
    of a group (Conv), ``None`` where fan-in is not defined (custom modules)."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, CONV_TYPES):
        return module.in_channels // module.groups
    return None


def check_fan_in(module: nn.Module, fan_in: int | None, name: str) -> None:
    """Refuse, at conversion time, a fan-in the layer cannot have."""
    if fan_in is None:
        return
    inputs = fan_in_inputs(module)
    if inputs is None:
        raise PerforationError(
            f"`DendriteConfig.fan_in` is {fan_in!r} for layer `{name}` ({type(module).__name__}), but limited "
            "fan-in is defined only for nn.Linear and nn.Conv1d/2d/3d. Give this layer dense dendrites with "
            f"DendriteConfig(overrides={{{name!r}: {{'fan_in': None}}}})."
        )
    if fan_in > inputs:
        what = "input features" if isinstance(module, nn.Linear) else "input channels per group"
        raise PerforationError(
            f"`DendriteConfig.fan_in` must be an int in [1, {inputs}] for layer `{name}` ({inputs} {what}), "
            f"or None for dense dendrites; got {fan_in!r}."
        )


def connections(
    module: nn.Module, num_sets: int, fan_in: int, mode: str, *, seed: int, name: str, dendrite: int
) -> Tensor:
    """The inputs ``[num_sets, out, k]`` (sorted per dendrite) that new sparse dendrite sets see.

    ``"local"``: neuron ``i`` of ``n`` sees the window starting at ``round(i·(in−k)/(n−1))``, so the
    windows are spread evenly over the input axis; every set shares them. ``"random"``: ``k``
    distinct inputs per set and neuron, from a generator seeded by ``seed``, the layer's ``name``
    and the ``dendrite`` number: the same on every rank, in every rerun, and independent of the
    global random state (which the training loop owns).
    """
    inputs = fan_in_inputs(module)
    assert inputs is not None
    weight = next(iter(module.parameters()))
    out = weight.shape[0]
    if mode == "local":
        groups = getattr(module, "groups", 1)
        per_group = out // groups
        position = torch.arange(out) % per_group  # windows spread over each group's channels
        start = torch.round(position * (inputs - fan_in) / max(per_group - 1, 1)).long()
        if per_group == 1:
            start = torch.full_like(start, (inputs - fan_in) // 2)
        index = (start.view(out, 1) + torch.arange(fan_in)).expand(num_sets, out, fan_in)
    elif mode == "random":
        generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}/{dendrite}".encode()))
        index = torch.rand((num_sets, out, inputs), generator=generator).topk(fan_in, dim=-1).indices.sort(-1).values
    else:
        raise ValueError(f"no fixed connections for fan_in_mode={mode!r}")
    return index.contiguous().to(weight.device)


def prune(tensors: dict[str, Tensor], fan_in: int) -> dict[str, Tensor]:
    """Dense sets ``{"weight": [N, out, in, *kernel], ...}`` cut to their ``k`` strongest inputs.

    Strength is the weight's magnitude (for convs, the norm of the input channel's kernel). The
    result is a sparse set — compact weights and the ``index`` of the inputs kept, in ascending
    order — computing exactly what the dense set computes with the other weights zeroed.
    """
    weight = tensors["weight"]
    n, out, inputs = weight.shape[:3]
    strength = weight.detach().float().reshape(n, out, inputs, -1).norm(dim=-1)
    index = strength.topk(fan_in, dim=-1).indices.sort(-1).values
    expanded = index.view(n, out, fan_in, *([1] * (weight.dim() - 3))).expand(n, out, fan_in, *weight.shape[3:])
    return {**tensors, "weight": weight.gather(2, expanded), "index": index}
