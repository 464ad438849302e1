"""Phase control: what start/accept/discard change, and what they must leave alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import pb_lightning as pb
from pb_lightning import DendriteConfig, PerforationError


def _net(config: DendriteConfig | None = None) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    return pb.perforate(model, config=config)


def _train_candidates(model: nn.Module, steps: int = 8) -> None:
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    opt = torch.optim.Adam(pb.trainable_parameters(model), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_dendrite_phase_freezes_everything_but_the_candidates() -> None:
    model = _net()
    pb.start_dendrite_phase(model)
    assert pb.in_dendrite_phase(model)
    candidate_ids = {id(p) for layer in pb.perforated_layers(model) for p in layer.candidates.parameters()}
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) in candidate_ids), name
    assert [layer.num_candidates for layer in pb.perforated_layers(model)] == [4, 4]


def test_returning_to_the_neuron_phase_unfreezes_only_what_the_phase_froze() -> None:
    model = _net()
    model[0].module.bias.requires_grad_(False)  # the user's own choice
    pb.start_dendrite_phase(model, num_candidates=2)
    pb.discard_candidates(model)
    assert not model[0].module.bias.requires_grad
    assert model[0].module.weight.requires_grad
    assert model[3].module.weight.requires_grad
    assert not pb.in_dendrite_phase(model)
    assert all(layer.num_dendrites == 0 for layer in pb.perforated_layers(model))


def test_batch_norm_statistics_do_not_drift_during_the_dendrite_phase() -> None:
    model = _net()
    bn = model[1]
    _train_candidates(model, 1)  # neuron phase: statistics move
    before = bn.running_mean.clone()
    pb.start_dendrite_phase(model)
    _train_candidates(model, 5)  # calls model.train() like any training loop
    assert torch.equal(bn.running_mean, before)
    pb.accept_dendrites(model)
    assert bn.training  # follows its parent again
    _train_candidates(model, 1)
    assert not torch.equal(bn.running_mean, before)


def test_accept_installs_one_frozen_set_with_zero_output_weight() -> None:
    model = _net()
    x = torch.randn(16, 4)
    pb.start_dendrite_phase(model)
    _train_candidates(model)
    model.eval()
    before = model(x)
    scores = pb.accept_dendrites(model)
    assert set(scores) == {"0", "3"}
    assert scores["0"].shape == (6,)
    assert torch.allclose(model(x), before, atol=1e-6)
    for layer in pb.perforated_layers(model):
        assert layer.num_dendrites == 1
        assert layer.candidates is None
        assert torch.equal(layer.output_weight, torch.zeros_like(layer.output_weight))
        assert layer.output_weight.requires_grad
        assert not layer.dendrites.weight.requires_grad


def test_accepted_dendrites_keep_training_when_configured() -> None:
    model = _net(DendriteConfig(train_accepted_dendrites=True))
    layer = model[0]
    pb.start_dendrite_phase(model)
    assert layer.dendrites is None  # nothing accepted yet
    pb.accept_dendrites(model)
    assert layer.dendrites.weight.requires_grad  # back in the neuron phase: it trains
    pb.start_dendrite_phase(model)
    # A dendrite phase trains only the candidates, even with train_accepted_dendrites=True.
    assert not layer.dendrites.weight.requires_grad
    assert not layer.output_weight.requires_grad
    pb.accept_dendrites(model)
    assert layer.dendrites.weight.requires_grad
    assert layer.cascade_weight.requires_grad
    weight = layer.dendrites.weight.detach().clone()
    with torch.no_grad():
        layer.output_weight.fill_(0.5)
    _train_candidates(model, 2)
    assert not torch.equal(layer.dendrites.weight, weight)


def test_accept_picks_each_neurons_best_candidate_snapshot() -> None:
    model = _net()
    pb.start_dendrite_phase(model, num_candidates=3)
    _train_candidates(model)
    pool = model[3].candidates
    best = pool.best_score.argmax(0)
    assert torch.equal(pool.best_candidate, best)
    expected = pool.best_bank__weight[0].clone()  # the snapshot of each neuron's best candidate
    pb.accept_dendrites(model)
    assert torch.equal(model[3].dendrites.weight[0], expected)


def test_phase_calls_in_the_wrong_order_are_refused() -> None:
    model = _net()
    with pytest.raises(RuntimeError, match="not in a dendrite phase"):
        pb.accept_dendrites(model)
    pb.start_dendrite_phase(model)
    with pytest.raises(RuntimeError, match="already in a dendrite phase"):
        pb.start_dendrite_phase(model)
    with pytest.raises(PerforationError, match=r"num_candidates.*got 0"):
        pb.start_dendrite_phase(_net(), num_candidates=0)
    with pytest.raises(PerforationError, match=r"no perforated layers; call pb_lightning.perforate"):
        pb.start_dendrite_phase(nn.Linear(2, 2))


def test_parameter_groups_hold_every_trainable_parameter_once() -> None:
    model = _net()
    pb.start_dendrite_phase(model)
    pb.accept_dendrites(model)
    groups = pb.parameter_groups(model, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["network", "dendrite_output_weights"]
    assert groups[1]["weight_decay"] == 0.0
    assert groups[0]["weight_decay"] == 0.1
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped})
    assert {id(p) for p in grouped} == {id(p) for p in pb.trainable_parameters(model)}
    pb.start_dendrite_phase(model)
    groups = pb.parameter_groups(model, candidate_lr=0.05)
    assert [g["name"] for g in groups] == ["candidates"]
    assert groups[0]["lr"] == 0.05
    torch.optim.AdamW(groups, lr=1e-3)  # a real optimizer accepts them


def test_parameter_counts_split_original_dendrites_and_candidates() -> None:
    model = pb.perforate(nn.Sequential(nn.Linear(4, 3)))
    model(torch.randn(2, 4))
    assert pb.parameter_counts(model) == {"original": 15, "dendrites": 0, "total": 15, "candidates": 0}
    pb.start_dendrite_phase(model, num_candidates=2)
    # Candidates: 2 sets x (3x4 weights + 3 biases); no cascade weights at D = 0.
    assert pb.parameter_counts(model)["candidates"] == 30
    pb.accept_dendrites(model)
    pb.start_dendrite_phase(model, num_candidates=2)
    # Now each candidate also has one cascade weight per neuron on the accepted dendrite.
    assert pb.parameter_counts(model)["candidates"] == 30 + 2 * 3
    pb.accept_dendrites(model)
    # Two sets of 15, one cascade weight per neuron (dendrite 2 on dendrite 1), w of 2 x 3.
    assert pb.parameter_counts(model) == {"original": 15, "dendrites": 30 + 3 + 6, "total": 54, "candidates": 0}


def test_parameter_groups_and_counts_agree_on_every_role() -> None:
    model = _net(DendriteConfig(train_accepted_dendrites=True))
    for _ in range(2):
        pb.start_dendrite_phase(model)
        pb.accept_dendrites(model)
    # Neuron phase with trainable accepted dendrites: every parameter is in some group.
    sizes = {g["name"]: sum(p.numel() for p in g["params"]) for g in pb.parameter_groups(model)}
    counts = pb.parameter_counts(model)
    assert set(sizes) == {"network", "dendrite_output_weights", "dendrites"}
    assert sizes["network"] == counts["original"] == sum(p.numel() for p in model.parameters()) - counts["dendrites"]
    assert sizes["dendrites"] + sizes["dendrite_output_weights"] == counts["dendrites"] > 0
    pb.start_dendrite_phase(model)
    sizes = {g["name"]: sum(p.numel() for p in g["params"]) for g in pb.parameter_groups(model)}
    assert sizes == {"candidates": pb.parameter_counts(model)["candidates"]}


def test_perforation_state_round_trips_mid_dendrite_phase() -> None:
    model = _net()
    pb.start_dendrite_phase(model)
    _train_candidates(model, 7)
    state = pb.perforation_state(model)
    assert state["dendrite_phase"] is True
    assert "0.module.weight" in state["frozen"]
    fresh = _net()
    fresh.load_state_dict(model.state_dict())
    pb.load_perforation_state(fresh, state)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    pb.discard_candidates(fresh)
    assert fresh[0].module.weight.requires_grad
    with pytest.raises(PerforationError, match="dendrite_phase=True"):
        pb.load_perforation_state(_net(), state)


def test_candidates_learn_in_a_model_left_in_eval_mode() -> None:
    # A trained model evaluated by hand (or loaded for fine-tuning) may be in eval mode when its
    # dendrite phase starts: the backward pass must still reach the candidates and train them.
    model = _net()
    model(torch.randn(8, 4))
    model.eval()
    pb.start_dendrite_phase(model)
    before = [p.detach().clone() for p in pb.trainable_parameters(model)]
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    opt = torch.optim.Adam(pb.trainable_parameters(model), lr=1e-2)
    for _ in range(8):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    after = list(pb.trainable_parameters(model))
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(layer.candidates.scores().abs().sum() > 0 for layer in pb.perforated_layers(model))
