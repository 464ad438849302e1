"""A retry's longer plateau window (``retry_window_factor``) and the patience of the neuron phases
after the first (``cycle_neuron_patience``)."""

from __future__ import annotations

import pytest

from pb_lightning.cycle.decision import ACCEPT, CONTINUE, RETRY, START_DENDRITE_PHASE, STOP
from pb_lightning.cycle.limits import plateau_window, shortest_cycle
from pb_lightning.cycle.machine import PhaseMachine
from pb_lightning.cycle.phase_state import PhaseState
from pb_lightning.cycle.schedule import PhaseSchedule
from pb_lightning.errors import PerforationError


def _steps_to_accept(machine: PhaseMachine, score: float = 0.3) -> int:
    """Feed one flat candidate score per training step until the phase is accepted; the count."""
    for n in range(1, 100):
        decision = machine.training_step(score)
        if decision is not None:
            assert decision.action == ACCEPT
            return n
    raise AssertionError("the phase never ended")


def _reject(machine: PhaseMachine) -> str:
    """A cycle's neuron phase (patience 1) that does not beat the global best 1.0: its verdict's action."""
    assert machine.step(1.2).action == CONTINUE
    return machine.step(1.3).action


def _machine(factor: int, max_tries: int = 3, **options: object) -> PhaseMachine:
    schedule = PhaseSchedule(
        neuron_patience=1,
        dendrite_patience_steps=2,
        retry_window_factor=factor,
        max_tries=max_tries,
        run_budget=None,
        **options,  # type: ignore[arg-type]
    )
    machine = PhaseMachine("min", schedule)
    assert [machine.step(s).action for s in (1.0, 1.5)] == [CONTINUE, START_DENDRITE_PHASE]
    return machine


# Written out: a flat score ends a phase with a window of w steps at its (w + 1)th step, once the
# first step's rise from the phase's 0 has left the window: w = 2 gives 3 steps; factor 2 gives a
# retry w = 4 (5 steps) and a second retry w = 8 (9 steps).
@pytest.mark.parametrize(("factor", "expected"), [(1, [3, 3, 3]), (2, [3, 5, 9]), (3, [3, 7, 19])])
def test_each_failed_try_lengthens_the_next_phase_by_the_factor(factor: int, expected: list[int]) -> None:
    machine = _machine(factor)
    lengths = []
    for _ in range(3):
        lengths.append(_steps_to_accept(machine))
        assert _reject(machine) == (RETRY if len(lengths) < 3 else STOP)
    assert lengths == expected


def test_an_accepted_cycle_resets_the_window() -> None:
    machine = _machine(2)
    assert _steps_to_accept(machine) == 3
    assert _reject(machine) == RETRY
    assert _steps_to_accept(machine) == 5
    assert machine.step(0.5).action == CONTINUE  # a new best of the phase ...
    decision = machine.step(0.6)  # ... then patience 1 runs out: the cycle beat the global best
    assert decision.action == START_DENDRITE_PHASE
    assert machine.state.tries == 0
    assert _steps_to_accept(machine) == 3


def test_the_reason_names_the_lengthened_window() -> None:
    machine = _machine(2)
    _steps_to_accept(machine)
    _reject(machine)
    for _ in range(4):
        assert machine.training_step(0.3) is None
    decision = machine.training_step(0.3)
    assert decision is not None
    assert "over the last 4 training steps (dendrite_patience_steps=2, x2 for try 2)" in decision.reason


def test_validation_judged_retries_are_lengthened_too() -> None:
    schedule = PhaseSchedule(
        neuron_patience=1, dendrite_patience=1, dendrite_patience_steps=None, retry_window_factor=2, run_budget=None
    )
    machine = PhaseMachine("min", schedule)
    [machine.step(s) for s in (1.0, 1.5)]
    # Window 1: the 2nd flat validation ends the phase (the 1st rose from the phase's 0).
    assert [machine.step(1.0, 0.4).action for _ in range(2)] == [CONTINUE, ACCEPT]
    assert _reject(machine) == RETRY
    # Window 2 for the retry: the 3rd.
    assert [machine.step(1.0, 0.4).action for _ in range(3)] == [CONTINUE, CONTINUE, ACCEPT]
    assert "dendrite_patience=1, x2 for try 2" in machine.state.history[-1]["reason"]


def test_plateau_window_written_out() -> None:
    schedule = PhaseSchedule(dendrite_patience_steps=20, dendrite_patience=3, retry_window_factor=2)
    assert plateau_window(schedule, PhaseState(), "dendrite_patience_steps") == (20, "dendrite_patience_steps=20")
    assert plateau_window(schedule, PhaseState(tries=2), "dendrite_patience") == (
        12,
        "dendrite_patience=3, x4 for try 3",
    )


def test_cycle_neuron_patience_applies_after_the_first_neuron_phase_only() -> None:
    schedule = PhaseSchedule(
        neuron_patience=3, cycle_neuron_patience=1, dendrite_patience_steps=2, run_budget=None, max_tries=1
    )
    machine = PhaseMachine("min", schedule)
    # The first neuron phase: patience 3.
    assert [machine.step(s).action for s in (1.0, 1.1, 1.1, 1.1)] == [CONTINUE] * 3 + [START_DENDRITE_PHASE]
    assert "(neuron_patience=3)" in machine.state.history[-1]["reason"]
    _steps_to_accept(machine)
    # After the acceptance: patience 1.
    assert [machine.step(s).action for s in (0.9, 0.95)] == [CONTINUE, START_DENDRITE_PHASE]
    assert "(cycle_neuron_patience=1)" in machine.state.history[-1]["reason"]


def test_cycle_neuron_patience_sets_the_shortest_cycle() -> None:
    assert shortest_cycle(PhaseSchedule(neuron_patience=10)) == 10
    assert shortest_cycle(PhaseSchedule(neuron_patience=10, cycle_neuron_patience=4)) == 4
    assert shortest_cycle(PhaseSchedule(neuron_patience=10, cycle_neuron_patience=4, neuron_epochs=2)) == 2


@pytest.mark.parametrize(
    "options",
    [
        {"retry_window_factor": 0},
        {"retry_window_factor": 1.5},
        {"cycle_neuron_patience": 0},
        {"cycle_neuron_patience": True},
    ],
)
def test_bad_settings_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(PerforationError):
        PhaseSchedule(**options)  # type: ignore[arg-type]
