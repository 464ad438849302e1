"""Bad input gets a clear, early error; numerical trouble never kills a run.

The table below lists every misuse case with the exception and the message it must give: the
message names the argument or object, the value, and what would be valid. Some cases are
exercised in the test files of their modules; they are listed here with a pointer, so that the
table is the complete list.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import nn

import pb_lightning as pb
from pb_lightning.demos.digits import DigitsDataModule, DigitsMLP
from pb_lightning.lightning.cli import main as cli_main
from tests.helpers import PlainClassifier, fast_trainer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
_REPO = Path(__file__).resolve().parents[1]

# Covered elsewhere (file under tests/engine, tests/cycle or tests/lightning: test):
#   invalid DendriteConfig fields ......... test_config.py::test_invalid_fields_are_refused_with_a_named_message
#   invalid PhaseSchedule fields .......... test_schedule.py::test_schedule_misconfiguration
#   invalid callback arguments ............ test_callback.py::test_callback_misconfiguration
#   nothing matched / wrapped twice / root  test_convert.py
#   monitor never logged .................. test_callback.py::test_a_missing_monitor_is_named_with_what_was_logged
#   no validation loop .................... test_callback.py::test_no_validation_loop_is_refused
#   configure_optimizers ignores new params test_callback.py::test_an_optimizer_that_misses_new_parameters_is_named
#   manual optimization, FSDP ............. test_callback.py::test_manual_optimization_is_refused, ..._sharded_...
#   ddp_spawn ............................. test_distributed.py::test_ddp_spawn_is_refused_with_the_reason
#   monitor logged on some ranks only ..... test_distributed.py::test_a_monitor_logged_on_some_ranks_only_is_named
#   not a PerforatedModule ................ test_callback.py::test_the_callback_needs_a_perforated_module


def _fit(model: pl.LightningModule, tmp_path: Path, callback: pb.PerforatedCallback | None = None, **kw: Any) -> None:
    callback = callback or pb.PerforatedCallback("val_loss", "min", neuron_epochs=1, dendrite_epochs=1)
    fast_trainer(tmp_path, [callback], kw.pop("max_epochs", 3), **kw).fit(model, DigitsDataModule())


class _TrainOnlyMonitor(DigitsMLP):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_acc", 0.5)  # the monitor (train_loss) is logged only in training


class _TwoOptimizers(DigitsMLP):
    def configure_optimizers(self) -> Any:
        return [torch.optim.Adam(self.net[0].parameters()), torch.optim.Adam(self.net[2].parameters())]

    def training_step(self, batch: Any, batch_idx: int) -> None:  # manual stepping is not the point here
        return None


class _Mixer(nn.Module):
    """A custom module whose output is [batch, neurons, time]: its neuron axis is 1, not -1."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).view(-1, 4, 3)


class _WrongAxis(pb.PerforatedModule):
    def __init__(self, axis: int) -> None:
        super().__init__(perforate_include=[_Mixer])
        self.mixer = _Mixer()
        self.head = nn.Linear(12, 10)
        self.example_input_array = torch.zeros(2, 64)
        self._axis = axis

    def configure_model(self) -> None:
        if not self.perforated_layers():
            pb.perforate(self, include=[_Mixer], neuron_axes={_Mixer: self._axis})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mixer(x).flatten(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters())


def _cli(args: list[str], tmp_path: Path) -> None:
    cli_main(
        [
            "fit",
            "--config",
            str(_REPO / "configs" / "digits_capacity_test.yaml"),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
            *args,
        ]
    )


def _checkpoint_of(model: pl.LightningModule, tmp_path: Path) -> Path:
    trainer = fast_trainer(tmp_path, [], 1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=2)
    trainer.fit(model, DigitsDataModule())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


class _HeadExcluded(DigitsMLP):
    def __init__(self) -> None:
        super().__init__(hidden=16)
        self._perforate_exclude = ["net.4"]


