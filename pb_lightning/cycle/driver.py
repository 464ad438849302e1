"""CycleDriver: the Perforated Backpropagation cycle behind both front ends, with a small interface.

A validation score (and, while a dendrite phase may end on training steps, each training step)
goes in; an :class:`Outcome` comes out: the decision, whether the trainable parameters changed
(rebuild the optimizer) and whether training is complete. Behind that interface the driver owns
everything the Lightning callback and the plain-PyTorch tracker used to repeat:

* the :class:`~pb_lightning.cycle.machine.PhaseMachine` that decides and the
  :class:`~pb_lightning.cycle.controller.CycleController` that carries decisions out (weights by
  snapshot and restore, structure through the front end's
  :class:`~pb_lightning.cycle.restructure.Restructurer`);
* the optimizer-state carry around each rebuild and the check that the rebuilt optimizers hold
  every trainable parameter (:meth:`CycleDriver.rebuild_optimizers`, :func:`missing_from_optimizers`);
* the one history (:class:`~pb_lightning.reporting.recorder.HistoryRecorder`), a row per decision;
* the hooks diagnostics observe (:class:`~pb_lightning.cycle.observers.CycleObserver`), such as the
  capacity test;
* one checkpoint layout for all of it (:meth:`CycleDriver.state_dict`).

What remains to a front end is its framework: where scores come from, how ranks share them,
how optimizers are built, what is logged.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pb_lightning.cycle.checkpoint_format import CHECKPOINT_VERSION, check_checkpoint_version
from pb_lightning.cycle.controller import CycleController, mean_candidate_score
from pb_lightning.cycle.decision import Decision
from pb_lightning.cycle.machine import PhaseMachine
from pb_lightning.cycle.observers import CycleObserver
from pb_lightning.cycle.restructure import EngineRestructurer, Restructurer
from pb_lightning.cycle.schedule import Mode, PhaseSchedule
from pb_lightning.engine.optimizer_state import OptimizerStateCarrier, OptimizerStateMode, check_optimizer_state
from pb_lightning.reporting.recorder import HistoryRecorder, candidate_scores_by_layer, machine_history

__all__ = ["CycleDriver", "Outcome", "missing_from_groups", "missing_from_optimizers"]


def _alone(value: Any) -> Any:
    """The default ``share``: a single process shares nothing."""
    return value


@dataclass(frozen=True)
class Outcome:
    """What one input to the driver changed.

    Attributes:
        decision: the decision taken, or None (a training step that decided nothing).
        restructured: the trainable parameters changed: rebuild the optimizer.
        complete: training is complete (the model holds the best weights found).
        score: the validation score the decision was taken on, as every rank shared it.
        row: the history row recorded for the decision (None without a decision).
        candidates: per layer, mean and max over neurons of the best candidate score, read just
            before the decision (empty outside dendrite phases, and on a step that accepted nothing).
    """

    decision: Decision | None
    restructured: bool = False
    complete: bool = False
    score: float | None = None
    row: dict[str, Any] | None = None
    candidates: dict[str, tuple[float, float]] = field(default_factory=dict)


def missing_from_optimizers(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> list[str]:
    """The names of ``model``'s trainable parameters that no optimizer holds (they would never train)."""
    return missing_from_groups(model, [group for opt in optimizers for group in opt.param_groups])


def missing_from_groups(model: nn.Module, groups: Sequence[dict[str, Any]]) -> list[str]:
    """The names of ``model``'s trainable parameters in none of the parameter ``groups``."""
    held = {id(p) for group in groups for p in group["params"]}
    return [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in held]


class _Observed:
    """The front end's restructurer, with the observers wrapped around the acceptance."""

    def __init__(self, inner: Restructurer, model: nn.Module, observers: Sequence[CycleObserver]) -> None:
        self.inner, self.model, self.observers = inner, model, observers
        self.candidates: dict[str, tuple[float, float]] = {}

    def start_dendrite_phase(self) -> None:
        self.inner.start_dendrite_phase()

    def accept_dendrites(self) -> Any:
        # Read just before the candidates go (on a step-ended phase, only at the step that accepts).
        self.candidates = self.candidates or candidate_scores_by_layer(self.model)
        accept: Callable[[], Any] = self.inner.accept_dendrites
        for observer in self.observers:
            accept = _wrapped(observer, self.model, accept)
        return accept()

    def discard_candidates(self) -> None:
        self.inner.discard_candidates()


def _wrapped(observer: CycleObserver, model: nn.Module, accept: Callable[[], Any]) -> Callable[[], Any]:
    return lambda: observer.around_accept(model, accept)


