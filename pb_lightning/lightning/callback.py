r"""PerforatedCallback: Lightning's hooks mapped onto a :class:`~pb_lightning.cycle.driver.CycleDriver`.

The driver decides and restructures through the :class:`~pb_lightning.lightning.module.PerforatedModule`
(its restructurer: a user's overrides of the module's phase controls see every restructure); the
:class:`~pb_lightning.lightning.strategy.StrategyAdapter` then converts precision, re-wraps DDP and
re-runs ``configure_optimizers``. Checks: :mod:`~pb_lightning.lightning.checks`; logs and files:
:mod:`~pb_lightning.lightning.recorder`. Timing (``docs/LIGHTNING_NOTES.md``): the score is read
in ``on_validation_end``, the decision taken in ``on_train_epoch_end`` from the epoch's last
validation — before EarlyStopping and ModelCheckpoint, so a checkpoint holds the restructured model.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal, cast

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor

from pb_lightning.cycle.decision import STOP, Decision
from pb_lightning.cycle.driver import CycleDriver, Outcome
from pb_lightning.cycle.machine import PhaseMachine
from pb_lightning.cycle.schedule import PhaseSchedule
from pb_lightning.diagnostics.capacity import CapacityTest
from pb_lightning.engine.convert import perforation_summary
from pb_lightning.engine.optimizer_state import OptimizerStateMode
from pb_lightning.lightning import checks
from pb_lightning.lightning.module import PerforatedModule, as_restructurer
from pb_lightning.lightning.recorder import RunRecorder
from pb_lightning.lightning.strategy import StrategyAdapter
from pb_lightning.reporting.history import MetricKind, resolve_metric_kind

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
        neuron_patience, dendrite_patience, improvement_threshold, improvement_threshold_abs,
            candidate_plateau_fraction, warmup_epochs, neuron_epochs, dendrite_epochs, max_dendrite_epochs,
            dendrite_patience_steps, run_budget, max_dendrites, max_tries, restarts_only: the switching
            rules, as the :class:`~pb_lightning.cycle.schedule.PhaseSchedule` fields of the same names
            (which also give their defaults).
        capacity_test: the first experiment on a new model (docs/ALGORITHM.md §5): switch every epoch,
            add three dendrite sets, check the pipeline at every step, report, and stop.
        metric_kind: ``"accuracy"`` or ``"error"`` makes the final report give the reduction of
            the remaining error; ``"auto"`` guesses from the monitor's name (``*acc*``, ``*err*``).
        output_dir: where to write ``pb_history.json``, ``pb_report.json`` and ``pb_history.png``;
            default: the logger's directory (no logger: no files).
        optimizer_state: what the optimizer rebuilt after each restructure starts from: ``"reset"``
            (the reference method: fresh moments, schedulers from their first epoch) or ``"carry"``
            (persisting parameters keep their state by name, schedulers continue; see
            :mod:`pb_lightning.engine.optimizer_state`).

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
        checks.check_arguments(monitor, capacity_test, restarts_only, metric_kind, output_dir)
        self.monitor, self.mode, self.capacity_test = monitor, mode, capacity_test
        arguments = locals()
        schedule = PhaseSchedule(**{name: arguments[name] for name in SCHEDULE_ARGUMENTS})
        self.schedule = PhaseSchedule.capacity_test(schedule) if capacity_test else schedule
        observers = checks.cycle_observers(monitor, capacity_test)
        self.driver = CycleDriver(
            mode, self.schedule, optimizer_state=optimizer_state, observers=observers, restructurer=as_restructurer
        )
        self.optimizer_state, self.strategy = self.driver.optimizer_state, StrategyAdapter()
        self.recorder = RunRecorder(monitor, mode, resolve_metric_kind(metric_kind, monitor), output_dir)
        self.score = checks.ValidationScore(monitor)
        self._module: PerforatedModule | None = None
        #: The final report (see :func:`pb_lightning.reporting.history.final_report`), set when fit ends.
        self.report: dict[str, Any] | None = None

    @property
    def machine(self) -> PhaseMachine:
        return self.driver.machine

    @property
    def best_score(self) -> float | None:
        """The best monitored score so far (the global best; the model left after fit has it)."""
        return self.machine.state.global_best

    @property
    def capacity_problems(self) -> list[str]:
        """Problems the capacity test found (empty: none)."""
        return [p for test in self.driver.observers if isinstance(test, CapacityTest) for p in test.problems]

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._module = as_restructurer(pl_module)  # refuses a plain LightningModule, by name
        if stage != "fit":
            return
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
        settings["optimizer_state"] = self.optimizer_state
        self.recorder.start(trainer, as_restructurer(pl_module), settings, self.schedule)
        self.strategy.fit_start(trainer, pl_module, self.driver)
        self.driver.start(pl_module)

    # ------------------------------------------------------------------ the decision
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.score.before_validation(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.score.after_validation(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        score = self.score.take(trainer)
        if score is not None:
            # Every rank steps its own driver with rank 0's inputs, so all take the same decision.
            self._carry_out(trainer, pl_module, self.driver.validation(pl_module, score, **self._where(trainer)))
            if as_restructurer(pl_module).in_dendrite_phase:
                checks.forgive_early_stopping(trainer)
        self.recorder.show_progress(trainer, pl_module, self.machine)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # With PhaseSchedule.dendrite_patience_steps a dendrite phase may end mid-epoch, at an optimizer step.
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            outcome = self.driver.training_step(pl_module, **self._where(trainer))
            if outcome.decision is not None:
                self._carry_out(trainer, pl_module, outcome)

    @staticmethod
    def _where(trainer: pl.Trainer) -> dict[str, Any]:
        share = lambda value: trainer.strategy.broadcast(value, src=0)  # noqa: E731
        return {"epoch": trainer.current_epoch, "global_step": trainer.global_step, "share": share}

    def _carry_out(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outcome: Outcome) -> None:
        decision, module = cast(Decision, outcome.decision), as_restructurer(pl_module)
        self.recorder.announce(trainer, decision, cast(float, outcome.score))
        if outcome.restructured:
            self._restructure(trainer, module)
        if decision.action == STOP:
            trainer.should_stop = True
        self.recorder.record(trainer, module, self.machine, decision, outcome.candidates, self.driver.history.rows)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self.strategy.before_backward(trainer, pl_module)

    def _restructure(self, trainer: pl.Trainer, module: PerforatedModule) -> None:
        self.strategy.restructure(trainer, module, self.driver)
        checks.forgive_early_stopping(trainer)
        self.driver.restructured(module)

    # ------------------------------------------------------------------ resuming and end of training
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Normally done in load_state_dict; here for strategies that restore before setup.
        self.driver.controller.rebuild_from_model(pl_module)
        checks.stop_if_finished(trainer, self.driver.complete)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        outcome = self.driver.finish(pl_module)
        if outcome.decision is None:
            return
        rank_zero_info(f"pb_lightning: {outcome.decision.reason}.")
        if outcome.restructured:
            # The restored model has other trainable parameters: an optimizer that matches it keeps
            # the rewritten checkpoint resumable.
            self._restructure(trainer, as_restructurer(pl_module))
            self.strategy.rewrite_last_checkpoints(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        checks.explain_torn_checkpoint(trainer, exception)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        extra = self.driver.close(pl_module, epoch=trainer.current_epoch, global_step=trainer.global_step)
        self.report = self.recorder.finish(trainer, self.driver.history.rows, ["  " + line for line in extra])

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        # Lightning writes this state and the module's weights into one checkpoint, in one call:
        # snapshots equal to those weights are stored by reference to them (see CycleController).
        return {**self.driver.state_dict(self._module), "pending_score": self.score.pending}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores the module's weights before the callbacks' states.
        self.driver.load_state_dict(state_dict, self._module, what="the PerforatedCallback's checkpoint state")
        self.score.pending = state_dict.get("pending_score")