Case = tuple[str, Callable[[Path], Any], type[BaseException], str]
CASES: list[Case] = [
    (
        "monitor logged only in training",
        lambda p: _fit(_TrainOnlyMonitor(), p, pb.PerforatedCallback("train_loss", "min", neuron_epochs=1)),
        pb.PerforationError,
        r"monitor='train_loss'.*not logged during validation.*validation_step",
    ),
    # Several optimizers need manual optimization, which the callback refuses (it rebuilds the
    # optimizer itself); Lightning already stops the automatic case with its own clear message.
    (
        "several optimizers",
        lambda p: _fit(_TwoOptimizers(), p),
        RuntimeError,
        r"multiple optimizers is only supported with manual optimization",
    ),
    (
        "declared neuron axis does not exist",
        lambda p: _fit(_WrongAxis(axis=3), p),
        pb.PerforationError,
        r"Layer `mixer` \(_Mixer\): neuron_axis=3 does not exist in its output of shape \(2, 4, 3\)",
    ),
    (
        "LightningCLI --optimizer",
        lambda p: _cli(["--optimizer", "Adam"], p),
        pb.PerforationError,
        r"replaced on the instance \(LightningCLI's `--optimizer`",
    ),
    (
        "invalid DendriteConfig in a YAML",
        lambda p: _cli(["--model.init_args.dendrites.num_candidates", "0"], p),
        ValueError,
        r"`DendriteConfig.num_candidates` must be an int >= 1; got 0",
    ),
    (
        "invalid callback argument in a YAML",
        lambda p: _cli(["--trainer.callbacks.init_args.neuron_patience", "0"], p),
        ValueError,
        r"`PhaseSchedule.neuron_patience` must be an int >= 1; got 0",
    ),
    (
        # load_from_checkpoint of it works (tests/lightning/test_finetune_trained.py); resuming does not.
        "fit(ckpt_path=...) from a checkpoint of a non-perforated model",
        lambda p: fast_trainer(p, [], 1).fit(
            DigitsMLP(hidden=16),
            DigitsDataModule(),
            ckpt_path=_checkpoint_of(PlainClassifier(DigitsMLP(hidden=16).net, lr=1e-3), p),
        ),
        pb.PerforationError,
        r"written by a module without dendrites .* YourModel.load_from_checkpoint\(path\).* without ckpt_path",
    ),
    (
        "checkpoint of a different perforation",
        lambda p: _HeadExcluded.load_from_checkpoint(_checkpoint_of(DigitsMLP(hidden=16), p)),
        pb.PerforationError,
        r"perforated layers \['net.0', 'net.2', 'net.4'\] do not match this model's \['net.0', 'net.2'\]",
    ),
    (
        "callback with a plain LightningModule",
        lambda p: pl.Trainer(callbacks=[pb.PerforatedCallback()], max_epochs=1, logger=False, default_root_dir=p).fit(
            BoringModel()
        ),
        pb.PerforationError,
        r"needs a pb_lightning.PerforatedModule; got BoringModel",
    ),
]


@pytest.mark.parametrize(("case", "trigger", "error", "pattern"), CASES, ids=[c[0] for c in CASES])
def test_misuse_gets_a_clear_early_error(
    case: str, trigger: Callable[[Path], Any], error: type[BaseException], pattern: str, tmp_path: Path
) -> None:
    with pytest.raises(error, match=pattern):
        trigger(tmp_path)


