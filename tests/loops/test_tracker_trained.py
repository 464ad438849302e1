"""PerforatedTracker on a trained network (issue 26): the plain model's weights — loaded before
``tracker.initialize`` or after it — are what the perforated model computes, and the tracker then
grows dendrites on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import pb_lightning as pb

# One pytest-xdist worker for the module, so its module-scoped training runs once.
pytestmark = pytest.mark.xdist_group("tracker_trained")


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    model.train()
    for batch in torch.randperm(len(y)).split(128):
        optimizer.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """A plain network trained for five epochs, and the file its state dict was saved to."""
    torch.manual_seed(0)
    x, y = _data()
    plain = _net()
    optimizer = torch.optim.Adam(plain.parameters(), lr=1e-2)
    for _ in range(5):
        _train(plain, x, y, optimizer)
    path = tmp_path_factory.mktemp("trained") / "plain.pt"
    torch.save(plain.state_dict(), path)
    return path, plain.eval()


def _assert_same_function(model: nn.Module, plain: nn.Module, x: torch.Tensor) -> None:
    for train in (False, True):  # restored to eval mode afterwards, as the fixture's model is
        model.train(train)
        plain.train(train)
        with torch.no_grad():
            torch.testing.assert_close(model(x), plain(x), rtol=0, atol=1e-6)
    plain.eval()


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_initialize_keeps_the_trained_weights_whenever_they_were_loaded(
    trained: tuple[Path, nn.Module], when: str, mode: str
) -> None:
    path, plain = trained
    plain_state = {k: v.clone() for k, v in plain.state_dict().items()}
    x = _data()[0][:128]
    model = _net()
    tracker = pb.PerforatedTracker("max", verbose=False)
    if when == "before":
        model.load_state_dict(torch.load(path))
        model.train(mode == "train")
        model = tracker.initialize(model, with_norm=True)
    else:
        model = tracker.initialize(model.train(mode == "train"), with_norm=True)
        model.load_state_dict(torch.load(path))  # plain keys, mapped onto the wrapped layers
    assert [layer.norm is not None for layer in pb.perforated_layers(model)] == [True, False]
    _assert_same_function(model, plain, x)
    plain.load_state_dict(plain_state)  # train-mode forwards moved the running statistics


def test_the_tracker_grows_dendrites_on_the_trained_network(trained: tuple[Path, nn.Module]) -> None:
    path, plain = trained
    x, y = _data()
    x_val, y_val = x[1200:], y[1200:]
    torch.manual_seed(1)
    model = _net()
    model.load_state_dict(torch.load(path))
    model.eval()  # as left by the evaluation after its training
    schedule = pb.PhaseSchedule(neuron_epochs=2, dendrite_epochs=1, max_dendrites=1)
    tracker = pb.PerforatedTracker("max", schedule, verbose=False)
    model = tracker.initialize(model, with_norm=True)
    tracker.set_optimizer(torch.optim.Adam, lr=1e-3)
    optimizer, _ = tracker.setup_optimizer(model)

    def accuracy() -> float:
        model.eval()
        with torch.no_grad():
            return (model(x_val).argmax(1) == y_val).float().mean().item()

    with torch.no_grad():
        assert accuracy() == (plain(x_val).argmax(1) == y_val).float().mean().item()  # starts where it ended
    learned: dict[str, float] = {}
    for _ in range(10):
        _train(model, x, y, optimizer)
        if pb.in_dendrite_phase(model):
            learned = {name: s.max().item() for name, s in pb.candidate_scores(model).items()}
        model, restructured, complete = tracker.add_validation_score(accuracy(), model)
        if complete:
            break
        if restructured:
            optimizer, _ = tracker.setup_optimizer(model)
    assert learned, "no dendrite phase ran"
    assert all(score > 0.01 for score in learned.values()), learned
    assert complete
    assert [layer.num_dendrites for layer in pb.perforated_layers(model)] == [1, 1]
    assert tracker.machine.state.global_best == accuracy()  # the run ends on its best model
