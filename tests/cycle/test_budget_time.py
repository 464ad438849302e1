"""A run budget of time (``PhaseSchedule.run_budget_unit="time"``): seconds reported with each
validation, checked against a reference written here."""

from __future__ import annotations

import math
import random

import pytest

from pb_lightning.cycle.decision import CONTINUE, START_DENDRITE_PHASE, STOP
from pb_lightning.cycle.machine import PhaseMachine
from pb_lightning.cycle.phase_state import PhaseState
from pb_lightning.cycle.schedule import PhaseSchedule
from pb_lightning.errors import PerforationError


def _schedule(budget: float | None = 2.0, unit: str = "time", **options: object) -> PhaseSchedule:
    return PhaseSchedule(
        neuron_patience=2,
        dendrite_patience=1,
        dendrite_patience_steps=None,
        run_budget=budget,
        run_budget_unit=unit,
        **options,  # type: ignore[arg-type]
    )


def _first_phase(machine: PhaseMachine, seconds: float = 1.0) -> None:
    """4 validations of ``seconds`` each (best at the 2nd): the first neuron phase ends."""
    actions = [machine.step(s, seconds=seconds).action for s in (1.0, 0.9, 0.9, 0.9)]
    assert actions[-1] == START_DENDRITE_PHASE
    assert machine.state.baseline_validations == 4


def test_the_budget_counts_the_reported_seconds_not_the_validations() -> None:
    # First phase: 4 s. Budget 2: 8 s. Later validations cost 2 s each, so the run has room
    # for 2 of them, where a budget of validations would allow 4.
    machine = PhaseMachine("min", _schedule(2.0))
    _first_phase(machine)
    assert machine.state.baseline_seconds == 4.0
    decisions = [machine.step(0.9, 0.5, seconds=2.0)]  # the dendrite phase's first validation: 6 s used
    decisions.append(machine.step(0.9, 0.5, seconds=2.0))  # 8 s used: spent
    assert [d.action for d in decisions] == [CONTINUE, STOP]
    assert "run_budget=2 allows 8.0 s (2x the first neuron phase's 4.0 s); 8.0 s used" in decisions[-1].reason
    assert machine.state.validations == 6
    assert machine.state.done


#: After :func:`_first_phase`, with a budget of 8 validations: the cycle accepts at the 6th
#: validation, and the 8th (a new best) is judged by the spent budget.
CYCLE = ((0.9, 0.5), (0.9, 0.5), (0.85, None), (0.84, None))


def _actions_of_the_cycle(machine: PhaseMachine, seconds: float | None) -> list[str]:
    return [str(machine.step(s, c, seconds=seconds).action) for s, c in CYCLE]


def test_with_validations_as_the_unit_the_seconds_are_ignored() -> None:
    machine = PhaseMachine("min", _schedule(2.0, unit="validations"))
    _first_phase(machine)
    assert machine.state.baseline_seconds is None
    # 2 s per validation would spend a budget of time after 2 validations; this one has 4.
    assert _actions_of_the_cycle(machine, 2.0) == ["continue", "accept", "continue", "stop"]
    assert "run_budget=2 allows 8 validations" in machine.state.history[-1]["reason"]


def test_no_cycle_starts_that_the_recent_seconds_say_cannot_fit() -> None:
    # A 6-validation first phase of 5.25 s whose last 5 validations cost 1 s each. Budget 1.7:
    # 8.925 s, 3.675 s left, 3.675 validations at the recent cost, and a cycle takes at least
    # neuron_patience 2 + 2: none starts. (At the whole phase's mean, 0.875 s, 4.2 would fit.)
    costs = (0.25, 1.0, 1.0, 1.0, 1.0, 1.0)
    machine = PhaseMachine("min", _schedule(1.7))
    decisions = [machine.step(s, seconds=t) for s, t in zip((1.0, 0.9, 0.8, 0.7, 0.7, 0.7), costs, strict=True)]
    assert machine.state.baseline_seconds == sum(costs)
    assert decisions[-1].action == STOP
    assert "no cycle fits" in decisions[-1].reason
    # At 1 s per validation a 1.7 budget leaves 4.2 validations: the cycle starts.
    machine = PhaseMachine("min", _schedule(1.7))
    decisions = [machine.step(s, seconds=1.0) for s in (1.0, 0.9, 0.8, 0.7, 0.7, 0.7)]
    assert decisions[-1].action == START_DENDRITE_PHASE


