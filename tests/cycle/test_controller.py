"""CycleController: snapshots, restores and the candidates' seed, checked against references in the test."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import pb_lightning as pb
from pb_lightning.cycle.controller import CycleController, mean_candidate_score, snapshot
from pb_lightning.cycle.decision import CONTINUE, RESTORE_GLOBAL_BEST, Decision


def _model() -> nn.Module:
    torch.manual_seed(0)
    return pb.perforate(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))


def _controller(**schedule: object) -> CycleController:
    return CycleController(pb.PhaseMachine("min", pb.PhaseSchedule(**schedule)))  # type: ignore[arg-type]


def _nudge(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)


def _copy(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_new_best_is_snapshotted_and_restored_exactly() -> None:
    controller, model = _controller(neuron_patience=2), _model()
    controller.step(model, 1.0, None)  # the best so far
    best = _copy(model)
    _nudge(model)
    decision, restructured = controller.step(model, 2.0, None)  # worse: no snapshot
    assert (decision.action, restructured) == (CONTINUE, False)
    assert controller.phase_best is not None
    assert _same(controller.phase_best, best)
    _nudge(model)
    decision, restructured = controller.step(model, 3.0, None)  # patience over: back to the best, candidates on
    assert decision.action == "start_dendrite_phase"
    assert restructured
    assert pb.in_dendrite_phase(model)
    plain = {k: v for k, v in model.state_dict().items() if ".candidates." not in k}
    assert _same(plain, best)
    assert controller.global_best is controller.phase_best  # the baseline is the global best


def test_a_rejected_cycle_goes_back_to_the_global_best_and_its_layer_sizes() -> None:
    controller, model = _controller(neuron_epochs=1, dendrite_epochs=1, max_tries=3), _model()
    controller.step(model, 1.0, None)  # baseline: start a dendrite phase
    before = _copy(model)
    before = {k: v for k, v in before.items() if ".candidates." not in k}
    controller.step(model, 1.0, 0.5)  # accept
    assert [layer.num_dendrites for layer in pb.perforated_layers(model)] == [1, 1]
    _nudge(model)
    decision, restructured = controller.step(model, 2.0, None)  # the cycle did not beat 1.0: retry
    assert decision.restore == RESTORE_GLOBAL_BEST
    assert restructured
    assert [layer.num_dendrites for layer in pb.perforated_layers(model)] == [0, 0]
    plain = {k: v for k, v in model.state_dict().items() if ".candidates." not in k}
    assert _same(plain, before)


def test_candidates_do_not_depend_on_what_else_drew_from_the_global_generator() -> None:
    def candidates_after(draws: int) -> dict[str, Tensor]:
        controller, model = _controller(neuron_epochs=1), _model()
        torch.manual_seed(1234)
        controller.candidate_seed = 7
        torch.rand(draws)  # data loading, dropout, another process's history...
        state = torch.random.get_rng_state()
        controller.step(model, 1.0, None)
        assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left alone
        return {k: v.clone() for k, v in model.state_dict().items() if ".candidates." in k}

    first, second = candidates_after(0), candidates_after(1000)
    assert first
    assert _same(first, second)


def test_mean_candidate_score_is_the_mean_over_all_neurons_of_their_best() -> None:
    model = _model()
    assert mean_candidate_score(model) is None
    pb.start_dendrite_phase(model)
    optimizer = torch.optim.SGD(pb.parameter_groups(model), lr=0.1)
    for _ in range(8):
        optimizer.zero_grad()
        F.cross_entropy(model(torch.randn(16, 4)), torch.randint(0, 2, (16,))).backward()
        optimizer.step()
    scores = pb.candidate_scores(model)
    reference = torch.cat([s.flatten() for s in scores.values()]).mean().item()
    assert mean_candidate_score(model) == pytest.approx(reference, rel=1e-6)


def test_a_snapshot_equal_to_the_model_is_stored_by_reference_and_rebuilt_from_it() -> None:
    controller, model = _controller(neuron_epochs=1), _model()
    controller.step(model, 1.0, None)  # phase best = global best = the weights the model holds (plus candidates)
    state = controller.state_dict(model)
    assert state["global_best"] is None
    assert state["phase_best_is_global_best"]
    assert set(state["global_best_keys_from_model"]) == set(controller.global_best or {})
    loaded = _controller(neuron_epochs=1)
    loaded.load_state_dict(state, model)
    assert loaded.global_best is not None
    assert loaded.phase_best is loaded.global_best
    assert _same(loaded.global_best, controller.global_best or {})
    # Without the model the full snapshot is stored.
    full = controller.state_dict()
    assert full["global_best"] is not None
    plain = {k: v for k, v in snapshot(model).items() if ".candidates." not in k}  # a best holds no candidates
    assert _same(full["global_best"], plain)


def test_finish_leaves_the_global_best_and_says_nothing_twice() -> None:
    controller, model = _controller(neuron_epochs=1), _model()
    controller.step(model, 1.0, None)
    best = {k: v.clone() for k, v in (controller.global_best or {}).items()}
    _nudge(model)
    decision = controller.finish(model)
    assert isinstance(decision, Decision)
    assert not pb.in_dendrite_phase(model)
    assert _same(model.state_dict(), best)
    assert controller.finish(model) is None
