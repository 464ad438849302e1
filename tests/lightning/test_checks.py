"""The fit checks of PerforatedCallback: non-finite scores, and an EarlyStopping that would end the cycle early."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

import pb_lightning as pb
from pb_lightning.demos.digits import DigitsDataModule, DigitsMLP
from tests.helpers import fast_trainer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

_trainer = fast_trainer


class _NanAtEpoch1(DigitsMLP):
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.current_epoch == 1:
            loss = loss * float("nan")
        self.log("val_loss", loss, sync_dist=True)


def test_a_non_finite_callback_score_is_reported_with_its_epoch_and_is_never_a_best(tmp_path: Path) -> None:
    pl.seed_everything(0)
    callback = pb.PerforatedCallback("val_loss", "min", neuron_patience=5)
    with pytest.warns(UserWarning, match=r"val_loss is nan at epoch 1; it counts as no improvement"):
        _trainer(tmp_path, [callback], max_epochs=3).fit(_NanAtEpoch1(hidden=8, lr=1e-2), DigitsDataModule())
    history = callback.machine.state.history
    assert math.isnan(history[1]["score"])
    assert callback.machine.state.phase_best is not None
    assert math.isfinite(callback.machine.state.phase_best)
    assert callback.best_score is not None
    assert math.isfinite(callback.best_score)


class _Stalled(DigitsMLP):
    """A validation score that never improves after the first epoch: patience decides everything."""

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val_loss", torch.tensor(1.0), sync_dist=True)


def _early_stopping_run(
    tmp_path: Path, patience: int, *, first: bool = False, at_validation_end: bool = False
) -> tuple[pb.PerforatedCallback, list]:
    from lightning.pytorch.callbacks import EarlyStopping

    pl.seed_everything(0)
    callback = pb.PerforatedCallback("val_loss", "min", neuron_patience=3, dendrite_epochs=1)
    on_epoch_end = False if at_validation_end else None
    stopper = EarlyStopping("val_loss", patience=patience, mode="min", check_on_train_epoch_end=on_epoch_end)
    callbacks: list[pl.Callback] = [stopper, callback] if first else [callback, stopper]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, callbacks, max_epochs=6, limit_train_batches=2).fit(
            _Stalled(hidden=8, lr=1e-2), DigitsDataModule()
        )
    return callback, [str(w.message) for w in caught if "EarlyStopping" in str(w.message)]


def test_an_early_stopping_that_would_end_the_first_neuron_phase_is_named_at_setup(tmp_path: Path) -> None:
    callback, warned = _early_stopping_run(tmp_path, patience=2)
    assert len(warned) == 1
    assert "EarlyStopping(monitor='val_loss', patience=2)" in warned[0]
    assert "neuron_patience=3" in warned[0]
    assert "patience to at least 4" in warned[0]
    # What it warned about is what happens: the run ended inside the first neuron phase.
    assert [h["action"] for h in callback.machine.state.history if h["action"] != "continue"] == []


@pytest.mark.parametrize("first", [False, True])
def test_an_early_stopping_with_enough_patience_lets_the_cycle_run_and_is_not_warned_about(
    tmp_path: Path, first: bool
) -> None:
    # Lightning runs EarlyStopping after the other callbacks at epoch end: the list order does not matter.
    callback, warned = _early_stopping_run(tmp_path, patience=4, first=first)
    assert warned == []
    actions = [h["action"] for h in callback.machine.state.history]
    assert "start_dendrite_phase" in actions


def test_an_early_stopping_checking_at_validation_end_needs_one_more_validation(tmp_path: Path) -> None:
    _, warned = _early_stopping_run(tmp_path, patience=4, at_validation_end=True)
    assert len(warned) == 1
    assert "checking at validation end, before PerforatedCallback decides" in warned[0]
    assert "at least 5" in warned[0]
    # With patience = neuron_patience it does stop the run before the first dendrite phase.
    callback, warned = _early_stopping_run(tmp_path, patience=3, at_validation_end=True)
    assert len(warned) == 1
    assert callback.machine.state.dendrites == 0
    assert all(h["phase"] == "neuron" for h in callback.machine.state.history)  # no dendrite phase ran
