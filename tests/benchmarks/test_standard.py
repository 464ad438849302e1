"""``benchmarks/standard.py``: the frontier reading, the envelope and the verdict, against written-out values."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
standard = pytest.importorskip("standard")


def test_a_frontier_is_read_in_log_parameters_and_never_past_what_was_measured() -> None:
    points = [(400.0, 0.7), (100.0, 0.5), (1600.0, 0.8)]
    value, beyond = standard.frontier_value(points, 200.0)  # halfway between 100 and 400 in log space
    assert value == pytest.approx(0.6)
    assert not beyond
    value, _ = standard.frontier_value(points, 800.0)
    assert value == pytest.approx(0.75)
    assert standard.frontier_value(points, 6400.0) == (0.8, True)  # no credit beyond the largest
    assert standard.frontier_value(points, 50.0) is None  # every point is larger: no competitor there
    assert standard.frontier_value([], 50.0) is None


def test_the_envelope_takes_the_best_family_and_single_sizes_count_only_when_not_larger() -> None:
    families = {
        "width": [(100.0, 0.50), (400.0, 0.60)],
        "restart": [(100.0, 0.56)],
        "patient": [(300.0, 0.90)],  # larger than the arm at 200: not a competitor there
    }
    # width at 200: 0.50 + 0.10 · log(2)/log(4) = 0.55 < restart's 0.56.
    assert standard.envelope(families, 200.0) == (0.56, "restart", False)
    assert standard.envelope(families, 300.0) == (0.90, "patient", False)
    value, family, beyond = standard.envelope(families, 1000.0)
    assert (value, family, beyond) == (0.90, "patient", False)
    assert standard.envelope({"width": [(400.0, 0.6), (800.0, 0.7)]}, 200.0) is None


@pytest.mark.parametrize(
    ("gaps", "expected"),
    [
        ([0.03, 0.04, 0.05], "wins"),
        ([-0.03, -0.04, -0.05], "loses"),
        ([0.05, -0.04, 0.01], "level"),
        ([0.1], "too few seeds"),
    ],
)
def test_a_win_needs_two_standard_errors(gaps: list[float], expected: str) -> None:
    assert standard.verdict(gaps) == expected
    mean, se = standard.mean_se(gaps)
    assert mean == pytest.approx(statistics.fmean(gaps))
    if len(gaps) > 1:
        assert se == pytest.approx(statistics.stdev(gaps) / math.sqrt(len(gaps)))


def test_the_margin_is_two_standard_errors_not_one() -> None:
    gaps = [0.0, 0.02, 0.04, 0.06]  # mean 0.03, SE ≈ 0.0129: above 2 SE
    assert standard.verdict(gaps) == "wins"
    gaps = [-0.02, 0.02, 0.04, 0.08]  # mean 0.03, SE ≈ 0.0208: between 1 and 2 SE
    mean, se = standard.mean_se(gaps)
    assert se < mean < 2 * se
    assert standard.verdict(gaps) == "level"
