"""The whole cycle inside trainer.fit: decisions, restructuring, checkpoints, the capacity test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from torch.utils.data import DataLoader, TensorDataset

import pb_lightning as pb
from pb_lightning.cycle.decision import ACCEPT, START_DENDRITE_PHASE, STOP
from pb_lightning.demos.digits import DigitsDataModule, DigitsMLP
from tests.helpers import fast_trainer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


_trainer = fast_trainer


def _fixed(**kwargs: Any) -> pb.PerforatedCallback:
    """A fixed-length schedule, so the decisions do not depend on the exact scores."""
    options = {"neuron_epochs": 2, "dendrite_epochs": 2, "max_dendrites": 2, "monitor": "val_loss", "mode": "min"}
    options.update(kwargs)
    return pb.PerforatedCallback(**options)


def test_a_full_cycle_accepts_dendrites_and_trains_them(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = DigitsMLP(hidden=8, lr=1e-2)
    seen: dict[str, torch.Tensor] = {}

    class Spy(pl.Callback):
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            layer = pl_module.perforated_layers()[0]
            if layer.candidates is not None and "candidates" not in seen:
                seen["candidates"] = layer.candidates.bank.weight.detach().clone()
                seen["candidate_param"] = layer.candidates.bank.weight
            if layer.output_weight is not None and "w" not in seen:
                seen["w"] = layer.output_weight.detach().clone()
                seen["w_param"] = layer.output_weight

    callback = pb.PerforatedCallback("val_loss", "min", neuron_epochs=8, dendrite_epochs=3, max_dendrites=1)
    trainer = _trainer(tmp_path, [callback, Spy()], max_epochs=40)
    trainer.fit(model, DigitsDataModule())
    actions = [h["action"] for h in callback.machine.state.history if h["action"] != "continue"]
    assert actions == [START_DENDRITE_PHASE, ACCEPT, STOP]
    assert [layer.num_dendrites for layer in model.perforated_layers()] == [1, 1, 1]
    assert callback.machine.state.accepted_cycles == 1
    assert trainer.current_epoch == 8 + 3 + 8  # stopped by the machine, not max_epochs
    # New parameters reached the optimizer and trained: candidates in the dendrite phase ...
    assert not torch.equal(seen["candidate_param"], seen["candidates"])
    # ... and the dendrite output weights, which start at exactly 0, after acceptance.
    assert torch.equal(seen["w"], torch.zeros_like(seen["w"]))
    assert seen["w_param"] is model.perforated_layers()[0].output_weight
    assert model.perforated_layers()[0].output_weight.abs().sum() > 0
    # The final model is the global best.
    result = trainer.validate(model, DigitsDataModule(), verbose=False)[0]
    assert result["val_loss"] == pytest.approx(callback.best_score, rel=1e-5)
    assert callback.best_score == callback.machine.state.global_best


def test_the_score_is_flat_during_the_dendrite_phase(tmp_path: Path) -> None:
    pl.seed_everything(0)
    callback = _fixed(dendrite_epochs=3, max_dendrites=1)
    _trainer(tmp_path, [callback], max_epochs=6).fit(DigitsMLP(hidden=8, lr=1e-2), DigitsDataModule())
    history = callback.machine.state.history
    start = next(i for i, h in enumerate(history) if h["action"] == START_DENDRITE_PHASE)
    dendrite_scores = [h["score"] for h in history[start + 1 : start + 4]]
    # Restored to the phase best, then frozen: every dendrite-phase validation gives that score.
    assert len(set(dendrite_scores)) == 1
    assert dendrite_scores[0] == pytest.approx(min(h["score"] for h in history[: start + 1]), rel=1e-6)


def test_a_failed_cycle_is_rolled_back_and_retried(tmp_path: Path) -> None:
    pl.seed_everything(0)
    # An absolute threshold no cycle can beat: every cycle fails.
    callback = _fixed(max_tries=2, improvement_threshold_abs=10.0, max_dendrites=5)
    model = DigitsMLP(hidden=8, lr=1e-2)
    trainer = _trainer(tmp_path, [callback], max_epochs=30)
    trainer.fit(model, DigitsDataModule())
    actions = [h["action"] for h in callback.machine.state.history if h["action"] != "continue"]
    assert actions == [START_DENDRITE_PHASE, ACCEPT, "retry", ACCEPT, STOP]
    assert [layer.num_dendrites for layer in model.perforated_layers()] == [0, 0, 0]
    assert callback.machine.state.rejected_cycles == 2
    assert not model.in_dendrite_phase
    assert all(p.requires_grad for p in model.parameters())


def _checkpointed_run(tmp_path: Path, max_epochs: int) -> tuple[pb.PerforatedCallback, DigitsMLP, ModelCheckpoint]:
    pl.seed_everything(0)
    callback = _fixed()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    model = DigitsMLP(hidden=8, lr=1e-2)
    trainer = _trainer(tmp_path, [callback, checkpoint], max_epochs=max_epochs, enable_checkpointing=True)
    trainer.fit(model, DigitsDataModule())
    return callback, model, checkpoint


def test_resume_from_a_mid_dendrite_phase_checkpoint(tmp_path: Path) -> None:
    full, full_model, _ = _checkpointed_run(tmp_path / "full", max_epochs=12)
    # Epochs 0-1 neuron, 2-3 dendrite: the checkpoint of epoch 2 is one epoch into the dendrite phase.
    _, _, checkpoint = _checkpointed_run(tmp_path / "part", max_epochs=3)
    path = tmp_path / "part" / "ckpt" / "epoch=2-step=51.ckpt"
    assert path.exists(), sorted(p.name for p in path.parent.iterdir())
    resumed = _fixed()
    model = DigitsMLP(hidden=8, lr=1e-2)
    trainer = _trainer(tmp_path / "resumed", [resumed], max_epochs=12)
    trainer.fit(model, DigitsDataModule(), ckpt_path=path)
    assert [h["action"] for h in resumed.machine.state.history] == [h["action"] for h in full.machine.state.history]
    assert [layer.num_dendrites for layer in model.perforated_layers()] == [
        layer.num_dendrites for layer in full_model.perforated_layers()
    ]


@pytest.mark.filterwarnings("ignore:Found .* module.* in eval mode")
def test_a_model_left_in_eval_mode_trains_through_its_dendrite_phase(tmp_path: Path) -> None:
    # E.g. a trained model evaluated by hand before fit: Lightning keeps the modes (and only
    # warns), so the dendrite phase's backward pass must reach the candidates in eval mode too.
    pl.seed_everything(0)
    model = DigitsMLP(hidden=8, lr=1e-2)
    model.configure_model()
    model.eval()
    callback = _fixed(max_dendrites=1)
    _trainer(tmp_path, [callback], max_epochs=4).fit(model, DigitsDataModule())
    assert [h["action"] for h in callback.machine.state.history][1:] == [START_DENDRITE_PHASE, "continue", ACCEPT]
    assert callback.machine.state.candidate_best > 0  # the candidates learned a correlation


class _ShuffledBySeedAndEpoch(DigitsDataModule):
    def train_dataloader(self) -> DataLoader:
        data = self._splits["train"]
        return DataLoader(data, batch_size=self.batch_size, sampler=pb.EpochShuffleSampler(data, seed=0))


def _shuffled_run(root: Path, max_epochs: int, ckpt_path: Path | None = None) -> DigitsMLP:
    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1)
    model = DigitsMLP(hidden=8, lr=1e-2)
    trainer = _trainer(root, [_fixed(max_dendrites=1), checkpoint], max_epochs=max_epochs, enable_checkpointing=True)
    trainer.fit(model, _ShuffledBySeedAndEpoch(), ckpt_path=ckpt_path)
    return model


def test_a_resumed_run_with_the_epoch_shuffle_sampler_ends_at_the_same_weights(tmp_path: Path) -> None:
    # DataLoader(shuffle=True) keeps its generator out of the checkpoint, so a resumed run sees
    # other batch orders; EpochShuffleSampler's order is a function of (seed, epoch) alone.
    full = _shuffled_run(tmp_path / "full", max_epochs=6)
    _shuffled_run(tmp_path / "part", max_epochs=3)  # "killed" one epoch into the dendrite phase
    resumed = _shuffled_run(tmp_path / "resumed", 6, tmp_path / "part" / "ckpt" / "epoch=2-step=51.ckpt")
    expected, got = full.state_dict(), resumed.state_dict()
    assert list(got) == list(expected)
    assert all(torch.equal(got[key], expected[key]) for key in expected)
    assert [layer.num_dendrites for layer in resumed.perforated_layers()] == [
        layer.num_dendrites for layer in full.perforated_layers()
    ]


def _steps_callback() -> pb.PerforatedCallback:
    # Candidates converge (5% rule, 3 steps) long before the validation patience of 50 would end the phase.
    return pb.PerforatedCallback(
        "val_loss",
        "min",
        neuron_epochs=3,
        dendrite_patience=50,
        dendrite_patience_steps=3,
        candidate_plateau_fraction=0.05,
        max_dendrites=2,
    )


def test_a_dendrite_phase_ends_mid_epoch_once_its_candidates_converge(tmp_path: Path) -> None:
    pl.seed_everything(0)
    seen: list[tuple[int, int, bool]] = []
    steps: list[int] = []  # trainer.global_step after each training batch, in the order of `seen`

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            seen.append((trainer.current_epoch, args[-1], pl_module.in_dendrite_phase))
            steps.append(trainer.global_step)

    callback = _steps_callback()
    model = DigitsMLP(hidden=8, lr=1e-2)
    trainer = _trainer(tmp_path, [callback, Spy()], max_epochs=20)
    trainer.fit(model, DigitsDataModule())
    accepts = [h for h in callback.machine.state.history if h["action"] == ACCEPT]
    assert len(accepts) == 2
    assert all("training steps" in h["reason"] for h in accepts)
    # Each dendrite phase ended inside an epoch: a batch in the dendrite phase, then the rest of
    # that epoch's batches in the neuron phase, and no validation in between.
    for epoch in {e for e, _, dendrite in seen if dendrite}:
        phases = [dendrite for e, _, dendrite in seen if e == epoch]
        assert phases == sorted(phases, reverse=True), phases
        assert not phases[-1], phases
    # Each mid-epoch accept shares its validation number with the validation before it; its row
    # says the training step it came at: the batch where the phase switched (the spy runs after
    # the callback, so it sees that batch already in the neuron phase). Every other row comes at
    # the end of its epoch, at that epoch's last step.
    switched = [steps[i] for i in range(1, len(seen)) if seen[i - 1][2] and not seen[i][2]]
    epoch_ends = [steps[i] for i in range(len(seen)) if i + 1 == len(seen) or seen[i + 1][0] != seen[i][0]]
    history = callback.machine.state.history
    mid_epoch = [i for i, h in enumerate(history) if h["action"] == ACCEPT]
    assert [history[i]["global_step"] for i in mid_epoch] == switched
    assert [h["global_step"] for i, h in enumerate(history) if i not in mid_epoch] == epoch_ends
    for i in mid_epoch:
        assert history[i - 1]["validation"] == history[i]["validation"]
        assert history[i - 1]["global_step"] < history[i]["global_step"]
    assert [(h["validation"], h["global_step"]) for h in history] == sorted(
        {(h["validation"], h["global_step"]) for h in history}
    )
    rows = [r for r in callback.driver.history.rows if r["action"] != "end"]
    assert [r["global_step"] for r in rows] == [h["global_step"] for h in history]
    assert callback.driver.history.rows[-1]["global_step"] == steps[-1]
    assert [layer.num_dendrites for layer in model.perforated_layers()] == [2, 2, 2]
    assert model.perforated_layers()[0].output_weight.abs().sum() > 0  # trained after the mid-epoch accept
    held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in model.parameters() if p.requires_grad} <= held
    result = trainer.validate(model, DigitsDataModule(), verbose=False)[0]
    assert result["val_loss"] == pytest.approx(callback.best_score, rel=1e-5)


def test_load_from_checkpoint_rebuilds_the_structure_at_any_point(tmp_path: Path) -> None:
    callback, model, _ = _checkpointed_run(tmp_path, max_epochs=7)
    x = torch.randn(5, 64)
    for epoch, phase in ((2, True), (4, False), (6, True)):
        path = next((tmp_path / "ckpt").glob(f"epoch={epoch}-*.ckpt"))
        loaded = DigitsMLP.load_from_checkpoint(path)
        assert loaded.in_dendrite_phase is phase
        frozen = {n for n, p in loaded.named_parameters() if not p.requires_grad}
        assert ("net.0.module.weight" in frozen) is phase
    loaded = DigitsMLP.load_from_checkpoint(next((tmp_path / "ckpt").glob("epoch=6-*.ckpt")))
    model.eval()
    loaded.eval()
    assert [layer.num_dendrites for layer in loaded.perforated_layers()] == [1, 1, 1]
    assert torch.equal(loaded(x), model(x))
    del callback


def test_the_capacity_test_adds_three_sets_and_reports_no_problems(tmp_path: Path, caplog: Any) -> None:
    pl.seed_everything(0)
    callback = pb.PerforatedCallback("val_loss", "min", capacity_test=True)
    model = DigitsMLP(hidden=8, lr=1e-2)
    with caplog.at_level("INFO"):
        _trainer(tmp_path, [callback], max_epochs=10).fit(model, DigitsDataModule())
    assert callback.capacity_problems == []
    assert [layer.num_dendrites for layer in model.perforated_layers()] == [3, 3, 3]
    assert "3 dendrite sets added; no problems detected" in caplog.text


class _Unloadable(DigitsMLP):
    """Does not save its hyperparameters' class correctly: a fresh instance cannot be rebuilt."""

    def __init__(self, required: int) -> None:
        super().__init__(hidden=8, lr=1e-2)
        self.save_hyperparameters(ignore=["required"])


