"""Picking the neuron output out of a wrapped module's return value and putting it back.

Modules such as ``nn.LSTM`` or Hugging Face blocks return tuples or dicts; ``output_key`` names
the entry whose neurons carry dendrites."""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor

from pb_lightning.errors import PerforationError


def select_output(out: Any, key: int | str, name: str) -> Tensor:
    """The entry ``key`` of a module's tuple (or dict) output: the tensor that holds the neurons."""
    try:
        y = out[key]
    except (TypeError, IndexError, KeyError):
        raise PerforationError(
            f"Layer `{name}`: output_selectors gives {key!r}, but its module returned {type(out).__name__} "
            f"{_describe(out)}; give the index (tuple) or key (dict) of the tensor that holds the neurons."
        ) from None
    if not isinstance(y, Tensor):
        raise PerforationError(
            f"Layer `{name}`: output entry {key!r} is a {type(y).__name__}, not a tensor (a PackedSequence? "
            "pad the sequences, or select the tensor that holds the neurons)."
        )
    return y


def _describe(out: Any) -> str:
    if isinstance(out, Tensor):
        return f"of shape {tuple(out.shape)}"
    if isinstance(out, dict):
        return f"with keys {list(out)}"
    if isinstance(out, (tuple, list)):
        return f"of {len(out)} entries"
    return ""


def replace_output(out: Any, key: int | str, y: Tensor) -> Any:
    """``out`` with entry ``key`` replaced by ``y`` (same container type)."""
    if isinstance(out, dict):
        new = copy.copy(out)  # keeps a dict subclass (e.g. a Hugging Face ModelOutput)
        new[key] = y
        return new
    items = list(out)
    items[key] = y  # type: ignore[index]
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # a named tuple
        return type(out)(*items)
    return type(out)(items)
