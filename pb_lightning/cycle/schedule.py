"""When to switch phases, accept, retry and stop: the :class:`PhaseSchedule` (docs/ALGORITHM.md §4)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, get_args

from pb_lightning.errors import check_int, invalid

Mode = Literal["min", "max"]
#: What ``PhaseSchedule.run_budget`` counts (see there).
BudgetUnit = Literal["time", "validations"]
BUDGET_UNITS: tuple[BudgetUnit, ...] = get_args(BudgetUnit)

#: Dendrite sets the capacity test adds (docs/ALGORITHM.md §5).
CAPACITY_TEST_DENDRITES = 3


@dataclass(frozen=True)
class PhaseSchedule:
    """When to switch phases, accept, retry and stop.

    Args:
        neuron_patience: validations without improvement that end a neuron phase.
        dendrite_patience: the window, in validations, over which a dendrite phase's plateau is
            judged (see ``candidate_plateau_fraction``).
        improvement_threshold: relative margin a score must beat the best by to count as an
            improvement (``|best| · threshold``).
        improvement_threshold_abs: absolute margin, required as well.
        candidate_plateau_fraction: a dendrite phase ends once the candidates' score over the last
            ``dendrite_patience`` validations (or ``dendrite_patience_steps`` training steps) rose by
            less than this share of the score itself — of all the phase has gained, since fresh
            candidates start at 0. Why a share of the gain and not a margin per validation: the
            candidates reach most of their correlation within a few steps and then creep up by
            1-3% per epoch for as long as they train; a fixed 1% per validation (the rule before
            0.3) let that creep reset the patience again and again, so phases ran to
            ``max_dendrite_epochs`` while adding little (benchmarks/README.md, "Phases that end").
        warmup_epochs: validations before the first dendrite phase may start.
        neuron_epochs: if set, every neuron phase lasts exactly this many validations (no patience).
        dendrite_epochs: if set, every dendrite phase lasts exactly this many validations.
        max_dendrite_epochs: cap on a dendrite phase's length (reaching it logs a warning once,
            naming the settings that end phases sooner).
        dendrite_patience_steps: if set, the candidates' score is also checked after every
            training step of a dendrite phase, and the phase ends — mid-epoch, at that step — once
            the last this-many steps added less than ``candidate_plateau_fraction`` of it. The
            network is frozen during the phase, so its last validation score still stands; what
            is saved is the rest of the frozen epochs: a small data set otherwise ends a dendrite
            phase only at epoch ends, ``dendrite_patience`` epochs after its candidates stopped
            learning, and a large one an epoch later than needed. Each check reads one number
            from the device (only during dendrite phases). Unused with ``dendrite_epochs``, which
            fixes the phase's length; ``None``: phases are judged at validations only. On by
            default (20 steps) because a validation-judged phase lasts at least
            ``dendrite_patience + 1`` epochs — on data with long epochs most of its time — and,
            among the rules that keep a whole run within 3x its baseline, judging per step at
            run budget 2.5 cost about as much accuracy on the research harness as judging at
            validations at the budget 2.0 that the same bound needs (benchmarks/README.md,
            "Phases that end"). Small networks on small data sets that can afford longer runs
            do better with ``None`` or 100 steps *and* a budget that leaves them the epochs:
            with the budget counted in validations (2.5), Friedman #1 lost 0.6 and 0.4 points
            against the old rule instead of 2.7, at 25% more wall time and 3.3x the baseline's on
            MNIST-1D; under the default budget of time, 100 steps leave fewer epochs and lose
            2.4 (benchmarks/README.md, "Third round").
        run_budget: if set, the whole run may cost at most this many times its first neuron
            phase (the plain network's own training, which a dendritic run is compared with),
            measured in ``run_budget_unit``. A cycle that could not fit in what is left is not
            started, and a cycle still running when the budget is spent is judged there, as if
            training had ended (its neuron phase kept only if it beat the global best). Why a
            budget: each cycle costs a dendrite phase and a whole neuron phase, and without one a
            run's cost has no bound relative to the network's own training (7-11× on the
            benchmarks before 0.3). ``None``: no bound. Not applied with ``neuron_epochs``: fixed
            neuron phases already set the run's length.
        run_budget_unit: what ``run_budget`` counts. ``"time"`` (default): wall-clock seconds, as
            the :class:`~pb_lightning.cycle.driver.CycleDriver` (and so the callback and the
            tracker) measures them from one validation to the next, every rank taking rank 0's.
            ``"validations"``: validations, so that two runs of one seed stop at the same
            validation (bit-reproducible runs, tests). Why time by default: an epoch with
            dendrites costs more than a plain one — 1.2× on the small MLPs, 1.4-1.6× on the
            MNIST-1D CNN, more with many sets on large layers — so a budget of 2.5× the
            validations cost up to 3.5× the baseline's wall time (``benchmarks/cycle_cost.py``),
            where one of seconds bounds what users wait for on any model and accelerator. The
            price: where the budget ends a run, the load of the machine can move that end by a
            few epochs (up to a neuron phase) between two runs of one seed.
        max_dendrites: dendrite sets per layer after which training is complete.
        max_tries: failed cycles in a row (each retried with fresh candidates) after which training
            is complete.
        require_improvement: keep a cycle's dendrites only if its neuron phase beat the global
            best (the method's rule). ``False`` keeps every cycle (the capacity test).
        restarts_only: the same cycle without dendrites: a neuron phase that ends rolls back to its
            best weights and restarts with a fresh optimizer instead of starting a dendrite phase
            (see the module docstring). ``max_dendrites`` then caps the improving restarts and
            ``max_tries`` the failed ones in a row; the dendrite-phase settings are unused. This is
            the control a dendritic run must beat once the schedule is accounted for: on the
            benchmarks, most of what dendrites seemed to add came from these warm restarts.

    Example::

        >>> PhaseSchedule(neuron_patience=3).neuron_patience
        3
    """

    neuron_patience: int = 5
    dendrite_patience: int = 3
    improvement_threshold: float = 1e-4
    improvement_threshold_abs: float = 0.0
    candidate_plateau_fraction: float = 0.1
    warmup_epochs: int = 0
    neuron_epochs: int | None = None
    dendrite_epochs: int | None = None
    max_dendrite_epochs: int = 50
    dendrite_patience_steps: int | None = 20
    run_budget: float | None = 2.5
    run_budget_unit: BudgetUnit = "time"
    max_dendrites: int = 8
    max_tries: int = 2
    require_improvement: bool = True
    restarts_only: bool = False

    def __post_init__(self) -> None:
        for name, minimum in (
            ("neuron_patience", 1),
            ("dendrite_patience", 1),
            ("warmup_epochs", 0),
            ("max_dendrite_epochs", 1),
            ("max_dendrites", 0),
            ("max_tries", 1),
        ):
            check_int(f"PhaseSchedule.{name}", getattr(self, name), minimum=minimum)
        for name in ("require_improvement", "restarts_only"):
            if not isinstance(getattr(self, name), bool):
                raise invalid(f"PhaseSchedule.{name}", getattr(self, name), "a bool")
        for name in ("neuron_epochs", "dendrite_epochs", "dendrite_patience_steps"):
            if getattr(self, name) is not None:
                check_int(f"PhaseSchedule.{name}", getattr(self, name), minimum=1)
        for name in ("improvement_threshold", "improvement_threshold_abs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise invalid(f"PhaseSchedule.{name}", value, "a finite float >= 0")
        fraction = self.candidate_plateau_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
            raise invalid(
                "PhaseSchedule.candidate_plateau_fraction",
                fraction,
                "a float in [0, 1): the share of the candidates' score a patience window must add",
            )
        budget = self.run_budget
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 1 <= budget < math.inf
        ):
            raise invalid(
                "PhaseSchedule.run_budget",
                budget,
                "None or a finite float >= 1 (the whole run's cost as a multiple of the first neuron phase's)",
            )
        if self.run_budget_unit not in BUDGET_UNITS:
            raise invalid("PhaseSchedule.run_budget_unit", self.run_budget_unit, " or ".join(map(repr, BUDGET_UNITS)))

    @classmethod
    def capacity_test(cls, base: PhaseSchedule | None = None) -> PhaseSchedule:
        """The capacity test's schedule (docs/ALGORITHM.md §5): switch at every validation, keep
        every cycle, stop after :data:`CAPACITY_TEST_DENDRITES` dendrite sets.

        The one place that schedule is built, for the Lightning callback and the tracker alike.
        ``base`` supplies the settings the test does not fix (the callback passes the schedule
        built from its own arguments; default: :class:`PhaseSchedule`'s defaults).

        Example::

            >>> PhaseSchedule.capacity_test().max_dendrites
            3
        """
        return replace(
            cls() if base is None else base,
            neuron_epochs=1,
            dendrite_epochs=1,
            dendrite_patience_steps=None,
            run_budget=None,
            max_dendrites=CAPACITY_TEST_DENDRITES,
            require_improvement=False,
            restarts_only=False,
        )
