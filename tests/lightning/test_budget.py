"""The run budget under Lightning: by default it counts the wall-clock seconds of the epochs."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest

import pb_lightning as pb
from pb_lightning.demos.digits import DigitsDataModule, DigitsMLP
from pb_lightning.lightning.cli import main as cli_main
from tests.helpers import fast_trainer

PLAIN_SECONDS, DENDRITIC_SECONDS = 1.0, 4.0
BUDGET = pb.PhaseSchedule().run_budget
assert BUDGET is not None


def _run(tmp_path: Path, unit: str) -> pb.PerforatedCallback:
    """A digits run whose (fake) clock says each epoch after the first neuron phase took 4x as long."""
    pl.seed_everything(0)
    callback = pb.PerforatedCallback("val_loss", "min", neuron_patience=2, max_tries=8, run_budget_unit=unit)
    now = [0.0]

    def clock() -> float:  # read once at the start and once per validation
        first_phase = callback.machine.state.baseline_validations is None
        now[0] += PLAIN_SECONDS if first_phase else DENDRITIC_SECONDS
        return now[0]

    callback.driver.clock = clock
    fast_trainer(tmp_path, [callback], max_epochs=300).fit(DigitsMLP(), DigitsDataModule())
    return callback


def test_the_default_budget_ends_the_run_by_the_seconds_its_epochs_took(tmp_path: Path) -> None:
    callback = _run(tmp_path, "time")
    s = callback.machine.state
    baseline = s.baseline_validations
    assert baseline is not None
    assert s.done
    assert s.baseline_seconds == pytest.approx(baseline * PLAIN_SECONDS)
    later = s.validations - baseline
    assert s.seconds == pytest.approx(s.baseline_seconds + later * DENDRITIC_SECONDS)
    # The reference: the run goes on only while one more epoch fits in BUDGET x the first phase's seconds.
    assert s.seconds <= BUDGET * s.baseline_seconds
    assert later <= math.floor((BUDGET - 1) * baseline * PLAIN_SECONDS / DENDRITIC_SECONDS)
    assert f"run_budget={BUDGET:g} allows" in s.history[-1]["reason"]
    assert " s used" in s.history[-1]["reason"]


def test_a_budget_of_validations_ignores_what_the_epochs_cost(tmp_path: Path) -> None:
    callback = _run(tmp_path, "validations")
    s = callback.machine.state
    assert s.baseline_seconds is None
    assert s.seconds == 0.0  # the driver reports no seconds
    assert s.validations <= math.ceil(BUDGET * s.baseline_validations)
    reason = s.history[-1]["reason"]
    assert f"allows {math.ceil(BUDGET * s.baseline_validations)} validations" in reason or "budget" not in reason
    # Longer than the same run under a budget of time, which its 4x epochs cut short.
    assert s.validations > _run(tmp_path / "time", "time").machine.state.validations


def test_the_cli_names_a_bad_budget_unit_and_what_is_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = Path(__file__).resolve().parents[2] / "configs" / "digits_capacity_test.yaml"
    args = ["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path)]
    with pytest.raises(SystemExit):
        cli_main([*args, "--trainer.callbacks.init_args.run_budget_unit", "hours"])
    error = capsys.readouterr().err
    assert 'Parser key "run_budget_unit"' in error
    assert "Literal['time', 'validations']. Got value: hours" in error
