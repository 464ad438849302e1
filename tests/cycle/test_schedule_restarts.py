"""``PhaseSchedule(restarts_only=True)``: the restart schedule without dendrites, decision by decision."""

from __future__ import annotations

import random

import pytest

from pb_lightning.cycle.decision import (
    ACCEPT,
    CONTINUE,
    RESTART,
    RESTORE_GLOBAL_BEST,
    RESTORE_PHASE_BEST,
    RETRY,
    START_DENDRITE_PHASE,
    STOP,
)
from pb_lightning.cycle.machine import PhaseMachine
from pb_lightning.cycle.schedule import PhaseSchedule
from pb_lightning.errors import PerforationError


def _machine(**kwargs: object) -> PhaseMachine:
    options: dict[str, object] = {"neuron_patience": 1, "restarts_only": True}
    options.update(kwargs)
    return PhaseMachine("max", PhaseSchedule(run_budget=None, **options))  # type: ignore[arg-type]


def test_an_ended_neuron_phase_restarts_from_its_best_weights() -> None:
    machine = _machine()
    assert machine.step(0.5).action == CONTINUE
    decision = machine.step(0.4)
    assert decision.action == RESTART
    assert decision.restore == RESTORE_PHASE_BEST
    assert decision.new_global_best
    assert machine.state.baseline == machine.state.global_best == 0.5
    assert machine.state.phase == "neuron"
    assert machine.state.awaiting_verdict
    assert machine.state.dendrites == 0


def test_an_improving_restart_starts_another_and_a_failing_one_rolls_back_then_stops() -> None:
    machine = _machine(max_tries=2)
    for s in (0.5, 0.5):
        machine.step(s)
    # Restart 1 improves: the next restart starts from this phase's best.
    assert [machine.step(s).action for s in (0.7, 0.7)] == [CONTINUE, RESTART]
    assert machine.state.global_best == 0.7
    assert machine.state.accepted_cycles == 1
    assert machine.state.history[-1]["reason"].startswith("no improvement")
    # Restart 2 does not beat 0.7: roll back to the global best and restart from it.
    decision = [machine.step(s) for s in (0.6, 0.6)][-1]
    assert decision.action == RESTART
    assert decision.restore == RESTORE_GLOBAL_BEST
    assert not decision.new_global_best
    assert "did not beat" in decision.reason
    assert machine.state.tries == 1
    # Restart 3 fails too: max_tries reached, stop with the global best.
    decision = [machine.step(s) for s in (0.65, 0.65)][-1]
    assert decision.action == STOP
    assert decision.restore == RESTORE_GLOBAL_BEST
    assert "2 failed tries" in decision.reason
    assert machine.state.global_best == 0.7
    assert (machine.state.accepted_cycles, machine.state.rejected_cycles) == (1, 2)
    assert machine.step(0.99).action == STOP


def test_a_success_resets_the_failed_tries() -> None:
    machine = _machine(max_tries=2)
    for s in (0.5, 0.5, 0.4, 0.4):  # baseline 0.5, then a failed restart
        machine.step(s)
    assert machine.state.tries == 1
    for s in (0.8, 0.8):
        machine.step(s)
    assert machine.state.tries == 0
    assert machine.state.global_best == 0.8
    assert not machine.state.done


@pytest.mark.parametrize("cap", [0, 1, 3])
def test_max_dendrites_caps_the_improving_restarts(cap: int) -> None:
    machine = _machine(max_dendrites=cap)
    actions = []
    score = 0.1
    while not machine.state.done:
        score += 0.1  # every restart improves
        actions += [machine.step(score).action, machine.step(score).action]
    assert actions.count(RESTART) == cap
    assert actions[-1] == STOP
    assert machine.state.accepted_cycles == cap
    assert f"{cap} restarts reached max_dendrites" in machine.state.history[-1]["reason"]


def test_the_neuron_phase_length_rules_still_apply() -> None:
    fixed = _machine(neuron_epochs=3, neuron_patience=50)
    assert [fixed.step(0.1 * i).action for i in range(1, 7)] == [CONTINUE, CONTINUE, RESTART] * 2
    warm = _machine(warmup_epochs=4)
    assert [warm.step(0.5).action for _ in range(4)] == [CONTINUE, CONTINUE, CONTINUE, RESTART]


def test_random_scores_never_lead_to_a_dendrite_phase_and_the_best_is_the_best_seen() -> None:
    rng = random.Random(0)
    for trial in range(200):
        machine = _machine(neuron_patience=rng.randint(1, 3), max_tries=rng.randint(1, 3), max_dendrites=8)
        scores: list[float] = []
        while not machine.state.done and len(scores) < 200:
            scores.append(round(rng.random(), 2))
            decision = machine.step(scores[-1], candidate_score=rng.random())
            assert decision.action in (CONTINUE, RESTART, STOP), trial
            assert machine.state.phase == "neuron"
            assert machine.state.dendrites == 0
        if not machine.state.done:
            machine.finish()
        # Every phase's best enters the global best only through an improving verdict, so the
        # global best is at most the best score seen and at least the first phase's best.
        assert machine.state.global_best is not None
        assert machine.state.global_best <= max(scores)
        assert machine.state.global_best >= machine.state.baseline  # type: ignore[operator]
        actions = {h["action"] for h in machine.state.history}
        assert not actions & {START_DENDRITE_PHASE, ACCEPT, RETRY}


def test_finish_judges_the_running_restart() -> None:
    better = _machine()
    for s in (0.5, 0.5, 0.6):
        better.step(s)
    decision = better.finish()
    assert (decision.action, decision.restore, better.state.global_best) == (STOP, RESTORE_PHASE_BEST, 0.6)
    worse = _machine()
    for s in (0.5, 0.5, 0.4):
        worse.step(s)
    decision = worse.finish()
    assert (decision.action, decision.restore, worse.state.global_best) == (STOP, RESTORE_GLOBAL_BEST, 0.5)
    assert worse.state.dendrites == 0
    assert worse.state.rejected_cycles == 1


def test_the_dendritic_schedule_is_unchanged_by_default() -> None:
    machine = PhaseMachine("max", PhaseSchedule(run_budget=None, neuron_patience=1))
    assert [machine.step(s).action for s in (0.5, 0.5)] == [CONTINUE, START_DENDRITE_PHASE]


def test_restarts_only_must_be_a_bool() -> None:
    with pytest.raises(PerforationError, match="restarts_only"):
        PhaseSchedule(run_budget=None, restarts_only="yes")  # type: ignore[arg-type]