# The problem found is also reported as a warning at the end of the fit; the test reads it from the callback.
@pytest.mark.filterwarnings("ignore:pb_lightning capacity test found problems:UserWarning")
def test_the_capacity_test_names_the_problem_it_finds(tmp_path: Path) -> None:
    pl.seed_everything(0)
    callback = pb.PerforatedCallback("val_loss", "min", capacity_test=True)
    _trainer(tmp_path, [callback], max_epochs=7).fit(_Unloadable(1), DigitsDataModule())
    assert callback.capacity_problems
    assert all("checkpoint saved after restructuring did not load" in p for p in callback.capacity_problems)


def test_the_capacity_test_needs_enough_epochs(tmp_path: Path) -> None:
    callback = pb.PerforatedCallback(capacity_test=True)
    with pytest.raises(pb.PerforationError, match=r"Trainer.max_epochs` must be >= 7.*got 3"):
        _trainer(tmp_path, [callback], max_epochs=3).fit(DigitsMLP(), DigitsDataModule())


class _StaleOptimizer(DigitsMLP):
    """Builds its optimizer once, like LightningCLI's --optimizer flag does."""

    def configure_optimizers(self) -> Any:
        if not hasattr(self, "_optimizer"):
            self._optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        return self._optimizer


def test_an_optimizer_that_misses_new_parameters_is_named(tmp_path: Path) -> None:
    callback = _fixed()
    with pytest.raises(pb.PerforationError, match=r"trainable parameters are not in any optimizer: net\.0\.candidates"):
        _trainer(tmp_path, [callback], max_epochs=4).fit(_StaleOptimizer(), DigitsDataModule())


