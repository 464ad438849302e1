"""The benchmark controls: inert dendrites and the restart schedule, on real models."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import pb_lightning as pb
from pb_lightning.cycle.decision import RESTART, STOP
from pb_lightning.cycle.schedule import PhaseSchedule
from pb_lightning.demos.digits import DigitsDataModule, DigitsMLP
from pb_lightning.engine.controls import InertPerforatedLayer, is_inert, make_dendrites_inert
from pb_lightning.errors import PerforationError
from tests.helpers import fast_trainer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(32, 6, generator=g)
        out.append((x, (x[:, 0] * x[:, 1] > 0).long() + (x[:, 2] > 1).long()))
    return out


def _train(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    optimizer = torch.optim.Adam(pb.parameter_groups(model, candidate_lr=0.05), lr=0.01)
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def _cycle(model: nn.Module, dendrite_phase: bool) -> torch.Tensor:
    """Neuron phase, (dendrite phase + accept), neuron phase with a fresh optimizer; test outputs."""
    batches = _batches(40)
    _train(model, batches[:20])
    if dendrite_phase:
        pb.start_dendrite_phase(model)
        _train(model, batches * 2)  # only the candidates learn: the network is frozen
        scores = pb.accept_dendrites(model)
        assert all(float(s.mean()) > 0.05 for s in scores.values())  # the candidates did learn
    _train(model, batches[20:])
    with torch.no_grad():
        return model(torch.randn(64, 6, generator=torch.Generator().manual_seed(2)))


def test_an_inert_model_computes_exactly_what_the_model_without_dendrites_does() -> None:
    net = _net()
    plain = _cycle(pb.perforate(copy.deepcopy(net)), dendrite_phase=False)
    inert_model = make_dendrites_inert(pb.perforate(copy.deepcopy(net)))
    inert = _cycle(inert_model, dendrite_phase=True)
    normal_model = pb.perforate(copy.deepcopy(net))
    normal = _cycle(normal_model, dendrite_phase=True)
    # The inert control grew dendrites like the normal run, but they never changed a thing.
    assert [layer.num_dendrites for layer in pb.perforated_layers(inert_model)] == [1, 1, 1]
    for layer in pb.perforated_layers(inert_model):
        assert torch.equal(layer.output_weight, torch.zeros_like(layer.output_weight))
        assert not layer.output_weight.requires_grad
    assert torch.equal(inert, plain)
    # The same cycle with ordinary dendrites changes the function (their w trained away from 0).
    assert all(float(layer.output_weight.abs().sum()) > 0 for layer in pb.perforated_layers(normal_model))
    assert (normal - plain).abs().max() > 1e-3


def test_inert_output_weights_stay_out_of_every_optimizer_and_survive_rollbacks() -> None:
    schedule = PhaseSchedule(neuron_epochs=1, dendrite_epochs=1, max_dendrites=3, max_tries=3)
    tracker = pb.PerforatedTracker("max", schedule)
    model = make_dendrites_inert(tracker.initialize(_net()))
    tracker.set_optimizer(torch.optim.Adam, lr=0.01)
    batches = _batches(4)
    optimizer, _ = tracker.setup_optimizer(model)
    # 0.5 baseline, accept, 0.6 improves (cycle kept), accept, 0.4 fails (rollback to 1 set), ...
    for score in (0.5, 0.5, 0.6, 0.6, 0.4, 0.4, 0.7):
        _train(model, batches)
        model, restructured, complete = tracker.add_validation_score(score, model)
        if restructured:
            optimizer, _ = tracker.setup_optimizer(model)
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for layer in pb.perforated_layers(model):
            assert isinstance(layer, InertPerforatedLayer)
            if layer.output_weight is not None:
                assert id(layer.output_weight) not in held
                assert not layer.output_weight.requires_grad
                assert float(layer.output_weight.abs().sum()) == 0.0
    assert tracker.machine.state.rejected_cycles == 1
    assert pb.perforated_layers(model)[0].num_dendrites >= 1
    # A checkpoint of an inert model loads into a fresh inert model and stays inert.
    fresh = make_dendrites_inert(pb.perforate(_net()))
    fresh.load_state_dict(model.state_dict())
    layer = pb.perforated_layers(fresh)[0]
    assert layer.num_dendrites == pb.perforated_layers(model)[0].num_dendrites
    assert not layer.output_weight.requires_grad


def test_the_inert_control_is_explicit_and_loud(caplog: Any) -> None:
    with pytest.raises(PerforationError, match="no perforated layers"):
        make_dendrites_inert(_net())
    with pytest.raises(PerforationError, match="learning='gradient'"):
        make_dendrites_inert(pb.perforate(_net(), config=pb.DendriteConfig(learning="gradient", num_candidates=1)))
    grown = pb.perforate(_net())
    _cycle(grown, dendrite_phase=True)
    with pytest.raises(PerforationError, match="already have accepted dendrites"):
        make_dendrites_inert(grown)
    model = pb.perforate(_net())
    assert not is_inert(model)
    with caplog.at_level(logging.WARNING, logger="pb_lightning.engine.controls"):
        make_dendrites_inert(model)
    assert "INERT CONTROL" in caplog.text
    assert is_inert(model)
    assert "INERT CONTROL" in repr(model)
    # No configuration path reaches it: not a config field, not a callback argument, not exported.
    assert not any("inert" in name for name in pb.DendriteConfig().to_dict())
    assert "inert" not in " ".join(pb.PerforatedCallback.__init__.__code__.co_varnames)
    assert not any("inert" in name.lower() for name in pb.__all__)


class _Counting(DigitsMLP):
    def __init__(self) -> None:
        super().__init__(hidden=8, lr=1e-2)
        self.optimizers_built = 0

    def configure_optimizers(self) -> Any:
        self.optimizers_built += 1
        return super().configure_optimizers()


def test_the_callback_runs_the_restart_schedule_without_dendrites(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = _Counting()
    callback = pb.PerforatedCallback("val_loss", "min", neuron_epochs=3, max_dendrites=2, restarts_only=True)
    trainer = fast_trainer(tmp_path, [callback], max_epochs=30)
    trainer.fit(model, DigitsDataModule())
    history = callback.machine.state.history
    actions = [h["action"] for h in history if h["action"] != "continue"]
    restarts = actions.count(RESTART)
    assert actions[-1] == STOP
    assert restarts >= 1
    assert trainer.current_epoch == 3 * (restarts + 1)  # no frozen dendrite-phase epochs
    # A fresh optimizer at the start, at every restart, and after the final rollback (as in every schedule).
    assert model.optimizers_built == 1 + restarts + 1
    assert all(layer.num_dendrites == 0 and layer.candidates is None for layer in model.perforated_layers())
    assert {h["phase"] for h in history} == {"neuron"}
    result = trainer.validate(model, DigitsDataModule(), verbose=False)[0]
    assert result["val_loss"] == pytest.approx(callback.best_score, rel=1e-5)
    with pytest.raises(PerforationError, match="restarts_only"):
        pb.PerforatedCallback(restarts_only=True, capacity_test=True)