def _reference_seconds_limit(budget: float, baseline_seconds: float) -> float:
    """The run may not go on once its seconds reach budget x the first phase's."""
    return budget * baseline_seconds


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("budget", [1.0, 2.0, 2.5])
def test_no_run_outlasts_its_budget_of_time(seed: int, budget: float) -> None:
    """Random scores and random validation costs (dendritic ones up to 3x a plain one): once the
    first phase has ended, the machine stops within one validation of the budget's seconds."""
    rng = random.Random(seed)
    machine = PhaseMachine(
        "min", PhaseSchedule(neuron_patience=rng.randint(1, 4), dendrite_patience=rng.randint(1, 3), run_budget=budget)
    )
    score, costs = 1.0, []
    for _ in range(400):
        score += rng.uniform(-0.05, 0.04)
        dendritic = machine.state.phase == "dendrite" or machine.state.dendrites > 0
        cost = rng.uniform(0.5, 1.0) * (rng.uniform(1.0, 3.0) if dendritic else 1.0)
        costs.append(cost)
        machine.step(score, rng.uniform(0, 1) if machine.state.phase == "dendrite" else None, seconds=cost)
        if machine.state.done:
            break
    s = machine.state
    assert s.done
    assert s.baseline_seconds == pytest.approx(sum(costs[: s.baseline_validations]))
    assert s.seconds == pytest.approx(sum(costs))
    limit = _reference_seconds_limit(budget, s.baseline_seconds)
    # Every validation but the last started with seconds left; none started after they ran out.
    assert sum(costs[:-1]) < limit or s.validations == s.baseline_validations


def test_a_timed_run_refuses_a_validation_without_seconds() -> None:
    machine = PhaseMachine("min", _schedule(2.0))
    _first_phase(machine)
    with pytest.raises(PerforationError, match=r"seconds.*run_budget_unit='time'"):
        machine.step(0.9, 0.5)
    assert machine.state.validations == 4  # refused before anything changed


@pytest.mark.parametrize("seconds", [-1.0, math.nan, math.inf, True, "1"])
def test_bad_seconds_are_refused_by_name(seconds: object) -> None:
    machine = PhaseMachine("min", _schedule(2.0))
    with pytest.raises(PerforationError, match="seconds"):
        machine.step(1.0, seconds=seconds)  # type: ignore[arg-type]
    assert machine.state.validations == 0


def test_a_first_phase_not_timed_throughout_counts_validations() -> None:
    # A machine fed no seconds (a direct user of PhaseMachine) has a budget of validations.
    machine = PhaseMachine("min", _schedule(2.0))
    [machine.step(s) for s in (1.0, 0.9, 0.9, 0.9)]
    assert machine.state.baseline_seconds is None
    assert _actions_of_the_cycle(machine, None) == ["continue", "accept", "continue", "stop"]


def test_the_unit_is_checked_by_name() -> None:
    with pytest.raises(PerforationError, match=r"run_budget_unit.*'time' or 'validations'"):
        PhaseSchedule(run_budget_unit="hours")  # type: ignore[arg-type]


def test_the_seconds_survive_a_state_round_trip_and_old_states_count_validations() -> None:
    machine = PhaseMachine("min", _schedule(2.0))
    _first_phase(machine, seconds=0.75)
    restored = PhaseMachine("min", machine.schedule)
    restored.load_state_dict(machine.state_dict())
    assert restored.state == machine.state
    assert (restored.state.baseline_seconds, restored.state.recent_seconds) == (3.0, [0.75] * 4)
    # A state saved before the budget counted time lacks the fields: its run counts validations.
    old = {k: v for k, v in machine.state_dict()["state"].items() if "seconds" not in k and k != "timed_validations"}
    assert PhaseState.from_dict(old).baseline_seconds is None


@pytest.mark.parametrize(
    ("neuron_scores", "says_so"),
    [((0.85, 0.85, 0.85), True), ((0.95, 0.95, 0.95), False)],
    ids=["the last cycle improved", "the last cycle failed"],
)
def test_a_budget_that_ends_an_improving_run_says_which_setting_lets_it_go_on(
    neuron_scores: tuple[float, ...], says_so: bool
) -> None:
    # Budget 2.5 x 4 validations = 10. The cycle accepts at the 6th validation and is judged at
    # the 9th; no cycle (or retry) fits in the one validation left.
    machine = PhaseMachine("min", _schedule(2.5, unit="validations"))
    _first_phase(machine)
    decisions = [machine.step(0.9, 0.5), machine.step(0.9, 0.5)] + [machine.step(s) for s in neuron_scores]
    assert decisions[-1].action == STOP
    assert "fits in what is left" in decisions[-1].reason
    assert ("run_budget=None lets a run go on" in decisions[-1].reason) == says_so


def test_a_budget_spent_mid_cycle_on_an_improving_cycle_says_so_too() -> None:
    machine = PhaseMachine("min", _schedule(2.0, unit="validations"))
    _first_phase(machine)
    assert _actions_of_the_cycle(machine, None) == ["continue", "accept", "continue", "stop"]
    reason = machine.state.history[-1]["reason"]
    assert "the last cycle improved the global best" in reason
    assert "run_budget=None lets a run go on" in reason
