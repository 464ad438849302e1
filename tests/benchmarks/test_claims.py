"""``benchmarks/claims.py``: every dendritic arm judged against the plain families, on synthetic runs."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
claims = pytest.importorskip("claims")


def _run(arm: str, kind: str, seed: int, params: float, score: float) -> dict:
    return {"benchmark": "b", "arm": arm, "kind": kind, "seed": seed, "params": params, "test_acc": score}


def test_families_are_named_by_their_arms() -> None:
    assert claims.family_of("base") == "width"
    assert claims.family_of("width@12") == "width"
    assert claims.family_of("restart@4") == "restart"
    assert claims.family_of("patient@8") == "patient"
    assert claims.family_of("pb") is None
    assert claims.family_of("pb/inert") is None
    assert claims.family_of("baseline") is None


def test_gaps_are_paired_by_seed_and_grouped_by_five_seeds(tmp_path: Path) -> None:
    runs = []
    expected: dict[str, list[float]] = {"0-4": [], "5-9": []}
    for seed in (0, 1, 2, 5, 6):
        shift = 0.01 * seed
        runs += [
            _run("base", "base", seed, 100, 0.50 + shift),
            _run("width@8", "width", seed, 400, 0.60 + shift),
            _run("restart@4", "restart", seed, 100, 0.57 + shift),
            _run("pb", "dendrites", seed, 200, 0.58 + 2 * shift),
            _run("pb/inert", "inert", seed, 200, 0.99),  # never a competitor, never judged
        ]
        # Reference: width at 200 reads 0.55 + shift, restart 0.57 + shift: the envelope is restart.
        expected["0-4" if seed < 5 else "5-9"].append((0.58 + 2 * shift) - (0.57 + shift))
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"runs": runs[:-5] + [dict(runs[-2], test_acc=0.0)]}))
    second.write_text(json.dumps({"runs": runs[-5:]}))  # the later file wins for the same key
    rows = claims.judge(claims.pooled([first, second]))
    assert [(r["arm"], r["seeds"], r["n"]) for r in rows] == [("pb", "0-4", 3), ("pb", "5-9", 2)]
    for row in rows:
        gaps = expected[row["seeds"]]
        assert row["gap"][0] == pytest.approx(statistics.fmean(gaps))
        assert row["gap"][1] == pytest.approx(statistics.stdev(gaps) / math.sqrt(len(gaps)))
        assert row["families"] == ["restart"]
    assert rows[0]["verdict"] == "wins"  # gaps 0.01, 0.02, 0.03: mean 0.02, SE 0.0058
    text = claims.markdown(rows, ["cmd"])
    assert "| b | pb | 0-4 | 3 | +2.00 ± 0.58 | restart | wins |" in text
    assert "- b, `pb`: fresh seeds 5-9: wins" in text
