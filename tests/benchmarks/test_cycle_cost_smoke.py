"""``benchmarks/cycle_cost.py --quick`` runs end to end and its phase clock accounts for the fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import run_benchmark

# Benchmark smoke tests: each runs a benchmark script (most in a subprocess).
pytestmark = pytest.mark.slow

pytest.importorskip("sklearn")


def test_cycle_cost_quick_run_splits_the_dendritic_fit_by_phase(tmp_path: Path) -> None:
    run_benchmark("cycle_cost.py", "--quick", "--out", str(tmp_path))
    data = json.loads((tmp_path / "results.json").read_text())
    (run,) = data["runs"]
    assert run["benchmark"] == "digits MLP-8"
    phases = run["phases"]
    # --quick: 3 neuron epochs, one dendrite phase of 2 epochs, then neuron epochs to the end.
    assert phases["epochs"]["dendrite"] == pytest.approx(2.0)
    assert sum(phases["epochs"].values()) == pytest.approx(run["pb"]["epochs"])
    assert phases["validations"]["dendrite"] == 2
    clocked = sum(phases["seconds"].values())
    assert 0 < clocked <= run["pb"]["wall_s"]
    assert 0 < run["dendrite_val_wall_share"] < run["dendrite_wall_share"] < 1
    assert run["wall_ratio"] == pytest.approx(run["pb"]["wall_s"] / run["base"]["wall_s"])
    assert run["epoch_ratio"] == pytest.approx(run["pb"]["epochs"] / run["base"]["epochs"])
    table = (tmp_path / "results.md").read_text()
    assert "| digits MLP-8 | 1 |" in table
    assert "frozen val" in table