def test_the_callback_needs_a_perforated_module(tmp_path: Path) -> None:
    with pytest.raises(pb.PerforationError, match=r"needs a pb_lightning.PerforatedModule; got BoringModel"):
        _trainer(tmp_path, [_fixed()], max_epochs=1).fit(BoringModel())


def test_a_missing_monitor_is_named_with_what_was_logged(tmp_path: Path) -> None:
    with pytest.raises(pb.PerforationError, match=r"monitor='val_accuracy'.*\['train_loss', 'val_acc', 'val_loss'\]"):
        _trainer(tmp_path, [_fixed(monitor="val_accuracy")], max_epochs=1).fit(DigitsMLP(), DigitsDataModule())


def test_a_missing_monitor_is_named_at_the_sanity_check(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, [_fixed(monitor="val_los")], max_epochs=1, num_sanity_val_steps=1)
    with pytest.raises(
        pb.PerforationError, match=r"not logged at the sanity check.*Close to 'val_los': \['val_loss'\]"
    ):
        trainer.fit(DigitsMLP(), DigitsDataModule())
    assert trainer.global_step == 0  # before any training


class _TwoValidationSets(DigitsDataModule):
    def val_dataloader(self) -> list[DataLoader]:
        return [super().val_dataloader(), super().val_dataloader()]


