"""optimizer_state under PerforatedCallback: carry continues Adam and the schedule across restructures,
reset restarts them."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor

import pb_lightning as pb
from pb_lightning.demos.digits import DigitsDataModule, DigitsMLP
from tests.helpers import fast_trainer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

_trainer = fast_trainer


class _CosineAdam(DigitsMLP):
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.dendrite_parameter_groups(candidate_lr=self.candidate_lr), lr=self.lr)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 5)}


class _OptimizerSpy(pl.Callback):
    """Each epoch's LRs by group; at its end (before PerforatedCallback decides) Adam's step counts."""

    def __init__(self) -> None:
        self.lrs: list[dict[str, float]] = []
        self.steps: list[dict[str, int | None]] = []
        self.moments: dict[int, Tensor] = {}

    def _state(self, trainer: pl.Trainer, param: Tensor | None) -> dict[str, Any]:
        return trainer.optimizers[0].state.get(param, {}) if param is not None else {}

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.lrs.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})  # what the epoch uses
        state = self._state(trainer, pl_module.perforated_layers()[0].module.weight)
        if "exp_avg" in state:
            self.moments[trainer.current_epoch] = state["exp_avg"].clone()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layer = pl_module.perforated_layers()[0]
        candidates = layer.candidates.bank.weight if layer.candidates is not None else None
        steps = {}
        for key, param in (("network", layer.module.weight), ("w", layer.output_weight), ("candidates", candidates)):
            state = self._state(trainer, param)
            steps[key] = int(state["step"]) if "step" in state else None
        self.steps.append(steps)
        if "exp_avg" in self._state(trainer, layer.module.weight):
            self.moments[-trainer.current_epoch - 1] = self._state(trainer, layer.module.weight)["exp_avg"].clone()


def _cosine_run(tmp_path: Path, optimizer_state: str) -> _OptimizerSpy:
    pl.seed_everything(0)
    spy = _OptimizerSpy()
    callback = pb.PerforatedCallback(
        "val_loss", "min", neuron_epochs=2, dendrite_epochs=1, max_dendrites=1, optimizer_state=optimizer_state
    )
    trainer = _trainer(tmp_path, [spy, callback], max_epochs=5, limit_train_batches=3)
    model = _CosineAdam(hidden=8, lr=1e-2, dendrites=pb.DendriteConfig(warmup_steps=0))  # candidates step at once
    trainer.fit(model, DigitsDataModule())
    assert [h["action"] for h in callback.machine.state.history][1:3] == ["start_dendrite_phase", "accept"]
    return spy


def _cosine(base: float, epoch: int, t_max: int = 5) -> float:
    return base * (1 + math.cos(math.pi * epoch / t_max)) / 2


def test_carry_continues_adam_and_the_cosine_schedule_across_restructures(tmp_path: Path) -> None:
    spy = _cosine_run(tmp_path, "carry")
    # Adam's step count of a network weight continues over the dendrite phase (3 batches an epoch) ...
    assert [s["network"] for s in spy.steps] == [3, 6, None, 9, 12]
    # ... with the very moments it had when the dendrite phase froze it.
    torch.testing.assert_close(spy.moments[3], spy.moments[-2], rtol=0, atol=0)
    # New parameters start fresh: the candidates, and the dendrite output weights after acceptance.
    assert spy.steps[2]["candidates"] == 3
    assert [s["w"] for s in spy.steps[3:]] == [3, 6]
    # Every group follows one cosine over the whole run, from its own base rate.
    for epoch, lrs in enumerate(spy.lrs):
        for name, lr in lrs.items():
            base = 0.1 if name == "candidates" else 1e-2
            assert lr == pytest.approx(_cosine(base, epoch), rel=1e-6), (epoch, name)


def test_reset_restarts_adam_and_the_schedule_at_every_restructure(tmp_path: Path) -> None:
    spy = _cosine_run(tmp_path, "reset")
    assert [s["network"] for s in spy.steps] == [3, 6, None, 3, 6]
    assert spy.steps[2]["candidates"] == 3
    assert spy.lrs[2]["candidates"] == pytest.approx(0.1)  # the schedule began again
    assert spy.lrs[3]["network"] == pytest.approx(1e-2)


def test_the_carried_state_of_a_frozen_network_is_in_the_callback_checkpoint_state(tmp_path: Path) -> None:

    captured: dict[str, Any] = {}

    class Capture(pl.Callback):
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if pl_module.in_dendrite_phase and not captured:
                captured.update(callback.state_dict())

    pl.seed_everything(0)
    callback = pb.PerforatedCallback(
        "val_loss", "min", neuron_epochs=2, dendrite_epochs=1, max_dendrites=1, optimizer_state="carry"
    )
    _trainer(tmp_path, [Capture(), callback], max_epochs=3, limit_train_batches=3).fit(
        _CosineAdam(hidden=8, lr=1e-2), DigitsDataModule()
    )
    saved = captured["optimizer_carry"]["saved"]
    assert "net.0.module.weight" in saved
    assert int(saved["net.0.module.weight"]["step"]) == 6
    assert saved["net.0.module.weight"]["exp_avg"].device.type == "cpu"
    buffer = io.BytesIO()
    torch.save(captured, buffer)
    buffer.seek(0)
    fresh = pb.PerforatedCallback("val_loss", "min", optimizer_state="carry")
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.state_dict()["optimizer_carry"]["saved"].keys() == saved.keys()
    assert "optimizer_carry" not in pb.PerforatedCallback("val_loss", "min").state_dict()


@pytest.mark.parametrize("bad", ["keep", None, True])
def test_optimizer_state_is_checked_early(bad: Any) -> None:
    with pytest.raises(pb.PerforationError, match=r"`optimizer_state` must be 'reset' .* or 'carry'"):
        pb.PerforatedCallback("val_loss", "min", optimizer_state=bad)
    with pytest.raises(pb.PerforationError, match=r"`optimizer_state` must be"):
        pb.PerforatedTracker("max", optimizer_state=bad)


def test_carry_survives_a_resume_from_a_mid_dendrite_phase_checkpoint(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(max_epochs: int, ckpt_path: str | None) -> _OptimizerSpy:
        pl.seed_everything(0)
        spy = _OptimizerSpy()
        callback = pb.PerforatedCallback(
            "val_loss", "min", neuron_epochs=2, dendrite_epochs=2, max_dendrites=1, optimizer_state="carry"
        )
        saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
        trainer = _trainer(
            tmp_path, [spy, callback, saver], max_epochs=max_epochs, limit_train_batches=3, enable_checkpointing=True
        )
        model = _CosineAdam(hidden=8, lr=1e-2, dendrites=pb.DendriteConfig(warmup_steps=0))
        trainer.fit(model, DigitsDataModule(), ckpt_path=ckpt_path)
        return spy

    run(3, None)  # stops (max_epochs) after the first epoch of the dendrite phase
    # last.ckpt holds the finished run (the final restore dropped the candidates); the epoch's own
    # checkpoint holds the mid-dendrite-phase state, from which a longer run continues.
    (epoch_file,) = tmp_path.glob("epoch=2-*.ckpt")
    resumed = run(5, str(epoch_file))
    # Epoch 3 ends the dendrite phase; in epoch 4 the network's Adam state goes on from its 6 steps.
    assert [s["network"] for s in resumed.steps] == [None, 9]
    assert [s["w"] for s in resumed.steps] == [None, 3]
