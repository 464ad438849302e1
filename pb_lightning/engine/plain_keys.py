"""Plain state dicts of a trained network, loaded into its perforated form.

``perforate()`` moves each wrapped module to ``<name>.module`` and a paired norm from its own
place into ``<name>.norm``; a trained network's plain state dict names them as they were. The
wrapped module's keys are mapped by the layer itself (``PerforatedLayer._load_from_state_dict``);
a norm's keys lie outside the layer's prefix, so a load hook of the closest module holding both
places maps them (here).
"""

from __future__ import annotations

import functools
from typing import Any, cast

from torch import nn


def hook_plain_norm_keys(model: nn.Module, layer_name: str, norm_name: str) -> None:
    """Let a plain state dict's keys for a norm that moved into a perforated layer still load.

    A trained network's plain state dict keeps the norm's tensors under its old name
    (``net.1.running_mean``), where the perforated model holds an ``nn.Identity`` and the norm
    sits in the layer (``net.0.norm.running_mean``). The layer cannot move those keys itself: they
    lie outside its prefix. So the closest module holding both places moves them before either
    loads — it is on the way of every ``load_state_dict`` that reaches both, from the model's root
    or from that module itself. The hook is a ``functools.partial`` of plain strings, so the model
    still pickles and deep-copies.
    """
    layer_parts, norm_parts = layer_name.split("."), norm_name.split(".")
    common = 0
    while common < min(len(layer_parts), len(norm_parts)) - 1 and layer_parts[common] == norm_parts[common]:
        common += 1
    holder = model.get_submodule(".".join(layer_parts[:common]))
    hook = functools.partial(_move_norm_keys, ".".join(layer_parts[common:]), ".".join(norm_parts[common:]))
    holder.register_load_state_dict_pre_hook(hook)


def _move_norm_keys(layer: str, norm: str, module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """The hook of :func:`hook_plain_norm_keys`: ``<norm>.*`` → ``<layer>.norm.*``, for a plain dict only."""
    old, new = f"{prefix}{norm}.", f"{prefix}{layer}.norm."
    names = list(cast(nn.Module, module.get_submodule(layer).norm).state_dict(keep_vars=True))
    present = [n for n in names if old + n in state_dict]
    if present and not any(new + n in state_dict for n in names):  # a perforated dict is never touched
        for n in present:
            state_dict[new + n] = state_dict.pop(old + n)
