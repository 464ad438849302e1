"""torch.compile of a perforated model: one graph per phase, no recompile per layer, eager numerics.

Every perforated layer runs the same ``PerforatedLayer.forward``; if a layer's forward ends its
frame (a graph break), each layer becomes a frame of that one code object, and a model with more
layer variants than dynamo's recompile limit (8) runs the rest eagerly. These tests count frames
and graph breaks (never time) on 20 layers of 20 different widths.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import pb_lightning as pb

_LAYERS = 20


def _model() -> tuple[nn.Module, Tensor]:
    """A 20-layer MLP whose layers all differ in width, with one accepted dendrite set each."""
    torch.manual_seed(0)
    widths = [6 + i for i in range(_LAYERS + 1)]
    layers: list[nn.Module] = []
    for i in range(_LAYERS):
        layers += [nn.Linear(widths[i], widths[i + 1]), nn.Tanh()]
    model = pb.perforate(nn.Sequential(*layers))
    x = torch.randn(5, widths[0])
    model(x)
    pb.start_dendrite_phase(model)
    with pytest.warns(UserWarning, match="no candidate learned"):
        pb.accept_dendrites(model)
    with torch.no_grad():  # accepted with w = 0: give the dendrites a visible effect
        for layer in pb.perforated_layers(model):
            layer.output_weight.normal_(0, 0.5)
    assert len(pb.perforated_layers(model)) == _LAYERS
    return model, x


def _grads(model: nn.Module) -> list[Tensor]:
    """Gradients of the trainable parameters; a missing one counts as zeros (see ``_tap_gradient``)."""
    params = pb.trainable_parameters(model)
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


def _step(model: nn.Module, x: Tensor) -> Tensor:
    for p in model.parameters():
        p.grad = None
    out = model(x)
    out.square().sum().backward()
    return out.detach()


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.slow  # torch.compile of a 20-layer model: among the longest tests (--durations)
def test_each_phase_of_a_20_layer_model_compiles_to_one_graph_and_matches_eager() -> None:
    # aot_eager: dynamo's frames and guards are what this counts, and AOTAutograd runs the
    # tap's backward op; inductor's code generation for 20 layers adds minutes and nothing here.
    model, x = _model()
    backend = CompileCounterWithBackend("aot_eager")  # counts the graphs dynamo hands the backend
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # fullgraph: a graph break fails
    eager = copy.deepcopy(model)
    for _ in range(3):
        assert torch.allclose(_step(compiled, x), _step(eager, x), atol=1e-6)
        for got, want in zip(_grads(model), _grads(eager), strict=True):
            assert torch.allclose(got, want, atol=1e-6)
    assert backend.frame_count == 1

    pb.start_dendrite_phase(model)
    eager = copy.deepcopy(model)  # the copy's pool observes into its own statistics
    for step in range(7):  # past the statistics warm-up (5 steps): the gradients become non-zero
        assert torch.allclose(_step(compiled, x), _step(eager, x), atol=1e-6)
        for got, want in zip(_grads(model), _grads(eager), strict=True):
            assert torch.allclose(got, want, atol=1e-5), step
        for mine, theirs in zip(pb.perforated_layers(model), pb.perforated_layers(eager), strict=True):
            assert torch.allclose(mine.candidates.statistics.moments, theirs.candidates.statistics.moments, atol=1e-5)
            assert torch.equal(mine.candidates.best_score, theirs.candidates.best_score)
            assert torch.equal(mine.candidates.best_candidate, theirs.candidates.best_candidate)
            assert torch.allclose(mine.candidates.best_bank__weight, theirs.candidates.best_bank__weight, atol=1e-5)
    # The phase change recompiles the model once; the 20 layers do not add a frame each.
    assert backend.frame_count == 2
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert any(layer.candidates.statistics.warmed_up for layer in pb.perforated_layers(model))


def test_a_copied_pool_gets_its_own_tap_key() -> None:
    model, _ = _model()
    pb.start_dendrite_phase(model)
    pools = [layer.candidates for layer in pb.perforated_layers(copy.deepcopy(model))]
    originals = [layer.candidates for layer in pb.perforated_layers(model)]
    keys = {p.tap_key for p in pools} | {p.tap_key for p in originals}
    assert len(keys) == 2 * _LAYERS


@pytest.mark.slow  # an inductor compile: among the longest tests (--durations)
def test_inductor_compiled_dendrite_phase_matches_eager() -> None:
    torch.manual_seed(0)
    model = pb.perforate(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)))
    x = torch.randn(7, 4)
    model(x)
    pb.start_dendrite_phase(model)
    eager = copy.deepcopy(model)
    backend = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for _ in range(3):
        assert torch.allclose(_step(compiled, x), _step(eager, x), atol=1e-5)
        for got, want in zip(_grads(model), _grads(eager), strict=True):
            assert torch.allclose(got, want, atol=1e-5)
    assert backend.frame_count == 1
