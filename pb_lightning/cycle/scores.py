"""Checking validation scores before they reach the phase machine.

Shared by the Lightning callback and the plain-PyTorch tracker so that both treat a bad score
the same way: a value that is not a real number is a caller's mistake and is refused with an
error naming ``score``; a NaN or infinite score is a training problem (a diverged loss, an empty
metric) and is reported, then counted as "no improvement" — the phase machine never takes it as
a new best (see :meth:`~pb_lightning.cycle.machine.PhaseMachine.is_improvement`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from pb_lightning.errors import invalid


def as_score(value: Any, argument: str = "score") -> float:
    """``value`` as a float, or a :class:`~pb_lightning.errors.PerforationError` naming ``argument``.

    Accepts Python and NumPy reals and one-element real tensors. A bool is refused: ``True`` as a
    validation score is a mistake (a comparison passed instead of the metric), not a score of 1.

    Example::

        >>> as_score(torch.tensor([0.25]))
        0.25
        >>> try:
        ...     as_score("high")
        ... except ValueError as error:
        ...     print(error)
        `score` must be a real number (a float, an int or a one-element real tensor); got 'high'.
    """
    number = value
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            number = None
        else:
            number = value.detach().reshape(()).item()
    if isinstance(number, bool) or not isinstance(number, numbers.Real):
        shown = value if not isinstance(value, torch.Tensor) else f"tensor of shape {tuple(value.shape)}, {value.dtype}"
        raise invalid(argument, shown, "a real number (a float, an int or a one-element real tensor)")
    return float(number)


def nonfinite_message(name: str, score: float, when: str) -> str | None:
    """The warning for a NaN or infinite ``score`` (None if it is finite); ``when`` says at which epoch."""
    if math.isfinite(score):
        return None
    return (
        f"pb_lightning: the validation score {name} is {score} at {when}; it counts as no improvement "
        "and never as a new best. A diverged loss or a metric computed over no samples gives such scores."
    )
