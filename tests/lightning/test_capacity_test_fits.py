"""The capacity test in a Lightning fit of a recurrent model: a sound one passes and the
conversion summary is shown; a layer whose parent reads its weights is reported.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import pb_lightning as pb
from tests.helpers import WeightReader, fast_trainer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class _RecurrentModule(pb.PerforatedModule):
    def __init__(self, weight_reader: bool = False) -> None:
        super().__init__(
            dendrite_config=pb.DendriteConfig(num_candidates=2),
            perforate_include=None if weight_reader else [nn.LSTM, nn.Linear],
        )
        self.save_hyperparameters()
        self.embed = nn.Embedding(10, 4)
        self.rnn = nn.LSTM(4, 6, batch_first=True)
        self.norm = nn.LayerNorm(6)
        self.reader = WeightReader() if weight_reader else None
        self.head = nn.Linear(6, 4)

    def forward(self, ids: Tensor) -> Tensor:
        out = self.head(self.norm(self.rnn(self.embed(ids))[0][:, -1]))
        return self.reader(out) if self.reader is not None else out[:, :2]

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        ids, y = batch
        return F.cross_entropy(self(ids), y)

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        ids, y = batch
        self.log("val_loss", F.cross_entropy(self(ids), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.dendrite_parameter_groups(), lr=1e-2)


def _capacity_fit(model: pl.LightningModule, tmp_path: Path) -> pb.PerforatedCallback:
    ids, y = torch.randint(0, 10, (8, 5)), torch.randint(0, 2, (8,))
    loader = DataLoader(TensorDataset(ids, y), batch_size=4)
    callback = pb.PerforatedCallback("val_loss", "min", capacity_test=True)
    trainer = fast_trainer(tmp_path, [callback], max_epochs=7)
    trainer.fit(model, loader, loader)
    return callback


@pytest.mark.slow
def test_an_lstm_classifier_goes_through_the_capacity_test_and_the_summary_is_shown(
    tmp_path: Path, caplog: Any
) -> None:
    pl.seed_everything(0)
    model = _RecurrentModule()
    with caplog.at_level(logging.INFO):
        callback = _capacity_fit(model, tmp_path)
    assert callback.capacity_problems == []
    assert [layer.num_dendrites for layer in model.perforated_layers()] == [3, 3]
    assert "pb_lightning: 2 perforated modules" in caplog.text
    assert "dendrites added to output[0]" in caplog.text
    assert "embedding (a lookup table" in caplog.text
    assert "normalisation layer" in caplog.text


@pytest.mark.slow
# The problem the test provokes is also reported as a warning at the end of the fit.
@pytest.mark.filterwarnings("ignore:pb_lightning capacity test found problems:UserWarning")
def test_the_capacity_test_reports_a_layer_whose_parent_reads_its_weights(tmp_path: Path, caplog: Any) -> None:
    pl.seed_everything(0)
    model = _RecurrentModule(weight_reader=True)
    with caplog.at_level(logging.INFO):
        callback = _capacity_fit(model, tmp_path)
    assert callback.capacity_problems
    assert all("`reader.lin`" in p for p in callback.capacity_problems)
    assert "recurrent layer (not perforated by default" in caplog.text
