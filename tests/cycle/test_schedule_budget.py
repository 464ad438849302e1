"""The run budget (``PhaseSchedule.run_budget``), the plateau rule at validations and its warning."""

from __future__ import annotations

import logging
import math
import random

import pytest

from pb_lightning.cycle.decision import (
    ACCEPT,
    CONTINUE,
    RESTART,
    RESTORE_GLOBAL_BEST,
    RESTORE_PHASE_BEST,
    START_DENDRITE_PHASE,
    STOP,
    Verdict,
)
from pb_lightning.cycle.machine import PhaseMachine
from pb_lightning.cycle.schedule import PhaseSchedule


def _machine(budget: float | None, **options: object) -> PhaseMachine:
    schedule = PhaseSchedule(
        neuron_patience=2, dendrite_patience=1, dendrite_patience_steps=None, run_budget=budget, **options
    )  # type: ignore[arg-type]
    machine = PhaseMachine("min", schedule)
    # The first neuron phase: 4 validations (best at the 2nd), then a dendrite phase starts.
    actions = [machine.step(s).action for s in (1.0, 0.9, 0.9, 0.9)]
    assert machine.state.baseline_validations == 4
    assert actions[-1] == START_DENDRITE_PHASE or schedule.run_budget is not None
    return machine


def test_a_cycle_still_running_when_the_budget_is_spent_is_judged_there() -> None:
    machine = _machine(2.0)  # 8 validations in all
    assert machine.state.phase == "dendrite"
    assert [machine.step(0.9, c).action for c in (0.5, 0.5)] == [CONTINUE, ACCEPT]
    assert machine.step(0.85).action == CONTINUE
    decision = machine.step(0.84)  # the 8th validation, and a new best of its phase
    assert decision.action == STOP
    assert decision.restore == RESTORE_PHASE_BEST
    assert decision.new_phase_best
    assert decision.new_global_best
    assert decision.verdict == Verdict.ACCEPTED
    assert "run_budget=2 allows 8 validations" in decision.reason
    assert machine.state.done
    assert machine.state.global_best == 0.84


def test_a_cycle_cut_by_the_budget_that_did_not_improve_is_rolled_back() -> None:
    machine = _machine(2.0)
    [machine.step(0.9, c) for c in (0.5, 0.5)]
    decisions = [machine.step(s) for s in (0.95, 0.96)]
    assert decisions[-1].action == STOP
    assert decisions[-1].restore == RESTORE_GLOBAL_BEST
    assert decisions[-1].verdict == Verdict.REJECTED
    assert machine.state.dendrites == 0
    assert machine.state.global_best == 0.9


def test_a_dendrite_phase_cut_by_the_budget_drops_its_candidates() -> None:
    machine = _machine(1.25)  # 5 validations: no whole cycle fits, so none starts
    assert machine.state.done
    assert machine.state.history[-1]["action"] == STOP
    assert "no cycle fits" in machine.state.history[-1]["reason"]
    # Candidates that keep growing: the phase outlasts what is left, and ends with the budget.
    machine = _machine(2.0)
    decisions = [machine.step(0.9, 0.1 * 2**i) for i in range(4)]
    assert [d.action for d in decisions] == [CONTINUE, CONTINUE, CONTINUE, STOP]
    assert decisions[-1].restore == RESTORE_GLOBAL_BEST
    assert machine.state.dendrites == 0
    assert machine.state.validations == 8


def test_no_cycle_is_started_that_cannot_fit_in_what_is_left() -> None:
    # 1.5 x 4 = 6 validations: 2 left, and a cycle takes at least neuron_patience 2 + 2.
    machine = PhaseMachine(
        "min", PhaseSchedule(neuron_patience=2, dendrite_patience=1, dendrite_patience_steps=None, run_budget=1.5)
    )
    decisions = [machine.step(s) for s in (1.0, 0.9, 0.9, 0.9)]
    assert decisions[-1].action == STOP
    assert decisions[-1].restore == RESTORE_PHASE_BEST
    assert decisions[-1].new_global_best
    assert machine.state.global_best == 0.9


def test_restarts_only_runs_under_the_same_budget() -> None:
    machine = PhaseMachine("min", PhaseSchedule(neuron_patience=2, restarts_only=True, run_budget=2.0))
    actions = [machine.step(s).action for s in (1.0, 0.9, 0.9, 0.9)]
    assert actions[-1] == RESTART
    decisions = [machine.step(s) for s in (0.8, 0.79, 0.78, 0.77)]
    assert decisions[-1].action == STOP
    assert machine.state.validations == 8
    assert machine.state.global_best == 0.77


