"""The PerforatedCallback's checks of a fit: set-up mistakes caught early, and clear errors.

Each check turns a mistake that would otherwise train silently wrong (no dendrite ever added, a
parameter that never trains, a score that should not move) or fail far from its cause (a torn
checkpoint, a wrong neuron axis) into a message that names it. Kept apart from the callback,
which only decides and restructures.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import zipfile
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import move_data_to_device
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from pb_lightning.cycle.decision import ACCEPT, Decision
from pb_lightning.cycle.observers import CycleObserver
from pb_lightning.cycle.phase_state import PhaseState
from pb_lightning.cycle.schedule import PhaseSchedule
from pb_lightning.diagnostics.capacity import CapacityProbe, CapacityTest
from pb_lightning.engine.transitions import in_dendrite_phase
from pb_lightning.errors import PerforationError, invalid
from pb_lightning.lightning.module import PerforatedModule

log = logging.getLogger(__name__)

#: Epochs the capacity test needs: neuron, dendrite, ×3, and the closing neuron epoch.
CAPACITY_TEST_EPOCHS = 7


def check_arguments(monitor: Any, capacity_test: Any, restarts_only: Any, metric_kind: Any, output_dir: Any) -> None:
    """The PerforatedCallback's own arguments (PhaseSchedule checks the schedule's)."""
    if not isinstance(monitor, str) or not monitor:
        raise invalid("monitor", monitor, "the name of a logged validation metric")
    if not isinstance(capacity_test, bool):
        raise invalid("capacity_test", capacity_test, "a bool")
    if capacity_test and restarts_only is True:
        raise invalid("restarts_only", restarts_only, "False with capacity_test=True (the test adds dendrites)")
    if metric_kind not in ("auto", "accuracy", "error", "other"):
        raise invalid("metric_kind", metric_kind, "one of 'auto', 'accuracy', 'error', 'other'")
    if output_dir is not None and not isinstance(output_dir, str):
        raise invalid("output_dir", output_dir, "a directory path (str) or None")


def check_capacity_test_epochs(trainer: pl.Trainer) -> None:
    if trainer.max_epochs is not None and 0 <= trainer.max_epochs < CAPACITY_TEST_EPOCHS:
        raise invalid(
            "Trainer.max_epochs", trainer.max_epochs, f">= {CAPACITY_TEST_EPOCHS} (or -1) for capacity_test=True"
        )


def check_checkpoint_round_trip(module: nn.Module, probe: CapacityProbe) -> None:
    """The capacity test's round trip under Lightning: ``trainer.save_checkpoint``, then
    ``load_from_checkpoint`` a fresh module (the :class:`~pb_lightning.diagnostics.capacity.CapacityTest`'s
    ``round_trip``; ``module`` is the fit's LightningModule)."""
    module = cast(pl.LightningModule, module)
    trainer = module.trainer

    def load(path: str) -> pl.LightningModule:
        return type(module).load_from_checkpoint(path, map_location=module.device, weights_only=True)

    def save(path: str) -> None:
        # A full checkpoint, as the user's are; saying so keeps Lightning from logging its default every epoch.
        trainer.save_checkpoint(path, weights_only=False)

    with tempfile.TemporaryDirectory() as own:
        # Only rank 0 writes the file: every rank reads it from rank 0's directory.
        directory = trainer.strategy.broadcast(own, src=0)
        probe.check_checkpoint_round_trip(module, save, load, directory)
        trainer.strategy.barrier("pb_lightning capacity test checkpoint")


def check_fit(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """A validation loop to decide from, and an optimizer that is rebuilt with the module."""
    if trainer.limit_val_batches == 0 or not is_overridden("validation_step", pl_module):
        raise PerforationError(
            "PerforatedCallback decides from validation scores, but this fit has no validation loop: "
            "define `validation_step` and a validation dataloader, and keep `limit_val_batches` > 0."
        )
    if "configure_optimizers" in vars(pl_module):
        raise PerforationError(
            "configure_optimizers of this module was replaced on the instance (LightningCLI's "
            "`--optimizer`/`--lr_scheduler` do this): that optimizer is built once, before any dendrite "
            "exists, and never sees them. Remove those options; take `optimizer: OptimizerCallable` in your "
            "module's __init__ and call it in `configure_optimizers` (or build the optimizer there)."
        )


def probe_shapes(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Run ``example_input_array`` once, so a wrong neuron axis fails here, before training.

    As Lightning's ModelSummary runs it: on the model's device and under the precision plugin's
    forward context (autocast for ``16-mixed``), so the probe sees the dtypes training will.
    """
    example = pl_module.example_input_array
    if example is None:
        return
    example = move_data_to_device(example, pl_module.device)
    # Each module's own mode is put back, not the root's: Lightning trains every module in the
    # mode the user left it in, and ``train(was_training)`` would overwrite all of them.
    modes = [(module, module.training) for module in pl_module.modules()]
    pl_module.eval()
    with torch.no_grad(), trainer.precision_plugin.forward_context():
        if isinstance(example, (tuple, list)):
            pl_module(*example)
        elif isinstance(example, dict):
            pl_module(**example)
        else:
            pl_module(example)
    for module, training in modes:
        module.training = training


def check_early_stopping(trainer: pl.Trainer, schedule: PhaseSchedule) -> None:
    """Warn when an EarlyStopping can end the run before a neuron phase has ended.

    EarlyStopping counts validations without improvement just as the neuron phase does; with
    a smaller patience it stops the run inside the first neuron phase, and no dendrite is ever
    added, while the run only reports that it "ended in the first neuron phase". After each
    restructure its counter is reset (:func:`forgive_early_stopping`), but the first
    validation of a new neuron phase may still count for it and not for the phase, hence one
    validation of margin. At the end of a training epoch Lightning runs EarlyStopping after
    the other callbacks, so after this callback's decision; an EarlyStopping that checks at
    validation end instead sees each validation before the decision: one more.
    """
    if schedule.neuron_epochs is not None:
        length, setting = schedule.neuron_epochs, f"neuron_epochs={schedule.neuron_epochs}"
    else:
        length, setting = schedule.neuron_patience + 1, f"neuron_patience={schedule.neuron_patience}"
    length = max(length, schedule.warmup_epochs)
    for stopper in trainer.early_stopping_callbacks:
        on_epoch_end = _checks_on_train_epoch_end(trainer, stopper)
        needed = length + int(not on_epoch_end)
        if stopper.patience < needed:
            order = "" if on_epoch_end else " (checking at validation end, before PerforatedCallback decides)"
            rank_zero_warn(
                f"pb_lightning: EarlyStopping(monitor={stopper.monitor!r}, patience={stopper.patience}){order} "
                f"can stop training before PerforatedCallback({setting}"
                + (f", warmup_epochs={schedule.warmup_epochs}" if schedule.warmup_epochs else "")
                + ") ends a neuron phase, so no dendrites would be added. Set EarlyStopping's patience to at "
                f"least {needed}, or lower the callback's {setting.split('=')[0]}."
            )


def forgive_early_stopping(trainer: pl.Trainer) -> None:
    """Keep EarlyStopping from counting validations that say nothing about the current network.

    After a restructure its patience counted a network that no longer exists, and during a
    dendrite phase the score cannot move. By default EarlyStopping checks at the end of the
    training epoch, after this callback decided on the same validation, so its counter starts
    one below zero to leave that validation uncounted.
    """
    for stopper in trainer.early_stopping_callbacks:
        stopper.wait_count = -1 if getattr(stopper, "_check_on_train_epoch_end", False) else 0


def _checks_on_train_epoch_end(trainer: pl.Trainer, stopper: Any) -> bool:
    # EarlyStopping keeps its `check_on_train_epoch_end` argument only privately (Lightning 2.6),
    # and decides None in its setup the same way, maybe after this callback's setup ran.
    on_epoch_end = stopper._check_on_train_epoch_end
    if on_epoch_end is None:
        return trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1
    return bool(on_epoch_end)


def stop_if_finished(trainer: pl.Trainer, done: bool) -> None:
    """A fit resumed from a checkpoint written after the final decision trains nothing.

    (A run killed after its last checkpoint, or ``fit(ckpt_path="last")`` on a finished run.) That
    checkpoint holds the final model; one more epoch would train the global best past itself.
    """
    if done:
        rank_zero_info(
            "pb_lightning: this run had already finished (the checkpoint was written after the final "
            "decision); no further training. Start a new fit from its weights to train more."
        )
        trainer.should_stop = True


def check_flat_score(previous: float | None, score: float, monitor: str, pl_module: PerforatedModule) -> float | None:
    """Correlation candidates do not touch the output: a moving score in a dendrite phase is a bug.

    Returns what to pass as ``previous`` next time (None outside correlation dendrite phases).
    """
    if not in_dendrite_phase(pl_module) or pl_module.dendrite_config.learning != "correlation":
        return None
    if previous is not None and math.isfinite(score) and not math.isclose(score, previous, rel_tol=1e-4, abs_tol=1e-6):
        rank_zero_warn(
            f"pb_lightning: {monitor} moved from {previous} to {score} during a dendrite phase, "
            "in which the network is frozen. Something outside the perforated layers is still training "
            "(a parameter the optimizer holds despite requires_grad=False, dropout in validation, or a "
            "stateful layer)."
        )
    return score


def warn_no_correlation(decision: Decision, candidate_best: float | None, pl_module: PerforatedModule) -> None:
    """An accepted dendrite phase whose candidates never correlated: the loss misses the layers."""
    if decision.action != ACCEPT or pl_module.dendrite_config.learning != "correlation":
        return
    if candidate_best is None or candidate_best < 1e-3:
        rank_zero_warn(
            f"pb_lightning: the candidates found no correlation with their neurons' errors in this dendrite "
            f"phase (best mean correlation {candidate_best}); the phase ended by its patience. Check that the "
            "loss reaches the perforated layers."
        )


def cycle_observers(monitor: str, capacity_test: bool) -> list[CycleObserver]:
    """What watches the callback's cycle: the fit checks, and the capacity test when asked for."""
    observers: list[CycleObserver] = [FitChecks(monitor)]
    if capacity_test:
        observers.append(CapacityTest(check_checkpoint_round_trip, monitor=monitor, warn=rank_zero_warn))
    return observers


class FitChecks(CycleObserver):
    """The fit checks that watch the cycle: a score that moves while the network is frozen, and
    candidates that never correlated (both warnings, on rank 0)."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self._previous: float | None = None
        self._on_validation = False

    def on_validation(self, model: nn.Module, score: float, when: str) -> None:
        self._previous = check_flat_score(self._previous, score, self.monitor, cast(PerforatedModule, model))
        self._on_validation = True

    def on_decision(self, model: nn.Module, decision: Decision, state: PhaseState) -> None:
        # Judged on validations only: a phase ended on training steps stopped at a plateau, by design.
        if self._on_validation:
            warn_no_correlation(decision, state.candidate_best, cast(PerforatedModule, model))
        self._on_validation = False


def explain_torn_checkpoint(trainer: pl.Trainer, exception: BaseException) -> None:
    """A resume from a torn checkpoint must fail (never load part of a model), and name the file."""
    path = trainer.ckpt_path
    if trainer.state.fn != TrainerFn.FITTING or not path:
        return
    message = torn_checkpoint_message(str(path))
    if message is None:
        return
    log.error(message)
    if hasattr(exception, "add_note"):
        exception.add_note(message)


def torn_checkpoint_message(path: str) -> str | None:
    """The message for a resume from a checkpoint that ``torch.save`` did not finish, else None.

    torch's own error ("failed finding central directory") names no file. A checkpoint is torn
    when a crash interrupts its copy into place (a temporary file on another file system); every
    torch checkpoint is a complete zip archive.
    """
    if not (os.path.isfile(path) and not zipfile.is_zipfile(path)):
        return None
    return (
        f"pb_lightning: the checkpoint {path} cannot be read: it is truncated or not a checkpoint (was its "
        "write interrupted by a crash?). Resume from an earlier checkpoint with fit(ckpt_path=...), or "
        "delete this file and start again."
    )
