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


def nonfinite_message(name: str | None, score: float, when: str) -> str | None:
    """The warning for a NaN or infinite ``score`` (None if it is finite); ``when`` says at which epoch.

    ``name`` is the monitored metric's name, or None where the score has none (the tracker's
    ``score`` argument), so the message never reads "the validation score score".
    """
    if math.isfinite(score):
        return None
    what = "the validation score" if name is None else f"the validation score {name}"
    return (
        f"pb_lightning: {what} is {score} at {when}; it counts as no improvement "
        "and never as a new best. A diverged loss or a metric computed over no samples gives such scores."
    )


def format_scores(*scores: float | None) -> list[str]:
    """``scores`` as text, with as many significant digits as it takes for unequal ones to differ.

    Six digits read well, but two scores closer than that (95.6330 and 95.6331 under a small
    improvement threshold) would print as the same number next to the words "improved": the
    digits grow, up to float's 17, until every pair of unequal scores reads differently.

    Example::

        >>> format_scores(0.2970280051, 0.2703150213)
        ['0.297028', '0.270315']
        >>> format_scores(95.63300323, 95.63304123)
        ['95.633', '95.63304']
    """
    finite = [s for s in scores if s is not None]
    digits = 6
    while digits < 17 and any(
        a != b and f"{a:.{digits}g}" == f"{b:.{digits}g}" for i, a in enumerate(finite) for b in finite[i + 1 :]
    ):
        digits += 1
    return ["n/a" if s is None else f"{s:.{digits}g}" for s in scores]


def score_change(before: float | None, after: float | None) -> str:
    """``"before -> after"``, with the digits that show the change (see :func:`format_scores`)."""
    return " -> ".join(format_scores(before, after))
