r"""PerforatedCallback: runs the Perforated Backpropagation cycle inside ``trainer.fit``.

After every end-of-epoch validation it feeds the monitored score to a
:class:`~pb_lightning.cycle.machine.PhaseMachine` and carries out its decision through the
:class:`~pb_lightning.lightning.module.PerforatedModule`: snapshot or restore weights, start a dendrite
phase, accept dendrites, retry, or stop. After every change of the trainable parameter set it
re-wraps the model under DDP, re-runs the user's ``configure_optimizers`` (schedulers included)
and checks that every trainable parameter is in the new optimizer.

Timing follows ``docs/LIGHTNING_NOTES.md``: the score is read in ``on_validation_end``
(where ``callback_metrics`` hold the current values; the sanity check and ``trainer.validate``
are skipped) and the decision is taken in ``on_train_epoch_end``, from the epoch's last
validation. That hook runs before the monitoring callbacks (EarlyStopping, ModelCheckpoint), so
an end-of-epoch checkpoint already holds the restructured model and its callback state.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import os
import zipfile
from dataclasses import asdict
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from pb_lightning.cycle.capacity import CAPACITY_TEST_DENDRITES, CapacityProbe
from pb_lightning.cycle.controller import CycleController, mean_candidate_score
from pb_lightning.cycle.machine import ACCEPT, HISTORY_KEYS, STOP, Decision, PhaseMachine
from pb_lightning.cycle.schedule import PhaseSchedule
from pb_lightning.cycle.scores import as_score, nonfinite_message
from pb_lightning.engine.convert import perforation_summary
from pb_lightning.engine.optimizer_state import OptimizerStateCarrier, OptimizerStateMode, check_optimizer_state
from pb_lightning.engine.transitions import (
    accept_dendrites,
    candidate_scores,
    in_dendrite_phase,
    set_loss_scale,
    set_statistics_group,
)
from pb_lightning.errors import PerforationError, invalid
from pb_lightning.lightning.module import CHECKPOINT_VERSION, PerforatedModule, check_checkpoint_version
from pb_lightning.lightning.recorder import RunRecorder
from pb_lightning.reporting.history import END, MetricKind, resolve_metric_kind

log = logging.getLogger(__name__)

#: Epochs the capacity test needs: neuron, dendrite, ×3, and the closing neuron epoch.
CAPACITY_TEST_EPOCHS = 7


class PerforatedCallback(Callback):
    """Drive the neuron phase → dendrite phase → accept cycle from the validation score.

    One decision per training epoch that ran a validation, from that epoch's last validation.

    Args:
        monitor: the logged validation metric that decides (log it with ``sync_dist=True`` under DDP).
        mode: ``"min"`` if lower is better (a loss), ``"max"`` if higher is better (an accuracy).
        neuron_patience: validations without improvement that end a neuron phase.
        dendrite_patience: validations without improvement of the candidates' correlation that end
            a dendrite phase.
        improvement_threshold: relative margin an improvement must exceed.
        improvement_threshold_abs: absolute margin an improvement must exceed as well.
        candidate_improvement_threshold: relative margin for the candidates' correlation.
        warmup_epochs: validations before the first dendrite phase may start.
        neuron_epochs: fixed length of every neuron phase (instead of patience).
        dendrite_epochs: fixed length of every dendrite phase (instead of patience).
        max_dendrite_epochs: cap on a dendrite phase's length.
        max_dendrites: dendrite sets per layer after which training is complete.
        max_tries: failed cycles in a row after which training is complete.
        restarts_only: the schedule without dendrites (``PhaseSchedule.restarts_only``): each
            neuron phase that ends rolls back to its best weights and restarts with a rebuilt
            optimizer; ``max_tries`` failed restarts in a row end training. The control that
            measures what the restart schedule alone is worth.
        capacity_test: the first experiment on a new model (docs/ALGORITHM.md §5): switch every epoch,
            add three dendrite sets, check the pipeline at every step, report, and stop.
        metric_kind: ``"accuracy"`` or ``"error"`` makes the final report give the reduction of
            the remaining error; ``"auto"`` guesses from the monitor's name (``*acc*``, ``*err*``).
        output_dir: where to write ``pb_history.json``, ``pb_report.json`` and
            ``pb_history.png``; default: the logger's directory (no logger: no files).
        optimizer_state: what the optimizer rebuilt after each restructure starts from.
            ``"reset"`` (the reference method): a fresh optimizer — Adam's moments and step count
            at zero — and schedulers from their first epoch, so a cosine schedule over
            ``max_epochs`` restarts at every switch. ``"carry"``: parameters that persist keep
            their optimizer state (by name), new parameters start fresh, and each scheduler
            continues where it was (see :mod:`pb_lightning.engine.optimizer_state`).

    Example::

        >>> PerforatedCallback(monitor="val_loss", mode="min", neuron_patience=3).schedule.neuron_patience
        3
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: Literal["min", "max"] = "min",
        *,
        neuron_patience: int = 5,
        dendrite_patience: int = 3,
        improvement_threshold: float = 1e-4,
        improvement_threshold_abs: float = 0.0,
        candidate_improvement_threshold: float = 0.01,
        warmup_epochs: int = 0,
        neuron_epochs: int | None = None,
        dendrite_epochs: int | None = None,
        max_dendrite_epochs: int = 50,
        max_dendrites: int = 8,
        max_tries: int = 2,
        restarts_only: bool = False,
        capacity_test: bool = False,
        metric_kind: MetricKind = "auto",
        output_dir: str | None = None,
        optimizer_state: OptimizerStateMode = "reset",
    ) -> None:
        super().__init__()
        self.optimizer_state = check_optimizer_state(optimizer_state)
        self._carrier = OptimizerStateCarrier()
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
        self.monitor = monitor
        self.capacity_test = capacity_test
        if capacity_test:
            neuron_epochs, dendrite_epochs, max_dendrites = 1, 1, CAPACITY_TEST_DENDRITES
        self.schedule = PhaseSchedule(
            neuron_patience=neuron_patience,
            dendrite_patience=dendrite_patience,
            improvement_threshold=improvement_threshold,
            improvement_threshold_abs=improvement_threshold_abs,
            candidate_improvement_threshold=candidate_improvement_threshold,
            warmup_epochs=warmup_epochs,
            neuron_epochs=neuron_epochs,
            dendrite_epochs=dendrite_epochs,
            max_dendrite_epochs=max_dendrite_epochs,
            max_dendrites=max_dendrites,
            max_tries=max_tries,
            require_improvement=not capacity_test,
            restarts_only=restarts_only,
        )
        self.machine = PhaseMachine(mode, self.schedule)
        self.mode = mode
        self.controller = CycleController(self.machine)
        self.probe = CapacityProbe()
        self.recorder = RunRecorder(monitor, mode, resolve_metric_kind(metric_kind, monitor), output_dir)
        self._flat_score: float | None = None
        self._pending_score: float | None = None
        self._statistics_group: Any = None
        self._before_validation: Any = None
        self._module: PerforatedModule | None = None
        #: The final report (see :func:`pb_lightning.reporting.history.final_report`), set when fit ends.
        self.report: dict[str, Any] | None = None

    @property
    def best_score(self) -> float | None:
        """The best monitored score so far (the global best; the model left after fit has it)."""
        return self.machine.state.global_best

    @property
    def capacity_problems(self) -> list[str]:
        """Problems the capacity test found (empty: none)."""
        return self.probe.problems

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    # ------------------------------------------------------------------ set-up checks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, PerforatedModule):
            raise PerforationError(
                f"PerforatedCallback needs a pb_lightning.PerforatedModule; got {type(pl_module).__name__}. "
                "Subclass PerforatedModule instead of LightningModule."
            )
        if stage != "fit":
            return
        self._module = pl_module
        strategy = trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise PerforationError(
                f"PerforatedCallback supports single-device and DDP strategies; got {type(strategy).__name__}. "
                "Strategies that shard parameters (FSDP, DeepSpeed) cannot grow them mid-training."
            )
        if not pl_module.automatic_optimization:
            raise PerforationError(
                "PerforatedCallback needs automatic optimization (`automatic_optimization = True`): it "
                "rebuilds the optimizer from `configure_optimizers` after every restructure."
            )
        if getattr(strategy, "_start_method", "popen") != "popen":
            raise PerforationError(
                f"PerforatedCallback does not support strategy='ddp_{strategy._start_method}': after fit, "
                "Lightning copies the workers' weights back into the main process with "
                "load_state_dict(strict=False) and drops state it does not expect. Use strategy='ddp', "
                "which launches one process per device by re-running your script."
            )
        if isinstance(strategy, DDPStrategy) and trainer.world_size > 1 and self._statistics_group is None:
            # A group of its own for the candidates' statistics: its all-reduce runs inside the
            # backward pass, and must not queue up behind DDP's gradient buckets on the default group.
            self._statistics_group = torch.distributed.new_group()
        self._check_early_stopping(trainer)
        if self.capacity_test and trainer.max_epochs is not None and 0 <= trainer.max_epochs < CAPACITY_TEST_EPOCHS:
            raise invalid(
                "Trainer.max_epochs", trainer.max_epochs, f">= {CAPACITY_TEST_EPOCHS} (or -1) for capacity_test=True"
            )

    def _check_early_stopping(self, trainer: pl.Trainer) -> None:
        """Warn when an EarlyStopping can end the run before a neuron phase has ended.

        EarlyStopping counts validations without improvement just as the neuron phase does; with
        a smaller patience it stops the run inside the first neuron phase, and no dendrite is ever
        added, while the run only reports that it "ended in the first neuron phase". After each
        restructure its counter is reset (:meth:`_forgive_early_stopping`), but the first
        validation of a new neuron phase may still count for it and not for the phase, hence one
        validation of margin. At the end of a training epoch Lightning runs EarlyStopping after
        the other callbacks, so after this callback's decision; an EarlyStopping that checks at
        validation end instead sees each validation before the decision: one more.
        """
        schedule = self.schedule
        if schedule.neuron_epochs is not None:
            length, setting = schedule.neuron_epochs, f"neuron_epochs={schedule.neuron_epochs}"
        else:
            length, setting = schedule.neuron_patience + 1, f"neuron_patience={schedule.neuron_patience}"
        length = max(length, schedule.warmup_epochs)
        for stopper in trainer.early_stopping_callbacks:
            on_epoch_end = stopper._check_on_train_epoch_end
            if on_epoch_end is None:  # EarlyStopping.setup decides it the same way, maybe after us
                on_epoch_end = trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1
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

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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
        self._probe_shapes(pl_module)
        # Like Lightning's model summary: what got dendrites and what did not, before training.
        rank_zero_info(perforation_summary(pl_module))
        self.recorder.start(trainer, pl_module, self._hyperparameters(pl_module))
        self._check_optimizer_coverage(trainer, pl_module)
        self._carrier.track(pl_module, trainer.optimizers)
        self._install_progress_bar_metrics(trainer)
        if self._statistics_group is not None:
            set_statistics_group(pl_module, self._statistics_group)
        if self.capacity_test:
            self.probe.start(pl_module)

    @staticmethod
    def _probe_shapes(pl_module: pl.LightningModule) -> None:
        """Run ``example_input_array`` once, so a wrong neuron axis fails here, before training."""
        example = pl_module.example_input_array
        if example is None:
            return
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            if isinstance(example, (tuple, list)):
                pl_module(*example)
            elif isinstance(example, dict):
                pl_module(**example)
            else:
                pl_module(example)
        pl_module.train(was_training)

    # ------------------------------------------------------------------ the decision
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lets _read_score tell a metric this validation logged from one left over from training.
        self._before_validation = trainer.callback_metrics.get(self.monitor)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        # Remember the score; the decision waits for the end of the training epoch, so that with
        # several validations per epoch (val_check_interval < 1) only the last one counts.
        self._pending_score = self._read_score(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        score, self._pending_score = self._pending_score, None
        if score is None:
            return  # no validation this epoch (check_val_every_n_epoch > 1)
        layers = self._candidate_scores_by_layer(pl_module)
        candidate = mean_candidate_score(pl_module)  # the same input the plain-PyTorch tracker gives
        # Every rank steps its own machine with rank 0's inputs, so all take the same decision.
        score, candidate = trainer.strategy.broadcast((score, candidate), src=0)
        self._check_flat_score(score, pl_module)
        decision = self.machine.step(score, candidate)
        self._log_decision(trainer, decision, score)
        self._apply(trainer, pl_module, decision)
        self.recorder.record(trainer, pl_module, self.machine, decision, layers)
        if in_dendrite_phase(pl_module):
            self._forgive_early_stopping(trainer)

    def _read_score(self, trainer: pl.Trainer) -> float:
        value = trainer.callback_metrics.get(self.monitor)
        strategy = trainer.strategy
        if not strategy.reduce_boolean_decision(value is not None, all=True):
            logged = sorted(trainer.callback_metrics)
            if strategy.reduce_boolean_decision(value is not None, all=False):
                where = "was logged on some ranks but not on others; log it on every rank (with sync_dist=True)"
            else:
                where = f"was not logged; logged metrics are {logged}"
            raise PerforationError(
                f"PerforatedCallback(monitor={self.monitor!r}): the metric {where}. Log it in "
                f"`validation_step` with `self.log({self.monitor!r}, ..., sync_dist=True)`."
            )
        if value is self._before_validation:
            raise PerforationError(
                f"PerforatedCallback(monitor={self.monitor!r}): the metric was not logged during validation (is it "
                "logged only in training?). Phases switch on a validation score: log it in `validation_step`."
            )
        score = as_score(value, f"score (the monitored {self.monitor!r})")
        message = nonfinite_message(self.monitor, score, f"epoch {trainer.current_epoch}")
        if message is not None:
            rank_zero_warn(message)
        if self.capacity_test:
            self.probe.check_finite(self.monitor, score, trainer.current_epoch)
        return score

    @staticmethod
    def _candidate_scores_by_layer(pl_module: pl.LightningModule) -> dict[str, tuple[float, float]]:
        """Per layer: mean and max over neurons of each neuron's best candidate score."""
        if not in_dendrite_phase(pl_module):
            return {}
        return {name: (float(s.mean()), float(s.max())) for name, s in candidate_scores(pl_module).items()}

    def _check_flat_score(self, score: float, pl_module: pl.LightningModule) -> None:
        """Correlation candidates do not touch the output: a moving score in a dendrite phase is a bug."""
        if not in_dendrite_phase(pl_module) or pl_module.dendrite_config.learning != "correlation":
            self._flat_score = None
            return
        if (
            self._flat_score is not None
            and math.isfinite(score)
            and not math.isclose(score, self._flat_score, rel_tol=1e-4, abs_tol=1e-6)
        ):
            rank_zero_warn(
                f"pb_lightning: {self.monitor} moved from {self._flat_score} to {score} during a dendrite phase, "
                "in which the network is frozen. Something outside the perforated layers is still training "
                "(a parameter the optimizer holds despite requires_grad=False, dropout in validation, or a "
                "stateful layer)."
            )
        self._flat_score = score

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, decision: Decision) -> None:
        module: PerforatedModule = pl_module  # type: ignore[assignment]
        if decision.action == ACCEPT:
            best = self.machine.state.candidate_best
            if module.dendrite_config.learning == "correlation" and (best is None or best < 1e-3):
                rank_zero_warn(
                    f"pb_lightning: the candidates found no correlation with their neurons' errors in this dendrite "
                    f"phase (best mean correlation {best}); the phase ended by its patience. Check that the loss "
                    "reaches the perforated layers."
                )
        accept = self.probe.checked_accept(accept_dendrites) if self.capacity_test else accept_dendrites
        if self.controller.apply(module, decision, accept=accept):
            self._restructure(trainer, module)
        if decision.action == STOP:
            trainer.should_stop = True

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and in_dendrite_phase(pl_module):
            # 16-mixed: the errors reaching the candidates carry the GradScaler's scale.
            set_loss_scale(pl_module, scaler.get_scale())

    # ------------------------------------------------------------------ restructuring
    def _restructure(self, trainer: pl.Trainer, module: PerforatedModule) -> None:
        strategy = trainer.strategy
        # New parameters must take the precision plugin's dtype (bf16-true / 16-true); identity otherwise.
        trainer.precision_plugin.convert_module(module)
        if isinstance(strategy, DDPStrategy):
            # DDP's reducer only knows the parameters that required grad when it was built: re-wrap.
            strategy.model = strategy.lightning_module
            strategy.configure_ddp()
        carry = self.optimizer_state == "carry"
        if carry:
            self._carrier.before_rebuild(module, trainer.optimizers, self._schedulers(trainer))
        strategy.setup_optimizers(trainer)
        if carry:
            self._carrier.after_rebuild(module, trainer.optimizers, self._schedulers(trainer))
        self._check_optimizer_coverage(trainer, module)
        self._forgive_early_stopping(trainer)
        if self.capacity_test:
            self._check_checkpoint_round_trip(trainer, module)

    @staticmethod
    def _schedulers(trainer: pl.Trainer) -> list[Any]:
        return [config.scheduler for config in trainer.lr_scheduler_configs]

    def _check_optimizer_coverage(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        held = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        missing = [name for name, p in module.named_parameters() if p.requires_grad and id(p) not in held]
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise PerforationError(
                f"After restructuring, {len(missing)} trainable parameters are not in any optimizer: {shown}. "
                "`configure_optimizers` must build a new optimizer from the module's current parameters "
                "(e.g. `self.parameters()` or `self.dendrite_parameter_groups()`). With LightningCLI, do not "
                "use `--optimizer`/`--lr_scheduler` (the CLI builds the optimizer once); take "
                "`optimizer: OptimizerCallable` in your module's __init__ and call it in configure_optimizers."
            )

    @staticmethod
    def _forgive_early_stopping(trainer: pl.Trainer) -> None:
        """Keep EarlyStopping from counting validations that say nothing about the current network.

        After a restructure its patience counted a network that no longer exists, and during a
        dendrite phase the score cannot move. By default EarlyStopping checks at the end of the
        training epoch, after this callback decided on the same validation, so its counter starts
        one below zero to leave that validation uncounted.
        """
        for callback in trainer.callbacks:
            if isinstance(callback, EarlyStopping):
                callback.wait_count = -1 if getattr(callback, "_check_on_train_epoch_end", False) else 0

    # ------------------------------------------------------------------ resuming and end of training
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Normally done in load_state_dict; here for strategies that restore before setup.
        self.controller.rebuild_from_model(pl_module)
        if self.machine.state.done:
            # Resumed from a checkpoint written after the machine said "stop" (a run killed after
            # its last checkpoint, or ``fit(ckpt_path="last")`` on a finished run). That checkpoint
            # holds the final model; one more epoch would train the global best past itself.
            rank_zero_info(
                "pb_lightning: this run had already finished (the checkpoint was written after the final "
                "decision); no further training. Start a new fit from its weights to train more."
            )
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        module: PerforatedModule = pl_module  # type: ignore[assignment]
        decision = self.controller.finish(module)
        if decision is None:
            return
        rank_zero_info(f"pb_lightning: {decision.reason}.")
        if decision.restore is not None:
            # The restored model has other trainable parameters: an optimizer that matches it keeps
            # the rewritten checkpoint resumable.
            self._restructure(trainer, module)
            self._rewrite_last_checkpoints(trainer)

    @staticmethod
    def _rewrite_last_checkpoints(trainer: pl.Trainer) -> None:
        """Make ``last.ckpt`` hold the model the run leaves, after the trainer's limits ended it mid-cycle.

        The last checkpoint was written at the end of the last epoch, before the final restore
        dropped an unfinished cycle's dendrites or candidates: resuming from it, or loading it,
        would give a different model than the one ``fit`` returned. Rewritten here, it holds the
        final model and a finished phase machine, so a resume from it trains nothing.
        """
        for callback in trainer.checkpoint_callbacks:
            path = getattr(callback, "last_model_path", "")
            if getattr(callback, "save_last", None) and path:
                trainer.save_checkpoint(path, weights_only=bool(getattr(callback, "save_weights_only", False)))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        path = trainer.ckpt_path
        if trainer.state.fn != TrainerFn.FITTING or not path or not _is_torn_checkpoint(str(path)):
            return
        # torch's own error ("failed finding central directory") names no file. A checkpoint is
        # torn when a crash interrupts its copy into place (a temporary file on another file
        # system); resuming from it must fail — never load part of a model.
        message = (
            f"pb_lightning: the checkpoint {path} cannot be read: it is truncated or not a checkpoint (was its "
            "write interrupted by a crash?). Resume from an earlier checkpoint with fit(ckpt_path=...), or "
            "delete this file and start again."
        )
        log.error(message)
        if hasattr(exception, "add_note"):
            exception.add_note(message)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.probe.stop()
        module: PerforatedModule = pl_module  # type: ignore[assignment]
        extra = []
        if self.capacity_test:
            extra.append("  " + self.probe.summary(self.machine.state.dendrites))
            if self.capacity_problems:
                rank_zero_warn("pb_lightning capacity test found problems: " + "; ".join(self.capacity_problems))
        self.report = self.recorder.finish(trainer, module, self.machine, extra)

    def _hyperparameters(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The callback's settings (and the dendrite configuration) for the loggers' hparams."""
        hparams: dict[str, Any] = {
            "pb_lightning/monitor": self.monitor,
            "pb_lightning/mode": self.mode,
            "pb_lightning/capacity_test": self.capacity_test,
            "pb_lightning/optimizer_state": self.optimizer_state,
        }
        hparams.update({f"pb_lightning/schedule/{k}": v for k, v in asdict(self.schedule).items()})
        config = getattr(pl_module, "dendrite_config", None)
        if config is not None:
            hparams.update({f"pb_lightning/dendrites/{k}": v for k, v in config.to_dict().items()})
        return hparams

    # ------------------------------------------------------------------ progress bar and logs
    def _install_progress_bar_metrics(self, trainer: pl.Trainer) -> None:
        bar = trainer.progress_bar_callback
        if bar is None or getattr(bar.get_metrics, "_pb_lightning", False):
            return
        original = bar.get_metrics
        machine = self.machine

        def get_metrics(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
            metrics = dict(original(trainer, pl_module))
            metrics["phase"] = machine.state.phase
            metrics["dendrites"] = machine.state.dendrites
            return metrics

        get_metrics._pb_lightning = True  # type: ignore[attr-defined]
        bar.get_metrics = get_metrics  # type: ignore[method-assign]

    def _log_decision(self, trainer: pl.Trainer, decision: Decision, score: float) -> None:
        if decision.action != "continue":
            rank_zero_info(
                f"pb_lightning epoch {trainer.current_epoch}: {decision.action} — {decision.reason} "
                f"({self.monitor}={score:.6g})"
            )
        log.debug("epoch %d: %s (%s)", trainer.current_epoch, decision.action, decision.reason)

    # ------------------------------------------------------------------ capacity test checks
    def _check_checkpoint_round_trip(self, trainer: pl.Trainer, module: PerforatedModule) -> None:
        """Save a checkpoint as Lightning would and load it into a fresh instance of the module."""
        try:
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            buffer.seek(0)
            fresh = type(module).load_from_checkpoint(buffer, map_location=module.device, weights_only=True)
        except Exception as error:  # the capacity test reports what failed instead of stopping
            problem = f"a checkpoint saved after restructuring did not load: {error!r}"
            if problem not in self.probe.problems:  # the same failure at every restructure: say it once
                self.probe.problems.append(problem)
            return
        self.probe.compare(module, fresh)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        # Lightning writes this state and the module's weights into one checkpoint, in one call:
        # snapshots equal to those weights are stored by reference to them (see CycleController).
        controller = self.controller.state_dict(self._module)
        # The machine's per-validation history is a projection of the recorder's rows (one row per
        # decision, recorded right after it): store it once, as those rows.
        controller["machine"]["state"]["history"] = []
        state = {
            "version": CHECKPOINT_VERSION,
            **controller,
            "pending_score": self._pending_score,
            "recorder": self.recorder.state_dict(),
        }
        if self.optimizer_state == "carry":  # the network's moments, kept while a dendrite phase runs
            state["optimizer_carry"] = self._carrier.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version", 0)
        check_checkpoint_version("the PerforatedCallback's checkpoint state", version)
        if version >= 1:
            state_dict = copy.deepcopy(state_dict)
            rows = state_dict.get("recorder", {}).get("rows", [])
            state_dict["machine"]["state"]["history"] = [
                {key: row.get(key) for key in HISTORY_KEYS} for row in rows if row.get("action") != END
            ]
        # Lightning restores the module's weights before the callbacks' states.
        self.controller.load_state_dict(state_dict, self._module)
        self._carrier.load_state_dict(state_dict.get("optimizer_carry", {}))
        self._pending_score = state_dict.get("pending_score")
        self.recorder.load_state_dict(state_dict.get("recorder", {}))


def _is_torn_checkpoint(path: str) -> bool:
    """A local file that ``torch.save`` did not finish: every torch checkpoint is a complete zip archive."""
    return os.path.isfile(path) and not zipfile.is_zipfile(path)
