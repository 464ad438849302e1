"""PerforatedTracker: the same engine and phase machine in a plain PyTorch training loop.

The five steps of the user's source document, with Pythonic names:

1. ``import pb_lightning as pb``
2. ``model = tracker.initialize(model)`` — perforate the model;
3. ``tracker.set_optimizer(torch.optim.Adam, lr=1e-3)`` and ``tracker.set_scheduler(StepLR, step_size=1)``;
4. ``optimizer, scheduler = tracker.setup_optimizer(model)`` — built for the current phase;
5. after each validation: ``model, restructured, complete = tracker.add_validation_score(score, model)``;
   rebuild the optimizer with ``setup_optimizer`` when ``restructured``, stop when ``complete``.

It drives the same :class:`~pb_lightning.cycle.controller.CycleController` as the Lightning callback,
so given the same scores both take the same decisions.

Its decisions are logged to the ``pb_lightning.loops.tracker`` logger at INFO. A plain loop usually
configures no logging, and INFO records would then go nowhere, so that logger carries a handler
that writes them to stderr while the root logger has no handler; once the application
configures logging, records reach its handlers instead (never both). Silence it with
``PerforatedTracker(verbose=False)`` or ``logging.getLogger("pb_lightning.loops.tracker").setLevel("WARNING")``.
"""

from __future__ import annotations

import copy
import logging
import sys
import warnings
from typing import Any, Literal

import torch
from torch import nn

from pb_lightning.cycle.capacity import CapacityProbe
from pb_lightning.cycle.controller import CycleController, mean_candidate_score
from pb_lightning.cycle.decision import CONTINUE, Decision
from pb_lightning.cycle.machine import PhaseMachine
from pb_lightning.cycle.schedule import PhaseSchedule
from pb_lightning.cycle.scores import as_score, nonfinite_message
from pb_lightning.engine.config import DendriteConfig
from pb_lightning.engine.convert import perforate, perforated_layers, perforation_summary
from pb_lightning.engine.optimizer_state import OptimizerStateCarrier, OptimizerStateMode, check_optimizer_state
from pb_lightning.engine.params import parameter_groups
from pb_lightning.engine.transitions import accept_dendrites
from pb_lightning.errors import PerforationError, invalid

log = logging.getLogger(__name__)


class _UnconfiguredLoggingHandler(logging.StreamHandler):
    """Writes the tracker's records to stderr, but only while the root logger has no handler.

    Lightning makes its INFO messages visible the same way; checking at every record (instead
    of once at import) means that logging configured later takes over without duplicates.
    """

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return  # the application configured logging: propagation delivers the record there
        self.setStream(sys.stderr)  # the current stderr (a test or a notebook may have replaced it)
        super().emit(record)


if not any(isinstance(h, _UnconfiguredLoggingHandler) for h in log.handlers):
    log.addHandler(_UnconfiguredLoggingHandler())
if log.level == logging.NOTSET:
    log.setLevel(logging.INFO)