def _reference_limit(budget: float, baseline: int) -> int:
    return math.ceil(budget * baseline)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("budget", [1.0, 2.0, 2.5, 3.0])
def test_no_run_outlasts_its_budget(seed: int, budget: float) -> None:
    """Random score walks: once the first neuron phase has ended, the machine is done by
    ``ceil(budget x its validations)``, and the model it leaves is its global best."""
    rng = random.Random(seed)
    schedule = PhaseSchedule(neuron_patience=rng.randint(1, 4), dendrite_patience=rng.randint(1, 3), run_budget=budget)
    machine = PhaseMachine("min", schedule)
    score = 1.0
    for _ in range(400):
        score += rng.uniform(-0.05, 0.04)
        candidate = rng.uniform(0, 1) if machine.state.phase == "dendrite" else None
        machine.step(score, candidate)
        if machine.state.done:
            break
    baseline = machine.state.baseline_validations
    assert baseline is not None
    assert machine.state.done
    assert machine.state.validations <= _reference_limit(budget, baseline)


def test_the_budget_survives_a_state_round_trip() -> None:
    machine = _machine(2.0)
    restored = PhaseMachine("min", machine.schedule)
    restored.load_state_dict(machine.state_dict())
    assert restored.state == machine.state
    assert restored.state.baseline_validations == 4


def test_a_slow_creep_ends_the_phase() -> None:
    """Candidates that creep up by 2% per validation forever: the old 1%-per-validation rule never
    ended such a phase; the plateau rule does once the creep is small next to the phase's gain."""
    machine = PhaseMachine("min", PhaseSchedule(neuron_patience=1, dendrite_patience=3, run_budget=None))
    [machine.step(s) for s in (1.0, 1.0)]
    scores = [0.07 * 1.02**i for i in range(40)]
    ended = next(i for i, c in enumerate(scores) if machine.step(1.0, c).action == ACCEPT)
    # The running best over the last 3 validations added 6% of itself: under 10%.
    assert ended == 3


def test_a_phase_that_hits_its_cap_warns_once_naming_the_settings(caplog: pytest.LogCaptureFixture) -> None:
    machine = PhaseMachine(
        "min", PhaseSchedule(neuron_patience=1, dendrite_patience=2, max_dendrite_epochs=3, run_budget=None)
    )
    caplog.set_level(logging.WARNING, logger="pb_lightning.cycle.machine")
    for _ in range(2):  # two phases that grow by half each validation: never flat
        while machine.state.phase != "dendrite":
            machine.step(1.0)
        growth = [machine.step(1.0, 0.1 * 1.5**i) for i in range(3)]
        assert growth[-1].action == ACCEPT
        assert "max_dendrite_epochs=3" in growth[-1].reason
    warnings = [r for r in caplog.records if "max_dendrite_epochs" in r.getMessage()]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    for setting in ("candidate_plateau_fraction", "dendrite_patience_steps", "dendrite_patience"):
        assert setting in message


def test_a_state_from_before_the_plateau_rule_loads_mid_phase() -> None:
    machine = PhaseMachine("min", PhaseSchedule(neuron_patience=1, dendrite_patience=2, run_budget=None))
    [machine.step(s) for s in (1.0, 1.0)]
    machine.step(1.0, 0.3)
    old = machine.state_dict()
    for key in ("candidate_window", "step_candidate_window", "baseline_validations"):
        del old["state"][key]
    old["state"] |= {"candidate_wait": 0, "step_candidate_best": None, "step_candidate_wait": 0}
    restored = PhaseMachine("min", machine.schedule)
    restored.load_state_dict(old)
    assert restored.state.candidate_window == [0.3]  # the window restarts from the best so far
    assert [restored.step(1.0, 0.3).action, restored.step(1.0, 0.3).action] == [CONTINUE, ACCEPT]


def test_fixed_neuron_phases_set_the_run_length_themselves() -> None:
    machine = PhaseMachine("min", PhaseSchedule(neuron_epochs=2, dendrite_epochs=1, run_budget=1.0, max_dendrites=3))
    actions = [machine.step(1.0 - 0.01 * i, 0.5).action for i in range(12)]
    assert actions.count(ACCEPT) == 3  # three whole cycles, although run_budget=1.0
