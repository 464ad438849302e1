"""Dendrites on a trained network in Lightning (issue 26): a plain model's weights — a state dict
loaded before or after perforation, or a plain Lightning checkpoint — become a PerforatedModule
that computes what the plain model did and then grows dendrites under the callback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.nn import functional as F

import pb_lightning as pb
from pb_lightning.demos.digits import DigitsConvNet, DigitsDataModule, DigitsMLP
from tests.helpers import PlainClassifier, fast_trainer

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning",
    "ignore:.*does not have many workers",
    "ignore:You passed in a `val_dataloader` but have no `validation_step`",  # the plain model's training
)


_MODELS = {"mlp": (lambda: DigitsMLP(hidden=8), True), "conv": (lambda: DigitsConvNet(channels=4), False)}


def _trained_plain(kind: str, root: Path) -> tuple[PlainClassifier, DigitsDataModule]:
    """A plain module with the demo model's network, trained for two epochs (non-default weights
    and, for the conv net, BatchNorm running statistics)."""
    pl.seed_everything(0)
    make, flat = _MODELS[kind]
    plain = PlainClassifier(make().net)
    data = DigitsDataModule(flat=flat)
    fast_trainer(root, [], 2, limit_val_batches=0).fit(plain, data)
    return plain, data


def _inputs(data: DigitsDataModule) -> torch.Tensor:
    data.setup()
    return next(iter(data.val_dataloader()))[0][:64]


def _assert_same_function(model: pl.LightningModule, plain: pl.LightningModule, x: torch.Tensor) -> None:
    for train in (False, True):  # train mode: batch statistics; running statistics update alike
        model.train(train)
        plain.train(train)
        with torch.no_grad():
            torch.testing.assert_close(model(x), plain(x), rtol=0, atol=1e-6)


class _CandidateScores(pl.Callback):
    """Each layer's best candidate correlation after the latest training step of a dendrite phase."""

    def __init__(self) -> None:
        self.latest: dict[str, float] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if pl_module.in_dendrite_phase:
            self.latest = {k: v.max().item() for k, v in pb.candidate_scores(pl_module).items()}


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_state_dict_loaded_before_perforation_is_kept(kind: str, mode: str, tmp_path: Path) -> None:
    plain, data = _trained_plain(kind, tmp_path)
    model = _MODELS[kind][0]()
    model.load_state_dict(plain.state_dict())  # the network is still plain: the keys match as they are
    model.train(mode == "train")
    model.configure_model()  # what trainer.fit does first
    assert len(model.perforated_layers()) == 3
    _assert_same_function(model, plain, _inputs(data))


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_a_plain_state_dict_loaded_after_perforation_is_mapped_onto_the_wrapped_layers(
    kind: str, tmp_path: Path
) -> None:
    plain, data = _trained_plain(kind, tmp_path)
    model = _MODELS[kind][0]()
    model.configure_model()
    model.load_state_dict(plain.state_dict())  # net.0.weight -> net.0.module.weight, BN keys into the layer
    _assert_same_function(model, plain, _inputs(data))
    bare = _MODELS[kind][0]()
    bare.configure_model()
    bare.net.load_state_dict(plain.net.state_dict())  # a bare nn.Module's state dict, into the network
    _assert_same_function(bare, plain, _inputs(data))


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_load_from_checkpoint_of_a_plain_lightning_module_gives_the_perforated_trained_network(
    kind: str, tmp_path: Path
) -> None:
    plain, data = _trained_plain(kind, tmp_path)
    path = tmp_path / "plain.ckpt"
    plain.trainer.save_checkpoint(path)
    cls = type(_MODELS[kind][0]())
    options = {"hidden": 8} if kind == "mlp" else {"channels": 4}
    model = cls.load_from_checkpoint(path, **options)
    assert [layer.num_dendrites for layer in model.perforated_layers()] == [0, 0, 0]
    _assert_same_function(model, plain, _inputs(data))


def test_the_callback_fine_tunes_the_loaded_network_from_its_trained_state(tmp_path: Path) -> None:
    plain, data = _trained_plain("conv", tmp_path)
    path = tmp_path / "plain.ckpt"
    plain.trainer.save_checkpoint(path)
    model = DigitsConvNet.load_from_checkpoint(path, channels=4)
    model.eval()  # left in eval mode by an evaluation: fit still trains the network and the candidates
    data.setup()
    plain.eval()
    with torch.no_grad():  # the plain network's validation loss, over the whole validation set
        batches = list(data.val_dataloader())
        plain_loss = sum(F.cross_entropy(plain(x), y, reduction="sum").item() for x, y in batches)
        plain_loss /= sum(len(y) for _, y in batches)
    trainer = fast_trainer(tmp_path, [], 1)
    # What fine-tuning starts from: the trained network's score, not a fresh network's.
    assert trainer.validate(model, data, verbose=False)[0]["val_loss"] == pytest.approx(plain_loss, rel=1e-5)
    scores = _CandidateScores()
    callback = pb.PerforatedCallback(
        monitor="val_loss", mode="min", neuron_epochs=2, dendrite_epochs=1, max_dendrites=1
    )
    trainer = fast_trainer(tmp_path, [callback, scores], 6)
    with pytest.warns(UserWarning, match="in eval mode at the start of training"):  # Lightning's, as intended
        trainer.fit(model, data)
    assert scores.latest, "no dendrite phase ran"
    assert all(score > 0.01 for score in scores.latest.values()), scores.latest  # the candidates learned
    assert [layer.num_dendrites for layer in model.perforated_layers()] == [1, 1, 1]
