"""The phase state machine, driven by synthetic score sequences: every rule and its edges."""

from __future__ import annotations

import json
import math

import pytest

from pb_lightning.cycle.decision import (
    ACCEPT,
    CONTINUE,
    RESTORE_GLOBAL_BEST,
    RESTORE_PHASE_BEST,
    RETRY,
    START_DENDRITE_PHASE,
    STOP,
)
from pb_lightning.cycle.machine import PhaseMachine
from pb_lightning.cycle.schedule import PhaseSchedule
from pb_lightning.errors import PerforationError

NAN = math.nan


def run(machine: PhaseMachine, scores: list[float], candidate: float = 0.5) -> list[str]:
    """Feed scores; during dendrite phases candidates improve once then stall."""
    actions = []
    for s in scores:
        c = None
        if machine.state.phase == "dendrite":
            c = candidate if machine.state.candidate_best is None else machine.state.candidate_best
        actions.append(machine.step(s, c).action)
    return actions


@pytest.mark.parametrize(
    ("mode", "scores", "expected"),
    [
        # max mode: patience 2, the third flat validation... the second non-improvement ends the phase.
        ("max", [0.5, 0.6, 0.6, 0.6], [CONTINUE, CONTINUE, CONTINUE, START_DENDRITE_PHASE]),
        ("min", [0.5, 0.4, 0.4, 0.4], [CONTINUE, CONTINUE, CONTINUE, START_DENDRITE_PHASE]),
        # A worse score in min mode is no improvement either.
        ("min", [0.5, 0.6, 0.7], [CONTINUE, CONTINUE, START_DENDRITE_PHASE]),
        # Ties are not improvements.
        ("max", [0.5, 0.5, 0.5], [CONTINUE, CONTINUE, START_DENDRITE_PHASE]),
        # NaN never counts as an improvement, and never as a best.
        ("max", [0.1, NAN, NAN], [CONTINUE, CONTINUE, START_DENDRITE_PHASE]),
        # Improvements reset the patience.
        ("max", [0.1, 0.2, 0.2, 0.3, 0.3, 0.3], [CONTINUE] * 5 + [START_DENDRITE_PHASE]),
    ],
)
def test_neuron_patience(mode: str, scores: list[float], expected: list[str]) -> None:
    machine = PhaseMachine(mode, PhaseSchedule(run_budget=None, neuron_patience=2))  # type: ignore[arg-type]
    assert run(machine, scores) == expected


def test_nan_is_never_a_best() -> None:
    machine = PhaseMachine("max", PhaseSchedule(run_budget=None, neuron_patience=2))
    run(machine, [NAN, 0.3, NAN, NAN])
    assert machine.state.global_best == 0.3


@pytest.mark.parametrize(
    ("relative", "absolute", "second", "improved"),
    [
        (0.1, 0.0, 1.05, False),  # +5% < 10% relative margin
        (0.1, 0.0, 1.11, True),
        (0.0, 0.2, 1.1, False),  # +0.1 < 0.2 absolute margin
        (0.0, 0.2, 1.3, True),
        (0.1, 0.5, 1.2, False),  # both margins must be beaten
        (0.1, 0.5, 1.6, True),
    ],
)
def test_improvement_thresholds(relative: float, absolute: float, second: float, improved: bool) -> None:
    sched = PhaseSchedule(run_budget=None, improvement_threshold=relative, improvement_threshold_abs=absolute)
    machine = PhaseMachine("max", sched)
    assert machine.is_improvement(second, 1.0) is improved
    assert PhaseMachine("min", sched).is_improvement(2.0 - second, 1.0) is improved


def test_warmup_delays_the_first_dendrite_phase() -> None:
    machine = PhaseMachine("max", PhaseSchedule(run_budget=None, neuron_patience=1, warmup_epochs=4))
    assert run(machine, [0.5, 0.5, 0.5, 0.5]) == [CONTINUE, CONTINUE, CONTINUE, START_DENDRITE_PHASE]


def test_fixed_epoch_schedule_ignores_patience() -> None:
    machine = PhaseMachine("max", PhaseSchedule(run_budget=None, neuron_epochs=3, dendrite_epochs=2, neuron_patience=1))
    actions = run(machine, [0.1, 0.1, 0.1, 0.1, 0.1, 0.2, 0.3, 0.4])
    assert actions == [
        CONTINUE,
        CONTINUE,
        START_DENDRITE_PHASE,
        CONTINUE,
        ACCEPT,
        CONTINUE,
        CONTINUE,
        START_DENDRITE_PHASE,
    ]