class CycleDriver:
    """Runs the cycle on a model from validation scores; the front ends adapt their framework to it.

    Args:
        mode: ``"min"`` if a lower score is better (a loss), ``"max"`` if higher is.
        schedule: the switching rules (default ``PhaseSchedule()``).
        optimizer_state: ``"reset"`` or ``"carry"`` (see :mod:`pb_lightning.engine.optimizer_state`).
        observers: diagnostics that watch the cycle (:class:`~pb_lightning.cycle.observers.CycleObserver`).
        restructurer: makes, from the model, what carries out the structural changes: the
            PerforatedModule itself under Lightning; by default :class:`EngineRestructurer`.
        clock: the wall clock a ``run_budget_unit="time"`` budget is measured with: the seconds
            from :meth:`start` (or the previous validation) to each validation go to the machine.

    Example::

        >>> import torch, pb_lightning as pb
        >>> driver = CycleDriver("min", pb.PhaseSchedule(neuron_epochs=1, dendrite_epochs=1))
        >>> model = pb.perforate(torch.nn.Sequential(torch.nn.Linear(3, 2)))
        >>> driver.start(model)
        >>> outcome = driver.validation(model, 1.0)
        >>> str(outcome.decision.action), outcome.restructured, outcome.complete
        ('start_dendrite_phase', True, False)
    """

    def __init__(
        self,
        mode: Mode,
        schedule: PhaseSchedule | None = None,
        *,
        optimizer_state: OptimizerStateMode = "reset",
        observers: Sequence[CycleObserver] = (),
        restructurer: Callable[[nn.Module], Restructurer] = EngineRestructurer,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.optimizer_state = check_optimizer_state(optimizer_state)
        self.machine = PhaseMachine(mode, schedule)
        self.controller = CycleController(self.machine)
        self.carrier = OptimizerStateCarrier()
        self.history = HistoryRecorder()
        self.observers = list(observers)
        self._restructurer = restructurer
        self._closed = False
        self.clock = clock
        self._since: float | None = None  # the clock when the time to the next validation began

    @property
    def complete(self) -> bool:
        """Whether the machine has said that training is complete."""
        return self.machine.state.done

    def start(self, model: nn.Module) -> None:
        """Training starts or resumes on ``model``: rebuild snapshots a checkpoint held by
        reference, remember the size before dendrites, start the observers."""
        self.controller.rebuild_from_model(model)
        self.history.start(model)
        for observer in self.observers:
            observer.on_start(model)
        self._since = self.clock()

    # ------------------------------------------------------------------ scores in, outcomes out
    def validation(
        self,
        model: nn.Module,
        score: float,
        *,
        epoch: int | None = None,
        global_step: int | None = None,
        share: Callable[[Any], Any] = _alone,
    ) -> Outcome:
        """Decide on one validation ``score`` and carry the decision out on ``model``.

        ``share`` makes every rank take rank 0's inputs (score, candidate score and the seconds
        since the previous validation) so that all take the same decision; ``epoch`` and
        ``global_step`` go into the history row.
        """
        candidates = candidate_scores_by_layer(model)
        score, candidate, seconds = share((score, mean_candidate_score(model), self._seconds()))
        when = f"epoch {epoch}" if epoch is not None else f"validation {self.machine.state.validations + 1}"
        for observer in self.observers:
            observer.on_validation(model, score, when)
        structure = _Observed(self._restructurer(model), model, self.observers)
        structure.candidates = candidates  # already read: an acceptance need not read them again
        decision, restructured = self.controller.step(
            model, score, candidate, restructurer=structure, global_step=global_step, seconds=seconds
        )
        return self._carried_out(model, decision, restructured, score, candidates, epoch)

    def _seconds(self) -> float | None:
        """The wall-clock seconds since :meth:`start` or the previous validation, for a budget of
        time (None for one of validations, or before :meth:`start`)."""
        if self.machine.schedule.run_budget_unit != "time" or self._since is None:
            return None
        now = self.clock()
        seconds, self._since = max(0.0, now - self._since), now
        return seconds

    def training_step(
        self,
        model: nn.Module,
        *,
        epoch: int | None = None,
        global_step: int | None = None,
        share: Callable[[Any], Any] = _alone,
    ) -> Outcome:
        """After one optimizer step: a dendrite phase may end on the candidates' converged score
        (``PhaseSchedule.dendrite_patience_steps``). Costs nothing while the machine does not
        check steps; the outcome then has no decision."""
        if not self.machine.checks_steps:
            return Outcome(None)
        candidate = share(mean_candidate_score(model))
        structure = _Observed(self._restructurer(model), model, self.observers)
        decision = self.controller.training_step(model, candidate, restructurer=structure, global_step=global_step)
        if decision is None:
            return Outcome(None)
        score = self.machine.state.last_score
        return self._carried_out(model, decision, True, score, structure.candidates, epoch)

    def finish(self, model: nn.Module) -> Outcome:
        """Training ends for another reason (an epoch budget): leave the global-best model.

        The outcome has no decision when the machine had already finished.
        """
        decision = self.controller.finish(model, restructurer=self._restructurer(model))
        if decision is None:
            return Outcome(None, complete=True)
        return Outcome(decision, restructured=decision.restore is not None, complete=True)

    def close(self, model: nn.Module, *, epoch: int | None = None, global_step: int | None = None) -> list[str]:
        """After the final restore: the closing history row, and the observers' report lines.

        Closing again with no decision in between does nothing (returns no line): a loop may
        close on ``complete`` and again when it ends.
        """
        if self._closed:
            return []
        self._closed = True
        self.history.close(model, self.machine.state, epoch, global_step)
        return [line for observer in self.observers for line in observer.on_finish(model, self.machine.state)]

    def _carried_out(
        self,
        model: nn.Module,
        decision: Decision,
        restructured: bool,
        score: float | None,
        candidates: dict[str, tuple[float, float]],
        epoch: int | None,
    ) -> Outcome:
        row = self.history.record(model, self.machine.state, decision, epoch)
        self._closed = False
        for observer in self.observers:
            observer.on_decision(model, decision, self.machine.state)
        return Outcome(decision, restructured, self.machine.state.done, score, row, candidates)

    def restructured(self, model: nn.Module) -> None:
        """The front end has finished a restructure (its optimizer rebuilt, where it rebuilds one)."""
        for observer in self.observers:
            observer.on_restructured(model)

    # ------------------------------------------------------------------ optimizers
    def rebuild_optimizers(
        self,
        model: nn.Module,
        old: tuple[Sequence[torch.optim.Optimizer], Sequence[Any]],
        build: Callable[[], tuple[Sequence[torch.optim.Optimizer], Sequence[Any]]],
    ) -> tuple[Sequence[torch.optim.Optimizer], Sequence[Any]]:
        """Build new optimizers and schedulers with ``build()``, carrying state over on request.

        ``old`` holds the optimizers and schedulers being replaced (empty at the first build).
        With ``optimizer_state="carry"`` the parameters that persist keep their state and each
        scheduler continues where its predecessor was; otherwise they start fresh. Returns what
        ``build`` returned; :func:`missing_from_optimizers` says whether it holds everything.
        """
        carry = self.optimizer_state == "carry" and len(old[0]) > 0
        if carry:
            self.carrier.before_rebuild(model, old[0], old[1])
        optimizers, schedulers = build()
        if carry:
            self.carrier.after_rebuild(model, optimizers, schedulers)
        else:
            self.carrier.track(model, optimizers)
        return optimizers, schedulers

    # ------------------------------------------------------------------ persistence
    def state_dict(self, model: nn.Module | None = None) -> dict[str, Any]:
        """The one checkpoint layout of the cycle's state, for the callback and the tracker.

        The machine's per-validation history is stored once, as the history rows; pass ``model``
        only when this state goes into the same checkpoint as ``model``'s weights (snapshots equal
        to them are then stored by reference, see :meth:`CycleController.state_dict`).
        """
        state = {"version": CHECKPOINT_VERSION, **self.controller.state_dict(model)}
        state["machine"]["state"]["history"] = []
        state["recorder"] = self.history.state_dict()
        if self.optimizer_state == "carry":  # the network's moments, kept while a dendrite phase runs
            state["optimizer_carry"] = self.carrier.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], model: nn.Module | None = None, *, what: str = "state") -> None:
        """Restore :meth:`state_dict`'s output, or a state of format 0.

        Format 0 kept the history in the machine: a tracker's state (no recorder rows, which are
        then rebuilt from it) or a callback's from up to 0.1.0 (rows and machine history both).
        ``what`` names the state in the error for a newer format.
        """
        version = state.get("version", 0)
        check_checkpoint_version(what, version)
        if version >= 1:
            state = copy.deepcopy(state)
            state["machine"]["state"]["history"] = machine_history(state.get("recorder", {}).get("rows", []))
        self.controller.load_state_dict(state, model)
        self.carrier.load_state_dict(state.get("optimizer_carry", {}))
        if "recorder" in state:
            self.history.load_state_dict(state["recorder"])
        else:
            self.history.load_machine_history(self.machine.state.history)
