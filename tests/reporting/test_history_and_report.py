"""What a run leaves behind: TensorBoard scalars and hparams, the history file, the plot, the report."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import pb_lightning as pb
from pb_lightning.demos.digits import DigitsDataModule, DigitsMLP
from pb_lightning.lightning import recorder
from pb_lightning.lightning.cli import console
from pb_lightning.reporting.history import final_report, format_report, load_history
from tests.helpers import fast_trainer

# One pytest-xdist worker for the module, so its module-scoped run is fitted once.
pytestmark = [pytest.mark.xdist_group("history_and_report"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _run(tmp_path: Path, **callback_options: Any) -> tuple[pb.PerforatedCallback, Path, DigitsMLP]:
    """A fixed schedule in which every cycle fails (an unreachable absolute threshold): one run
    shows acceptances, a rejection with retry, and the final rejection."""
    pl.seed_everything(0)
    options = {
        "neuron_epochs": 2,
        "dendrite_epochs": 2,
        "max_dendrites": 3,
        "max_tries": 2,
        "improvement_threshold_abs": 10.0,
    }
    options.update(callback_options)
    callback = pb.PerforatedCallback("val_loss", "min", **options)
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = fast_trainer(tmp_path, [callback], 30, logger=logger)
    model = DigitsMLP(hidden=8, lr=1e-2)
    trainer.fit(model, DigitsDataModule())
    return callback, Path(logger.log_dir), model


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[pb.PerforatedCallback, Path, DigitsMLP]:
    return _run(tmp_path_factory.mktemp("history"))


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_phase_dendrites_parameters_correlations_and_events(run: Any) -> None:
    callback, log_dir, model = run
    scalars = _scalars(log_dir)
    rows = [r for r in load_history(log_dir) if r["action"] != "end"]
    actions = [r["action"] for r in rows]
    assert actions == [
        "continue",
        "start_dendrite_phase",
        "continue",
        "accept",
        "continue",
        "retry",
        "continue",
        "accept",
        "continue",
        "stop",
    ]
    # One value per decision, in order, equal to the history's.
    assert [v for _, v in scalars["pb/dendrites_total"]] == [3.0 * r["dendrites"] for r in rows]
    assert [v for _, v in scalars["pb/parameters_total"]] == [float(r["parameters"]) for r in rows]
    assert [v for _, v in scalars["pb/dendrite_phase"]] == [
        float(a in ("start_dendrite_phase", "retry") or (p == "dendrite" and a == "continue"))
        for a, p in zip(actions, (r["phase"] for r in rows), strict=True)
    ]
    assert [v for _, v in scalars["pb/event/dendrites_accepted"]] == [float(a == "accept") for a in actions]
    assert [v for _, v in scalars["pb/event/cycle_rejected"]] == [float(a in ("retry", "stop")) for a in actions]
    assert scalars["pb/dendrites/net.0"][3][1] == 1.0
    # Candidate correlations are logged at the dendrite-phase decisions only, and are correlations.
    correlation = scalars["pb/candidate_correlation_max/net.2"]
    assert len(correlation) == sum(r["phase"] == "dendrite" for r in rows)
    assert all(0.0 < v <= 1.0 for _, v in correlation)
    assert all(
        mean <= best
        for (_, mean), (_, best) in zip(scalars["pb/candidate_correlation_mean/net.2"], correlation, strict=True)
    )
    # The final report's numbers, and the callback's settings as hyperparameters.
    assert scalars["pb/report/cycles_rejected"][-1][1] == 2.0
    hparams = (log_dir / "hparams.yaml").read_text()
    assert "pb_lightning/monitor: val_loss" in hparams
    assert "pb_lightning/schedule/max_tries: 2" in hparams
    assert "pb_lightning/dendrites/num_candidates: 4" in hparams
    del callback, model


def test_history_file_loads_with_pandas_and_matches_the_decisions(run: Any) -> None:
    callback, log_dir, model = run
    table = pd.read_json(log_dir / "pb_history.json")
    machine = callback.machine.state.history
    assert list(table["action"][:-1]) == [h["action"] for h in machine]
    assert list(table["reason"][:-1]) == [h["reason"] for h in machine]
    assert list(table["score"][:-1]) == pytest.approx([h["score"] for h in machine])
    assert table["action"].iloc[-1] == "end"
    assert {"epoch", "phase", "score", "dendrites", "parameters", "action", "reason"} <= set(table.columns)
    assert list(table["epoch"][:-1]) == list(range(len(machine)))
    assert table["parameters"].iloc[-1] == pb.parameter_counts(model)["total"]


def test_the_report_equals_numbers_recomputed_from_the_history(run: Any) -> None:
    callback, log_dir, model = run
    rows = load_history(log_dir)
    report = callback.report
    assert report == final_report(rows, monitor="val_loss", metric_kind="other", mode="min")
    assert (log_dir / "pb_report.json").read_text().count('"cycles_rejected": 2') == 1
    # Recomputed here from the rows. With an unreachable improvement threshold no later score
    # counts as better than the first, so the first score is the baseline and stays the best.
    assert report["best_before_dendrites"] == rows[0]["score"]
    assert report["final_best"] == rows[0]["score"]
    assert report["cycles_accepted"] == 0
    assert report["cycles_rejected"] == sum(r["action"] in ("retry", "stop") for r in rows) == 2
    assert report["parameters_before"] == rows[0]["parameters"] == report["parameters_after"]
    assert report["dendrites_per_layer"] == {"net.0": 0, "net.2": 0, "net.4": 0}
    del model


def test_the_report_of_a_run_that_keeps_dendrites(tmp_path: Path) -> None:
    callback, log_dir, model = _run(tmp_path, improvement_threshold_abs=0.0, max_dendrites=2)
    rows = load_history(log_dir)
    report = callback.report
    first_start = next(i for i, r in enumerate(rows) if r["action"] == "start_dendrite_phase")
    assert report["best_before_dendrites"] == min(r["score"] for r in rows[: first_start + 1])
    verdicts = sum(r["action"] == "accept" for r in rows)
    assert report["cycles_accepted"] + report["cycles_rejected"] == verdicts
    assert report["cycles_accepted"] >= 1
    assert report["dendrites_per_layer"] == {layer.name: layer.num_dendrites for layer in model.perforated_layers()}
    assert report["parameters_after"] == pb.parameter_counts(model)["total"] > report["parameters_before"]
    # The model left behind is the one whose score the report calls the final best.
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    result = trainer.validate(model, DigitsDataModule(), verbose=False)[0]
    assert result["val_loss"] == pytest.approx(report["final_best"], rel=1e-5)
    assert report["final_best"] < report["best_before_dendrites"]


def test_remaining_error_reduction_for_an_accuracy() -> None:
    rows = [
        {"action": "continue", "global_best": 0.90},
        {"action": "start_dendrite_phase", "global_best": 0.90, "parameters_before": 10, "parameters": 10},
        {
            "action": "end",
            "global_best": 0.93,
            "parameters": 30,
            "dendrites_per_layer": {"a": 1},
            "cycles_accepted": 1,
            "cycles_rejected": 0,
        },
    ]
    rows[0]["parameters_before"] = 10
    report = final_report(rows, monitor="val_acc", metric_kind="accuracy")
    assert report["remaining_error_reduction"] == pytest.approx((0.10 - 0.07) / 0.10)
    percent = [dict(r, global_best=100 * r["global_best"]) for r in rows]
    assert final_report(percent, monitor="val_acc", metric_kind="accuracy")["remaining_error_reduction"] == (
        pytest.approx(0.3)
    )
    assert final_report(rows, monitor="val_loss", metric_kind="other")["remaining_error_reduction"] is None


def test_the_plot_is_a_legible_image(run: Any) -> None:
    from PIL import Image

    _, log_dir, _ = run
    with Image.open(log_dir / "pb_history.png") as image:
        width, height = image.size
        colours = len(set(image.convert("RGB").getdata()))
    assert width >= 800
    assert height >= 400
    assert colours > 50  # lines, shading, markers and text, not a blank canvas


def test_pb_lightning_plot_redraws_from_the_history_file(run: Any, tmp_path: Path, capsys: Any) -> None:
    _, log_dir, _ = run
    output = tmp_path / "redrawn.png"
    console(["plot", str(log_dir), "--output", str(output)])
    assert output.stat().st_size > 10_000
    assert str(output) in capsys.readouterr().out


def test_without_matplotlib_the_run_works_and_says_so_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recorder, "matplotlib_available", lambda: False)
    with pytest.warns(UserWarning, match="matplotlib is not installed") as warned:
        callback, log_dir, _ = _run(tmp_path, max_tries=1)
    assert sum("matplotlib is not installed" in str(w.message) for w in warned) == 1
    assert (log_dir / "pb_history.json").exists()
    assert not (log_dir / "pb_history.png").exists()
    assert callback.report is not None


def test_a_run_without_a_logger_writes_no_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    pl.seed_everything(0)
    callback = pb.PerforatedCallback("val_loss", "min", neuron_epochs=1, dendrite_epochs=1, max_dendrites=1)
    # With the sanity check and the model summary (fast_trainer turns them off): they must write nothing either.
    trainer = fast_trainer(tmp_path, [callback], 3, enable_model_summary=True, num_sanity_val_steps=2)
    trainer.fit(DigitsMLP(hidden=8, lr=1e-2), DigitsDataModule())
    assert callback.report is not None
    assert list(tmp_path.iterdir()) == []


def test_the_summary_shows_a_real_improvement_as_two_different_numbers() -> None:
    report = {"monitor": "val_acc", "best_before_dendrites": 95.63300323486328, "final_best": 95.63304138183594}
    text = format_report(report)
    assert "best val_acc before dendrites: 95.633\n" in text
    assert "final best val_acc: 95.63304\n" in text
    assert "final best val_acc: n/a" in format_report({"monitor": "val_acc", "final_best": math.nan})
