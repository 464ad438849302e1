"""``benchmarks/research.py``: the quick run end to end, and the frontier arithmetic against a reference."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from tests.helpers import run_benchmark

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
research = pytest.importorskip("research")


@pytest.mark.slow  # a benchmark smoke test: the research script's quick run
def test_quick_run_fits_every_arm_and_renders_from_the_json(tmp_path: Path) -> None:
    args = ("--quick", "--variants", "pb", "fan4-local", "--out", str(tmp_path))
    result = run_benchmark("research.py", *args, timeout=120)
    saved = json.loads((tmp_path / "results.json").read_text())
    arms = {r["arm"] for r in saved["runs"]}
    expected = {"base", "pb", "pb/inert", "fan4-local", "fan4-local/inert", "restart@8", "restart@16", "width@12"}
    assert expected | {"width@16", "width@24"} == arms
    assert {r["seed"] for r in saved["runs"]} == {0, 1}
    summary = saved["summary"]["digits MLP-8"]
    for key in ("vs_width_frontier", "vs_restart_frontier", "vs_inert"):
        assert math.isfinite(summary["pb"][key][0]), key
    inert = [r for r in saved["runs"] if r["arm"] == "pb/inert"]
    assert all(r["dendrites_per_layer"] >= 1 for r in inert)  # the control grew dendrites too
    assert all(r["dendrites_per_layer"] == 0 for r in saved["runs"] if r["kind"] in ("base", "width", "restart"))

    # A sparse set (each dendrite sees 4 inputs) costs less than a dense one (64, 8 and 8 inputs).
    def per_set(arm: str) -> list[float]:
        rows = [r for r in saved["runs"] if r["arm"] == arm and r["dendrites_per_layer"] > 0]
        return [(r["params"] - 682) / r["dendrites_per_layer"] for r in rows]

    assert per_set("fan4-local/inert")
    assert max(per_set("fan4-local/inert")) < min(per_set("pb/inert"))
    written = (tmp_path / "results.md").read_text()
    (tmp_path / "results.md").unlink()
    run_benchmark("research.py", "--render", "--out", str(tmp_path))
    assert (tmp_path / "results.md").read_text() == written
    assert "| pb/inert |" in written
    assert written.strip() in result.stdout


def test_the_frontier_is_interpolated_in_log_parameters() -> None:
    points = [(400.0, 0.7), (100.0, 0.5), (1600.0, 0.8)]
    # Halfway between 100 and 400 in log space is 200.
    value, extrapolated = research.interpolate(points, 200.0)
    assert value == pytest.approx(0.6)
    assert not extrapolated
    value, _ = research.interpolate(points, 800.0)
    assert value == pytest.approx(0.75)
    # Beyond the range: the end segment's slope (0.1 per factor 4), flagged.
    value, extrapolated = research.interpolate(points, 6400.0)
    assert value == pytest.approx(0.9)
    assert extrapolated
    value, extrapolated = research.interpolate(points, 25.0)
    assert value == pytest.approx(0.3)
    assert extrapolated


def test_gaps_are_paired_by_seed() -> None:
    def row(arm: str, kind: str, seed: int, acc: float, params: int) -> dict:
        return {
            "benchmark": "b",
            "arm": arm,
            "kind": kind,
            "seed": seed,
            "test_acc": acc,
            "params": params,
            "width": 1,
            "epochs": 1,
            "wall_s": 0.0,
            "dendrites_per_layer": 0,
            "accept_correlation": None,
        }

    rows = []
    for seed, shift in ((0, 0.0), (1, 0.1)):
        rows += [
            row("base", "base", seed, 0.5 + shift, 100),
            row("width@2", "width", seed, 0.7 + shift, 400),
            row("restart@1", "restart", seed, 0.55 + shift, 100),
            row("restart@2", "restart", seed, 0.75 + shift, 400),
            row("pb", "dendrites", seed, 0.62 + shift, 200),
            row("pb/inert", "inert", seed, 0.6 + shift, 200),
        ]
    pb = research.summarize(rows)["b"]["pb"]
    # Each seed's frontier at 200 params is 0.6 + shift (width) and 0.65 + shift (restart).
    assert pb["vs_width_frontier"][0] == pytest.approx(0.02)
    assert pb["vs_width_frontier"][1] == pytest.approx(0.0, abs=1e-12)  # the same gap on both seeds
    assert pb["vs_restart_frontier"][0] == pytest.approx(-0.03)
    assert pb["vs_inert"][0] == pytest.approx(0.02)
    assert pb["vs_base"][0] == pytest.approx(0.12)


def test_regression_score_is_r_squared_against_a_reference() -> None:
    import torch

    torch.manual_seed(0)
    x = torch.randn(300, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 * torch.randn(300)
    model = torch.nn.Linear(3, 1)
    score, loss = research.evaluate(model, x, y, "regression")
    with torch.no_grad():
        pred = model(x).squeeze(-1)
    sse = float(((pred - y) ** 2).sum())
    sst = float(((y - y.mean()) ** 2).sum())
    assert score == pytest.approx(1 - sse / sst, rel=1e-5)
    assert loss == pytest.approx(sse / len(y), rel=1e-5)
    assert score < 0.9  # an untrained model explains little of the variance: the test can fail


def test_regression_benchmark_keeps_real_targets_standardised_and_fits() -> None:
    import torch

    bench = research.all_benches()["Friedman-1 MLP-4"]
    data = research.splits(bench)
    x_train, y_train = data["train"]
    assert y_train.dtype == torch.float32
    assert float(y_train.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(y_train.std()) == pytest.approx(1.0, abs=1e-2)
    assert x_train.shape[1] == 10
    arm = research.Arm("width@8", "width", 8)
    row = research.fit(bench, arm, 0, data, quick=True)
    assert row["task"] == "regression"
    assert 0.3 < row["test_acc"] <= 1.0  # eight epochs of a width-8 MLP explain most of Friedman #1


def test_run_story_against_a_written_out_run() -> None:
    from pb_lightning import PhaseSchedule
    from pb_lightning.cycle.machine import PhaseMachine

    schedule = PhaseSchedule(
        neuron_patience=1, dendrite_patience=1, dendrite_patience_steps=None, run_budget=None, max_tries=1
    )
    machine = PhaseMachine("min", schedule)
    # Validations 1-2: the first neuron phase; 3-4: a dendrite phase; 5-6: its neuron phase, which
    # beats 1.0 (accepted); 7-8: a second dendrite phase; 9-10: its neuron phase, which does not
    # beat 0.8 (rolled back: validations 7-10), and max_tries=1 ends the run.
    for score, candidate in [(1.0, None), (1.1, None), (1.0, 0.4), (1.0, 0.4), (0.8, None), (0.9, None)]:
        machine.step(score, candidate)
    for score, candidate in [(0.8, 0.3), (0.8, 0.3), (0.85, None), (0.86, None)]:
        decision = machine.step(score, candidate)
    assert decision.action == "stop"
    story = research.run_story(machine.state.history, complete=True)
    assert story == {
        "stop": "max_tries",
        "first_phase_epochs": 2,
        "neuron_epochs": 6,
        "dendrite_epochs": 4,
        "rolled_back_epochs": 4,
    }
    assert research.run_story(machine.state.history, complete=False)["stop"] == "max_epochs"


def test_run_story_of_a_run_the_budget_ended() -> None:
    from pb_lightning import PhaseSchedule
    from pb_lightning.cycle.machine import PhaseMachine

    schedule = PhaseSchedule(neuron_patience=2, dendrite_patience=1, dendrite_patience_steps=None, run_budget=2.0)
    machine = PhaseMachine("min", schedule)
    # 4 validations of first neuron phase, so 8 in all; the cycle still running at the 8th is
    # judged there (it improved: kept, nothing rolled back).
    for score, candidate in [(1.0, None), (0.9, None), (0.9, None), (0.9, None), (0.9, 0.5), (0.9, 0.5)]:
        machine.step(score, candidate)
    assert machine.step(0.85).action == "continue"
    assert machine.step(0.84).action == "stop"
    assert research.run_story(machine.state.history, complete=True) == {
        "stop": "budget",
        "first_phase_epochs": 4,
        "neuron_epochs": 6,
        "dendrite_epochs": 2,
        "rolled_back_epochs": 0,
    }
