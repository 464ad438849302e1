"""Exceptions raised by pb_lightning.

Every error the library raises for bad input is a :class:`PerforationError` (itself a
``ValueError``), so a caller can catch all of them in one place while the message still names
the argument, the value it got and what would have been valid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, get_args


class PerforationError(ValueError):
    """A model, configuration or call that pb_lightning cannot work with."""


def invalid(argument: str, value: Any, valid: str) -> PerforationError:
    """Build the library's standard message: which argument, what it got, what would be valid.

    Keeping one format makes every message greppable and keeps tests able to match on
    ``argument`` and ``valid`` without depending on punctuation.
    """
    return PerforationError(f"`{argument}` must be {valid}; got {value!r}.")


def check_int(argument: str, value: object, *, minimum: int) -> None:
    """Raise unless ``value`` is an int ``>= minimum``.

    ``bool`` is an ``int`` subclass, but ``True`` as a pool size or a patience is almost certainly a
    mistake, so it is rejected.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise invalid(argument, value, f"an int >= {minimum}")


def choices_of(literal: Any) -> tuple[str, ...]:
    """The values of a ``typing.Literal`` alias, so that a type hint and its runtime check are one list.

    >>> from typing import Literal
    >>> choices_of(Literal["min", "max"])
    ('min', 'max')
    """
    values = get_args(literal)
    if not values:
        raise TypeError(f"choices_of needs a typing.Literal alias; got {literal!r}")
    return values


def check_choice(argument: str, value: object, choices: tuple[str, ...]) -> None:
    """Raise unless ``value`` is one of ``choices``, listing them in the message."""
    if value not in choices:
        raise invalid(argument, value, "one of " + ", ".join(repr(c) for c in choices))


def check_float(argument: str, value: object, valid: str, ok: Callable[[float], bool]) -> None:
    """Raise ``invalid(argument, value, valid)`` unless ``value`` is a finite real number (not a bool)
    for which ``ok`` holds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise invalid(argument, value, valid)


def torchscript_refused(layer: str) -> PerforationError:
    """The error for TorchScript (``torch.jit.trace``/``script``) of a model with dendrites.

    TorchScript is in maintenance in torch 2.x and cannot express the dendrite layers (their
    forward takes the wrapped module's ``*args, **kwargs``; sparse dendrites use a custom
    autograd function that a trace cannot save; a trace check sees the fused dendrite operation
    differ between invocations). ``torch.export`` and the ONNX exporter built on it handle them,
    with a dynamic batch, so the refusal points there instead of a half-working trace.
    """
    return PerforationError(
        f"pb_lightning: TorchScript (torch.jit.trace / torch.jit.script / to_torchscript) cannot compile "
        f"pb_lightning's dendrite layers (layer `{layer}`). Deploy the copy pb_lightning.to_inference(model) "
        "returns with torch.export.export(deployed, (x,), dynamic_shapes=...) or torch.onnx.export(deployed, (x,), "
        "path, dynamo=True); the README's 'Deploy' section shows both."
    )
