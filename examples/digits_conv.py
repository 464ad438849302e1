"""A conv example: each Conv2d is perforated together with the BatchNorm after it.

    python examples/digits_conv.py [--max-epochs 120] [--root lightning_logs]

Dendrites of a conv layer are themselves convolutions (one per output channel, shared over all
positions); all of a layer's dendrites run as one convolution with ``D·channels`` outputs.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

import pb_lightning as pb
from pb_lightning.demos.digits import DigitsConvNet, DigitsDataModule


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=120)
    parser.add_argument("--root", default="lightning_logs")
    args = parser.parse_args(argv)

    pl.seed_everything(0)
    model = DigitsConvNet(channels=4, lr=0.01)
    callback = pb.PerforatedCallback(
        monitor="val_loss", mode="min", neuron_patience=4, dendrite_patience=2, max_dendrites=3
    )
    trainer = pl.Trainer(
        max_epochs=args.max_epochs,
        callbacks=[callback],
        logger=TensorBoardLogger(args.root, name="digits_conv"),
        enable_checkpointing=False,
        log_every_n_steps=10,
    )
    data = DigitsDataModule(flat=False)
    trainer.fit(model, data)
    return trainer.test(model, data)[0]


if __name__ == "__main__":
    main()
