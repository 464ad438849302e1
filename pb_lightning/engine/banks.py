"""Fused dendrite operations: N copies of a layer's operation computed as one.

A *bank* holds the weights of N dendrite sets of one perforated layer (N accepted sets, or K
candidates). Its forward runs all N copies in a single operation — one ``F.linear`` with
``N·out`` outputs, one ``F.convNd`` with ``N·out`` output channels, or one ``vmap`` of a custom
module — rather than a Python loop over dendrites, so the cost of a set is close to its FLOPs.

Every stacked tensor is stored as ``[N, out, ...]`` for Linear and Conv (``per_neuron``): the set
axis first, then the neuron axis. That layout makes the operations the phases need — pick, for
every neuron, the weights of its best candidate; append a set; snapshot the rows of neurons
whose score improved — plain indexing on the first two axes, whatever the layer.

The output of a bank is the layer's output shape with a set axis inserted just before the
neuron axis (``[B, N, out]`` for Linear, ``[B, N, out, *spatial]`` for Conv), so per-neuron
scalars of shape ``[N, out]`` broadcast against it without any permutation.

Sparse banks (:class:`SparseBank`, ``DendriteConfig.fan_in = k``) keep the same layout for their
compact weights ``[N, out, k, *kernel]`` and add one stacked buffer, ``index [N, out, k]``: the
input each connection reads. Their sets still run as one operation (see :class:`SparseBank`).
"""

from __future__ import annotations

import copy
import logging
import math
import zlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pb_lightning.errors import PerforationError

log = logging.getLogger(__name__)

_CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class DendriteBank(nn.Module):
    """N dendrite sets of one layer, stored stacked and computed by one operation.

    Subclasses register their stacked parameters (leading axis N) and implement :meth:`forward`.
    """

    #: Whether each stacked tensor has the neuron axis second, so candidates can be chosen per
    #: neuron. ``False`` for custom modules, whose parameters are shared by all their neurons.
    per_neuron: bool = True

    def stacked(self) -> dict[str, nn.Parameter]:
        """The stacked parameters by name, each with the set axis first."""
        return dict(self.named_parameters(recurse=False))

    def structure(self) -> dict[str, Tensor]:
        """Stacked buffers that describe the sets' wiring (set axis first); none for dense banks."""
        return {}

    @property
    def num_sets(self) -> int:
        """N, the number of dendrite sets in the bank."""
        return next(iter(self.stacked().values())).shape[0]

    def replace(self, tensors: dict[str, Tensor], *, requires_grad: bool) -> None:
        """Swap every stacked parameter for a new one holding ``tensors[name]``.

        New ``Parameter`` objects (never in-place resizes) so that an optimizer built before the
        change cannot silently keep stale state for a tensor whose shape changed.
        """
        for name in self.stacked():
            setattr(self, name, nn.Parameter(tensors[name], requires_grad=requires_grad))

    def take(self, choice: Tensor) -> dict[str, Tensor]:
        """One set built by choosing, for every neuron ``i``, set ``choice[i]`` of this bank."""
        return take_sets(self.stacked() | self.structure(), choice, per_neuron=self.per_neuron)

    def append(self, tensors: dict[str, Tensor], *, requires_grad: bool) -> None:
        """Add sets at the end (the sets given must match this bank's operation)."""
        self.replace(
            {name: torch.cat([p.detach(), tensors[name].to(p)], dim=0) for name, p in self.stacked().items()},
            requires_grad=requires_grad,
        )
        for name, b in self.structure().items():
            setattr(self, name, torch.cat([b, tensors[name].to(b)], dim=0))

    def resize(self, num_sets: int) -> None:
        """Give every stacked tensor ``num_sets`` uninitialised sets (before loading weights)."""
        if num_sets == self.num_sets:
            return
        self.replace(
            {name: p.new_empty((num_sets, *p.shape[1:])) for name, p in self.stacked().items()},
            requires_grad=any(p.requires_grad for p in self.stacked().values()),
        )
        for name, b in self.structure().items():
            setattr(self, name, b.new_zeros((num_sets, *b.shape[1:])))

    def flops_per_position(self) -> int:
        """Multiply-accumulates of one set at one output position (for benchmarks)."""
        raise NotImplementedError


