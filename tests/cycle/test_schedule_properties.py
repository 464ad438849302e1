"""Property tests: the phase machine under random score sequences and random schedules."""

from __future__ import annotations

import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from pb_lightning.cycle.decision import RETRY, START_DENDRITE_PHASE, STOP
from pb_lightning.cycle.machine import PhaseMachine
from pb_lightning.cycle.schedule import PhaseSchedule

scores = st.one_of(
    st.floats(min_value=-10, max_value=10, allow_nan=False),
    st.just(math.nan),
    st.just(math.inf),
    st.just(-math.inf),
)
schedules = st.builds(
    PhaseSchedule,
    neuron_patience=st.integers(1, 4),
    dendrite_patience=st.integers(1, 3),
    improvement_threshold=st.sampled_from([0.0, 1e-4, 0.1]),
    improvement_threshold_abs=st.sampled_from([0.0, 0.01, 1.0]),
    warmup_epochs=st.integers(0, 3),
    neuron_epochs=st.one_of(st.none(), st.integers(1, 3)),
    dendrite_epochs=st.one_of(st.none(), st.integers(1, 3)),
    max_dendrite_epochs=st.integers(1, 5),
    max_dendrites=st.integers(0, 3),
    max_tries=st.integers(1, 3),
)


def _better(mode: str, a: float, b: float | None) -> bool:
    return b is None or (a < b if mode == "min" else a > b)


@settings(max_examples=150, deadline=None)
@given(
    mode=st.sampled_from(["min", "max"]),
    schedule=schedules,
    sequence=st.lists(scores, max_size=60),
    candidates=st.lists(st.floats(0, 1), min_size=1, max_size=8),
)
def test_invariants_hold_at_every_step(
    mode: str, schedule: PhaseSchedule, sequence: list[float], candidates: list[float]
) -> None:
    machine = PhaseMachine(mode, schedule)  # type: ignore[arg-type]
    twin = PhaseMachine(mode, schedule)  # type: ignore[arg-type]
    previous_best = None
    for i, score in enumerate(sequence):
        candidate = candidates[i % len(candidates)] if machine.state.phase == "dendrite" else None
        # The state round-trips as plain data and the round-tripped machine decides the same.
        twin.load_state_dict(json.loads(json.dumps(machine.state_dict())))
        decision = machine.step(score, candidate)
        assert twin.step(score, candidate) == decision
        s = machine.state
        assert 0 <= s.dendrites <= schedule.max_dendrites
        assert 0 <= s.tries <= schedule.max_tries
        # The global best only ever improves, and is never NaN or infinite.
        if s.global_best is not None:
            assert math.isfinite(s.global_best)
            assert (
                previous_best is None or s.global_best == previous_best or _better(mode, s.global_best, previous_best)
            )
        previous_best = s.global_best
        if decision.action in (START_DENDRITE_PHASE, RETRY):
            assert s.dendrites < schedule.max_dendrites or decision.action == RETRY


@settings(max_examples=150, deadline=None)
@given(mode=st.sampled_from(["min", "max"]), schedule=schedules, prefix=st.lists(scores, max_size=30))
def test_a_plateau_always_ends_training_within_its_limits(
    mode: str, schedule: PhaseSchedule, prefix: list[float]
) -> None:
    machine = PhaseMachine(mode, schedule)  # type: ignore[arg-type]
    for score in prefix:
        machine.step(score, 0.5 if machine.state.phase == "dendrite" else None)
    # After any history, a flat score (and flat candidates) must end training within this bound.
    neuron = max(schedule.neuron_patience, schedule.neuron_epochs or 0) + schedule.warmup_epochs + 1
    dendrite = schedule.max_dendrite_epochs
    cycles = (schedule.max_dendrites + 1) * (schedule.max_tries + 1)
    bound = (neuron + dendrite) * (cycles + 1)
    for _ in range(bound):
        decision = machine.step(0.0, 0.5 if machine.state.phase == "dendrite" else None)
        if machine.state.done:
            break
    assert machine.state.done, machine.state
    assert decision.action == STOP


@settings(max_examples=100, deadline=None)
@given(mode=st.sampled_from(["min", "max"]), schedule=schedules, sequence=st.lists(scores, max_size=60))
def test_a_kept_cycle_always_beat_the_global_best(mode: str, schedule: PhaseSchedule, sequence: list[float]) -> None:
    machine = PhaseMachine(mode, schedule)  # type: ignore[arg-type]
    for score in sequence:
        before = machine.state.global_best
        accepted = machine.state.accepted_cycles
        machine.step(score, 0.3 if machine.state.phase == "dendrite" else None)
        if machine.state.accepted_cycles > accepted:  # a verdict kept the cycle's dendrites
            assert machine.is_improvement(machine.state.global_best, before)