class _LossPerLoader(DigitsMLP):
    def validation_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))


def test_a_monitor_logged_per_dataloader_names_the_keys_it_was_logged_as(tmp_path: Path) -> None:
    with pytest.raises(pb.PerforationError) as raised:
        _trainer(tmp_path, [_fixed()], max_epochs=1).fit(_LossPerLoader(), _TwoValidationSets())
    message = str(raised.value)
    assert "['val_loss/dataloader_idx_0', 'val_loss/dataloader_idx_1']" in message
    assert "add_dataloader_idx=False" in message
    assert "Log it in `validation_step`" not in message


class _EmptyValidationSet(DigitsDataModule):
    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(0, 64), torch.zeros(0, dtype=torch.long)), batch_size=4)


@pytest.mark.filterwarnings("ignore:Total length of `DataLoader` across ranks is zero")
def test_a_validation_without_a_score_is_reported_once(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"validation of epoch 0 produced no 'val_loss' score.*no batches") as seen:
        _trainer(tmp_path, [_fixed()], max_epochs=3).fit(DigitsMLP(), _EmptyValidationSet())
    assert sum("produced no 'val_loss' score" in str(w.message) for w in seen) == 1


def test_no_validation_loop_is_refused(tmp_path: Path) -> None:
    with pytest.raises(pb.PerforationError, match=r"no validation loop"):
        _trainer(tmp_path, [_fixed()], max_epochs=1, limit_val_batches=0).fit(DigitsMLP(), DigitsDataModule())


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"monitor": ""}, r"`monitor` must be the name of a logged validation metric"),
        ({"mode": "up"}, r"`mode` must be 'min' or 'max'; got 'up'"),
        ({"neuron_patience": 0}, r"neuron_patience` must be an int >= 1; got 0"),
        ({"capacity_test": "yes"}, r"`capacity_test` must be a bool"),
    ],
)
def test_callback_misconfiguration(kwargs: dict, pattern: str) -> None:
    with pytest.raises(pb.PerforationError, match=pattern):
        pb.PerforatedCallback(**kwargs)


