"""The accepted dendrites' forward: cascade inputs, activations and the weighted sum into the
neuron's output (docs/ALGORITHM.md §2), as plain functions shared by the layer, its candidates and
the inference layer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from pb_lightning.engine.banks import DendriteBank

#: The dendrite activations by ``DendriteConfig.activation`` name. Public because the candidates
#: must apply the very function the accepted dendrites apply: a candidate is trained to correlate
#: *as it will run once accepted*.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
}


def cascade_weight_count(d: int) -> int:
    """Cascade weights of the first ``d`` dendrites: dendrite ``e`` has ``e`` of them.

    Dendrite ``d``'s weights on the earlier ones start at row ``cascade_weight_count(d)`` of the
    layer's ``cascade_weight``; the layer sizes that tensor with it.
    """
    return d * (d - 1) // 2


def per_neuron(t: Tensor, trailing: int) -> Tensor:
    """View ``[..., out]`` per-neuron scalars so they broadcast over ``trailing`` spatial axes.

    Every per-neuron weight of a dendrite (cascade, output, a candidate's cascade) multiplies an
    activation shaped like the layer's output; this is the one place that says how.
    """
    return t.view(*t.shape, *([1] * trailing))


def accepted_activations(
    bank: DendriteBank,
    cascade_weight: Tensor | None,
    inputs: tuple[Any, ...],
    axis: int,
    activation: str,
    **kwargs: Any,
) -> Tensor | list[Tensor]:
    """The activations of all accepted dendrites: ``(..., D, out, ...)``, or the D tensors ``a_d``.

    Shared by the training layer and the deployment layer of :mod:`pb_lightning.engine.inference`, so
    the two compute the very same function. Without autograd the sets of a large output are
    computed in chunks (:meth:`~pb_lightning.engine.banks.DendriteBank.forward_chunks`) and returned as a
    list, never joined: no single tensor of a wide conv layer is then large enough to be freshly
    mapped — and page-faulted — at every step (see :data:`CHUNK_BYTES`). Every consumer takes the
    dendrites one by one (:func:`dendrite_sets`).
    """
    f = ACTIVATIONS[activation]
    if not torch.is_grad_enabled():
        chunks = bank.forward_chunks(*inputs, neuron_axis=axis, max_bytes=CHUNK_BYTES, **kwargs)
        zs = [z for chunk in chunks for z in chunk.unbind(axis)]
        if cascade_weight is None or len(zs) == 1:
            for z in zs:
                _IN_PLACE[activation](z)
        else:
            _cascade_in_place(zs, cascade_weight, activation, zs[0].dim() - axis - 1)
        return chunks[0] if len(chunks) == 1 else zs
    z = bank(*inputs, neuron_axis=axis, **kwargs)
    # unbind, not select/indexing: its backward stacks the gradients once, where every select's
    # backward would allocate a zero tensor of the full size.
    pres = z.unbind(axis)
    if cascade_weight is None or len(pres) == 1:
        return f(z)
    trailing = z.dim() - axis - 2
    # The cascade is a recurrence through f: dendrite d needs a_e for all e < d. The expensive
    # part (L_d(x̂) for every d) is already one fused op above; this loop is elementwise, one
    # multiply-add per (d, e) pair: fewer autograd nodes than stacking the earlier activations
    # for every d, and no (..., d, out, ...) temporaries.
    weights = cascade_weight.unbind(0)
    acts = [f(pres[0])]
    for d in range(1, len(pres)):
        pre = pres[d]
        for e in range(d):
            pre = torch.addcmul(pre, acts[e], per_neuron(weights[cascade_weight_count(d) + e], trailing))
        acts.append(f(pre))
    return torch.stack(acts, axis)


def dendrite_sets(acts: Tensor | Sequence[Tensor], axis: int) -> Sequence[Tensor]:
    """The sets of :func:`accepted_activations`' result one by one (views of a stacked tensor)."""
    return acts.unbind(axis) if isinstance(acts, Tensor) else acts


#: Without autograd, a fused bank whose output would exceed this many bytes runs in chunks of
#: sets. glibc serves allocations above its mmap threshold (32 MiB at most) with fresh pages that
#: fault in on first touch at every step: a 51 MB conv output cost 47 ms that way against 2.6 ms
#: for refilling reused memory (this project's machine), which made the 8-dendrite conv step 1.7x
#: its FLOP ideal. Chunks this size are reused from the heap instead.
CHUNK_BYTES = 8 * 1024**2

_IN_PLACE: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid_,
    "tanh": torch.tanh_,
    "relu": torch.relu_,
}


def _cascade_in_place(zs: list[Tensor], cascade_weight: Tensor, activation: str, trailing: int) -> None:
    """The cascade without autograd (frozen dendrites behind a perforation: the common case).

    Each ``z_d`` becomes ``a_d`` in place: it receives ``c_{d,e} a_e`` from every finished earlier
    dendrite (in the order ``e = 0, 1, …``, as the autograd path adds them), then its activation.
    No temporaries, and one pre-activation is written at a time while the earlier ones are read.
    """
    f_ = _IN_PLACE[activation]
    weights = cascade_weight.unbind(0)
    for d, z in enumerate(zs):
        for e in range(d):
            z.addcmul_(zs[e], per_neuron(weights[cascade_weight_count(d) + e], trailing))
        f_(z)


def add_weighted(y: Tensor, acts: Tensor | Sequence[Tensor], weight: Tensor, axis: int) -> Tensor:
    """``y + Σ_d w_d ⊙ a_d`` with ``acts`` as :func:`accepted_activations` gives it and ``weight [D, out]``.

    One multiply-add per set: a broadcast product summed over a set axis would allocate a
    ``(..., D, out, ...)`` temporary in forward and another in backward, and for conv layers that
    allocation, not the arithmetic, dominated the step.
    """
    trailing = y.dim() - axis - 1
    # unbind rather than select: one backward node that stacks the D gradients, instead of D
    # select-backwards that each allocate a zero tensor of the full (..., D, out, ...) size.
    for a, w in zip(dendrite_sets(acts, axis), weight.unbind(0), strict=True):
        y = torch.addcmul(y, a, per_neuron(w, trailing))
    return y
