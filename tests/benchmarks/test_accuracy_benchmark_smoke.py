"""``benchmarks/accuracy.py --quick`` runs end to end, so the accuracy benchmark cannot rot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import run_benchmark

# Benchmark smoke tests: each runs a benchmark script (most in a subprocess).
pytestmark = pytest.mark.slow

pytest.importorskip("sklearn")


def test_accuracy_quick_run_writes_every_variant(tmp_path: Path) -> None:
    # The timeout only guards against a hang: this run takes ~1 min alone, several under load.
    run_benchmark("accuracy.py", "--quick", "--controls", "--out", str(tmp_path), timeout=900)
    data = json.loads((tmp_path / "results.json").read_text())
    variants = {(r["benchmark"], r["variant"]) for r in data["runs"]}
    for bench in ("digits MLP-8", "spirals MLP 2-8-8-2"):
        assert {(bench, v) for v in ("base", "pb", "grad", "wide", "inert", "restart")} <= variants
    # The controls are what they say: the inert run grew (inert) dendrites, the restart run none.
    for r in data["runs"]:
        assert r["inert"] == (r["variant"] == "inert"), r
        assert r["restarts_only"] == (r["variant"] == "restart"), r
    assert all(r["dendrites_per_layer"] == 1 for r in data["runs"] if r["variant"] == "inert")
    assert all(r["dendrites_per_layer"] == 0 for r in data["runs"] if r["variant"] == "restart")
    assert any(r["variant"] == "full" for r in data["runs"])
    pb = [r for r in data["runs"] if r["variant"] == "pb"]
    assert all(r["dendrites_per_layer"] == 1 for r in pb)  # --quick adds exactly one set
    assert "| benchmark | variant |" in (tmp_path / "results.md").read_text()
