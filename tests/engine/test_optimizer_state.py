"""OptimizerStateCarrier on its own: a replaced parameter starts fresh, ReduceLROnPlateau continues."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_the_carrier_starts_a_replaced_parameter_fresh_and_continues_reduce_on_plateau() -> None:
    from pb_lightning.engine.optimizer_state import OptimizerStateCarrier

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.Adam([{"params": list(model.parameters()), "name": "network"}], lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0)
    carrier = OptimizerStateCarrier()
    carrier.track(model, [optimizer])
    for metric in (1.0, 2.0, 3.0):  # two validations without improvement: the rate halves twice
        optimizer.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        plateau.step(metric)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    carrier.before_rebuild(model, [optimizer], [plateau])
    model.weight = nn.Parameter(model.weight.detach().clone())  # same name and shape, a new parameter
    new = torch.optim.Adam([{"params": list(model.parameters()), "name": "network"}], lr=0.1)
    new_plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(new, factor=0.5, patience=0)
    carrier.after_rebuild(model, [new], [new_plateau])
    assert model.weight not in new.state  # fresh
    assert int(new.state[model.bias]["step"]) == 3  # persisted: carried
    assert torch.equal(new.state[model.bias]["exp_avg"], optimizer.state[model.bias]["exp_avg"])
    assert new.param_groups[0]["lr"] == pytest.approx(0.025)
    assert new_plateau.best == 1.0
    assert new_plateau.num_bad_epochs == plateau.num_bad_epochs
