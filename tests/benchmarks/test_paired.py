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


def _validation(t: float, epoch: int, phase: str, val: float, test: float, dendrites: int = 0) -> dict:
    return {"t": t, "epoch": epoch, "phase": phase, "val": val, "test": test, "dendrites": dendrites}


def _trajectory_run(mode: str = "max", first_phase_s: float | None = 2.0) -> dict:
    # Validation scores and the test scores of the weights each judged. Epoch 3 starts the dendrite
    # phase (first_phase_s = its t); epoch 4 is frozen and would be the best by its score alone;
    # epoch 5 beats the best by less than the 1e-4 margin; epoch 6 beats it properly, at t = 6.
    scores = [0.50, 0.60, 0.70, 0.65, 0.90, 0.70005, 0.80]
    tests = [0.40, 0.55, 0.66, 0.60, 0.99, 0.99, 0.77]
    phases = ["neuron", "neuron", "neuron", "dendrite", "dendrite", "neuron", "neuron"]
    sign = 1.0 if mode == "max" else -1.0
    trajectory = [
        _validation(float(i), i, phase, sign * val, test, dendrites=int(i >= 5))
        for i, (val, test, phase) in enumerate(zip(scores, tests, phases, strict=True))
    ]
    return {**_run(0.77, 7), "mode": mode, "first_phase_s": first_phase_s, "trajectory": trajectory, "wall_s": 7.0}


@pytest.mark.parametrize("mode", ["max", "min"])
def test_a_run_cut_at_a_budget_keeps_its_best_neuron_phase_weights_by_then(mode: str) -> None:
    run = _trajectory_run(mode)
    # 2.5 x 2 s = 5 s: validations 0-5 are seen; 5 beat 2 by less than the margin, 4 was frozen.
    cut = paired.at_budget(run, 2.5)
    assert (cut["test_acc"], cut["epochs"], cut["wall_s"], cut["dendrites_per_layer"]) == (0.66, 5, 5.0, 0)
    # 3 x 2 s = 6 s: validation 6 beats the best properly and is kept.
    assert paired.at_budget(run, 3.0)["test_acc"] == 0.77
    whole = paired.at_budget(run, float("inf"))
    assert (whole["test_acc"], whole["epochs"], whole["dendrites_per_layer"]) == (run["test_acc"], 6, 1)
    assert (run["epochs"], run["test_acc"]) == (7, 0.77)  # the run itself is not changed


def test_a_run_cut_after_a_number_of_epochs_ignores_the_clock() -> None:
    run = _trajectory_run()
    for v in run["trajectory"]:
        v["t"] = 100.0 * v["epoch"]  # a slow machine: no budget of seconds would reach epoch 6
    cut = paired.at_epochs(run, 5)
    assert (cut["test_acc"], cut["epochs"]) == (0.66, 5)
    assert paired.at_epochs(run, 6)["test_acc"] == 0.77
    assert paired.at_budget(run, 2.5)["test_acc"] == 0.40  # only validation 0 fits 5 s of this clock


def test_a_run_whose_first_phase_never_ended_is_not_cut() -> None:
    run = _trajectory_run(first_phase_s=None)
    assert paired.at_budget(run, 1.0)["test_acc"] == 0.77


def _write(tmp_path: Path, name: str, runs: list[dict]) -> str:
    import json

    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"runs": [{"benchmark": "b", "seed": 0, "arm": name, **r} for r in runs]}))
    return f"{path}:{name}"


def test_the_cut_is_printed_against_the_new_arm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new = _write(tmp_path, "new", [_run(0.70, 4)])
    old = _write(tmp_path, "old", [_trajectory_run()])
    assert paired.main(["--new", new, "--old", old, "--old-at-budget", "2.5"]) == 0
    text = capsys.readouterr().out
    assert "on 1 of 1 runs" in text
    assert "| b | 1 | 70.00 | 66.00 | +4.00 ± nan | no | 4 / 5 | 1.0 / 0.0 |" in text


def test_the_old_runs_can_be_cut_at_the_new_runs_epochs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new = _write(tmp_path, "new", [_run(0.70, 6)])
    old = _write(tmp_path, "old", [_trajectory_run()])
    assert paired.main(["--new", new, "--old", old, "--old-at-new-epochs"]) == 0
    assert "| b | 1 | 70.00 | 77.00 | -7.00 ± nan | no | 6 / 6 | 1.0 / 1.0 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        paired.main(["--new", new, "--old", old, "--old-at-new-epochs", "--old-at-budget", "2"])
    assert "give one" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("budget", "runs", "message"),
    [("0.5", [_trajectory_run()], "--old-at-budget must be >= 1"), ("2", [_run(0.7, 4)], "none in ['b']")],
)
def test_the_cut_refuses_what_it_cannot_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], budget: str, runs: list[dict], message: str
) -> None:
    new = _write(tmp_path, "new", [_run(0.70, 4)])
    with pytest.raises(SystemExit):
        paired.main(["--new", new, "--old", _write(tmp_path, "old", runs), "--old-at-budget", budget])
    assert message in capsys.readouterr().err