class PerforatedTracker:
    """Decides phase switches from validation scores in a plain PyTorch loop.

    Args:
        mode: ``"max"`` if a higher score is better (accuracy), ``"min"`` if lower is (loss).
        schedule: the switching rules (default :class:`~pb_lightning.cycle.schedule.PhaseSchedule()`).
        capacity_test: the first experiment (docs/ALGORITHM.md §5): switch every validation, add three
            dendrite sets, check function preservation, optimizer coverage, a state round trip and
            finite scores, then report (:attr:`capacity_report`).
        weight_decay: weight decay of the optimizer's parameter groups (never on dendrite output weights).
        candidate_lr: learning rate of the candidates (default: the optimizer's).
        optimizer_state: ``"reset"`` (default, the reference method): :meth:`setup_optimizer`
            builds a fresh optimizer and scheduler after each restructure. ``"carry"``: the
            parameters that persist keep their optimizer state (by name), new ones start fresh,
            and the scheduler continues where the previous one was.
        verbose: log every phase decision at INFO (shown on stderr when the application
            configures no logging, see the module docstring); ``False`` logs them at DEBUG.

    Example::

        >>> import torch
        >>> tracker = PerforatedTracker("max", PhaseSchedule(neuron_patience=2))
        >>> model = tracker.initialize(torch.nn.Sequential(torch.nn.Linear(4, 2)))
        >>> tracker.set_optimizer(torch.optim.SGD, lr=0.1)
        >>> optimizer, scheduler = tracker.setup_optimizer(model)
        >>> model, restructured, complete = tracker.add_validation_score(0.5, model)
        >>> restructured, complete
        (False, False)
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
        if not isinstance(capacity_test, bool):
            raise invalid("capacity_test", capacity_test, "a bool")
        if not isinstance(verbose, bool):
            raise invalid("verbose", verbose, "a bool")
        schedule = PhaseSchedule() if schedule is None else schedule
        if not isinstance(schedule, PhaseSchedule):
            raise invalid("schedule", schedule, "a pb_lightning.PhaseSchedule")
        if capacity_test:  # the test's own schedule, the same as the callback's
            schedule = PhaseSchedule.capacity_test()
        self.machine = PhaseMachine(mode, schedule)
        self.controller = CycleController(self.machine)
        self.capacity_test = capacity_test
        self.weight_decay = weight_decay
        self.candidate_lr = candidate_lr
        self.verbose = verbose
        self.optimizer_state = check_optimizer_state(optimizer_state)
        self._carrier = OptimizerStateCarrier()
        self._current_scheduler: Any = None
        self.probe = CapacityProbe()
        #: The decision taken on the latest validation score (None before the first).
        self.last_decision: Decision | None = None
        self._optimizer: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None
        self._scheduler: tuple[Any, dict[str, Any]] | None = None
        self._current: torch.optim.Optimizer | None = None
        #: The capacity test's verdict, once it has finished.
        self.capacity_report: str | None = None
        self._summarised = False

    # ------------------------------------------------------------------ steps 2-4
    def initialize(self, model: nn.Module, **perforate_options: Any) -> nn.Module:
        """Perforate ``model`` (options as for :func:`pb_lightning.perforate`) and return it.

        A trained model keeps its weights and computes what it did, in train and eval mode; its
        plain state dict may also be loaded afterwards (the keys are mapped onto the wrapped layers).
        """
        perforate_options.setdefault("config", DendriteConfig())
        model = perforate(model, **perforate_options)
        # What was perforated and what was skipped (and why), as the callback shows at fit start:
        # once per tracker (at INFO), since a loop that calls initialize again (a resumed or
        # re-created model) would otherwise repeat the same summary each time.
        level = logging.INFO if self.verbose and not self._summarised else logging.DEBUG
        log.log(level, "%s", perforation_summary(model))
        self._summarised = True
        if self.capacity_test:
            self.probe.start(model)
        return model

    def set_optimizer(self, optimizer: type[torch.optim.Optimizer], **kwargs: Any) -> None:
        """The optimizer class and its arguments (not ``params``: the tracker supplies the groups)."""
        if not (isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer)):
            raise invalid("optimizer", optimizer, "a torch.optim.Optimizer subclass (the class, not an instance)")
        if "params" in kwargs:
            raise invalid("params", "given", "left out: the tracker builds the parameter groups of each phase")
        self._optimizer = (optimizer, kwargs)

    def set_scheduler(self, scheduler: Any, **kwargs: Any) -> None:
        """The LR scheduler class and its arguments (built with each new optimizer)."""
        if not callable(scheduler):
            raise invalid("scheduler", scheduler, "an LR scheduler class")
        self._scheduler = (scheduler, kwargs)

    def setup_optimizer(self, model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        """A new optimizer (and scheduler, or None) over what the current phase trains."""
        if self._optimizer is None:
            raise PerforationError("Call tracker.set_optimizer(OptimizerClass, **kwargs) before setup_optimizer.")
        cls, kwargs = self._optimizer
        groups = parameter_groups(model, weight_decay=self.weight_decay, candidate_lr=self.candidate_lr)
        if not groups:
            raise PerforationError("The model has no trainable parameters in this phase.")
        carry = self.optimizer_state == "carry" and self._current is not None
        old_schedulers = [] if self._current_scheduler is None else [self._current_scheduler]
        if carry:
            self._carrier.before_rebuild(model, [self._current], old_schedulers)
        optimizer = cls(groups, **kwargs)
        scheduler = None
        if self._scheduler is not None:
            scheduler = self._scheduler[0](optimizer, **self._scheduler[1])
        if carry:
            self._carrier.after_rebuild(model, [optimizer], [] if scheduler is None else [scheduler])
        else:
            self._carrier.track(model, [optimizer])
        self._current, self._current_scheduler = optimizer, scheduler
        return optimizer, scheduler

    # ------------------------------------------------------------------ step 5
    def add_validation_score(
        self, score: float, model: nn.Module, *, epoch: int | None = None
    ) -> tuple[nn.Module, bool, bool]:
        """Report one validation score; returns ``(model, restructured, training_complete)``.

        When ``restructured`` the trainable parameters changed: call :meth:`setup_optimizer`
        again. When ``training_complete`` the model holds the best weights found; stop training.
        The decision itself is in :attr:`last_decision` and in the log.

        A NaN or infinite score is reported with a warning (naming ``epoch`` if given, else the
        validation's number) and counts as no improvement, never as a new best. A score that is
        not a real number raises :class:`~pb_lightning.errors.PerforationError`.
        """
        score = as_score(score)
        when = f"epoch {epoch}" if epoch is not None else f"validation {self.machine.state.validations + 1}"
        message = nonfinite_message(None, score, when)
        if message is not None:
            warnings.warn(message, stacklevel=2)
        if self.capacity_test:
            self.probe.check_finite("score", score, self.machine.state.validations)
        decision, restructured = self.controller.step(model, score, mean_candidate_score(model), accept=self._accept())
        self.last_decision = decision
        self._announce(decision, score, when)
        if restructured and self.capacity_test:
            self._check_capacity(model)
        complete = self.machine.state.done
        if complete:
            self._finish()
        return model, restructured, complete

    def add_training_step(self, model: nn.Module) -> bool:
        """Call after every optimizer step; returns ``restructured`` (rebuild the optimizer).

        Needed only with ``PhaseSchedule(dendrite_patience_steps=...)``: in a dendrite phase it
        reads the candidates' score and accepts the dendrites as soon as that score has
        converged, mid-epoch, instead of at a later validation. Otherwise it returns False at
        no cost, so a loop may call it unconditionally.
        """
        if not self.machine.checks_steps:
            return False
        decision = self.controller.training_step(model, mean_candidate_score(model), accept=self._accept())
        if decision is None:
            return False
        self.last_decision = decision
        score = self.machine.state.last_score
        assert score is not None  # checks_steps holds only once a validation score exists
        self._announce(decision, score, "a training step")
        return True

    def _accept(self) -> Any:
        """What installs the dendrites: checked by the capacity probe during the capacity test."""
        return self.probe.checked_accept(accept_dendrites) if self.capacity_test else accept_dendrites

    def finish(self, model: nn.Module) -> nn.Module:
        """Call when training ends for another reason (an epoch budget): leaves the best model."""
        decision = self.controller.finish(model)
        if decision is not None:
            log.log(logging.INFO if self.verbose else logging.DEBUG, "pb_lightning: %s.", decision.reason)
        self._finish()
        return model

    def _finish(self) -> None:
        if self.capacity_test and self.capacity_report is None:
            self.capacity_report = self.probe.summary(self.machine.state.dendrites)
            self.probe.stop()
            log.info("pb_lightning %s", self.capacity_report)
            if self.probe.problems:
                warnings.warn(f"pb_lightning {self.capacity_report}", stacklevel=3)

    def _announce(self, decision: Decision, score: float, when: str) -> None:
        level = logging.INFO if self.verbose and decision.action != CONTINUE else logging.DEBUG
        log.log(level, "pb_lightning %s: %s — %s (score=%.6g)", when, decision.action, decision.reason, score)

    def _check_capacity(self, model: nn.Module) -> None:
        optimizer = self._current
        if optimizer is not None:
            # The loop has not rebuilt its optimizer yet; check what setup_optimizer will build.
            groups = parameter_groups(model, weight_decay=self.weight_decay, candidate_lr=self.candidate_lr)
            held = {id(p) for g in groups for p in g["params"]}
            missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
            if missing:
                self.probe.problems.append(f"trainable parameters missing from the optimizer: {missing}")
        fresh = copy.deepcopy(model)
        for layer in perforated_layers(fresh):  # a newly perforated twin: no dendrites, no candidates
            layer.dendrites = layer.cascade_weight = layer.output_weight = layer.candidates = None
        self.probe.check_state_round_trip(model, fresh)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """The phase machine's state and the best-weight snapshots (save it with the model's)."""
        state = self.controller.state_dict()
        if self.optimizer_state == "carry":
            state["optimizer_carry"] = self._carrier.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state)
        self._carrier.load_state_dict(state.get("optimizer_carry", {}))
