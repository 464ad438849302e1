"""The main job as a plain Python script: a narrow MLP on scikit-learn's digits grows dendrites.

    python examples/digits_mlp.py [--max-epochs 200] [--root lightning_logs]

The same run as ``pb-lightning fit --config configs/digits.yaml``, written out: a
PerforatedModule, a LightningDataModule, a TensorBoard logger, and PerforatedCallback deciding
when to switch phases from the validation loss.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

import pb_lightning as pb
from pb_lightning.demos.digits import DigitsDataModule, DigitsMLP


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--root", default="lightning_logs")
    args = parser.parse_args(argv)

    pl.seed_everything(0)
    model = DigitsMLP(hidden=8, lr=0.01, dendrites=pb.DendriteConfig(num_candidates=4))
    callback = pb.PerforatedCallback(
        monitor="val_loss", mode="min", neuron_patience=4, dendrite_patience=2, max_dendrites=4
    )
    trainer = pl.Trainer(
        max_epochs=args.max_epochs,
        callbacks=[callback],
        logger=TensorBoardLogger(args.root, name="digits_script"),
        enable_checkpointing=False,
        log_every_n_steps=10,
    )
    data = DigitsDataModule()
    trainer.fit(model, data)
    return trainer.test(model, data)[0]


if __name__ == "__main__":
    main()
