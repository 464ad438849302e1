"""The thin callback's parts: one source of schedule defaults, the verdict-driven metric, the probe."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

import pb_lightning as pb
from pb_lightning.cycle.decision import Action, Decision, Verdict
from pb_lightning.cycle.schedule import PhaseSchedule
from pb_lightning.demos.digits import DigitsDataModule, DigitsMLP
from pb_lightning.lightning.callback import SCHEDULE_ARGUMENTS
from pb_lightning.lightning.recorder import RunRecorder
from tests.helpers import fast_trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def test_the_callbacks_schedule_arguments_are_phase_schedules_fields_with_its_defaults() -> None:
    parameters = inspect.signature(pb.PerforatedCallback).parameters
    fields = {f.name: f for f in dataclasses.fields(PhaseSchedule)}
    assert set(SCHEDULE_ARGUMENTS) == set(fields) - {"require_improvement"}
    for name in SCHEDULE_ARGUMENTS:
        parameter = parameters[name]
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, name
        assert parameter.default == fields[name].default, name
        assert parameter.annotation == fields[name].type, name
    # ... and the callback passes every one of them through.
    custom = {name: (3 if fields[name].type.startswith("int") else 0.25) for name in SCHEDULE_ARGUMENTS}
    custom["restarts_only"] = True
    custom["dendrite_epochs"] = None
    custom["run_budget"] = 1.75  # at least 1
    custom["run_budget_unit"] = "validations"  # not the default
    schedule = pb.PerforatedCallback(**custom).schedule
    assert {name: getattr(schedule, name) for name in SCHEDULE_ARGUMENTS} == custom


def test_the_callback_and_the_tracker_build_the_same_capacity_test_schedule() -> None:
    from_callback = pb.PerforatedCallback(capacity_test=True).schedule
    from_tracker = pb.PerforatedTracker(capacity_test=True).machine.schedule
    assert from_callback == from_tracker == PhaseSchedule.capacity_test()


@pytest.mark.parametrize(
    ("decision", "rejected"),
    [
        (Decision(Action.RETRY, "anything at all", verdict=Verdict.REJECTED), 1.0),
        (Decision(Action.STOP, "worded without the old phrase", verdict=Verdict.REJECTED), 1.0),
        (Decision(Action.RESTART, "also reworded", verdict=Verdict.REJECTED), 1.0),
        (Decision(Action.STOP, "the cycle did not beat the global best", verdict=Verdict.ACCEPTED), 0.0),
        (Decision(Action.STOP, "the cycle did not beat the global best"), 0.0),
        (Decision(Action.START_DENDRITE_PHASE, "did not beat", verdict=Verdict.ACCEPTED), 0.0),
    ],
)
def test_the_cycle_rejected_metric_follows_the_verdict_not_the_reason(decision: Decision, rejected: float) -> None:
    module = DigitsMLP(hidden=8)
    machine = pb.PhaseMachine("min")
    metrics = RunRecorder._metrics(module, machine, decision)
    assert metrics["pb/event/cycle_rejected"] == rejected
    assert metrics["pb/event/dendrites_accepted"] == 0.0


class _AutocastProbe(DigitsMLP):
    """Records, on each forward outside training, the device of its input and whether autocast is on."""

    def __init__(self) -> None:
        super().__init__(hidden=8)
        self.example_input_array = torch.zeros(2, 64)
        self.seen: list[tuple[str, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and not self.seen:
            self.seen.append((x.device.type, torch.is_autocast_enabled("cpu")))
        return super().forward(x)


def test_the_example_input_probe_runs_under_the_precision_plugins_forward_context(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = _AutocastProbe()
    callback = pb.PerforatedCallback("val_loss", "min", neuron_epochs=1, max_dendrites=0)
    trainer = fast_trainer(tmp_path, [callback], max_epochs=1, precision="bf16-mixed", limit_train_batches=1)
    trainer.fit(model, DigitsDataModule())
    # The first forward outside training is the probe (no sanity check runs in fast_trainer).
    assert model.seen[0] == ("cpu", True)


def test_a_capacity_test_checkpoint_round_trip_goes_through_save_checkpoint(tmp_path: Path) -> None:
    pl.seed_everything(0)
    saved: list[str] = []

    class Spy(pl.Callback):
        def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ckpt: dict[str, Any]) -> None:
            saved.append(trainer.current_epoch)

    callback = pb.PerforatedCallback("val_loss", "min", capacity_test=True)
    trainer = fast_trainer(tmp_path, [callback, Spy()], max_epochs=7)
    trainer.fit(DigitsMLP(hidden=8), DigitsDataModule())
    assert callback.capacity_problems == []
    # One checkpoint per restructure, each saved through the trainer's public save_checkpoint.
    restructures = [h for h in callback.machine.state.history if h["action"] != "continue"]
    assert len(saved) == len(restructures) == 7
    assert list(tmp_path.rglob("*.ckpt")) == []  # the probe's files are temporary
