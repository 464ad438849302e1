"""Typed decisions: enums equal to the old strings, plain strings in the state, the verdict field."""

from __future__ import annotations

import io
import json
import random

import pytest
import torch

from pb_lightning.cycle.decision import RESTART, RETRY, STOP, Action, Decision, Phase, Restore, StrEnum, Verdict
from pb_lightning.cycle.machine import PhaseMachine
from pb_lightning.cycle.schedule import PhaseSchedule


def test_the_enums_are_the_strings_checkpoints_and_histories_always_held() -> None:
    expected = {
        Action: ["continue", "start_dendrite_phase", "accept", "retry", "stop", "restart"],
        Phase: ["neuron", "dendrite"],
        Restore: ["phase_best", "global_best"],
        Verdict: ["accepted", "rejected"],
    }
    for enum, values in expected.items():
        assert [member.value for member in enum] == values
        for member, value in zip(enum, values, strict=True):
            assert member == value
            assert str(member) == value
            assert f"{member}" == value
            assert "%s" % (member,) == value  # noqa: UP031 (logging formats with %s)
            assert json.dumps(member) == json.dumps(value)
            assert enum(value) is member
    assert issubclass(Action, StrEnum)
    assert issubclass(Action, str)


def test_a_decision_converts_plain_strings_and_rejects_unknown_ones() -> None:
    decision = Decision("retry", "why", restore="global_best", verdict="rejected")
    assert decision.action is Action.RETRY
    assert decision.restore is Restore.GLOBAL_BEST
    assert decision.verdict is Verdict.REJECTED
    with pytest.raises(ValueError, match="'jump'"):
        Decision("jump", "why")


def _drive(machine: PhaseMachine, rng: random.Random, steps: int) -> list[Decision]:
    decisions = []
    for _ in range(steps):
        if machine.state.done:
            break
        score = rng.choice([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
        candidate = rng.random() if machine.state.phase == Phase.DENDRITE else None
        decisions.append(machine.step(score, candidate))
    return decisions


@pytest.mark.parametrize("restarts_only", [False, True])
def test_the_verdict_field_marks_exactly_the_decisions_the_reason_text_used_to(restarts_only: bool) -> None:
    # The recorder's pb/event/cycle_rejected used to be this test on the reason text; the field
    # must give the same metric on every decision, so the metric did not change.
    seen = {Verdict.ACCEPTED: 0, Verdict.REJECTED: 0}
    for seed in range(20):
        rng = random.Random(seed)
        schedule = PhaseSchedule(
            run_budget=None, neuron_patience=2, dendrite_patience=1, max_dendrites=3, restarts_only=restarts_only
        )
        machine = PhaseMachine("max", schedule)
        decisions = _drive(machine, rng, 200)
        for d in decisions:
            by_text = d.action == RETRY or (d.action in (STOP, RESTART) and "did not beat" in d.reason)
            assert (d.verdict is Verdict.REJECTED) == by_text, d
            assert d.verdict is None or d.action != Action.CONTINUE
        accepted = sum(d.verdict is Verdict.ACCEPTED for d in decisions)
        rejected = sum(d.verdict is Verdict.REJECTED for d in decisions)
        assert (accepted, rejected) == (machine.state.accepted_cycles, machine.state.rejected_cycles)
        seen[Verdict.ACCEPTED] += accepted
        seen[Verdict.REJECTED] += rejected
    assert seen[Verdict.ACCEPTED] > 0  # both verdicts were exercised
    assert seen[Verdict.REJECTED] > 0


def test_the_history_and_state_hold_plain_strings_that_load_weights_only() -> None:
    machine = PhaseMachine("min", PhaseSchedule(run_budget=None, neuron_epochs=1, dendrite_epochs=1, max_dendrites=1))
    for score in (1.0, 1.0, 0.5, 0.4):
        machine.step(score, 0.3)
    machine.finish()
    state = machine.state_dict()
    assert type(state["state"]["phase"]) is str
    assert all(type(entry["action"]) is str and type(entry["phase"]) is str for entry in state["state"]["history"])
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == state


@pytest.mark.parametrize(
    ("scores", "verdict"),
    [
        ([0.5], None),  # the first neuron phase: nothing to judge
        ([0.5, 0.5], None),  # mid dendrite phase
        ([0.5, 0.5, 0.5, 0.5, 0.9], Verdict.ACCEPTED),
        ([0.5, 0.5, 0.5, 0.5, 0.3], Verdict.REJECTED),
    ],
)
def test_finish_sets_the_verdict_of_the_cycle_it_judges(scores: list[float], verdict: Verdict | None) -> None:
    machine = PhaseMachine("max", PhaseSchedule(run_budget=None, neuron_patience=1, dendrite_epochs=2))
    for score in scores:
        machine.step(score, 0.5)
    assert machine.finish().verdict is verdict


def test_capacity_test_schedule_keeps_the_base_settings_it_does_not_fix() -> None:
    schedule = PhaseSchedule.capacity_test(PhaseSchedule(run_budget=None, max_tries=4, warmup_epochs=2))
    assert (schedule.neuron_epochs, schedule.dendrite_epochs, schedule.max_dendrites) == (1, 1, 3)
    assert (schedule.require_improvement, schedule.restarts_only) == (False, False)
    assert (schedule.max_tries, schedule.warmup_epochs) == (4, 2)
    assert PhaseSchedule.capacity_test() == PhaseSchedule.capacity_test(PhaseSchedule(run_budget=None))
