"""Nothing trained is lost: state dicts load into a fresh model, deployment copies agree."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import pb_lightning as pb
from pb_lightning import DendriteInferenceLayer, PerforatedLayer
from tests.helpers import Mixer


def _conv_net() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )
    return pb.perforate(model, with_norm=True)


def _mixer_net() -> nn.Module:
    model = nn.Sequential(Mixer(), nn.Linear(6, 3))
    return pb.perforate(model, include=[Mixer, nn.Linear], neuron_axes={Mixer: -1})


def _sparse_net() -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    return pb.perforate(model, config=pb.DendriteConfig(fan_in=2))


_BUILDERS = {"conv": (_conv_net, (8, 2, 6, 6)), "mixer": (_mixer_net, (8, 4, 5)), "sparse": (_sparse_net, (8, 6))}


def _train(model: nn.Module, x: torch.Tensor, steps: int) -> None:
    target = torch.randint(0, 3, (x.shape[0],))
    opt = torch.optim.Adam(pb.trainable_parameters(model), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        F.cross_entropy(out.reshape(-1, 3), target.repeat_interleave(out.numel() // 3 // x.shape[0])).backward()
        opt.step()


def _grown(kind: str, cycles: int, mid_phase: bool) -> tuple[nn.Module, torch.Tensor]:
    build, shape = _BUILDERS[kind]
    model, x = build(), torch.randn(*shape)
    _train(model, x, 2)
    for _ in range(cycles):
        pb.start_dendrite_phase(model, num_candidates=3)
        _train(model, x, 6)
        pb.accept_dendrites(model)
        _train(model, x, 3)  # w moves away from 0
    if mid_phase:
        pb.start_dendrite_phase(model, num_candidates=2)
        _train(model, x, 6)
    return model, x


def _round_trip(model: nn.Module, kind: str) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = _BUILDERS[kind][0]()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


@pytest.mark.parametrize("kind", ["conv", "mixer"])
@pytest.mark.parametrize("mid_phase", [False, True])
def test_state_dict_loads_into_a_freshly_perforated_model(kind: str, mid_phase: bool) -> None:
    model, x = _grown(kind, cycles=2, mid_phase=mid_phase)
    fresh = _round_trip(model, kind)
    pb.load_perforation_state(fresh, pb.perforation_state(model))
    assert [layer.num_dendrites for layer in pb.perforated_layers(fresh)] == [
        layer.num_dendrites for layer in pb.perforated_layers(model)
    ]
    assert {layer.num_candidates for layer in pb.perforated_layers(fresh)} == {2 if mid_phase else 0}
    model.eval()
    fresh.eval()
    assert torch.equal(fresh(x), model(x))
    if mid_phase:
        # The resumed dendrite phase continues exactly where it was: same statistics, same update.
        for layer_a, layer_b in zip(pb.perforated_layers(model), pb.perforated_layers(fresh), strict=True):
            assert torch.equal(layer_a.candidates.statistics.moments, layer_b.candidates.statistics.moments)
        torch.manual_seed(1)
        _train(model, x, 1)
        torch.manual_seed(1)
        _train(fresh, x, 1)
        for a, b in zip(pb.trainable_parameters(model), pb.trainable_parameters(fresh), strict=True):
            assert torch.equal(a, b)


def test_a_state_dict_without_dendrites_shrinks_a_grown_model_back() -> None:
    # Rolling back a rejected cycle loads a snapshot with fewer dendrite sets.
    model, x = _grown("conv", cycles=1, mid_phase=False)
    plain = _conv_net()
    model.load_state_dict(plain.state_dict())
    assert all(layer.num_dendrites == 0 for layer in pb.perforated_layers(model))
    model.eval()
    plain.eval()
    assert torch.equal(model(x), plain(x))


@pytest.mark.parametrize("kind", ["conv", "mixer"])
def test_to_inference_equals_the_trained_model_and_holds_nothing_else(kind: str) -> None:
    model, x = _grown(kind, cycles=2, mid_phase=True)
    model.eval()
    expected = model(x)
    deployed = pb.to_inference(model)
    assert torch.allclose(deployed(x), expected, atol=1e-6)
    assert not any(isinstance(m, PerforatedLayer) for m in deployed.modules())
    assert sum(isinstance(m, DendriteInferenceLayer) for m in deployed.modules()) == len(pb.perforated_layers(model))
    assert not any("candidates" in name or "statistics" in name for name, _ in deployed.state_dict().items())
    assert not any(m._forward_pre_hooks for m in deployed.modules())
    assert not deployed.training
    assert not any(p.requires_grad for p in deployed.parameters())
    assert pb.in_dendrite_phase(model)  # the original is untouched
    dendrite_params = pb.parameter_counts(model)["dendrites"]
    original = pb.parameter_counts(model)["original"]
    assert sum(p.numel() for p in deployed.parameters()) == original + dendrite_params


def test_to_inference_unwraps_layers_without_dendrites() -> None:
    model = _conv_net()
    x = torch.randn(2, 2, 6, 6)
    model.eval()
    deployed = pb.to_inference(model)
    assert isinstance(deployed[0], nn.Sequential)
    assert isinstance(deployed[0][1], nn.BatchNorm2d)
    assert isinstance(deployed[6], nn.Linear)
    assert torch.equal(deployed(x), model(x))


@pytest.mark.parametrize("kind", ["conv", "mixer", "sparse"])
def test_torchscript_of_a_deployed_model_is_refused_with_the_way_to_export(kind: str) -> None:
    # TorchScript cannot express the dendrite layers (README "Deploy"): each of its three routes
    # gets the same error naming torch.export and ONNX, not a half-working trace.
    model, x = _grown(kind, cycles=1, mid_phase=False)
    deployed = pb.to_inference(model)
    for script in (
        lambda: torch.jit.trace(deployed, x),
        lambda: torch.jit.trace(deployed, x, check_trace=False),
        lambda: torch.jit.script(deployed),
    ):
        with pytest.raises(pb.PerforationError, match=r"TorchScript .* torch\.export\.export.*torch\.onnx\.export"):
            script()


@pytest.mark.parametrize("kind", ["conv", "mixer", "sparse"])
def test_a_deployed_model_exports_with_a_dynamic_batch(kind: str) -> None:
    model, x = _grown(kind, cycles=2, mid_phase=False)
    deployed = pb.to_inference(model)
    exported = torch.export.export(deployed, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    for batch in (x, torch.randn(3, *x.shape[1:])):
        assert torch.allclose(exported.module()(batch), deployed(batch), atol=1e-6)
