"""A dendrite phase ended in training steps (``PhaseSchedule.dendrite_patience_steps``)."""

from __future__ import annotations

import pytest

from pb_lightning.cycle.decision import ACCEPT, CONTINUE, RETRY, START_DENDRITE_PHASE
from pb_lightning.cycle.machine import PhaseMachine
from pb_lightning.cycle.schedule import PhaseSchedule
from pb_lightning.errors import PerforationError


def _in_dendrite_phase(patience_steps: int | None, fraction: float = 0.1) -> PhaseMachine:
    """A machine whose first neuron phase (patience 1) has just ended: scores 1.0, then a worse 1.5.

    The dendrite phase runs on the restored best weights (score 1.0), not on the last ones."""
    schedule = PhaseSchedule(
        neuron_patience=1, dendrite_patience_steps=patience_steps, candidate_plateau_fraction=fraction, run_budget=None
    )
    machine = PhaseMachine("min", schedule)
    assert machine.step(1.0).action == CONTINUE
    assert machine.step(1.5).action == START_DENDRITE_PHASE
    return machine


def _reference_end(scores: list[float], patience: int, fraction: float) -> int | None:
    """The step (0-based) at which the plateau rule ends the phase, written out plainly: the
    running best score, starting from the phase's 0, gained no more than ``fraction`` of itself
    over the last ``patience`` counted steps."""
    running = [0.0]
    for i, score in enumerate(scores):
        if score <= 0:
            continue
        running.append(max(running[-1], score))
        if len(running) > patience and running[-1] - running[-1 - patience] <= fraction * running[-1]:
            return i
    return None


@pytest.mark.parametrize(
    "scores",
    [
        [0.0, 0.0, 0.1, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3],  # warm-up zeros are not counted
        [0.1, 0.2, 0.201, 0.202, 0.25, 0.251, 0.252, 0.253, 0.26],  # a jump restarts the wait
        [0.1, 0.5, 0.51, 0.52, 0.53, 0.54, 0.55],  # a 2% creep per step: flat relative to the gain
        [0.1, 0.2, 0.4, 0.8, 1.6],  # keeps improving: never ends
        [0.5, 0.5, 0.5, 0.5],
        [0.5, 0.4, 0.3, 0.2],  # a falling score: the running best is what counts
    ],
)
@pytest.mark.parametrize("fraction", [0.1, 0.01])
def test_the_phase_ends_at_the_step_the_rule_says(scores: list[float], fraction: float) -> None:
    machine = _in_dendrite_phase(3, fraction)
    ended = None
    for i, score in enumerate(scores):
        decision = machine.training_step(score, global_step=100 + i)
        if decision is not None:
            assert decision.action == ACCEPT
            ended = i
            break
    assert ended == _reference_end(scores, 3, fraction)
    if ended is not None:
        s = machine.state
        assert (s.phase, s.dendrites, s.awaiting_verdict) == ("neuron", 1, True)
        assert machine.training_step(1.0) is None  # a neuron phase: nothing to check
        # The accept is recorded under the last validation, with the restored weights' score.
        row = machine.state.history[-1]
        assert (row["validation"], row["score"], row["action"]) == (2, 1.0, ACCEPT)
        assert "training steps" in row["reason"]
        # ... and at the training step it came at: the validation's own row has the same number.
        assert row["global_step"] == 100 + ended
        assert machine.state.history[-2]["validation"] == 2


def test_after_a_step_ended_phase_the_cycle_goes_on_as_usual() -> None:
    machine = _in_dendrite_phase(2)
    for score in (0.3, 0.3, 0.3):
        decision = machine.training_step(score)
    assert decision is not None
    assert decision.action == ACCEPT
    # The next neuron phase beats the global best (1.0): the cycle is kept, a new dendrite phase starts.
    actions = [machine.step(score).action for score in (0.9, 0.95)]
    assert actions == [CONTINUE, START_DENDRITE_PHASE]
    assert machine.state.accepted_cycles == 1
    # The new phase counts its steps afresh.
    assert machine.state.step_candidate_window == [0.0]


