r"""One standard for every claim that dendrites win (benchmarks/README.md, "One standard for every claim").

A dendritic configuration *wins* on a benchmark only when, paired by seed, its score minus the
**envelope** of every non-dendritic alternative at its parameter count exceeds ``WIN_SE``
standard errors of those gaps — and the win repeats on five fresh seeds. The envelope of one seed
is the best of the alternative *families* read at the arm's parameter count: a family of several
sizes (plain networks of several widths, adapters of several ranks, widenings by several
multiples) is a frontier read by :func:`frontier_value`; a family of one size below the arm's
(a restart schedule or a longer patience at the network's own width) counts as it is.

Used by ``research.py`` (from scratch: width ∪ restart ∪ patient), ``transfer.py`` (on a trained
network: fine-tuning ∪ patient ∪ restart ∪ widening ∪ adapters) and ``claims.py`` (the verdicts).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from typing import Any

import numpy as np

#: The margin of a win: the mean paired gap to the envelope must exceed this many standard errors.
WIN_SE = 2.0

Point = tuple[float, float]  # (parameters, score)


def frontier_value(points: Iterable[Point], params: float) -> tuple[float, bool] | None:
    """A frontier of (parameters, score) points read at ``params``, linear in log(parameters).

    Beyond its largest point it reads as that point's score, flagged: a family larger than
    measured is credited with no more than was measured (a harness chooses its sizes to reach past
    the dendritic arms, so the flag should stay rare, and it is reported). Below its smallest
    point it returns None: every member of the family has more parameters than the arm, so the
    family is no competitor *at* the arm's size.
    """
    pts = sorted(points)
    if not pts or params < pts[0][0]:
        return None
    if params >= pts[-1][0]:
        return pts[-1][1], params > pts[-1][0]
    xs = [math.log(p) for p, _ in pts]
    return float(np.interp(math.log(params), xs, [score for _, score in pts])), False


def envelope(families: dict[str, list[Point]], params: float) -> tuple[float, str, bool] | None:
    """The best score of any family at ``params``: (score, family, read beyond its range), or None.

    A family of one point counts when that point is not larger than ``params`` (the same rule as
    a frontier's lower end).
    """
    best: tuple[float, str, bool] | None = None
    for name, points in families.items():
        if len(points) == 1:  # one size: a competitor as it is, if it is not the larger one
            read = (points[0][1], False) if points[0][0] <= params else None
        else:
            read = frontier_value(points, params)
        if read is not None and (best is None or read[0] > best[0]):
            best = (read[0], name, read[1])
    return best


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (NaN for an empty list; NaN error for one value)."""
    if not values:
        return math.nan, math.nan
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return statistics.fmean(values), se


def plus_minus(t: Any, scale: float = 100.0, digits: int = 2, sign: bool = False) -> str:
    """``mean ± se`` of a (mean, se, ...) tuple for the reports, scaled (fractions → points); ``–`` if missing."""
    if t is None or t[0] is None or (isinstance(t[0], float) and math.isnan(t[0])):
        return "–"
    mean, se = t[0] * scale, t[1] * scale
    text = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return text + ("" if math.isnan(se) else f" ± {se:.{digits}f}")


def verdict(gaps: list[float]) -> str:
    """``wins`` when the mean paired gap to the envelope exceeds ``WIN_SE`` standard errors,
    ``loses`` when it is that far below, else ``level`` (``too few seeds`` below two)."""
    mean, se = mean_se(gaps)
    if len(gaps) < 2 or math.isnan(se):
        return "too few seeds"
    if mean > WIN_SE * se:
        return "wins"
    if mean < -WIN_SE * se:
        return "loses"
    return "level"
