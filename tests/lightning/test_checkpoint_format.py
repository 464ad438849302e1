"""Checkpoints that last: format versions, an old-format fixture, compact snapshots, structure checks,
and a last.ckpt that holds the model the run leaves."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import pb_lightning as pb
from pb_lightning.cycle.controller import CycleController
from pb_lightning.cycle.machine import PhaseMachine
from pb_lightning.cycle.schedule import PhaseSchedule
from pb_lightning.demos.digits import DigitsDataModule, DigitsMLP
from pb_lightning.lightning.module import CHECKPOINT_VERSION
from tests.helpers import fast_trainer

_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
_OLD = _FIXTURES / "format_v0_dendrite_phase.ckpt"


def _trainer(root: Path, callbacks: list[pl.Callback], max_epochs: int) -> pl.Trainer:
    return fast_trainer(root, callbacks, max_epochs, limit_train_batches=3, enable_checkpointing=True)


def _callback(**kwargs: Any) -> pb.PerforatedCallback:
    options = {"neuron_epochs": 1, "dendrite_epochs": 1, "max_dendrites": 3}
    options.update(kwargs)
    return pb.PerforatedCallback("val_loss", "min", **options)


def test_the_old_format_fixture_loads_with_the_outputs_it_was_written_with() -> None:
    expected = torch.load(_FIXTURES / "format_v0_dendrite_phase_outputs.pt", weights_only=True)
    model = DigitsMLP.load_from_checkpoint(_OLD, weights_only=True)
    model.eval()
    assert model.in_dendrite_phase
    assert [layer.num_dendrites for layer in model.perforated_layers()] == expected["dendrites"]
    with torch.no_grad():
        assert torch.equal(model(expected["input"]), expected["output"])


def test_a_run_resumes_from_the_old_format_fixture(tmp_path: Path) -> None:
    old = torch.load(_OLD, weights_only=True)
    old_state = next(v for k, v in old["callbacks"].items() if k.startswith("PerforatedCallback"))
    old_actions = [h["action"] for h in old_state["machine"]["state"]["history"]]
    callback = _callback()
    trainer = _trainer(tmp_path, [callback], max_epochs=5)
    trainer.fit(DigitsMLP(hidden=4, lr=1e-2), DigitsDataModule(), ckpt_path=_OLD)
    actions = [h["action"] for h in callback.machine.state.history]
    assert actions[: len(old_actions)] == old_actions  # the old history was kept
    assert len(actions) == len(old_actions) + 2  # and epochs 3 and 4 were added to it


def test_a_checkpoint_from_a_newer_format_is_refused_by_name(tmp_path: Path) -> None:
    checkpoint = torch.load(_OLD, weights_only=True)
    checkpoint["pb_lightning"]["version"] = CHECKPOINT_VERSION + 1
    path = tmp_path / "newer.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(pb.PerforationError, match=f"format version {CHECKPOINT_VERSION + 1}, newer"):
        DigitsMLP.load_from_checkpoint(path, weights_only=True)


def test_weights_that_do_not_rebuild_the_recorded_structure_are_an_error(tmp_path: Path) -> None:
    checkpoint = torch.load(_OLD, weights_only=True)
    checkpoint["pb_lightning"]["layers"][1]["dendrites"] = 2  # the record says 2, the tensors hold 1
    path = tmp_path / "mixed.ckpt"
    torch.save(checkpoint, path)
    wrong = r"net\.2: recorded 2 dendrite sets and 4 candidates, rebuilt \(1, 4\)"
    with pytest.raises(pb.PerforationError, match=wrong):
        DigitsMLP.load_from_checkpoint(path, weights_only=True)


def _ckpt_state(path: Path) -> dict[str, Any]:
    checkpoint = torch.load(path, weights_only=True)
    return next(v for k, v in checkpoint["callbacks"].items() if k.startswith("PerforatedCallback"))


def test_the_history_and_snapshots_are_stored_once(tmp_path: Path) -> None:
    callback = _callback(max_dendrites=1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    model = DigitsMLP(hidden=4, lr=1e-2)
    _trainer(tmp_path, [callback, checkpoint], max_epochs=2).fit(model, DigitsDataModule())
    # Epoch 0 ended the first neuron phase: its best became the global best, and the model was
    # left at it (plus candidates): no snapshot is stored, only which of the weights it is.
    path = next((tmp_path / "ckpt").glob("epoch=0-*.ckpt"))
    state = _ckpt_state(path)
    assert state["version"] == CHECKPOINT_VERSION
    assert state["phase_best"] is None
    assert state["phase_best_is_global_best"]
    assert state["global_best"] is None
    assert "net.0.module.weight" in state["global_best_keys_from_model"]
    assert not any(".candidates." in key for key in state["global_best_keys_from_model"])
    assert state["machine"]["state"]["history"] == []
    assert [row["action"] for row in state["recorder"]["rows"]] == ["start_dendrite_phase"]
    # Loading rebuilds them: the history from the rows, the snapshots from the loaded weights.
    loaded = DigitsMLP.load_from_checkpoint(path, weights_only=True)
    fresh = _callback(max_dendrites=1)
    fresh._module = loaded
    fresh.load_state_dict(state)
    assert [h["action"] for h in fresh.machine.state.history] == ["start_dendrite_phase"]
    assert fresh.machine.state.history[0]["score"] == state["recorder"]["rows"][0]["score"]
    assert fresh.driver.controller.phase_best is fresh.driver.controller.global_best
    weights = loaded.state_dict()
    assert fresh.driver.controller.global_best.keys() == set(state["global_best_keys_from_model"])
    for key, value in fresh.driver.controller.global_best.items():
        assert value.device.type == "cpu"
        assert torch.equal(value, weights[key])
    # Later in the cycle (epoch 1: candidates trained, the accepted set not yet judged), the
    # global best differs from the model and is stored in full.
    later = _ckpt_state(next((tmp_path / "ckpt").glob("epoch=1-*.ckpt")))
    assert later["global_best"] is not None
    assert all(v.device.type == "cpu" for v in later["global_best"].values())


def test_snapshots_are_kept_on_the_cpu() -> None:
    model = pb.perforate(torch.nn.Sequential(torch.nn.Linear(3, 2)))
    controller = CycleController(PhaseMachine("min", PhaseSchedule(neuron_epochs=1)))
    controller.step(model, 1.0, None)
    assert controller.global_best is not None
    assert all(v.device.type == "cpu" for v in controller.global_best.values())
    # a copy, not a view of the live weights
    weight = next(iter(model.parameters()))
    with torch.no_grad():
        weight.add_(1.0)
    assert not torch.equal(controller.global_best["0.module.weight"], weight)


def test_last_ckpt_holds_the_model_fit_leaves_when_max_epochs_ends_a_cycle(tmp_path: Path) -> None:
    # neuron_epochs=1, dendrite_epochs=1: epoch 0 starts a dendrite phase, epoch 1 accepts, epoch 2
    # starts the next dendrite phase (candidates) — and max_epochs=3 ends the run there.
    callback = _callback()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=1, every_n_epochs=1)
    model = DigitsMLP(hidden=4, lr=1e-2)
    _trainer(tmp_path, [callback, checkpoint], max_epochs=3).fit(model, DigitsDataModule())
    assert not model.in_dendrite_phase  # the final restore dropped the candidates
    last = DigitsMLP.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert not last.in_dendrite_phase
    assert [layer.num_dendrites for layer in last.perforated_layers()] == [
        layer.num_dendrites for layer in model.perforated_layers()
    ]
    for (name, theirs), ours in zip(last.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(theirs, ours), name
    assert _ckpt_state(tmp_path / "ckpt" / "last.ckpt")["machine"]["state"]["done"]


def test_fit_on_a_finished_run_trains_no_step_and_keeps_the_weights(tmp_path: Path) -> None:
    callback = _callback(max_dendrites=1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=1, every_n_epochs=1)
    model = DigitsMLP(hidden=4, lr=1e-2)
    _trainer(tmp_path, [callback, checkpoint], max_epochs=20).fit(model, DigitsDataModule())
    assert callback.machine.state.done
    finished = {k: v.clone() for k, v in model.state_dict().items()}
    shutil.copy(tmp_path / "ckpt" / "last.ckpt", tmp_path / "finished.ckpt")

    steps: list[int] = []

    class Count(pl.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            steps.append(1)

    resumed_model = DigitsMLP(hidden=4, lr=1e-2)
    resumed = _callback(max_dendrites=1)
    _trainer(tmp_path / "again", [resumed, Count()], max_epochs=20).fit(
        resumed_model, DigitsDataModule(), ckpt_path=tmp_path / "finished.ckpt"
    )
    assert steps == []
    assert resumed.machine.state.history == callback.machine.state.history
    for name, value in resumed_model.state_dict().items():
        assert torch.equal(value, finished[name]), name


# ---------------------------------------------------------------------- format 1 (before the cycle driver)
def test_a_run_resumes_from_the_format_1_fixture_with_the_same_decisions_and_outputs(tmp_path: Path) -> None:
    # Written by tests/fixtures/make_format_v1.py on the code before the cycle driver: the
    # machine's history blanked, the recorder's rows holding it, optimizer_state="carry".
    from tests.fixtures import make_format_v1 as v1

    expected = torch.load(v1.EXPECTED, weights_only=True)["callback"]
    got = v1.resume_callback(v1.CALLBACK_CKPT, tmp_path)
    assert got["decisions"] == expected["decisions"]
    assert got["best_score"] == expected["best_score"]
    torch.testing.assert_close(got["output"], expected["output"], rtol=1e-5, atol=1e-6)