def test_dendrite_phase_ends_by_candidate_patience_or_cap() -> None:
    machine = PhaseMachine("max", PhaseSchedule(run_budget=None, neuron_patience=1, dendrite_patience=2))
    run(machine, [0.5, 0.5])
    assert machine.state.phase == "dendrite"
    assert machine.step(0.5, 0.1).action == CONTINUE
    assert machine.step(0.5, 0.2).action == CONTINUE  # +100%: improvement
    assert machine.step(0.5, 0.21).action == CONTINUE  # 0.1 -> 0.21 over 2 validations: not flat
    decision = machine.step(0.5, 0.2)  # 0.2 -> 0.21 over the last 2: under 10% of 0.21
    assert decision.action == ACCEPT
    assert "rose by less than 0.1 of itself over the last 2 validations" in decision.reason
    capped = PhaseMachine(
        "max", PhaseSchedule(run_budget=None, neuron_patience=1, dendrite_patience=50, max_dendrite_epochs=3)
    )
    run(capped, [0.5, 0.5])
    assert [capped.step(0.5, 0.1 * (i + 1)).action for i in range(3)] == [CONTINUE, CONTINUE, ACCEPT]


def test_an_accepted_cycle_that_improves_starts_the_next_one() -> None:
    machine = PhaseMachine("max", PhaseSchedule(run_budget=None, neuron_patience=1, dendrite_patience=1))
    actions = run(machine, [0.5, 0.5, 0.5, 0.5, 0.7, 0.7])
    assert actions == [CONTINUE, START_DENDRITE_PHASE, CONTINUE, ACCEPT, CONTINUE, START_DENDRITE_PHASE]
    assert machine.state.global_best == 0.7
    assert machine.state.dendrites == 1
    assert machine.state.accepted_cycles == 1


def test_a_cycle_that_does_not_beat_the_global_best_is_retried_then_training_stops() -> None:
    machine = PhaseMachine("max", PhaseSchedule(run_budget=None, neuron_patience=1, dendrite_patience=1, max_tries=2))
    run(machine, [0.5, 0.5, 0.5, 0.5])  # baseline 0.5, dendrite phase, accept
    decision = machine.step(0.5)  # tie with the global best: not an improvement
    assert decision.action == CONTINUE
    decision = machine.step(0.4)
    assert decision.action == RETRY
    assert decision.restore == RESTORE_GLOBAL_BEST
    assert machine.state.dendrites == 0  # the failed set is gone
    assert machine.state.phase == "dendrite"
    run(machine, [0.5, 0.5, 0.5])
    decision = machine.step(0.45)
    assert decision.action == STOP
    assert decision.restore == RESTORE_GLOBAL_BEST
    assert "2 failed tries" in decision.reason
    assert machine.state.rejected_cycles == 2
    assert machine.step(0.9).action == STOP  # stays complete


def test_a_success_resets_the_retry_count() -> None:
    machine = PhaseMachine("max", PhaseSchedule(run_budget=None, neuron_patience=1, dendrite_patience=1, max_tries=2))
    run(machine, [0.5, 0.5, 0.5, 0.5, 0.4, 0.4])  # first try fails
    assert machine.state.tries == 1
    run(machine, [0.5, 0.5, 0.8, 0.8])  # retry succeeds
    assert machine.state.tries == 0
    assert machine.state.global_best == 0.8


def test_max_dendrites_ends_training_with_the_best_model() -> None:
    machine = PhaseMachine(
        "min", PhaseSchedule(run_budget=None, neuron_patience=1, dendrite_patience=1, max_dendrites=1)
    )
    actions = run(machine, [1.0, 1.0, 1.0, 1.0, 0.5, 0.5])
    assert actions[-1] == STOP
    assert machine.state.dendrites == 1
    decision = machine.state.history[-1]
    assert "max_dendrites" in decision["reason"]


def test_max_dendrites_zero_never_starts_a_dendrite_phase() -> None:
    machine = PhaseMachine("max", PhaseSchedule(run_budget=None, neuron_patience=1, max_dendrites=0))
    decision = [machine.step(s) for s in (0.5, 0.5)][-1]
    assert decision.action == STOP
    assert decision.restore == RESTORE_PHASE_BEST


def test_decisions_say_when_to_snapshot() -> None:
    machine = PhaseMachine("max", PhaseSchedule(run_budget=None, neuron_patience=1))
    first, second = machine.step(0.5), machine.step(0.4)
    assert first.new_phase_best
    assert not second.new_phase_best
    assert second.action == START_DENDRITE_PHASE
    assert second.restore == RESTORE_PHASE_BEST
    assert second.new_global_best


@pytest.mark.parametrize(
    ("scores", "action", "restore", "dendrites"),
    [
        ([0.5], STOP, RESTORE_PHASE_BEST, 0),  # first phase: its best is the result
        ([0.5, 0.5], STOP, RESTORE_GLOBAL_BEST, 0),  # mid dendrite phase: drop candidates
        ([0.5, 0.5, 0.5, 0.5, 0.9], STOP, RESTORE_PHASE_BEST, 1),  # last cycle improved: keep it
        ([0.5, 0.5, 0.5, 0.5, 0.3], STOP, RESTORE_GLOBAL_BEST, 0),  # last cycle did not: undo it
    ],
)
def test_finish_leaves_the_global_best(scores: list[float], action: str, restore: str, dendrites: int) -> None:
    machine = PhaseMachine(
        "max", PhaseSchedule(run_budget=None, neuron_patience=1, dendrite_patience=1, neuron_epochs=None)
    )
    run(machine, scores)
    decision = machine.finish()
    assert (decision.action, decision.restore) == (action, restore)
    assert machine.state.dendrites == dendrites


