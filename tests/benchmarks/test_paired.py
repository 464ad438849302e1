"""``benchmarks/paired.py``: the pairing's tables against written-out runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
paired = pytest.importorskip("paired")


def _run(acc: float, epochs: int, **story: object) -> dict:
    return {"test_acc": acc, "epochs": epochs, "dendrites_per_layer": 1, **story}


def test_the_gap_is_split_by_the_old_runs_length() -> None:
    base = {("b", s): _run(0.5, 10) for s in range(3)}
    old = {("b", 0): _run(0.80, 30), ("b", 1): _run(0.80, 31), ("b", 2): _run(0.90, 60)}
    new = {("b", 0): _run(0.81, 20), ("b", 1): _run(0.79, 20), ("b", 2): _run(0.85, 25)}
    # Seed 0 ran 3x the base's 10 epochs (counted as within), seeds 1 and 2 longer.
    table = paired.by_length(new, old, base)
    assert "| b | 1 | +1.00 | 2 | -3.00 |" in table
    assert "| all benchmarks | 1 | +1.00 | 2 | -3.00 |" in table


def test_the_story_table_counts_stops_and_shares() -> None:
    story = {"first_phase_epochs": 50, "neuron_epochs": 95, "dendrite_epochs": 5, "rolled_back_epochs": 20}
    new = {
        ("b", 0): {**_run(0.8, 100), "stop": "budget", "accepted_cycles": 2, "rejected_cycles": 1, **story},
        ("b", 1): {**_run(0.8, 100), "stop": "max_tries", "accepted_cycles": 0, "rejected_cycles": 2, **story},
    }
    table = paired.story(new)
    assert "| b | 2 | budget 1, max_tries 1 | 1.0 / 1.5 | 100 | 50% | 45% | 5.0% | 20% |" in table
    assert paired.story({("b", 0): _run(0.8, 100)}) == ""  # runs recorded before the story fields
