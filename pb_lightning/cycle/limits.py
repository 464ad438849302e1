"""What ends a dendrite phase and what bounds a whole run: the plateau rule and the run budget.

Pure functions of the :class:`~pb_lightning.cycle.schedule.PhaseSchedule` and the
:class:`~pb_lightning.cycle.phase_state.PhaseState`, kept apart from the machine that applies
them (docs/ALGORITHM.md §4) so each rule reads in one place and is tested on its own.
"""

from __future__ import annotations

import logging
import math
import numbers

from pb_lightning.cycle.decision import Verdict
from pb_lightning.cycle.phase_state import PhaseState
from pb_lightning.cycle.schedule import PhaseSchedule
from pb_lightning.errors import invalid

#: The machine's logger: the warning below is part of its decisions.
log = logging.getLogger("pb_lightning.cycle.machine")


def plateaued(window: list[float], score: float | None, size: int, fraction: float) -> bool:
    """Fold ``score`` into a plateau ``window`` (changed in place) and say whether it is flat.

    The window holds the candidates' running best at its last ``size + 1`` observations,
    starting with the phase's 0: it is flat once its last ``size`` observations added no more
    than ``fraction`` of the latest value — of what the whole phase has gained. A running best,
    not the raw score, so a noisy dip neither ends nor prolongs a phase. A missing or
    non-finite score adds nothing (candidates that never score end the phase after ``size``
    observations, as they did under the old patience rule).

    Example::

        >>> window = [0.0]
        >>> [plateaued(window, s, 2, 0.1) for s in (0.5, 0.52, 0.53)]
        [False, False, True]
    """
    best = window[-1] if window else 0.0
    if score is not None and math.isfinite(score):
        best = max(best, float(score))
    window.append(best)
    del window[: -(size + 1)]
    return len(window) > size and window[-1] - window[0] <= fraction * window[-1]


def plateau_reason(fraction: float, size: int, unit: str, setting: str) -> str:
    """A plateau-ended phase's reason, e.g. ``... over the last 20 training steps (dendrite_patience_steps=20)``."""
    return (
        f"the candidates' score rose by less than {fraction:g} of itself over the last {size} {unit} ({setting}={size})"
    )


def budget_left(schedule: PhaseSchedule, state: PhaseState) -> float:
    """Validations ``run_budget`` leaves: infinite without a budget, before the first neuron
    phase has ended (its cost is the unit), or with fixed ``neuron_epochs`` (the user set the
    run's length).

    A budget of time counts seconds and converts what is left into validations at the cost of
    the latest ones (:data:`RECENT_VALIDATIONS`), a fraction; a budget of validations counts
    whole ones.
    """
    budget = schedule.run_budget
    if budget is None or state.baseline_validations is None or schedule.neuron_epochs is not None:
        return math.inf
    if state.baseline_seconds is None:
        return math.ceil(budget * state.baseline_validations) - state.validations
    left = budget * state.baseline_seconds - state.seconds
    per_validation = sum(state.recent_seconds) / len(state.recent_seconds) if state.recent_seconds else 0.0
    if per_validation <= 0.0:  # validations that cost nothing measurable: only spent seconds end the run
        return math.inf if left > 0 else left
    return left / per_validation


#: How many of the latest validations' seconds estimate what the next ones cost.
RECENT_VALIDATIONS = 5


def count_seconds(schedule: PhaseSchedule, state: PhaseState, seconds: float | None) -> None:
    """Add one validation's reported wall-clock ``seconds`` (None: not reported) to ``state``.

    A run whose budget counts time (``run_budget_unit="time"``) measures it against the first
    neuron phase's seconds, so those must all be reported; once that phase was timed, a later
    validation without seconds is refused rather than counted as free.
    """
    if seconds is None:
        if schedule.run_budget_unit == "time" and state.baseline_seconds is not None:
            raise invalid(
                "seconds",
                seconds,
                "the validation's wall-clock seconds: this run's budget counts the time of every validation "
                "(PhaseSchedule.run_budget_unit='time'; use 'validations' to count validations instead)",
            )
        return
    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real) or not 0 <= seconds < math.inf:
        raise invalid("seconds", seconds, "None or a finite number of seconds >= 0 (the validation's wall time)")
    state.seconds += float(seconds)
    state.timed_validations += 1
    state.recent_seconds = [*state.recent_seconds, float(seconds)][-RECENT_VALIDATIONS:]


