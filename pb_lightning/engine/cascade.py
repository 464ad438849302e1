"""The accepted dendrites' forward: cascade inputs, activations and the weighted sum into the
neuron's output (docs/ALGORITHM.md §2), as plain functions shared by the layer, its candidates and
the inference layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pb_lightning.engine.banks import DendriteBank

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
}


def _triangle(d: int) -> int:
    """Cascade weights of the first ``d`` dendrites: dendrite ``e`` has ``e`` of them."""
    return d * (d - 1) // 2


def _per_neuron(t: Tensor, trailing: int) -> Tensor:
    """View ``[..., out]`` per-neuron scalars so they broadcast over ``trailing`` spatial axes."""
    return t.view(*t.shape, *([1] * trailing))


def accepted_activations(
    bank: DendriteBank,
    cascade_weight: Tensor | None,
    inputs: tuple[Any, ...],
    axis: int,
    activation: str,
    **kwargs: Any,
) -> Tensor:
    """The activations ``a`` of all accepted dendrites, shaped ``(..., D, out, ...)``.

    Shared by the training layer and the deployment layer of :mod:`pb_lightning.engine.inference`, so
    the two compute the very same function.
    """
    z = bank(*inputs, neuron_axis=axis, **kwargs)
    num = z.shape[axis]
    if cascade_weight is None or num == 1:
        return _ACTIVATIONS[activation](z)
    trailing = z.dim() - axis - 2
    if not torch.is_grad_enabled():
        return _cascade_in_place(z, cascade_weight, axis, activation, trailing)
    # The cascade is a recurrence through f: dendrite d needs a_e for all e < d. The expensive
    # part (L_d(x̂) for every d) is already one fused op above; this loop is elementwise, one
    # multiply-add per (d, e) pair: fewer autograd nodes than stacking the earlier activations
    # for every d, and no (..., d, out, ...) temporaries.
    # unbind, not select/indexing: its backward stacks the gradients once, where every select's
    # backward would allocate a zero tensor of the full size.
    f = _ACTIVATIONS[activation]
    pres, weights = z.unbind(axis), cascade_weight.unbind(0)
    acts = [f(pres[0])]
    for d in range(1, num):
        pre = pres[d]
        for e in range(d):
            pre = torch.addcmul(pre, acts[e], _per_neuron(weights[_triangle(d) + e], trailing))
        acts.append(f(pre))
    return torch.stack(acts, axis)


_IN_PLACE: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid_,
    "tanh": torch.tanh_,
    "relu": torch.relu_,
}


def _cascade_in_place(z: Tensor, cascade_weight: Tensor, axis: int, activation: str, trailing: int) -> Tensor:
    """The cascade without autograd (frozen dendrites behind a perforation: the common case).

    ``z`` becomes ``a`` in place: once ``a_e`` is final it is added, with each later dendrite's
    weight on it, to all later ``z_d`` in one ``addcmul_``. Memory traffic stays linear in the
    dendrites per step instead of re-stacking every earlier activation for every dendrite.
    """
    num = z.shape[axis]
    f_ = _IN_PLACE[activation]
    for e in range(num):
        a_e = z.select(axis, e)
        f_(a_e)
        if e + 1 < num:
            # c_{d,e} for d = e+1 … D-1 lives in row triangle(d) + e of the flat cascade weights.
            rows = [_triangle(d) + e for d in range(e + 1, num)]
            c = _per_neuron(cascade_weight[rows], trailing)  # (D-e-1, out, 1...)
            z.narrow(axis, e + 1, num - e - 1).addcmul_(a_e.unsqueeze(axis), c)
    return z


def add_weighted(y: Tensor, acts: Tensor, weight: Tensor, axis: int) -> Tensor:
    """``y + Σ_d w_d ⊙ a_d`` with ``acts (..., D, out, ...)`` and ``weight [D, out]``.

    One multiply-add per set: a broadcast product summed over the set axis would allocate a
    ``(..., D, out, ...)`` temporary in forward and another in backward, and for conv layers that
    allocation, not the arithmetic, dominated the step.
    """
    trailing = acts.dim() - axis - 2
    # unbind rather than select: one backward node that stacks the D gradients, instead of D
    # select-backwards that each allocate a zero tensor of the full (..., D, out, ...) size.
    for a, w in zip(acts.unbind(axis), weight.unbind(0), strict=True):
        y = torch.addcmul(y, a, _per_neuron(w, trailing))
    return y
