"""PerforatedTracker: the five steps of a plain PyTorch loop, mapped onto a cycle driver.

    >>> import pb_lightning as pb, torch                                   # 1
    >>> tracker = pb.PerforatedTracker("max", pb.PhaseSchedule(neuron_patience=2))
    >>> model = tracker.initialize(torch.nn.Sequential(torch.nn.Linear(4, 2)))  # 2: perforate
    >>> tracker.set_optimizer(torch.optim.SGD, lr=0.1)                     # 3 (and set_scheduler)
    >>> optimizer, scheduler = tracker.setup_optimizer(model)              # 4: for the current phase
    >>> model, restructured, complete = tracker.add_validation_score(0.5, model)  # 5: after each validation
    >>> restructured, complete  # rebuild the optimizer when restructured, stop when complete
    (False, False)

The :class:`~pb_lightning.cycle.driver.CycleDriver` is the Lightning callback's: the same scores
give the same decisions, logged at INFO here (on stderr while nothing is configured: :mod:`~pb_lightning.loops.log`).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Literal

import torch
from torch import nn

from pb_lightning.cycle.decision import Decision
from pb_lightning.cycle.driver import CycleDriver, Outcome
from pb_lightning.cycle.schedule import PhaseSchedule
from pb_lightning.cycle.scores import as_score, nonfinite_message
from pb_lightning.diagnostics.capacity import CapacityProbe, CapacityTest
from pb_lightning.engine.config import DendriteConfig
from pb_lightning.engine.convert import perforate
from pb_lightning.engine.optimizer_state import OptimizerStateMode
from pb_lightning.errors import invalid
from pb_lightning.loops.log import DecisionLog, visible_without_configuration
from pb_lightning.loops.optimizers import OptimizerRecipe

log = visible_without_configuration(logging.getLogger(__name__))


class PerforatedTracker:
    """Decides phase switches from validation scores in a plain PyTorch loop.

    Args:
        mode: ``"max"`` if a higher score is better (accuracy), ``"min"`` if lower is (loss).
        schedule: the switching rules (default :class:`~pb_lightning.cycle.schedule.PhaseSchedule()`).
        capacity_test: the first experiment (docs/ALGORITHM.md §5): switch every validation, add three
            dendrite sets, check the pipeline at every step, report (:attr:`capacity_report`).
        weight_decay, candidate_lr: of the optimizer's parameter groups (see :class:`OptimizerRecipe`).
        optimizer_state: ``"reset"`` (the reference method: a fresh optimizer and scheduler after each
            restructure) or ``"carry"`` (persisting parameters keep their state, the scheduler continues).
        verbose: log every phase decision at INFO (``False``: at DEBUG; silence the logger otherwise).
    """

    def __init__(
        self,
        mode: Literal["min", "max"] = "max",
        schedule: PhaseSchedule | None = None,
        *,
        capacity_test: bool = False,
        weight_decay: float = 0.0,
        candidate_lr: float | None = None,
        optimizer_state: OptimizerStateMode = "reset",
        verbose: bool = True,
    ) -> None:
        for name, value in (("capacity_test", capacity_test), ("verbose", verbose)):
            if not isinstance(value, bool):
                raise invalid(name, value, "a bool")
        if schedule is not None and not isinstance(schedule, PhaseSchedule):
            raise invalid("schedule", schedule, "a pb_lightning.PhaseSchedule")
        self.capacity = CapacityTest(self._round_trip) if capacity_test else None
        schedule = PhaseSchedule.capacity_test() if capacity_test else schedule  # the callback's test too
        observers = [] if self.capacity is None else [self.capacity]
        self.driver = CycleDriver(mode, schedule, optimizer_state=optimizer_state, observers=observers)
        self.capacity_test, self.verbose, self.machine = capacity_test, verbose, self.driver.machine
        self.recipe = OptimizerRecipe(weight_decay, candidate_lr)
        self.optimizer_state = self.driver.optimizer_state
        #: The decision taken on the latest validation score (None before the first).
        self.last_decision: Decision | None = None
        self._current: tuple[list[torch.optim.Optimizer], list[Any]] = ([], [])
        self.log = DecisionLog(log, verbose)

    @property
    def capacity_report(self) -> str | None:
        """The capacity test's verdict, once it has finished."""
        return None if self.capacity is None else self.capacity.report

    def initialize(self, model: nn.Module, **perforate_options: Any) -> nn.Module:
        """Perforate ``model`` (options as for :func:`pb_lightning.perforate`) and return it; a
        trained model computes what it did, and its plain state dict still loads afterwards."""
        perforate_options.setdefault("config", DendriteConfig())
        model = perforate(model, **perforate_options)
        self.log.summary(model)  # once per tracker at INFO
        self.driver.start(model)
        return model

    def set_optimizer(self, optimizer: type[torch.optim.Optimizer], **kwargs: Any) -> None:
        """The optimizer class and its arguments (not ``params``: the tracker supplies the groups)."""
        self.recipe.set_optimizer(optimizer, kwargs)

    def set_scheduler(self, scheduler: Any, **kwargs: Any) -> None:
        """The LR scheduler class and its arguments (built with each new optimizer)."""
        self.recipe.set_scheduler(scheduler, kwargs)

    def setup_optimizer(self, model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        """A new optimizer (and scheduler, or None) over what the current phase trains."""
        optimizers, schedulers = self.driver.rebuild_optimizers(model, self._current, lambda: self.recipe.build(model))
        self._current = (list(optimizers), list(schedulers))
        return optimizers[0], schedulers[0] if schedulers else None

    def add_validation_score(
        self, score: float, model: nn.Module, *, epoch: int | None = None
    ) -> tuple[nn.Module, bool, bool]:
        """Report one validation score; returns ``(model, restructured, training_complete)``.

        ``restructured``: call :meth:`setup_optimizer` again; ``training_complete``: the model holds
        the best weights found, stop. The decision is in :attr:`last_decision`. A NaN or infinite
        score is warned about (with ``epoch``) and never a best; a non-number raises PerforationError.
        """
        score = as_score(score)
        when = f"epoch {epoch}" if epoch is not None else f"validation {self.machine.state.validations + 1}"
        message = nonfinite_message(None, score, when)
        if message is not None:
            warnings.warn(message, stacklevel=2)
        outcome = self._carried_out(model, self.driver.validation(model, score, epoch=epoch), when)
        return model, outcome.restructured, outcome.complete

    def add_training_step(self, model: nn.Module) -> bool:
        """Call after every optimizer step; returns ``restructured``. With ``PhaseSchedule(
        dendrite_patience_steps=...)`` a dendrite phase may end here; otherwise it costs nothing."""
        return self._carried_out(model, self.driver.training_step(model), "a training step").restructured

    def _carried_out(self, model: nn.Module, outcome: Outcome, when: str) -> Outcome:
        self.last_decision = self.log.decision(outcome, when) or self.last_decision
        if outcome.restructured:
            self.driver.restructured(model)
        if outcome.complete:
            self.log.report(self.driver.close(model))
        return outcome

    def finish(self, model: nn.Module) -> nn.Module:
        """Call when training ends for another reason (an epoch budget): leaves the best model."""
        self.log.end(self.driver.finish(model).decision)
        self.log.report(self.driver.close(model))
        return model

    def _round_trip(self, model: nn.Module, probe: CapacityProbe) -> None:
        """The capacity test's: the groups setup_optimizer will build (once it has built), a saved state."""
        probe.check_fresh_round_trip(model, self.recipe.groups(model) if self._current[0] else None)

    def state_dict(self) -> dict[str, Any]:
        """The cycle's state (the callback's layout): save it with the model's state dict."""
        return self.driver.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.driver.load_state_dict(state, what="the PerforatedTracker's state")
