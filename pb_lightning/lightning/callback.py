r"""PerforatedCallback: runs the Perforated Backpropagation cycle inside ``trainer.fit``.

After every end-of-epoch validation it feeds the monitored score to a
:class:`~pb_lightning.cycle.machine.PhaseMachine` and carries out its decision through the
:class:`~pb_lightning.lightning.module.PerforatedModule`: snapshot or restore weights, start a dendrite
phase, accept dendrites, retry, or stop. After every change of the trainable parameter set its
:class:`~pb_lightning.lightning.strategy.StrategyAdapter` re-wraps the model under DDP, re-runs
the user's ``configure_optimizers`` (schedulers included) and checks that every trainable
parameter is in the new optimizer; the set-up checks are in :mod:`pb_lightning.lightning.checks`
and the logs and files in :mod:`pb_lightning.lightning.recorder`.

Timing follows ``docs/LIGHTNING_NOTES.md``: the score is read in ``on_validation_end``
(where ``callback_metrics`` hold the current values; the sanity check and ``trainer.validate``
are skipped) and the decision is taken in ``on_train_epoch_end``, from the epoch's last
validation. That hook runs before the monitoring callbacks (EarlyStopping, ModelCheckpoint), so
an end-of-epoch checkpoint already holds the restructured model and its callback state.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from pb_lightning.cycle.capacity import CapacityProbe
from pb_lightning.cycle.controller import CycleController, mean_candidate_score
from pb_lightning.cycle.decision import STOP
from pb_lightning.cycle.machine import PhaseMachine
from pb_lightning.cycle.schedule import PhaseSchedule
from pb_lightning.engine.convert import perforation_summary
from pb_lightning.engine.optimizer_state import OptimizerStateMode
from pb_lightning.engine.transitions import accept_dendrites, in_dendrite_phase
from pb_lightning.errors import PerforationError
from pb_lightning.lightning import checks
from pb_lightning.lightning.module import CHECKPOINT_VERSION, PerforatedModule, check_checkpoint_version
from pb_lightning.lightning.recorder import RunRecorder, candidate_scores_by_layer, machine_history
from pb_lightning.lightning.strategy import StrategyAdapter
from pb_lightning.reporting.history import MetricKind, resolve_metric_kind

log = logging.getLogger(__name__)

#: The one source of the schedule arguments' defaults: the callback's signature reads them here.
_SCHEDULE = PhaseSchedule()
#: The callback's arguments that are PhaseSchedule fields (``require_improvement`` is the
#: capacity test's alone).
SCHEDULE_ARGUMENTS = tuple(name for name in asdict(_SCHEDULE) if name != "require_improvement")


class PerforatedCallback(Callback):
    """Drive the neuron phase → dendrite phase → accept cycle from the validation score.

    One decision per training epoch that ran a validation, from that epoch's last validation.

    Args:
        monitor: the logged validation metric that decides (log it with ``sync_dist=True`` under DDP).
        mode: ``"min"`` if lower is better (a loss), ``"max"`` if higher is better (an accuracy).
        neuron_patience: validations without improvement that end a neuron phase.
        dendrite_patience, improvement_threshold, improvement_threshold_abs,
            candidate_plateau_fraction, warmup_epochs, neuron_epochs, dendrite_epochs,
            max_dendrite_epochs, dendrite_patience_steps, run_budget, max_dendrites, max_tries: the other
            switching rules, as the :class:`~pb_lightning.cycle.schedule.PhaseSchedule` fields of
            the same names (which also give their defaults).
        restarts_only: the schedule without dendrites (``PhaseSchedule.restarts_only``), the
            control that measures what the restart schedule alone is worth.
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
        neuron_patience: int = _SCHEDULE.neuron_patience,
        dendrite_patience: int = _SCHEDULE.dendrite_patience,
        improvement_threshold: float = _SCHEDULE.improvement_threshold,
        improvement_threshold_abs: float = _SCHEDULE.improvement_threshold_abs,
        candidate_plateau_fraction: float = _SCHEDULE.candidate_plateau_fraction,
        warmup_epochs: int = _SCHEDULE.warmup_epochs,
        neuron_epochs: int | None = _SCHEDULE.neuron_epochs,
        dendrite_epochs: int | None = _SCHEDULE.dendrite_epochs,
        max_dendrite_epochs: int = _SCHEDULE.max_dendrite_epochs,
        dendrite_patience_steps: int | None = _SCHEDULE.dendrite_patience_steps,
        run_budget: float | None = _SCHEDULE.run_budget,
        max_dendrites: int = _SCHEDULE.max_dendrites,
        max_tries: int = _SCHEDULE.max_tries,
        restarts_only: bool = _SCHEDULE.restarts_only,
        capacity_test: bool = False,
        metric_kind: MetricKind = "auto",
        output_dir: str | None = None,
        optimizer_state: OptimizerStateMode = "reset",
    ) -> None:
        super().__init__()
        self.strategy = StrategyAdapter(optimizer_state)
        self.optimizer_state = self.strategy.optimizer_state
        checks.check_arguments(monitor, capacity_test, restarts_only, metric_kind, output_dir)
        self.monitor = monitor
        self.capacity_test = capacity_test
        arguments = locals()
        self.schedule = PhaseSchedule(**{name: arguments[name] for name in SCHEDULE_ARGUMENTS})
        if capacity_test:
            self.schedule = PhaseSchedule.capacity_test(self.schedule)
        self.machine = PhaseMachine(mode, self.schedule)
        self.mode = mode
        self.controller = CycleController(self.machine)
        self.probe = CapacityProbe()
        self.recorder = RunRecorder(monitor, mode, resolve_metric_kind(metric_kind, monitor), output_dir)
        self._flat_score: float | None = None
        self._pending_score: float | None = None
        self._said_no_score = False
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

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, PerforatedModule):
            raise PerforationError(
                f"PerforatedCallback needs a pb_lightning.PerforatedModule; got {type(pl_module).__name__}. "
                "Subclass PerforatedModule instead of LightningModule."
            )
        if stage != "fit":
            return
        self._module = pl_module
        self.strategy.setup(trainer, pl_module)
        checks.check_early_stopping(trainer, self.schedule)
        if self.capacity_test:
            checks.check_capacity_test_epochs(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        checks.check_fit(trainer, pl_module)
        checks.probe_shapes(trainer, pl_module)
        # Like Lightning's model summary: what got dendrites and what did not, before training.
        rank_zero_info(perforation_summary(pl_module))
        settings = {"monitor": self.monitor, "mode": self.mode, "capacity_test": self.capacity_test}
        self.recorder.start(trainer, pl_module, {**settings, "optimizer_state": self.optimizer_state}, self.schedule)
        self.strategy.fit_start(trainer, pl_module)
        if self.capacity_test:
            self.probe.start(pl_module)

    # ------------------------------------------------------------------ the decision
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lets read_score tell a metric this validation logged from one left over from training.
        self._before_validation = trainer.callback_metrics.get(self.monitor)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if trainer.sanity_checking:
            # The sanity check's metrics decide nothing, but they name the logged keys: a monitor
            # missing from them is reported now, not after a whole training epoch. (With several
            # validation dataloaders Lightning shows no metric at the sanity check: nothing to say.)
            if trainer.callback_metrics:
                checks.check_monitor_logged(trainer, self.monitor)
            return
        # Remember the score; the decision waits for the end of the training epoch, so that with
        # several validations per epoch (val_check_interval < 1) only the last one counts.
        self._pending_score = checks.read_score(trainer, self.monitor, self._before_validation)
        if self.capacity_test:
            self.probe.check_finite(self.monitor, self._pending_score, trainer.current_epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        score, self._pending_score = self._pending_score, None
        if score is not None:
            self._decide(trainer, pl_module, score)
        elif not self._said_no_score:  # no validation this epoch (check_val_every_n_epoch > 1), or an empty one
            self._said_no_score = checks.warn_no_score(trainer, self.monitor)
        self.recorder.show_progress(trainer, pl_module, self.machine)

    def _decide(self, trainer: pl.Trainer, pl_module: pl.LightningModule, score: float) -> None:
        module: PerforatedModule = pl_module  # type: ignore[assignment]
        layers = candidate_scores_by_layer(module)
        candidate = mean_candidate_score(module)  # the same input the plain-PyTorch tracker gives
        # Every rank steps its own machine with rank 0's inputs, so all take the same decision.
        score, candidate = trainer.strategy.broadcast((score, candidate), src=0)
        self._flat_score = checks.check_flat_score(self._flat_score, score, self.monitor, module)
        # Stepped as the tracker steps it: the machine decides, the controller carries it out.
        decision, restructured = self.controller.step(
            module, score, candidate, accept=self._accept(), global_step=trainer.global_step
        )
        self.recorder.announce(trainer, decision, score)
        checks.warn_no_correlation(decision, self.machine.state.candidate_best, module)
        if restructured:
            self._restructure(trainer, module)
        if decision.action == STOP:
            trainer.should_stop = True
        self.recorder.record(trainer, module, self.machine, decision, layers)
        if in_dendrite_phase(module):
            checks.forgive_early_stopping(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Only with PhaseSchedule.dendrite_patience_steps, in a dendrite phase: accept as soon as
        # the candidates' score has converged, mid-epoch (the machine decides on the last
        # validation's score: the network has been frozen since).
        if not self.machine.checks_steps or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        module: PerforatedModule = pl_module  # type: ignore[assignment]
        # Every rank steps its own machine with rank 0's score, so all accept at the same step.
        candidate = trainer.strategy.broadcast(mean_candidate_score(module), src=0)
        layers: dict[str, tuple[float, float]] = {}

        def accept(model: PerforatedModule) -> Any:
            # The per-layer scores are read only at the step that accepts, just before the
            # candidates go: not at every step of the phase.
            layers.update(candidate_scores_by_layer(model))
            return self._accept()(model)

        decision = self.controller.training_step(module, candidate, accept=accept, global_step=trainer.global_step)
        if decision is None:
            return
        self.recorder.announce(trainer, decision, float(self.machine.state.last_score))  # type: ignore[arg-type]
        self._restructure(trainer, module)
        self.recorder.record(trainer, module, self.machine, decision, layers)

    def _accept(self) -> Any:
        """What installs the dendrites: checked by the capacity probe during the capacity test."""
        return self.probe.checked_accept(accept_dendrites) if self.capacity_test else accept_dendrites

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self.strategy.before_backward(trainer, pl_module)

    def _restructure(self, trainer: pl.Trainer, module: PerforatedModule) -> None:
        self.strategy.restructure(trainer, module)
        checks.forgive_early_stopping(trainer)
        if self.capacity_test:
            checks.check_checkpoint_round_trip(trainer, module, self.probe)

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
            self.strategy.rewrite_last_checkpoints(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        checks.explain_torn_checkpoint(trainer, exception)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.probe.stop()
        module: PerforatedModule = pl_module  # type: ignore[assignment]
        extra = []
        if self.capacity_test:
            extra.append("  " + self.probe.summary(self.machine.state.dendrites))
            if self.capacity_problems:
                rank_zero_warn("pb_lightning capacity test found problems: " + "; ".join(self.capacity_problems))
        self.report = self.recorder.finish(trainer, module, self.machine, extra)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        # Lightning writes this state and the module's weights into one checkpoint, in one call:
        # snapshots equal to those weights are stored by reference to them (see CycleController).
        controller = self.controller.state_dict(self._module)
        # The machine's per-validation history is stored once, as the recorder's rows.
        controller["machine"]["state"]["history"] = []
        state = {
            "version": CHECKPOINT_VERSION,
            **controller,
            "pending_score": self._pending_score,
            "recorder": self.recorder.state_dict(),
        }
        if self.optimizer_state == "carry":  # the network's moments, kept while a dendrite phase runs
            state["optimizer_carry"] = self.strategy.carrier.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version", 0)
        check_checkpoint_version("the PerforatedCallback's checkpoint state", version)
        if version >= 1:
            state_dict = copy.deepcopy(state_dict)
            state_dict["machine"]["state"]["history"] = machine_history(state_dict.get("recorder", {}).get("rows", []))
        # Lightning restores the module's weights before the callbacks' states.
        self.controller.load_state_dict(state_dict, self._module)
        self.strategy.carrier.load_state_dict(state_dict.get("optimizer_carry", {}))
        self._pending_score = state_dict.get("pending_score")
        self.recorder.load_state_dict(state_dict.get("recorder", {}))
