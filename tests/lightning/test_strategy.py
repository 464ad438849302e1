"""StrategyAdapter: what restructuring asks of the Lightning strategy, checked against references."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

import pb_lightning as pb
from pb_lightning.cycle.driver import CycleDriver
from pb_lightning.demos.digits import DigitsDataModule, DigitsMLP
from pb_lightning.lightning.strategy import StrategyAdapter
from tests.helpers import fast_trainer


def _fake_trainer(strategy: Any, **extra: Any) -> Any:
    return SimpleNamespace(strategy=strategy, world_size=1, **extra)


def test_a_strategy_that_shards_parameters_is_refused_by_name() -> None:
    class ShardingStrategy:
        pass

    with pytest.raises(pb.PerforationError, match="got ShardingStrategy"):
        StrategyAdapter().setup(_fake_trainer(ShardingStrategy()), DigitsMLP(hidden=4))


def test_manual_optimization_is_refused() -> None:
    module = DigitsMLP(hidden=4)
    module.automatic_optimization = False
    strategy = pl.strategies.SingleDeviceStrategy(device=torch.device("cpu"))
    with pytest.raises(pb.PerforationError, match="needs automatic optimization"):
        StrategyAdapter().setup(_fake_trainer(strategy), module)


def test_where_shares_rank_zeros_inputs_through_the_strategys_broadcast() -> None:
    sent: list[tuple[Any, int]] = []

    class Strategy:
        def broadcast(self, value: Any, src: int = 0) -> Any:
            sent.append((value, src))
            return ("from rank 0", value)

    where = StrategyAdapter.where(_fake_trainer(Strategy(), current_epoch=3, global_step=40))
    assert (where["epoch"], where["global_step"]) == (3, 40)
    assert where["share"]((0.5, None)) == ("from rank 0", (0.5, None))
    assert sent == [((0.5, None), 0)]


def test_the_coverage_check_names_the_parameters_no_optimizer_holds() -> None:
    module = DigitsMLP(hidden=4)
    module.configure_model()
    names = [name for name, p in module.named_parameters() if p.requires_grad]
    held = dict(module.named_parameters())
    trainer = SimpleNamespace(optimizers=[torch.optim.SGD([held[n] for n in names[2:]], lr=0.1)])
    with pytest.raises(
        pb.PerforationError, match=rf"2 trainable parameters are not in any optimizer: {names[0]}, {names[1]}\."
    ):
        StrategyAdapter.check_optimizer_coverage(trainer, module)  # type: ignore[arg-type]
    trainer.optimizers.append(torch.optim.SGD([held[n] for n in names[:2]], lr=0.1))
    StrategyAdapter.check_optimizer_coverage(trainer, module)  # type: ignore[arg-type]


def test_before_backward_tells_the_candidates_the_scalers_scale_in_a_dendrite_phase() -> None:
    module = DigitsMLP(hidden=4)
    module.configure_model()
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=SimpleNamespace(get_scale=lambda: 64.0)))
    StrategyAdapter.before_backward(trainer, module)  # type: ignore[arg-type]  # neuron phase: nothing to tell
    module.start_dendrite_phase()
    StrategyAdapter.before_backward(trainer, module)  # type: ignore[arg-type]
    scales = [layer.candidates.loss_scale for layer in module.perforated_layers() if layer.candidates is not None]
    assert scales == [64.0] * len(module.perforated_layers())


class _Restructure(pl.Callback):
    """Starts a dendrite phase at the end of epoch 0 and restructures through the adapter."""

    def __init__(self, mode: str) -> None:
        self.adapter, self.driver = StrategyAdapter(), CycleDriver("min", optimizer_state=mode)  # type: ignore[arg-type]
        self.before: dict[str, Any] = {}
        self.after: list[torch.optim.Optimizer] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.adapter.fit_start(trainer, pl_module, self.driver)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != 0:
            return
        (optimizer,) = trainer.optimizers
        self.before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
        pl_module.start_dendrite_phase()  # type: ignore[operator]
        self.adapter.restructure(trainer, pl_module, self.driver)
        self.after = list(trainer.optimizers)


@pytest.mark.parametrize("mode", ["reset", "carry"])
def test_restructure_rebuilds_an_optimizer_over_what_the_phase_trains(tmp_path: Path, mode: str) -> None:
    pl.seed_everything(0)
    module, spy = DigitsMLP(hidden=4, lr=1e-2), _Restructure(mode)
    fast_trainer(tmp_path, [spy], max_epochs=1, limit_train_batches=2, limit_val_batches=1).fit(
        module, DigitsDataModule()
    )
    (optimizer,) = spy.after
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == trainable  # the reference: exactly what the dendrite phase trains
    # The dendrite phase trains only candidates, which are new: nothing to carry in either mode,
    # and the network's moments are kept aside (by name) when carrying.
    assert not optimizer.state
    kept = spy.driver.carrier.saved
    assert bool(kept) == (mode == "carry")
    if mode == "carry":
        network = dict(module.named_parameters())
        for name, state in kept.items():
            assert torch.equal(state["exp_avg"], spy.before[id(network[name])]["exp_avg"])
