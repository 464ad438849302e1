"""A deterministic training run that kills itself at a named point, for tests/lightning/test_kill_resume.py.

    PB_KILL_AT=POINT python tests/scripts/kill_resume.py OUT_DIR [--resume] [--devices N]

Without ``PB_KILL_AT`` it runs to the end. With it, the process sends SIGKILL to itself at
that point — chosen by the test, never by a timer, so a test passes or fails the same way on
every machine. ``--resume`` continues with ``fit(ckpt_path="last")``. At the end it writes the
phase history and the training step of each of its rows, the dendrite counts, the epoch count,
the number of training batches this process ran, the checkpoint it resumed from, and the final
weights to ``OUT_DIR/result.pt``.

Points (E: a 0-based epoch, B: a 0-based batch of that epoch, N: a 1-based count):

* ``batch:E:B`` — before training batch B of epoch E (mid-epoch);
* ``decided:E`` — at the end of epoch E, after the callback took its decision (and restructured),
  before that epoch's checkpoint is written;
* ``saved:E`` — after epoch E's checkpoint is written (at the start of epoch E + 1);
* ``optimizer:N`` — in the N-th rebuild of the optimizer during training, before it is built
  (after the restructure that asked for it);
* ``write:E`` — midway through writing epoch E's ``last.ckpt``: the bytes are being copied into
  place, as ``fsspec`` does when the temporary file is on another file system (a torn file);
* ``finished`` — after ``fit`` returned, before the result is written.

Every source of randomness is a function of the epoch: the sampler shuffles by epoch and the
global RNG is re-seeded at each epoch start, so a resumed run's batches, dropout and candidate
initialisations are those of the uninterrupted run. With one thread and deterministic
algorithms, the two end with bit-identical weights.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Sampler

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pb_lightning as pb
from pb_lightning.demos.digits import DigitsDataModule, DigitsMLP

SEED = 0


def _die() -> None:
    """SIGKILL the whole process group: under DDP the other rank dies with this one, as on a machine failure."""
    sys.stdout.flush()
    os.killpg(os.getpgid(0), signal.SIGKILL)


class EpochShuffle(Sampler[int]):
    """Shuffles with a generator seeded by the epoch (Lightning calls ``set_epoch``)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(SEED * 1000 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class Digits(DigitsDataModule):
    def train_dataloader(self) -> DataLoader:
        data = self._splits["train"]
        return DataLoader(data, batch_size=self.batch_size, sampler=EpochShuffle(len(data)))


class FaultInjection(pl.Callback):
    """Kills the process at the point named by ``PB_KILL_AT`` (only in a run that is not resumed)."""

    def __init__(self, point: str | None) -> None:
        self.kind, *numbers = point.split(":") if point else ("",)
        self.numbers = [int(n) for n in numbers]
        self.batches_run = 0
        self.optimizer_builds = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.kind == "optimizer":
            strategy = trainer.strategy
            original = strategy.setup_optimizers

            def setup_optimizers(trainer: pl.Trainer) -> None:
                if trainer.training and trainer.global_step > 0:
                    self.optimizer_builds += 1
                    if self.optimizer_builds == self.numbers[0]:
                        _die()
                original(trainer)

            strategy.setup_optimizers = setup_optimizers  # type: ignore[method-assign]
        if self.kind == "write":
            import fsspec.implementations.local as local

            epoch = self.numbers[0]

            def torn_move(source: str, target: str) -> None:
                if trainer.current_epoch == epoch and Path(target).name == "last.ckpt":
                    data = Path(source).read_bytes()
                    with open(target, "wb") as f:
                        f.write(data[: len(data) // 2])
                    _die()
                shutil.move(source, target)

            patched = types.ModuleType("shutil")
            patched.__dict__.update(vars(shutil))
            patched.move = torn_move  # type: ignore[attr-defined]
            local.shutil = patched  # type: ignore[attr-defined]

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.manual_seed(SEED * 1000 + trainer.current_epoch)
        if self.kind == "saved" and trainer.current_epoch == self.numbers[0] + 1:
            _die()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.batches_run += 1
        if self.kind == "batch" and self.numbers == [trainer.current_epoch, idx]:
            _die()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after PerforatedCallback's decision (callbacks run in order) and before
        # ModelCheckpoint's save (Lightning runs checkpoint callbacks last).
        if self.kind == "decided" and trainer.current_epoch == self.numbers[0]:
            _die()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--max-dendrites", type=int, default=2)
    parser.add_argument(
        "--mode", default="min", help="'max' on val_loss makes every cycle fail: retries, rollbacks, a failed stop"
    )
    parser.add_argument("--ckpt", default="last", help="the checkpoint --resume starts from")
    parser.add_argument(
        "--steps", action="store_true", help="end dendrite phases in training steps (dendrite_patience_steps=2)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    pl.seed_everything(SEED, verbose=False)
    point = None if args.resume else os.environ.get("PB_KILL_AT")
    injection = FaultInjection(point)
    phases: dict[str, Any] = {"dendrite_epochs": 2}
    if args.steps:  # the candidates converge within an epoch (5% rule): accepted mid-epoch
        phases = {"dendrite_patience": 50, "dendrite_patience_steps": 2, "candidate_plateau_fraction": 0.05}
    callback = pb.PerforatedCallback("val_loss", args.mode, neuron_epochs=2, max_dendrites=args.max_dendrites, **phases)
    # A checkpoint after every epoch (save_top_k=1 without a monitor keeps the newest; Lightning
    # 2.6 writes last.ckpt only together with such a save), and last.ckpt beside it.
    checkpoint = ModelCheckpoint(dirpath=args.out / "ckpt", save_last=True, save_top_k=1, every_n_epochs=1)
    ddp = args.devices > 1
    trainer = pl.Trainer(
        max_epochs=30,
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if ddp else "auto",
        callbacks=[callback, injection, checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_train_batches=6,
    )
    model = DigitsMLP(hidden=8, lr=1e-2)
    trainer.fit(model, Digits(batch_size=32), ckpt_path=args.ckpt if args.resume else None)
    if point == "finished":
        _die()
    if trainer.is_global_zero:
        torch.save(
            {
                "history": [(h["validation"], h["action"]) for h in callback.machine.state.history],
                "global_steps": [h["global_step"] for h in callback.machine.state.history],
                "dendrites": [layer.num_dendrites for layer in model.perforated_layers()],
                "epochs": trainer.current_epoch,
                "batches_run": injection.batches_run,
                "resumed_from": None if trainer.ckpt_path is None else str(trainer.ckpt_path),
                "weights": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            },
            args.out / "result.pt",
        )


if __name__ == "__main__":
    main()