def test_a_wrong_neuron_axis_is_caught_before_the_first_training_step(tmp_path: Path) -> None:
    steps: list[int] = []

    class Count(pl.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            steps.append(1)

    model = _WrongAxis(axis=3)
    with pytest.raises(pb.PerforationError):
        pl.Trainer(
            callbacks=[pb.PerforatedCallback(), Count()],
            max_epochs=1,
            logger=False,
            default_root_dir=tmp_path,
            enable_progress_bar=False,
        ).fit(model, DigitsDataModule())
    assert steps == []


# ---------------------------------------------------------------------- numerical trouble
def test_a_nan_monitored_score_is_no_improvement_and_is_reported() -> None:
    machine = pb.PhaseMachine("min", pb.PhaseSchedule(neuron_patience=2))
    assert machine.step(float("nan")).action == "continue"
    assert machine.step(1.0).new_phase_best
    assert not machine.step(float("nan")).new_phase_best
    assert machine.state.phase_best == 1.0


def test_a_diverged_candidate_restarts_and_the_phase_goes_on() -> None:
    torch.manual_seed(0)
    model = pb.perforate(
        nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)),
        config=pb.DendriteConfig(num_candidates=3, warmup_steps=0),
    )
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    model(x)
    pb.start_dendrite_phase(model)
    opt = torch.optim.Adam(pb.trainable_parameters(model), lr=1e-2)

    def step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    pool = model[0].candidates
    healthy = pool.bank.weight[0].detach().clone()
    with torch.no_grad():
        pool.bank.weight[1, 2, 0] = float("nan")  # candidate set 1 blows up
    step()  # sees the NaN: set 1 is flagged, its gradients zeroed
    assert all(torch.isfinite(s["exp_avg"]).all() for s in opt.state.values())
    step()  # set 1 restarts from fresh weights before this forward
    assert torch.isfinite(pool.bank.weight).all()
    assert torch.isfinite(pool.statistics.moments).all()
    assert not torch.equal(pool.bank.weight[0], healthy)  # the healthy sets kept learning
    for _ in range(5):
        step()
    assert int(pool.statistics.skipped_steps) == 0
    assert (pool.best_score[1] >= 0).all()  # the restarted set is scored again
    pb.accept_dendrites(model)
    assert torch.isfinite(model[0].dendrites.weight).all()


def test_zero_errors_do_not_divide_by_zero() -> None:
    model = pb.perforate(nn.Sequential(nn.Linear(4, 3)), config=pb.DendriteConfig(warmup_steps=0))
    x = torch.randn(8, 4)
    model(x)
    pb.start_dendrite_phase(model)
    model(x).sum().mul(0.0).backward()  # every error is exactly zero
    pool = model[0].candidates
    assert torch.isfinite(pool.statistics.score()).all()
    assert torch.equal(pool.statistics.score(), torch.zeros_like(pool.statistics.score()))
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in pool.parameters())


def test_a_dendrite_phase_where_nothing_is_learned_ends_and_is_reported(tmp_path: Path) -> None:
    class Frozen(DigitsMLP):
        def configure_optimizers(self) -> Any:  # candidates are in the optimizer but never move
            return torch.optim.SGD(self.parameters(), lr=0.0)

    callback = pb.PerforatedCallback("val_loss", "min", neuron_epochs=1, dendrite_patience=2, max_dendrites=1)
    with pytest.warns(UserWarning, match="no candidate learned anything"):
        _fit(model := Frozen(hidden=8), tmp_path, callback, max_epochs=6)
    state = callback.machine.state
    rows = state.history
    # The phase ends on candidate patience (not only at max_epochs): a dendrite-phase row that is
    # not "continue", followed by more training in the neuron phase.
    ends = [i for i, row in enumerate(rows) if row["phase"] == "dendrite" and row["action"] != "continue"]
    assert ends, [row["action"] for row in rows]
    assert rows[ends[0]]["action"] == "accept"
    assert ends[0] + 1 < len(rows)
    assert rows[ends[0] + 1]["phase"] == "neuron"
    # Nothing was learned (lr = 0), so the cycle cannot beat the best and is rejected: no dendrites kept.
    assert state.accepted_cycles == 0
    assert state.rejected_cycles >= 1
    assert all(layer.num_dendrites == 0 for layer in pb.perforated_layers(model))
