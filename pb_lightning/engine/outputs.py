"""Picking the neuron output out of a wrapped module's return value and putting it back.

Modules such as ``nn.LSTM`` or Hugging Face blocks return tuples or dicts; ``output_key`` names
the entry whose neurons carry dendrites."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from torch import Tensor

from pb_lightning.errors import PerforationError


def select_output(out: Any, key: int | str, name: str) -> Tensor:
    """The entry ``key`` of a module's tuple (or dict) output: the tensor that holds the neurons.

    A str ``key`` also names a field of a named tuple or of a dataclass output: the names a user
    sees in the module's code, where an index would be a guess.
    """
    try:
        y = output_entry(out, key)
    except (TypeError, IndexError, KeyError):
        raise PerforationError(
            f"Layer `{name}`: output_selectors gives {key!r}, but its module returned {type(out).__name__} "
            f"{_describe(out)}; give the index (tuple) or key (dict, or field name) of the tensor that holds the "
            "neurons."
        ) from None
    if not isinstance(y, Tensor):
        raise PerforationError(
            f"Layer `{name}`: output entry {key!r} is a {type(y).__name__}, not a tensor (a PackedSequence? "
            "pad the sequences, or select the tensor that holds the neurons)."
        )
    return y


def output_entry(out: Any, key: int | str) -> Any:
    """``out[key]``, or the field ``key`` of a named tuple or dataclass output."""
    return getattr(out, key) if isinstance(key, str) and _has_field(out, key) else out[key]


def not_a_tensor(out: Any, name: str, module: Any) -> PerforationError:
    """The error for a module without ``output_selectors`` whose output is not one tensor.

    Raised at its first forward, instead of an AttributeError from deep inside the layer: the
    message says which argument names the entry that holds the neurons.
    """
    kind = type(module).__name__
    return PerforationError(
        f"Layer `{name}` ({kind}): its module returned {type(out).__name__} {_describe(out)}, not a tensor, "
        f"so pb_lightning cannot tell which part holds the neurons. Name it with "
        f"output_selectors={{{kind}: <index, key or field name>}} (perforate(..., output_selectors=...), or "
        "PerforatedModule(perforate_output_selectors=...))."
    )


def _has_field(out: Any, key: str) -> bool:
    fields = getattr(out, "_fields", None)  # a named tuple
    if fields is not None:
        return key in fields
    return dataclasses.is_dataclass(out) and not isinstance(out, dict) and hasattr(out, key)


def _describe(out: Any) -> str:
    if isinstance(out, Tensor):
        return f"of shape {tuple(out.shape)}"
    if isinstance(out, dict):
        return f"with keys {list(out)}"
    if hasattr(out, "_fields"):
        return f"with fields {list(out._fields)}"
    if isinstance(out, (tuple, list)):
        return f"of {len(out)} entries"
    if dataclasses.is_dataclass(out):
        return f"with fields {[f.name for f in dataclasses.fields(out)]}"
    return ""


def replace_output(out: Any, key: int | str, y: Tensor) -> Any:
    """``out`` with entry ``key`` replaced by ``y`` (same container type)."""
    if isinstance(out, dict):
        new = copy.copy(out)  # keeps a dict subclass (e.g. a Hugging Face ModelOutput)
        new[key] = y
        return new
    if isinstance(key, str):  # a field of a named tuple or a dataclass (see select_output)
        if hasattr(out, "_fields"):
            return out._replace(**{key: y})
        return dataclasses.replace(out, **{key: y})
    items = list(out)
    items[key] = y
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # a named tuple
        return type(out)(*items)
    return type(out)(items)
