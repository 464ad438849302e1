"""A training run that checkpoints every epoch, for tests/test_kill_resume.py.

    python tests/scripts/kill_resume.py OUT_DIR [--resume]

It prints ``EPOCH n`` (flushed) when epoch n starts, so a test can SIGKILL it at a chosen
point; ``--resume`` continues with ``fit(ckpt_path="last")``. At the end it writes the phase
history, the dendrite counts and the weights to ``OUT_DIR/result.pt``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pb_lightning as pb
from pb_lightning.demo import DigitsDataModule, DigitsMLP


class _Announce(pl.Callback):
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        print(f"EPOCH {trainer.current_epoch}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0)
    callback = pb.PerforatedCallback("val_loss", "min", neuron_epochs=2, dendrite_epochs=2, max_dendrites=2)
    checkpoint = ModelCheckpoint(dirpath=args.out / "ckpt", save_last=True, save_top_k=0)
    trainer = pl.Trainer(
        max_epochs=30,
        callbacks=[callback, checkpoint, _Announce()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    model = DigitsMLP(hidden=8, lr=1e-2)
    trainer.fit(model, DigitsDataModule(), ckpt_path="last" if args.resume else None)
    torch.save(
        {
            "history": [h["action"] for h in callback.machine.state.history],
            "dendrites": [layer.num_dendrites for layer in model.perforated_layers()],
            "epochs": trainer.current_epoch,
        },
        args.out / "result.pt",
    )


if __name__ == "__main__":
    main()
