"""The comparison's statistics against numbers worked out by hand (no Lightning, no fits)."""

from __future__ import annotations

import math

import pytest

from pb_lightning.reporting import comparison as cmp


def _fit(arm: str, seed: int, score: float, params: int = 100) -> dict:
    return {"arm": arm, "seed": seed, "score": score, "params": params, "wall_s": 1.0}


# Accuracies, higher is better. Per seed, dendrites − restart = 0.02, 0.03, 0.04 (mean 0.03,
# sd 0.01, SE 0.01/√3); dendrites − plain = 0.05, 0.00, 0.10.
FITS = [
    *(_fit("dendrites", s, v, 150) for s, v in enumerate([0.90, 0.91, 0.95])),
    *(_fit("restart", s, v) for s, v in enumerate([0.88, 0.88, 0.91])),
    *(_fit("plain", s, v) for s, v in enumerate([0.85, 0.91, 0.85])),
]


def test_paired_gaps_and_their_standard_error() -> None:
    gaps = cmp.paired_gaps(FITS, "max")
    assert list(gaps) == ["restart", "plain"]
    assert gaps["restart"].mean == pytest.approx(0.03)
    assert gaps["restart"].se == pytest.approx(0.01 / math.sqrt(3))
    assert gaps["restart"].resolved  # 0.03 > 2 · 0.00577
    assert gaps["plain"].mean == pytest.approx(0.05)
    assert gaps["plain"].se == pytest.approx(0.05 / math.sqrt(3))  # sd of (0.05, 0, 0.1) is 0.05
    assert not gaps["plain"].resolved  # 0.05 < 2 · 0.0289
    assert gaps["restart"].per_seed == pytest.approx({0: 0.02, 1: 0.03, 2: 0.04})


def test_a_minimised_metric_counts_a_lower_score_as_better() -> None:
    losses = [_fit("dendrites", 0, 0.30), _fit("dendrites", 1, 0.20), _fit("plain", 0, 0.40), _fit("plain", 1, 0.25)]
    gap = cmp.paired_gaps(losses, "min")["plain"]
    assert gap.mean == pytest.approx(0.075)  # (0.10 + 0.05) / 2: dendrites better
    assert gap.se == pytest.approx(0.025)


def test_only_seeds_both_arms_ran_are_paired_and_one_seed_resolves_nothing() -> None:
    fits = [_fit("dendrites", 0, 0.9), _fit("dendrites", 1, 0.8), _fit("restart", 1, 0.5)]
    gap = cmp.paired_gaps(fits, "max")["restart"]
    assert (gap.n, gap.mean, gap.se, gap.resolved) == (1, pytest.approx(0.3), None, False)
    assert "one seed cannot resolve any difference" in cmp.verdict({"restart": gap}, None, 100, "points")


def test_the_envelope_is_the_best_plain_network_at_or_below_the_dendritic_size() -> None:
    wide = [_fit("plain@32", s, v, 140) for s, v in enumerate([0.93, 0.94, 0.97])]
    too_big = [_fit("plain@64", s, 0.99, 400) for s in range(3)]
    fits = FITS + wide + too_big
    envelope = cmp.envelope_gap(fits, "max")
    assert envelope is not None
    # Per seed, the best of plain (100 params) and plain@32 (140): 0.93, 0.94, 0.97; plain@64 is larger.
    assert envelope.per_seed == pytest.approx({0: -0.03, 1: -0.03, 2: -0.02})
    assert envelope.mean == pytest.approx(-0.08 / 3)
    assert cmp.envelope_gap(FITS, "max") is None  # no width arm: no envelope
    text = cmp.verdict(cmp.paired_gaps(fits, "max"), envelope, 100, "points")
    assert text == (
        "dendrites beat restart by +3.0 ± 0.6 points over 3 seeds, "
        "but a plain network of at most the same size is 2.7 points better"
    )


def test_the_verdict_says_when_the_seeds_cannot_resolve_a_difference() -> None:
    fits = [*(_fit("dendrites", s, v) for s, v in enumerate([0.9, 0.8])), *(_fit("restart", s, 0.85) for s in range(2))]
    text = cmp.verdict(cmp.paired_gaps(fits, "max"), None, 100, "points")
    assert text == "dendrites vs restart: +0.0 ± 5.0 points over 2 seeds: no difference the seeds can resolve"


def test_the_verdict_leads_with_the_strongest_control_that_ran() -> None:
    fits = [f for f in FITS if f["arm"] != "restart"] + [_fit("inert", s, 0.8) for s in range(3)]
    assert cmp.verdict(cmp.paired_gaps(fits, "max"), None).startswith("dendrites beat inert by")


def test_the_table_has_a_row_per_arm_and_the_envelope() -> None:
    fits = FITS + [_fit("plain@32", s, 0.9, 140) for s in range(3)]
    table = cmp.markdown_table(fits, "max", metric="test_acc", scale=100, unit="points")
    rows = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert rows == ["dendrites", "restart", "plain", "plain@32", "best plain ≤ dendrites' size"]
    assert "| restart | 3 | 89.0 ± 1.0 | 100 | +3.0 ± 0.6 points | yes |" in table
