"""Two-process DDP run of a full dendrite cycle, for tests/lightning/test_distributed.py.

    python tests/scripts/ddp_cycle.py OUT_DIR [--resume CKPT] [--max-epochs N]

Lightning's ``ddp`` strategy launches rank 1 by re-running this script. Every rank writes its
final parameters, buffers and phase history to ``OUT_DIR/rank{r}.pt`` so the test can compare
them across ranks.
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
from pb_lightning.demos.digits import DigitsDataModule, DigitsMLP


class _Rank0Monitor(DigitsMLP):
    """Logs its monitor on rank 0 only: a misuse the callback must name instead of hanging."""

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if self.global_rank == 0:
            self.log("val_rank0", 1.0, rank_zero_only=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--resume", type=Path, default=None)
    parser.add_argument("--max-epochs", type=int, default=14)
    parser.add_argument("--monitor-rank0-only", action="store_true", help="log the monitor on rank 0 only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0)
    # Each rank sees different batches (DistributedSampler): the replicas must still stay identical.
    monitor = "val_rank0" if args.monitor_rank0_only else "val_loss"
    callback = pb.PerforatedCallback(monitor, "min", neuron_epochs=3, dendrite_epochs=2, max_dendrites=2)
    checkpoint = ModelCheckpoint(dirpath=args.out / "ckpt", save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=args.max_epochs,
        callbacks=[callback, checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    model = (_Rank0Monitor if args.monitor_rank0_only else DigitsMLP)(hidden=8, lr=1e-2)
    trainer.fit(model, DigitsDataModule(), ckpt_path=args.resume)
    torch.save(
        {
            "state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "history": callback.machine.state.history,
            "dendrites": [layer.num_dendrites for layer in model.perforated_layers()],
            "world_size": trainer.world_size,
        },
        args.out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