def test_a_retry_ended_in_steps_is_recorded_with_the_global_best_it_restored() -> None:
    machine = _in_dendrite_phase(2)
    for score in (0.3, 0.3, 0.3):
        machine.training_step(score)
    # The cycle's neuron phase (1.2, then 1.3) does not beat the global best 1.0: retry from it.
    assert [machine.step(score).action for score in (1.2, 1.3)] == [CONTINUE, RETRY]
    decisions = [machine.training_step(score) for score in (0.3, 0.3, 0.3)]
    assert decisions[-1] is not None
    assert decisions[-1].action == ACCEPT
    assert machine.state.history[-1]["score"] == 1.0


def test_without_the_setting_nothing_is_checked_per_step() -> None:
    machine = _in_dendrite_phase(None)
    assert not machine.checks_steps
    assert all(machine.training_step(0.5) is None for _ in range(100))
    assert machine.state.phase == "dendrite"


def test_a_validation_still_ends_the_phase_by_its_own_patience() -> None:
    machine = _in_dendrite_phase(1000)
    actions = [machine.step(1.0, 0.5).action for _ in range(4)]
    assert actions == [CONTINUE, CONTINUE, CONTINUE, ACCEPT]  # dendrite_patience=3 validations


def test_the_step_count_survives_a_state_round_trip() -> None:
    machine = _in_dendrite_phase(3)
    for score in (0.3, 0.3, 0.3):
        assert machine.training_step(score) is None  # wait 2 of 3
    restored = PhaseMachine("min", machine.schedule)
    restored.load_state_dict(machine.state_dict())
    assert restored.state == machine.state
    assert restored.training_step(0.3) is not None
    # A state written before the setting existed loads with the counters at their start.
    old = machine.state_dict()
    for key in ("last_score", "step_candidate_window"):
        del old["state"][key]
    legacy = PhaseMachine("min", machine.schedule)
    legacy.load_state_dict(old)
    assert not legacy.checks_steps  # no validation score yet to decide on: waits for the next validation


def test_a_validation_row_records_the_global_step_it_is_given() -> None:
    machine = PhaseMachine("min", PhaseSchedule(run_budget=None, neuron_patience=1, dendrite_patience_steps=2))
    machine.step(1.0, global_step=10)
    machine.step(1.5)  # a caller that counts no steps (the plain tracker)
    assert [h["global_step"] for h in machine.state.history] == [10, None]


@pytest.mark.parametrize("bad", [-1, 2.5, True, "3"])
def test_a_bad_global_step_is_named(bad: object) -> None:
    machine = _in_dendrite_phase(2)
    with pytest.raises(PerforationError, match="global_step"):
        machine.training_step(0.5, global_step=bad)  # type: ignore[arg-type]
    with pytest.raises(PerforationError, match="global_step"):
        machine.step(1.0, global_step=bad)  # type: ignore[arg-type]
    assert len(machine.state.history) == 2  # nothing recorded from the bad calls


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"dendrite_patience_steps": 0}, "dendrite_patience_steps"),
        ({"dendrite_patience_steps": 2.5}, "dendrite_patience_steps"),
    ],
)
def test_bad_settings_are_named(options: dict, pattern: str) -> None:
    with pytest.raises(PerforationError, match=pattern):
        PhaseSchedule(run_budget=None, **options)


def test_the_capacity_test_switches_every_epoch_whatever_the_base_says() -> None:
    schedule = PhaseSchedule.capacity_test(PhaseSchedule(run_budget=None, dendrite_patience_steps=7))
    assert (schedule.dendrite_epochs, schedule.dendrite_patience_steps) == (1, None)


def test_fixed_dendrite_phases_are_not_judged_per_step() -> None:
    """``dendrite_epochs`` fixes the phase's length: a per-step check stands aside."""
    machine = PhaseMachine(
        "min", PhaseSchedule(neuron_patience=1, dendrite_epochs=2, dendrite_patience_steps=5, run_budget=None)
    )
    [machine.step(s) for s in (1.0, 1.5)]
    assert machine.state.phase == "dendrite"
    assert not machine.checks_steps
    assert all(machine.training_step(0.5) is None for _ in range(50))
    assert [machine.step(1.0, 0.5).action for _ in range(2)] == [CONTINUE, ACCEPT]
