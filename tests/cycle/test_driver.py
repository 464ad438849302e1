"""CycleDriver: scores in, outcomes out, checked against a bare PhaseMachine and hand-written references."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import pb_lightning as pb
from pb_lightning.cycle.checkpoint_format import CHECKPOINT_VERSION
from pb_lightning.cycle.decision import ACCEPT, RETRY, START_DENDRITE_PHASE, Decision
from pb_lightning.cycle.driver import CycleDriver, missing_from_groups, missing_from_optimizers
from pb_lightning.cycle.machine import PhaseMachine
from pb_lightning.cycle.observers import CycleObserver
from pb_lightning.cycle.phase_state import HISTORY_KEYS, PhaseState
from pb_lightning.cycle.restructure import EngineRestructurer
from pb_lightning.reporting.recorder import machine_history

# Every decision: baseline, an improving cycle, a failed cycle retried, a final failure (mode "max").
SCORES = [0.5, 0.625, 0.625, 0.625, 0.625, 0.75, 0.75, 0.75, 0.75, 0.6875, 0.6875, 0.6875, 0.6875, 0.7, 0.7, 0.7]
SCHEDULE = {"neuron_patience": 1, "dendrite_epochs": 1, "max_tries": 2, "max_dendrites": 4, "run_budget": None}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return pb.perforate(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)))


def _train(model: nn.Module, steps: int = 2) -> None:
    """A few SGD steps on what the current phase trains (the candidates learn in a dendrite phase)."""
    groups = pb.parameter_groups(model)
    if not groups:
        return
    optimizer = torch.optim.SGD(groups, lr=0.1)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def _restructures(decision: Decision) -> bool:
    """The reference: a decision changes the trainable parameters when it restores weights or
    adds, installs or replaces candidates."""
    return decision.restore is not None or decision.action in (START_DENDRITE_PHASE, RETRY, ACCEPT)


def test_the_driver_takes_the_machines_decisions_and_says_what_changed() -> None:
    reference = PhaseMachine("max", pb.PhaseSchedule(**SCHEDULE))
    driver = CycleDriver("max", pb.PhaseSchedule(**SCHEDULE))
    model = _model()
    driver.start(model)
    for score in SCORES:
        _train(model)
        candidate = None if not pb.in_dendrite_phase(model) else 0.5  # the reference ignores it outside
        expected = reference.step(score, candidate)
        outcome = driver.validation(model, score)
        assert outcome.decision is not None
        assert (outcome.decision.action, outcome.decision.restore) == (expected.action, expected.restore)
        assert outcome.restructured == _restructures(expected)
        assert outcome.complete == reference.state.done
        assert outcome.score == score
        if outcome.complete:
            break
    assert driver.complete
    assert [h["action"] for h in driver.machine.state.history] == [h["action"] for h in reference.state.history]


class _Recording:
    """A restructurer that records each call, then does what the engine does."""

    def __init__(self, model: nn.Module, calls: list[str]) -> None:
        self.inner, self.calls = EngineRestructurer(model), calls

    def start_dendrite_phase(self) -> None:
        self.calls.append("start")
        self.inner.start_dendrite_phase()

    def accept_dendrites(self) -> Any:
        self.calls.append("accept")
        return self.inner.accept_dendrites()

    def discard_candidates(self) -> None:
        self.calls.append("discard")
        self.inner.discard_candidates()


def test_every_structural_change_goes_through_the_front_ends_restructurer() -> None:
    calls: list[str] = []
    driver = CycleDriver("max", pb.PhaseSchedule(**SCHEDULE), restructurer=lambda m: _Recording(m, calls))
    model = _model()
    expected: list[str] = []
    for score in SCORES:
        _train(model)
        was_dendrite_phase = pb.in_dendrite_phase(model)
        outcome = driver.validation(model, score)
        decision = outcome.decision
        assert decision is not None
        # The reference: restoring weights in a dendrite phase first drops the candidates; then
        # the action's own change.
        if decision.restore is not None and was_dendrite_phase:
            expected.append("discard")
        expected += {START_DENDRITE_PHASE: ["start"], RETRY: ["start"], ACCEPT: ["accept"]}.get(decision.action, [])
        if outcome.complete:
            break
    assert calls == expected
    assert {"start", "accept"} <= set(calls)
    # Training ended in a dendrite phase: the candidates are dropped through it too.
    calls.clear()
    driver = CycleDriver("min", pb.PhaseSchedule(neuron_epochs=1), restructurer=lambda m: _Recording(m, calls))
    driver.validation(model, 1.0)
    assert driver.finish(model).restructured
    assert calls == ["start", "discard"]


class _Observer(CycleObserver):
    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []

    def on_start(self, model: nn.Module) -> None:
        self.seen.append(("start", None))

    def on_validation(self, model: nn.Module, score: float, when: str) -> None:
        self.seen.append(("validation", (score, when)))

    def around_accept(self, model: nn.Module, accept: Callable[[], Any]) -> Any:
        self.seen.append(("before accept", pb.in_dendrite_phase(model)))
        result = accept()
        self.seen.append(("after accept", pb.in_dendrite_phase(model)))
        return result

    def on_decision(self, model: nn.Module, decision: Decision, state: PhaseState) -> None:
        self.seen.append(("decision", str(decision.action)))

    def on_restructured(self, model: nn.Module) -> None:
        self.seen.append(("restructured", None))

    def on_finish(self, model: nn.Module, state: PhaseState) -> list[str]:
        return [f"{state.dendrites} dendrite sets"]


def test_observers_see_each_hook_in_order() -> None:
    observer = _Observer()
    driver = CycleDriver("min", pb.PhaseSchedule(neuron_epochs=1, dendrite_epochs=1), observers=[observer])
    model = _model()
    driver.start(model)
    driver.validation(model, 1.0, epoch=0)
    _train(model)
    outcome = driver.validation(model, 1.0)  # no epoch: the validation's number
    driver.restructured(model)
    assert observer.seen == [
        ("start", None),
        ("validation", (1.0, "epoch 0")),
        ("decision", "start_dendrite_phase"),
        ("validation", (1.0, "validation 2")),
        ("before accept", True),
        ("after accept", False),
        ("decision", "accept"),
        ("restructured", None),
    ]
    assert outcome.decision is not None
    assert outcome.decision.action == ACCEPT
    assert outcome.candidates.keys() == {"0", "2"}  # read before the candidates went
    driver.finish(model)  # the accepted set was never judged better: finish takes it back
    assert driver.close(model) == ["0 dendrite sets"]
    assert driver.close(model) == []  # closed once until the next decision


def test_the_decision_is_taken_on_the_shared_inputs() -> None:
    # Under DDP every rank takes rank 0's score: the driver must decide on what `share` returns.
    driver = CycleDriver("min", pb.PhaseSchedule(neuron_epochs=1))
    model = _model()
    outcome = driver.validation(model, 5.0, share=lambda inputs: (0.25, *inputs[1:]))
    assert outcome.score == 0.25
    assert driver.machine.state.global_best == 0.25
    assert driver.history.rows[-1]["score"] == 0.25


class _Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_budget_of_time_gets_the_seconds_between_validations_as_rank_0_measured_them() -> None:
    clock = _Clock()
    schedule = pb.PhaseSchedule(neuron_patience=1, dendrite_patience_steps=None, run_budget=2.0)
    driver = CycleDriver("min", schedule, clock=clock)
    model = _model()
    driver.start(model)
    shared: list[Any] = []

    def rank_0(inputs: Any) -> Any:
        shared.append(inputs)
        return (*inputs[:2], 3.0 * inputs[2])  # rank 0's seconds: three times this rank's

    for seconds, score in ((1.0, 1.0), (0.5, 1.0)):
        clock.now += seconds
        driver.validation(model, score, share=rank_0)
    assert [inputs[2] for inputs in shared] == [1.0, 0.5]  # from start(), then from the previous validation
    state = driver.machine.state
    assert (state.seconds, state.baseline_seconds, state.recent_seconds) == (4.5, 4.5, [3.0, 1.5])
    # With validations as the unit the driver reports no seconds.
    driver = CycleDriver("min", pb.PhaseSchedule(run_budget_unit="validations"), clock=clock)
    driver.start(model)
    clock.now += 1.0
    driver.validation(model, 1.0, share=lambda inputs: shared.append(inputs) or inputs)
    assert shared[-1][2] is None
    assert driver.machine.state.seconds == 0.0


def test_a_resumed_driver_times_from_its_start_not_from_before_the_checkpoint() -> None:
    clock = _Clock()
    schedule = pb.PhaseSchedule(neuron_patience=2, run_budget=2.0)
    driver = CycleDriver("min", schedule, clock=clock)
    model = _model()
    driver.start(model)
    clock.now += 2.0
    driver.validation(model, 1.0)
    saved = driver.state_dict(model)
    clock.now += 1000.0  # the process is killed; a new one starts much later
    resumed = CycleDriver("min", schedule, clock=clock)
    resumed.load_state_dict(saved, model)
    resumed.start(model)
    clock.now += 2.5
    resumed.validation(model, 0.9)
    assert resumed.machine.state.seconds == 4.5
    assert resumed.machine.state.recent_seconds == [2.0, 2.5]


def test_one_history_row_per_decision_is_the_machines_history_widened() -> None:
    driver = CycleDriver("max", pb.PhaseSchedule(**SCHEDULE))
    model = _model()
    driver.start(model)
    initial = pb.parameter_counts(model)["total"]
    for epoch, score in enumerate(SCORES[:8]):
        _train(model)
        outcome = driver.validation(model, score, epoch=epoch, global_step=10 * epoch)
        row = driver.history.rows[-1]
        assert outcome.row is row
        assert (row["epoch"], row["global_step"]) == (epoch, 10 * epoch)
        assert row["parameters"] == pb.parameter_counts(model)["total"]
        assert row["parameters_before"] == initial
        assert row["dendrites_per_layer"] == {layer.name: layer.num_dendrites for layer in pb.perforated_layers(model)}
    assert machine_history(driver.history.rows) == driver.machine.state.history
    assert all(set(HISTORY_KEYS) <= set(row) for row in driver.history.rows)


def test_a_driver_loaded_from_its_state_continues_with_the_same_decisions() -> None:
    def run(scores: list[float], driver: CycleDriver, model: nn.Module) -> list[str]:
        actions = []
        for score in scores:
            torch.manual_seed(len(actions))
            _train(model)
            outcome = driver.validation(model, score)
            assert outcome.decision is not None
            actions.append(str(outcome.decision.action))
        return actions

    whole, model = CycleDriver("max", pb.PhaseSchedule(**SCHEDULE)), _model()
    first = run(SCORES[:7], whole, model)
    state = whole.state_dict()
    assert state["version"] == CHECKPOINT_VERSION
    assert state["machine"]["state"]["history"] == []  # stored once, as the rows
    weights, perforation = model.state_dict(), pb.perforation_state(model)
    rest = run(SCORES[7:], whole, model)

    resumed, twin = CycleDriver("max", pb.PhaseSchedule(**SCHEDULE)), _model()
    twin.load_state_dict(weights)
    pb.load_perforation_state(twin, perforation)
    resumed.load_state_dict(state)
    assert resumed.machine.state.history == machine_history(state["recorder"]["rows"])
    assert run(SCORES[7:], resumed, twin) == rest
    assert resumed.history.rows == whole.history.rows
    assert first[2] == "start_dendrite_phase"


def test_a_state_of_format_0_keeps_its_machine_history_and_gets_rows_from_it() -> None:
    driver, model = CycleDriver("max", pb.PhaseSchedule(**SCHEDULE)), _model()
    for score in SCORES[:4]:
        driver.validation(model, score)
    old = driver.controller.state_dict()  # what a tracker saved before the driver: no version, no rows
    assert "version" not in old
    assert old["machine"]["state"]["history"]
    loaded = CycleDriver("max", pb.PhaseSchedule(**SCHEDULE))
    loaded.load_state_dict(old)
    assert loaded.machine.state.history == driver.machine.state.history
    assert [r["action"] for r in loaded.history.rows] == [h["action"] for h in driver.machine.state.history]


def test_a_state_of_a_newer_format_is_refused_by_name() -> None:
    driver = CycleDriver("max")
    state = driver.state_dict()
    state["version"] = CHECKPOINT_VERSION + 1
    with pytest.raises(pb.PerforationError, match=rf"the tracker's state has format version {CHECKPOINT_VERSION + 1}"):
        CycleDriver("max").load_state_dict(state, what="the tracker's state")


def test_missing_from_optimizers_names_exactly_the_trainable_parameters_no_optimizer_holds() -> None:
    model = _model()
    pb.start_dendrite_phase(model)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    held = dict(model.named_parameters())
    optimizer = torch.optim.SGD([held[trainable[0]]], lr=0.1)
    assert missing_from_optimizers(model, [optimizer]) == trainable[1:]
    assert missing_from_groups(model, pb.parameter_groups(model)) == []
    assert missing_from_optimizers(model, []) == trainable


@pytest.mark.parametrize("mode", ["reset", "carry"])
def test_rebuild_optimizers_carries_the_state_of_persisting_parameters_only_on_carry(mode: str) -> None:
    model = _model()
    driver = CycleDriver("min", optimizer_state=mode)  # type: ignore[arg-type]

    def build() -> tuple[list[torch.optim.Optimizer], list[Any]]:
        return [torch.optim.Adam(pb.parameter_groups(model), lr=0.01)], []

    (optimizer,), _ = driver.rebuild_optimizers(model, ([], []), build)
    _train_with(model, optimizer)
    weight = model[0].module.weight
    moment = optimizer.state[weight]["exp_avg"].clone()
    (rebuilt,), _ = driver.rebuild_optimizers(model, ([optimizer], []), build)
    assert rebuilt is not optimizer
    if mode == "carry":
        assert torch.equal(rebuilt.state[weight]["exp_avg"], moment)
        assert int(rebuilt.state[weight]["step"]) == 2
    else:
        assert weight not in rebuilt.state


def _train_with(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_a_bad_optimizer_state_is_refused_by_name() -> None:
    with pytest.raises(pb.PerforationError, match="`optimizer_state` must be"):
        CycleDriver("min", optimizer_state="keep")  # type: ignore[arg-type]