def test_state_round_trips_as_plain_data_at_every_step() -> None:
    machine = PhaseMachine("max", PhaseSchedule(run_budget=None, neuron_patience=1, dendrite_patience=1))
    scores = [0.5, 0.5, 0.5, 0.5, 0.7, 0.7, 0.7, 0.7, 0.6, 0.6]
    twin = PhaseMachine("max", PhaseSchedule(run_budget=None, neuron_patience=1, dendrite_patience=1))
    for s in scores:
        c = 0.3 if machine.state.phase == "dendrite" else None
        state = json.loads(json.dumps(machine.state_dict()))  # plain types only
        twin.load_state_dict(state)
        assert twin.step(s, c) == machine.step(s, c)


def test_history_records_every_validation() -> None:
    machine = PhaseMachine("max", PhaseSchedule(run_budget=None, neuron_patience=1, dendrite_patience=1))
    run(machine, [0.5, 0.5, 0.5, 0.5])
    assert [h["action"] for h in machine.state.history] == [CONTINUE, START_DENDRITE_PHASE, CONTINUE, ACCEPT]
    assert [h["phase"] for h in machine.state.history] == ["neuron", "neuron", "dendrite", "dendrite"]


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"neuron_patience": 0}, r"PhaseSchedule.neuron_patience` must be an int >= 1; got 0"),
        ({"dendrite_patience": 1.5}, r"dendrite_patience` must be an int >= 1; got 1.5"),
        ({"max_tries": 0}, r"max_tries` must be an int >= 1"),
        ({"max_dendrites": -1}, r"max_dendrites` must be an int >= 0"),
        ({"neuron_epochs": 0}, r"neuron_epochs` must be an int >= 1"),
        ({"improvement_threshold": -0.1}, r"improvement_threshold` must be a finite float >= 0"),
        ({"candidate_plateau_fraction": math.inf}, r"candidate_plateau_fraction.*in \[0, 1\)"),
        ({"candidate_plateau_fraction": 1.0}, r"candidate_plateau_fraction"),
        ({"run_budget": 0.5}, r"run_budget.*>= 1"),
        ({"run_budget": math.nan}, r"run_budget"),
        ({"run_budget": True}, r"run_budget"),
    ],
)
def test_schedule_misconfiguration(kwargs: dict, pattern: str) -> None:
    with pytest.raises(PerforationError, match=pattern):
        PhaseSchedule(**kwargs)


def test_machine_misconfiguration() -> None:
    with pytest.raises(PerforationError, match=r"`mode` must be 'min' or 'max'; got 'maximum'"):
        PhaseMachine("maximum")  # type: ignore[arg-type]
    with pytest.raises(PerforationError, match=r"`schedule` must be a pb_lightning.PhaseSchedule"):
        PhaseMachine("max", {"neuron_patience": 2})  # type: ignore[arg-type]


@pytest.mark.parametrize("score", ["high", None, True, [0.5]])
def test_the_machine_refuses_a_score_that_is_not_a_real_number(score: object) -> None:
    machine = PhaseMachine("min")
    with pytest.raises(PerforationError, match=r"score"):
        machine.step(score)  # type: ignore[arg-type]
    assert machine.state.validations == 0


def test_a_real_improvement_never_reads_as_equal_scores() -> None:
    # Six significant digits would print both as 95.633: the digits grow until they differ.
    machine = PhaseMachine("max", PhaseSchedule(neuron_epochs=1, dendrite_epochs=1, improvement_threshold=0))
    machine.step(95.63300323486328)  # baseline (a float32 accuracy)
    machine.step(95.63300323486328, 0.5)  # dendrite phase
    decision = machine.step(95.63304138183594)  # the cycle's neuron phase ends: improved
    assert decision.reason.endswith("improved the global best 95.633 -> 95.63304")


def test_fixed_phase_lengths_are_counted_in_validations() -> None:
    # With check_val_every_n_epoch=2 a phase of neuron_epochs=2 lasts four epochs: say what it counts.
    machine = PhaseMachine("min", PhaseSchedule(neuron_epochs=2, dendrite_epochs=2))
    machine.step(1.0)
    assert "neuron phase reached its 2 validations (neuron_epochs)" in machine.step(0.9).reason
    machine.step(0.9, 0.5)
    assert "dendrite phase reached its 2 validations (dendrite_epochs)" in machine.step(0.9, 0.5).reason
