r"""PerforatedCallback: Lightning's hooks mapped onto a :class:`~pb_lightning.cycle.driver.CycleDriver`.

It decides and restructures through the PerforatedModule (whose overrides see every restructure);
the StrategyAdapter then converts precision, re-wraps DDP and re-runs ``configure_optimizers``. The
score is read in ``on_validation_end``, decided on in ``on_train_epoch_end`` (the last validation
counts), before EarlyStopping and ModelCheckpoint: checkpoints hold the restructured model.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor

from pb_lightning.cycle.driver import CycleDriver, Outcome
from pb_lightning.cycle.schedule import BudgetUnit, PhaseSchedule
from pb_lightning.diagnostics.capacity import CapacityTest
from pb_lightning.engine.convert import perforation_summary
from pb_lightning.engine.optimizer_state import OptimizerStateMode
from pb_lightning.lightning import checks
from pb_lightning.lightning.module import PerforatedModule, as_restructurer
from pb_lightning.lightning.monitor import ValidationScore
from pb_lightning.lightning.recorder import RunRecorder
from pb_lightning.lightning.strategy import StrategyAdapter
from pb_lightning.reporting.history import MetricKind, resolve_metric_kind

_SCHEDULE = PhaseSchedule()  # the one source of the schedule arguments' defaults
#: The callback's arguments that are PhaseSchedule fields (``require_improvement`` is the capacity test's).
SCHEDULE_ARGUMENTS = tuple(name for name in asdict(_SCHEDULE) if name != "require_improvement")


class PerforatedCallback(Callback):
    """Drive the neuron phase → dendrite phase → accept cycle: one decision per epoch that validated.

    Args:
        monitor: the logged validation metric that decides (log it with ``sync_dist=True`` under DDP).
        mode: ``"min"`` if lower is better (a loss), ``"max"`` if higher is better (an accuracy).
        neuron_patience, dendrite_patience, improvement_threshold, improvement_threshold_abs,
            candidate_plateau_fraction, warmup_epochs, neuron_epochs, dendrite_epochs, max_dendrite_epochs,
            dendrite_patience_steps, run_budget, run_budget_unit, max_dendrites, max_tries, restarts_only: the rules,
            as the :class:`~pb_lightning.cycle.schedule.PhaseSchedule` fields of those names (and defaults).
        capacity_test: the first experiment on a new model (docs/ALGORITHM.md §5): switch every epoch,
            add three dendrite sets, check the pipeline at every step, report, and stop.
        metric_kind: ``"accuracy"`` or ``"error"``: the report gives the reduction of the remaining
            error; ``"auto"`` guesses from the monitor's name (``*acc*``, ``*err*``).
        output_dir: where ``pb_history.json``, ``pb_report.json``, ``pb_history.png`` go (default: the logger's).
        optimizer_state: what the optimizer rebuilt after each restructure starts from: ``"reset"``
            (the reference method) or ``"carry"`` (see :mod:`pb_lightning.engine.optimizer_state`).

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
        run_budget_unit: BudgetUnit = _SCHEDULE.run_budget_unit,
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
        schedule = PhaseSchedule(**{name: value for name, value in locals().items() if name in SCHEDULE_ARGUMENTS})
        self.schedule = PhaseSchedule.capacity_test(schedule) if capacity_test else schedule
        observers = checks.cycle_observers(monitor, capacity_test)
        self.driver = CycleDriver(
            mode, self.schedule, optimizer_state=optimizer_state, observers=observers, restructurer=as_restructurer
        )
        self.machine, self.optimizer_state, self.strategy = self.driver.machine, optimizer_state, StrategyAdapter()
        self.recorder = RunRecorder(monitor, mode, resolve_metric_kind(metric_kind, monitor), output_dir)
        self.score = ValidationScore(monitor)
        self._module: PerforatedModule | None = None
        self.report: dict[str, Any] | None = None  # the final report (reporting.history.final_report)

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
        settings = {k: getattr(self, k) for k in ("monitor", "mode", "capacity_test", "optimizer_state")}
        self.recorder.start(trainer, as_restructurer(pl_module), settings, self.schedule)
        self.strategy.fit_start(trainer, pl_module, self.driver)
        self.driver.start(pl_module)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.score.before_validation(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.score.after_validation(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        score = self.score.take(trainer)
        if score is not None:
            outcome = self.driver.validation(pl_module, score, **self.strategy.where(trainer))  # rank 0's inputs
            self._carry_out(trainer, pl_module, outcome)
            if as_restructurer(pl_module).in_dendrite_phase:
                checks.forgive_early_stopping(trainer)
        self.recorder.show_progress(trainer, pl_module, self.machine)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # With PhaseSchedule.dendrite_patience_steps a dendrite phase may end at an optimizer step.
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            outcome = self.driver.training_step(pl_module, **self.strategy.where(trainer))
            if outcome.decision is not None:
                self._carry_out(trainer, pl_module, outcome)

    def _carry_out(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outcome: Outcome) -> None:
        self.recorder.announce(trainer, outcome)
        if outcome.restructured:
            self._restructure(trainer, as_restructurer(pl_module))
        if outcome.complete:  # the decision was to stop
            trainer.should_stop = True
        self.recorder.record(trainer, as_restructurer(pl_module), self.machine, outcome, self.driver.history.rows)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self.strategy.before_backward(trainer, pl_module)

    def _restructure(self, trainer: pl.Trainer, module: PerforatedModule) -> None:
        self.strategy.restructure(trainer, module, self.driver)
        checks.forgive_early_stopping(trainer)
        self.driver.restructured(module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.driver.controller.rebuild_from_model(pl_module)  # if the state was loaded before the weights
        checks.stop_if_finished(trainer, self.driver.complete)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        outcome = self.driver.finish(pl_module)
        if outcome.decision is None:
            return
        rank_zero_info(f"pb_lightning: {outcome.decision.reason}.")
        if outcome.restructured:  # an optimizer that matches the restored model keeps last.ckpt resumable
            self._restructure(trainer, as_restructurer(pl_module))
            self.strategy.rewrite_last_checkpoints(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        checks.explain_torn_checkpoint(trainer, exception)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        extra = self.driver.close(pl_module, epoch=trainer.current_epoch, global_step=trainer.global_step)
        self.report = self.recorder.finish(trainer, self.driver.history.rows, ["  " + line for line in extra])

    def state_dict(self) -> dict[str, Any]:
        # Saved with the module's weights: snapshots equal to them are stored by reference.
        return {**self.driver.state_dict(self._module), "pending_score": self.score.pending}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # after the module's weights
        self.driver.load_state_dict(state_dict, self._module, what="the PerforatedCallback's checkpoint state")
        self.score.pending = state_dict.get("pending_score")
