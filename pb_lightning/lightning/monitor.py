"""The monitored validation score of a fit: read after each validation, held until the epoch's decision.

Reading it is where a user's set-up goes wrong most: a metric never logged, logged only in
training, logged per dataloader, logged on some ranks only, or a validation with no batch. Each
is reported here by name, early (the sanity check already knows the logged keys), with the way out.
"""

from __future__ import annotations

import difflib
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from pb_lightning.cycle.scores import as_score, nonfinite_message
from pb_lightning.errors import PerforationError


class ValidationScore:
    """The monitored score of the fit's validations, held until the epoch's decision.

    The decision waits for the end of the training epoch, so that with several validations per
    epoch (``val_check_interval < 1``) only the last one counts; ``pending`` is checkpointed.
    """

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.pending: float | None = None
        self._before: Any = None
        self._said_none = False

    def before_validation(self, trainer: pl.Trainer) -> None:
        # Lets read_score tell a metric this validation logged from one left over from training.
        self._before = trainer.callback_metrics.get(self.monitor)

    def after_validation(self, trainer: pl.Trainer) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if trainer.sanity_checking:
            # The sanity check's metrics decide nothing, but they name the logged keys: a monitor
            # missing from them is reported now, not after a whole training epoch. (With several
            # validation dataloaders Lightning shows no metric at the sanity check: nothing to say.)
            if trainer.callback_metrics:
                check_monitor_logged(trainer, self.monitor)
            return
        self.pending = read_score(trainer, self.monitor, self._before)

    def take(self, trainer: pl.Trainer) -> float | None:
        """The epoch's score, once; None (said once) when no validation gave one this epoch."""
        score, self.pending = self.pending, None
        if score is None and not self._said_none:  # check_val_every_n_epoch > 1, or an empty validation
            self._said_none = warn_no_score(trainer, self.monitor)
        return score


def read_score(trainer: pl.Trainer, monitor: str, before_validation: Any) -> float:
    """The monitored metric this validation logged, or an error that says how to log it.

    ``before_validation`` is the value ``callback_metrics`` held when the validation started:
    the same object afterwards means the validation did not log the metric (only training did).
    """
    value = check_monitor_logged(trainer, monitor)
    if value is before_validation:
        raise PerforationError(
            f"PerforatedCallback(monitor={monitor!r}): the metric was not logged during validation (is it "
            "logged only in training?). Phases switch on a validation score: log it in `validation_step`."
        )
    score = as_score(value, f"score (the monitored {monitor!r})")
    message = nonfinite_message(monitor, score, f"epoch {trainer.current_epoch}")
    if message is not None:
        rank_zero_warn(message)
    return score


def check_monitor_logged(trainer: pl.Trainer, monitor: str) -> Any:
    """The monitored metric's value in ``callback_metrics``, or an error naming what was logged.

    Called at the end of every validation of a fit, the sanity check's included: a monitor that
    is never logged is a typo or a misunderstanding, and the sanity check already knows the
    logged keys — waiting for the first training epoch's validation costs a whole epoch.
    """
    value = trainer.callback_metrics.get(monitor)
    strategy = trainer.strategy
    if strategy.reduce_boolean_decision(value is not None, all=True):
        return value
    if strategy.reduce_boolean_decision(value is not None, all=False):
        raise PerforationError(
            f"PerforatedCallback(monitor={monitor!r}): the metric was logged on some ranks but not on others; "
            f"log it on every rank in `validation_step` with `self.log({monitor!r}, ..., sync_dist=True)`."
        )
    raise PerforationError(missing_monitor_message(monitor, sorted(trainer.callback_metrics), trainer.sanity_checking))


def missing_monitor_message(monitor: str, logged: list[str], sanity_checking: bool = False) -> str:
    """Why ``monitor`` is not among the ``logged`` keys, and the keys it was probably meant to be.

    With several validation dataloaders Lightning logs each metric once per dataloader, as
    ``name/dataloader_idx_N``: the name the user logged is then never a key, and "log it in
    validation_step" would be wrong advice, so those keys are named with the two ways out.
    """
    when = " at the sanity check" if sanity_checking else ""
    message = f"PerforatedCallback(monitor={monitor!r}): the metric was not logged{when}; logged metrics are {logged}."
    per_loader = [key for key in logged if key.startswith(monitor + "/dataloader_idx_")]
    close = per_loader or difflib.get_close_matches(monitor, logged, n=3, cutoff=0.6)
    if per_loader:
        message += (
            f" With several validation dataloaders Lightning logs it per dataloader, as {per_loader}: set monitor "
            f"to one of these, or log one value for all of them with `self.log({monitor!r}, ..., "
            "add_dataloader_idx=False)`."
        )
    elif close:
        message += f" Close to {monitor!r}: {close}; set monitor to the one you mean."
    else:
        message += (
            f" Log it in `validation_step` with `self.log({monitor!r}, ..., sync_dist=True)`, or set monitor to "
            "one of the logged metrics."
        )
    if sanity_checking:
        message += (
            " (If it is logged only after the sanity check, log it during the sanity check too, or set "
            "Trainer(num_sanity_val_steps=0).)"
        )
    return message


def warn_no_score(trainer: pl.Trainer, monitor: str) -> bool:
    """Say that the validation produced no score; returns whether it said so.

    A validation over dataloaders without a single batch (an empty validation set, or a
    ``limit_val_batches`` that rounds down to 0) runs no hook at all, so without this the
    callback would take no decision, add no dendrite and say nothing while the run spends its
    whole budget. ``trainer.num_val_batches`` is known from the first validation that was due.
    """
    batches = trainer.num_val_batches
    if not batches or sum(batches) > 0:
        return False
    rank_zero_warn(
        f"pb_lightning: the validation of epoch {trainer.current_epoch} produced no {monitor!r} score: the "
        f"validation dataloaders have no batches (num_val_batches={list(batches)}). PerforatedCallback decides "
        "only from validation scores, so this run trains without ever adding dendrites. Give it a non-empty "
        "validation set (and a `limit_val_batches` that keeps at least one batch)."
    )
    return True