def baseline_seconds(schedule: PhaseSchedule, state: PhaseState) -> float | None:
    """The first neuron phase's seconds, the unit of a budget of time; None when the budget
    counts validations, or when that phase's validations did not all report seconds."""
    if schedule.run_budget_unit != "time" or state.timed_validations != state.validations:
        return None
    return state.seconds


def shortest_cycle(schedule: PhaseSchedule) -> int:
    """The fewest validations a new cycle (or restart) can take: none is started in less.

    A neuron phase lasts at least its patience; a dendrite phase judged per training step can
    end before its first validation, one judged at validations needs ``dendrite_patience + 1``.
    """
    neuron = schedule.neuron_epochs or schedule.neuron_patience
    if schedule.restarts_only:
        return neuron
    if schedule.dendrite_epochs is not None:
        return neuron + schedule.dendrite_epochs
    return neuron + (0 if schedule.dendrite_patience_steps is not None else schedule.dendrite_patience + 1)


def budget_spent(schedule: PhaseSchedule, state: PhaseState) -> bool:
    """Whether not even one more validation fits in the budget: the run is judged now.

    For a budget of validations, none is left; for one of time, less than the latest
    validations' cost is left, so the run ends before the budget, never a validation past it.
    """
    return budget_left(schedule, state) < 1


def cycle_fits(schedule: PhaseSchedule, state: PhaseState) -> bool:
    """Whether the budget leaves room for the shortest possible new cycle (or retry, or restart)."""
    return budget_left(schedule, state) >= shortest_cycle(schedule)


def budget_note(schedule: PhaseSchedule, state: PhaseState) -> str:
    """The budget's arithmetic, for a decision's reason."""
    budget, baseline = schedule.run_budget, state.baseline_validations
    assert budget is not None
    assert baseline is not None
    if state.baseline_seconds is not None:
        return (
            f"run_budget={budget:g} allows {budget * state.baseline_seconds:.1f} s "
            f"({budget:g}x the first neuron phase's {state.baseline_seconds:.1f} s); {state.seconds:.1f} s used"
        )
    return (
        f"run_budget={budget:g} allows {math.ceil(budget * baseline)} validations "
        f"({budget:g}x the first neuron phase's {baseline}); {state.validations} used"
    )


#: Added to the reason when the budget ends a run whose last cycle improved the score: the run was
#: still paying, and the setting that lets it go on is not the one a user would look for first.
STILL_IMPROVING = (
    "the last cycle improved the score, so a longer run might have gained more: "
    "run_budget=None lets a run go on while its cycles improve (or raise run_budget)"
)


def still_improving(verdict: Verdict | None) -> str:
    """What a budget stop's reason ends with: :data:`STILL_IMPROVING` after an accepted cycle."""
    return f"; {STILL_IMPROVING}" if verdict == Verdict.ACCEPTED else ""


def warn_max_dendrite_epochs(schedule: PhaseSchedule) -> None:
    """A phase that ran to its cap is one the plateau rule did not end: say which settings do."""
    log.warning(
        "A dendrite phase ran to max_dendrite_epochs=%d without its candidates' score levelling off "
        "(candidate_plateau_fraction=%g over dendrite_patience=%d validations). To end phases sooner, "
        "raise candidate_plateau_fraction (e.g. 0.2), lower dendrite_patience, set dendrite_patience_steps "
        "(e.g. 20: judged every training step) or lower max_dendrite_epochs.",
        schedule.max_dendrite_epochs,
        schedule.candidate_plateau_fraction,
        schedule.dendrite_patience,
    )
