"""optimizer_state under PerforatedTracker: carry continues Adam and StepLR across restructures, reset restarts them."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import pb_lightning as pb

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _tracker_run(optimizer_state: str, candidate_lr: float | None) -> tuple[list[list[float]], list[int | None]]:
    torch.manual_seed(0)
    tracker = pb.PerforatedTracker(
        "max",
        pb.PhaseSchedule(neuron_epochs=2, dendrite_epochs=1, max_dendrites=1),
        optimizer_state=optimizer_state,
        candidate_lr=candidate_lr,
    )
    model = tracker.initialize(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)))
    tracker.set_optimizer(torch.optim.Adam, lr=0.1)
    tracker.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    optimizer, scheduler = tracker.setup_optimizer(model)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    lrs, steps = [], []
    for epoch in range(5):
        for _ in range(2):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        lrs.append([g["lr"] for g in optimizer.param_groups])
        network = pb.perforated_layers(model)[0].module.weight
        steps.append(int(optimizer.state[network]["step"]) if network in optimizer.state else None)
        scheduler.step()
        model, restructured, complete = tracker.add_validation_score(float(epoch), model)
        if restructured:
            optimizer, scheduler = tracker.setup_optimizer(model)
    return lrs, steps


@pytest.mark.parametrize("candidate_lr", [None, 0.3])
def test_the_tracker_carries_adam_and_step_lr_or_resets_them(candidate_lr: float | None) -> None:
    lrs, steps = _tracker_run("carry", candidate_lr)
    assert steps == [2, 4, None, 6, 8]
    for epoch, group_lrs in enumerate(lrs):
        bases = [candidate_lr or 0.1] if epoch == 2 else [0.1] * len(group_lrs)
        assert group_lrs == pytest.approx([b * 0.5**epoch for b in bases])
    lrs, steps = _tracker_run("reset", candidate_lr)
    assert steps == [2, 4, None, 2, 4]
    assert lrs[3][0] == pytest.approx(0.1)  # StepLR began again at the acceptance