# The EarlyStopping here is deliberately shorter than a neuron phase (the callback resets it).
@pytest.mark.filterwarnings("ignore:pb_lightning. EarlyStopping.* can stop training before:UserWarning")
def test_progress_bar_shows_phase_and_dendrites_and_early_stopping_is_reset(tmp_path: Path) -> None:
    pl.seed_everything(0)
    callback = _fixed(max_dendrites=1)
    stopper = EarlyStopping("val_loss", patience=1)
    trainer = _trainer(tmp_path, [callback, stopper], max_epochs=6, enable_progress_bar=True)
    model = DigitsMLP(hidden=8, lr=1e-2)
    trainer.fit(model, DigitsDataModule())
    # With patience 1 EarlyStopping would have stopped in the flat dendrite phase without the reset.
    assert callback.machine.state.dendrites == 1
    # Logged with prog_bar=True (the progress bar itself is not patched): 0.0 = neuron phase.
    metrics = trainer.progress_bar_callback.get_metrics(trainer, model)
    assert metrics["dendrite_phase"] == 0.0
    assert metrics["dendrites"] == 1


class _Scheduled(DigitsMLP):
    """Uses an LR scheduler, which must be rebuilt with (and bound to) every new optimizer."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.dendrite_parameter_groups(), lr=self.lr)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5)}


def test_schedulers_are_rebuilt_with_the_optimizer(tmp_path: Path) -> None:
    pl.seed_everything(0)
    checks: list[bool] = []

    class Check(pl.Callback):
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            scheduler = trainer.lr_scheduler_configs[0].scheduler
            checks.append(scheduler.optimizer is trainer.optimizers[0])

    callback = _fixed(max_dendrites=1)
    _trainer(tmp_path, [callback, Check()], max_epochs=6).fit(_Scheduled(hidden=8, lr=1e-2), DigitsDataModule())
    assert checks == [True] * 6
    assert callback.machine.state.dendrites == 1


def test_only_end_of_epoch_validations_during_fit_decide(tmp_path: Path) -> None:
    pl.seed_everything(0)
    callback = _fixed(max_dendrites=1)
    model = DigitsMLP(hidden=8, lr=1e-2)
    trainer = _trainer(tmp_path, [callback], max_epochs=3, val_check_interval=0.5, num_sanity_val_steps=2)
    trainer.fit(model, DigitsDataModule())
    assert len(callback.machine.state.history) == 3  # one per epoch: not the sanity check, not mid-epoch
    trainer.validate(model, DigitsDataModule(), verbose=False)
    assert len(callback.machine.state.history) == 3


class _Drifting(DigitsMLP):
    """Something outside the perforated layers keeps changing the output: a training-step counter."""

    def __init__(self) -> None:
        super().__init__(hidden=8, lr=1e-2)
        self.register_buffer("drift", torch.zeros(()))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.drift += 0.01
        return super().training_step(batch, batch_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.drift * torch.arange(10.0)


def test_a_score_that_moves_in_a_dendrite_phase_is_reported(tmp_path: Path) -> None:
    pl.seed_everything(0)
    with pytest.warns(UserWarning, match=r"val_loss moved from .* during a dendrite phase"):
        _trainer(tmp_path, [_fixed(dendrite_epochs=3, max_dendrites=1)], max_epochs=5).fit(
            _Drifting(), DigitsDataModule()
        )


def test_checkpoints_with_a_dendrite_config_load_with_weights_only(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = DigitsMLP(hidden=8, lr=1e-2, dendrites=pb.DendriteConfig(num_candidates=2, activation="tanh"))
    trainer = _trainer(tmp_path, [_fixed(max_dendrites=1)], max_epochs=5)
    trainer.fit(model, DigitsDataModule())
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    loaded = DigitsMLP.load_from_checkpoint(tmp_path / "model.ckpt", weights_only=True)
    assert loaded.dendrite_config == model.dendrite_config
    assert [layer.num_dendrites for layer in loaded.perforated_layers()] == [1, 1, 1]


def test_sharded_strategies_are_refused_at_setup() -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    trainer = SimpleNamespace(strategy=FSDPStrategy(), max_epochs=1, world_size=1)
    with pytest.raises(pb.PerforationError, match=r"single-device and DDP strategies; got FSDPStrategy"):
        _fixed().setup(trainer, DigitsMLP(), "fit")  # type: ignore[arg-type]


class _Manual(DigitsMLP):
    def __init__(self) -> None:
        super().__init__(hidden=8)
        self.automatic_optimization = False


def test_manual_optimization_is_refused(tmp_path: Path) -> None:
    with pytest.raises(pb.PerforationError, match=r"needs automatic optimization"):
        _trainer(tmp_path, [_fixed()], max_epochs=1).fit(_Manual(), DigitsDataModule())


def test_the_shape_probe_leaves_each_module_in_its_own_mode() -> None:
    # Lightning trains every module in the mode the user left it in; the probe of
    # example_input_array at fit start must not switch them all to the root's mode.
    from pb_lightning.lightning.checks import probe_shapes

    model = DigitsMLP(hidden=8, lr=1e-2)
    model.configure_model()
    model.example_input_array = torch.randn(2, 64)
    model.net[2].eval()
    probe_shapes(pl.Trainer(logger=False, enable_progress_bar=False), model)
    assert model.training
    assert model.net[0].training
    assert not model.net[2].training


def test_torchscript_of_a_deployed_lightning_module_is_refused_by_pb_lightning() -> None:
    # Not Lightning's "DigitsMLP is not attached to a `Trainer`", which says nothing about what works.
    model = DigitsMLP(hidden=8, lr=1e-2)
    model.configure_model()
    x = torch.randn(4, 64)
    model(x)
    model.start_dendrite_phase()
    model.accept_dendrites()
    deployed = pb.to_inference(model)
    with pytest.raises(pb.PerforationError, match=r"TorchScript .*\(layer `net\.0`\).*torch\.export\.export"):
        torch.jit.trace(deployed, x)
    with pytest.raises(pb.PerforationError, match=r"TorchScript .* torch\.onnx\.export"):
        model.to_torchscript()
    exported = torch.export.export(deployed, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert torch.allclose(exported.module()(x[:3]), deployed(x[:3]))