def take_sets(tensors: dict[str, Tensor], choice: Tensor, *, per_neuron: bool) -> dict[str, Tensor]:
    """From stacked tensors ``[N, ...]``, one set ``[1, ...]`` that holds set ``choice[i]`` for neuron ``i``.

    With ``per_neuron=False`` (custom modules, whose weights serve all neurons at once) the
    choice must be the same for every neuron and whole sets are taken.
    """
    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        if per_neuron:
            index = choice.view(1, -1, *([1] * (t.dim() - 2))).expand(1, *t.shape[1:])
            out[name] = t.detach().gather(0, index)
        else:
            out[name] = t.detach()[int(choice[0])].unsqueeze(0)
    return out


def _linear_sets(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` of every set of ``weight [N, out, in]`` at once, as ``(..., N, out)``."""
    n, out, _ = weight.shape
    y = F.linear(x, weight.reshape(n * out, -1), None if bias is None else bias.reshape(n * out))  # (..., N*out)
    return y.unflatten(-1, (n, out))


def _uniform(shape: tuple[int, ...], bound: float, like: Tensor) -> Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device).uniform_(-bound, bound)


class LinearBank(DendriteBank):
    """N copies of an ``nn.Linear``: weight ``[N, out, in]``, bias ``[N, out]``."""

    def __init__(self, template: nn.Linear, num_sets: int, init_scale: float) -> None:
        super().__init__()
        w = template.weight
        # PyTorch's default Linear initialisation bound, scaled.
        bound = init_scale / math.sqrt(template.in_features)
        self.weight = nn.Parameter(_uniform((num_sets, template.out_features, template.in_features), bound, w))
        self.bias = (
            nn.Parameter(_uniform((num_sets, template.out_features), bound, w)) if template.bias is not None else None
        )

    def forward(self, x: Tensor, neuron_axis: int = -1) -> Tensor:
        return _linear_sets(x, self.weight, self.bias)

    def flops_per_position(self) -> int:
        return self.weight.shape[1] * self.weight.shape[2]


class ConvBank(DendriteBank):
    """N copies of an ``nn.Conv1d/2d/3d``: weight ``[N, out, in/groups, *kernel]``, bias ``[N, out]``."""

    def __init__(self, template: nn.modules.conv._ConvNd, num_sets: int, init_scale: float) -> None:
        super().__init__()
        w = template.weight
        self.dims = w.dim() - 2
        self.stride = template.stride
        self.padding = template.padding
        self.dilation = template.dilation
        self.groups = template.groups
        self.padding_mode = template.padding_mode
        self._reversed_padding = template._reversed_padding_repeated_twice
        fan_in = w.shape[1] * math.prod(w.shape[2:])
        bound = init_scale / math.sqrt(fan_in)
        self.weight = nn.Parameter(_uniform((num_sets, *w.shape), bound, w))
        self.bias = nn.Parameter(_uniform((num_sets, w.shape[0]), bound, w)) if template.bias is not None else None

    def forward(self, x: Tensor, neuron_axis: int = 1) -> Tensor:
        return self._conv_sets(x, self.weight, self.bias)

    def _padded(self, x: Tensor) -> tuple[Tensor, Any]:
        if self.padding_mode != "zeros":
            return F.pad(x, self._reversed_padding, mode=self.padding_mode), 0
        return x, self.padding

    def _conv_sets(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The conv of every set of ``weight [N, out, in/groups, *kernel]``, as ``(B, N, out, *S)``."""
        n, out = weight.shape[:2]
        g = self.groups
        # A grouped conv connects output channel j to input group j // (channels / groups). With
        # N·out channels the sets must be interleaved inside each group: [G, N, out/G].
        weight = weight.unflatten(1, (g, out // g)).transpose(0, 1).reshape(n * out, *weight.shape[2:])
        if bias is not None:
            bias = bias.unflatten(1, (g, out // g)).transpose(0, 1).reshape(n * out)
        x, padding = self._padded(x)
        y = _CONV_FUNCTIONS[self.dims](x, weight, bias, self.stride, padding, self.dilation, g)  # (B, G*N*out/G, *S)
        # (B, G, N, out/G, *S) → (B, N, out, *S); a view when G = 1.
        return y.unflatten(1, (g, n, out // g)).transpose(1, 2).flatten(2, 3)

    def flops_per_position(self) -> int:
        return self.weight.shape[1] * math.prod(self.weight.shape[2:])


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
        self.weight = nn.Parameter(_uniform((num_sets, out, k, *kernel), bound, like))
        self.bias = nn.Parameter(_uniform((num_sets, out), bound, like)) if bias else None

    def dense_weight(self) -> Tensor:
        """The compact weights scattered into a dense ``[N, out, in, *kernel]`` zero weight."""
        n, out, k = self.index.shape
        kernel = self.weight.shape[3:]
        index = self.index.view(n, out, k, *([1] * len(kernel))).expand(self.weight.shape)
        return self.weight.new_zeros((n, out, self.in_size, *kernel)).scatter(2, index, self.weight)

    def flops_per_position(self) -> int:
        return math.prod(self.weight.shape[1:])


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
            return _linear_sets(x, self.dense_weight(), self.bias)
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
        y = _CONV_FUNCTIONS[self.dims](gathered, weight, bias, self.stride, padding, self.dilation, n * out)
        return y.unflatten(1, (n, out))


class ModuleBank(DendriteBank):
    """N fresh copies of any module, run together with ``torch.func.vmap``.

    The copies' parameters are stacked (``[N, *shape]``). They are shared by all neurons of a
    copy, so a candidate is chosen per set, not per neuron (``per_neuron = False``).

    Where vmap has no batching rule for the module's operations (``aten::lstm``, ``aten::gru``:
    every recurrent layer), the copies run one after another through the same functional call:
    the same function, N times the Python overhead.

    Args:
        template: the module whose copies the bank holds.
        num_sets: N.
        init_scale: scale of the copies' fresh initialisation.
        output_key: for a module with a tuple (or dict) output, the entry that holds the neurons;
            the bank returns that entry only.
    """

    per_neuron = False

    def __init__(
        self, template: nn.Module, num_sets: int, init_scale: float, output_key: int | str | None = None
    ) -> None:
        super().__init__()
        copies = [_fresh_copy(template, init_scale) for _ in range(num_sets)]
        self._names = [name for name, _ in template.named_parameters()]
        self.output_key = output_key
        for name in self._names:
            tensors = [dict(c.named_parameters())[name].detach() for c in copies]
            if tensors:
                stacked = torch.stack(tensors)
            else:
                p = dict(template.named_parameters())[name]
                stacked = p.detach().new_empty((0, *p.shape))
            self.register_parameter(_encode(name), nn.Parameter(stacked))
        # The functional skeleton only: its own tensors live on the meta device (no memory, not in
        # the state dict); functional_call supplies each set's parameters.
        self.__dict__["_skeleton"] = copy.deepcopy(template).to("meta")

    def forward(self, *inputs: Any, neuron_axis: int, **kwargs: Any) -> Tensor:
        names = [_encode(n) for n in self._names]
        params = tuple(getattr(self, n) for n in names)
        key = self.output_key

        def run(*flat: Any) -> Tensor:
            ps, args = flat[: len(names)], flat[len(names) :]
            out = torch.func.functional_call(self._skeleton, dict(zip(self._names, ps, strict=True)), args, kwargs)
            return out if key is None else out[key]

        kind = type(self._skeleton)
        y: Tensor | None = None
        if kind not in _NOT_BATCHABLE and not isinstance(self._skeleton, nn.RNNBase):
            in_dims = (0,) * len(names) + (None,) * len(inputs)
            try:
                y = torch.func.vmap(run, in_dims=in_dims)(*params, *inputs)  # (N, *y.shape)
            except RuntimeError as error:
                if "Batching rule not implemented" not in str(error):
                    raise
                _NOT_BATCHABLE.add(kind)
                _SEQUENTIAL_LOGGED.add(kind)
                log.info(
                    "pb_lightning: torch.func.vmap cannot batch %s (%s); its dendrite copies run one after another.",
                    kind.__name__,
                    str(error).splitlines()[0],
                )
        if y is None:
            if kind not in _SEQUENTIAL_LOGGED:
                _SEQUENTIAL_LOGGED.add(kind)
                log.info("pb_lightning: the dendrite copies of %s run one after another (no vmap).", kind.__name__)
            y = torch.stack([run(*(p[i] for p in params), *inputs) for i in range(self.num_sets)])
        return y.movedim(0, neuron_axis)

    def flops_per_position(self) -> int:
        return sum(p[0].numel() for p in self.stacked().values())


#: Module types whose copies vmap could not batch: they run one after another from then on.
_NOT_BATCHABLE: set[type[nn.Module]] = set()
_SEQUENTIAL_LOGGED: set[type[nn.Module]] = set()


def _encode(name: str) -> str:
    return name.replace(".", "__")


def _reset(module: nn.Module) -> bool:
    found = False
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
            found = True
    return found


def _fresh_copy(template: nn.Module, init_scale: float) -> nn.Module:
    clone = copy.deepcopy(template)
    _reset(clone)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(init_scale)
    return clone


def check_custom_module(module: nn.Module, name: str) -> None:
    """Refuse, at conversion time, a custom module that cannot be copied into dendrites."""
    if not any(callable(getattr(m, "reset_parameters", None)) for m in module.modules()):
        raise PerforationError(
            f"Module `{name}` ({type(module).__name__}) has no `reset_parameters()` in itself or its "
            "submodules, so pb_lightning cannot give its dendrite copies fresh weights. Add a "
            "`reset_parameters()` method, or perforate the nn.Linear/nn.Conv layers inside it instead."
        )
    buffers = [n for n, _ in module.named_buffers()]
    if buffers:
        raise PerforationError(
            f"Module `{name}` ({type(module).__name__}) has buffers {buffers}; dendrite copies of a "
            "custom module must be pure functions of their parameters (run with torch.func.vmap). "
            "Perforate a buffer-free submodule instead, e.g. the layer before its normalisation."
        )
    if not any(True for _ in module.parameters()):
        raise PerforationError(f"Module `{name}` ({type(module).__name__}) has no parameters to copy into dendrites.")


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
        if output_key is None and isinstance(module, _CONV_TYPES):
            return SparseConvBank(module, num_sets, init_scale, fan_in, index)  # type: ignore[arg-type]
        raise PerforationError(f"fan_in is only supported for nn.Linear and nn.Conv; got {type(module).__name__}.")
    if output_key is None and isinstance(module, nn.Linear):
        return LinearBank(module, num_sets, init_scale)
    if output_key is None and isinstance(module, _CONV_TYPES):
        return ConvBank(module, num_sets, init_scale)  # type: ignore[arg-type]
    return ModuleBank(module, num_sets, init_scale, output_key)


def fan_in_inputs(module: nn.Module) -> int | None:
    """How many inputs a dendrite of ``module`` can see: input features (Linear), input channels
    of a group (Conv), ``None`` where fan-in is not defined (custom modules)."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, _CONV_TYPES):
        return module.in_channels // module.groups  # type: ignore[operator]
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


def iter_stacked(bank: DendriteBank | None) -> Iterator[tuple[str, nn.Parameter]]:
    """``bank.stacked().items()``, or nothing for a layer without a bank."""
    if bank is not None:
        yield from bank.stacked().items()
