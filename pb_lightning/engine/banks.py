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
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pb_lightning.engine.outputs import output_entry
from pb_lightning.engine.stacked_ops import CONV_FUNCTIONS, linear_sets, uniform
from pb_lightning.errors import PerforationError

log = logging.getLogger(__name__)


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

    def forward_chunks(self, *inputs: Any, neuron_axis: int, max_bytes: int, **kwargs: Any) -> list[Tensor]:
        """The bank's output as consecutive chunks of sets, each about ``max_bytes`` or less.

        Concatenated along the set axis they are :meth:`forward`'s output. Only banks whose output
        can be large (convolutions) split it; the others return one chunk.
        """
        return [self(*inputs, neuron_axis=neuron_axis, **kwargs)]


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


class LinearBank(DendriteBank):
    """N copies of an ``nn.Linear``: weight ``[N, out, in]``, bias ``[N, out]``."""

    def __init__(self, template: nn.Linear, num_sets: int, init_scale: float) -> None:
        super().__init__()
        w = template.weight
        # PyTorch's default Linear initialisation bound, scaled.
        bound = init_scale / math.sqrt(template.in_features)
        self.weight = nn.Parameter(uniform((num_sets, template.out_features, template.in_features), bound, w))
        self.bias = (
            nn.Parameter(uniform((num_sets, template.out_features), bound, w)) if template.bias is not None else None
        )

    def forward(self, x: Tensor, neuron_axis: int = -1) -> Tensor:
        return linear_sets(x, self.weight, self.bias)


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
        self.weight = nn.Parameter(uniform((num_sets, *w.shape), bound, w))
        self.bias = nn.Parameter(uniform((num_sets, w.shape[0]), bound, w)) if template.bias is not None else None

    def forward(self, x: Tensor, neuron_axis: int = 1) -> Tensor:
        return self._conv_sets(x, self.weight, self.bias)

    # A conv bank has one input, so it names it (DendriteBank's takes any inputs and keywords).
    def forward_chunks(  # type: ignore[override]
        self, x: Tensor, *, neuron_axis: int = 1, max_bytes: int
    ) -> list[Tensor]:
        n = self.num_sets
        # One set's output, estimated from the input: its positions shrink by the stride (padding
        # and kernel edges ignored; an estimate is all a chunk size needs).
        positions = x[0, 0].numel() * x.shape[0] // math.prod(self.stride)
        per_set = positions * self.weight.shape[1] * x.element_size()
        step = max(1, max_bytes // max(per_set, 1))
        if step >= n:
            return [self.forward(x)]
        bias = self.bias
        return [
            self._conv_sets(x, self.weight[i : i + step], None if bias is None else bias[i : i + step])
            for i in range(0, n, step)
        ]

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
        y = CONV_FUNCTIONS[self.dims](x, weight, bias, self.stride, padding, self.dilation, g)  # (B, G*N*out/G, *S)
        # (B, G, N, out/G, *S) → (B, N, out, *S); a view when G = 1.
        return y.unflatten(1, (g, n, out // g)).transpose(1, 2).flatten(2, 3)


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
    _skeleton: nn.Module  # the template on the meta device, kept out of the submodules

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
            return out if key is None else output_entry(out, key)

        kind = type(self._skeleton)
        y: Tensor | None = None
        # torch.export specializes the batch size of vmap'd code (a graph for one batch only),
        # so an exported model runs the copies one after another, with a dynamic batch.
        exporting = torch.compiler.is_exporting()
        if kind not in _NOT_BATCHABLE and not isinstance(self._skeleton, nn.RNNBase) and not exporting:
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
            if kind not in _SEQUENTIAL_LOGGED and not exporting:
                _SEQUENTIAL_LOGGED.add(kind)
                log.info("pb_lightning: the dendrite copies of %s run one after another (no vmap).", kind.__name__)
            y = torch.stack([run(*(p[i] for p in params), *inputs) for i in range(self.num_sets)])
        return y.movedim(0, neuron_axis)


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


def iter_stacked(bank: DendriteBank | None) -> Iterator[tuple[str, nn.Parameter]]:
    """``bank.stacked().items()``, or nothing for a layer without a bank."""
    if bank is not None:
        yield from bank.stacked().items()
