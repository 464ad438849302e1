"""The operations that dense and sparse banks share on stacked sets ``[N, out, ...]``.

A bank runs N dendrite sets as one operation. The dense banks (:mod:`pb_lightning.engine.banks`)
and the sparse ones (:mod:`pb_lightning.engine.sparse_banks`) differ in how they build a set's
weights, not in the operation that runs them or in how fresh weights are drawn, so those live
here, once: the linear map of every set at once, the conv function for a layer's dimensionality,
and the uniform initialisation PyTorch gives the layer the dendrites copy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The conv layers whose dendrites are conv banks (dense or sparse).
CONV_TYPES: tuple[type[nn.Conv1d], type[nn.Conv2d], type[nn.Conv3d]] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: The functional conv for a conv layer's number of spatial dimensions.
CONV_FUNCTIONS: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def linear_sets(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` of every set of ``weight [N, out, in]`` at once, as ``(..., N, out)``."""
    n, out, _ = weight.shape
    y = F.linear(x, weight.reshape(n * out, -1), None if bias is None else bias.reshape(n * out))  # (..., N*out)
    return y.unflatten(-1, (n, out))


def uniform(shape: tuple[int, ...], bound: float, like: Tensor) -> Tensor:
    """Fresh weights drawn from ``U(-bound, bound)`` with ``like``'s dtype and device.

    ``bound`` is PyTorch's default for the copied layer (``1/sqrt(fan_in)``) scaled by
    ``DendriteConfig.init_scale``, so dendrites start at the scale of the layer they extend.
    """
    return torch.empty(shape, dtype=like.dtype, device=like.device).uniform_(-bound, bound)
