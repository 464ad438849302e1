"""Dendrites on a trained network: train a plain model, save it, add dendrites to the saved model.

    python examples/finetune_trained.py [--plain-epochs 40] [--max-epochs 80] [--load checkpoint|state_dict]

Step 1 trains an ordinary LightningModule (no pb_lightning in it) on scikit-learn's digits and
saves it twice: a Lightning checkpoint and a plain ``state_dict`` file. Step 2 loads the saved
network into a :class:`~pb_lightning.PerforatedModule` with the same network — from the
checkpoint with ``load_from_checkpoint``, or from the state dict with ``load_state_dict`` — and
checks that it computes exactly what the trained model did. Step 3 fine-tunes it with
:class:`~pb_lightning.PerforatedCallback`: its first neuron phase continues the training, then
dendrites are added while they help. Under 20 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import pb_lightning as pb
from pb_lightning.demos.digits import DigitsDataModule, DigitsMLP


class PlainMLP(pl.LightningModule):
    """The network as it was first trained: a plain LightningModule, no dendrites.

    Its ``net`` is built as :class:`~pb_lightning.demos.digits.DigitsMLP`'s, so the weights have
    the same names in both; in your project, the PerforatedModule is your own module with
    ``PerforatedModule`` as its base class.
    """

    def __init__(self, hidden: int = 8, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def _trainer(max_epochs: int, root: str, callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks or [],
        default_root_dir=root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plain-epochs", type=int, default=40, help="epochs of the plain training (step 1)")
    parser.add_argument("--max-epochs", type=int, default=80, help="at most this many epochs of fine-tuning")
    parser.add_argument("--load", choices=["checkpoint", "state_dict"], default="checkpoint")
    parser.add_argument("--root", default="lightning_logs/finetune_trained")
    args = parser.parse_args(argv)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    data = DigitsDataModule()

    # Step 1: train a plain network and save it, as a checkpoint and as a state dict.
    pl.seed_everything(0)
    plain = PlainMLP(hidden=8)
    trainer = _trainer(args.plain_epochs, args.root)
    trainer.fit(plain, data)
    trainer.save_checkpoint(root / "plain.ckpt")
    torch.save(plain.state_dict(), root / "plain.pt")
    plain_acc = trainer.test(plain, data, verbose=False)[0]["test_acc"]

    # Step 2: load the saved network into a PerforatedModule. It is perforated (layers wrapped,
    # no dendrites yet) and computes exactly what the plain model did.
    dendrites = pb.DendriteConfig(num_candidates=4)
    if args.load == "checkpoint":
        # The plain checkpoint's hyperparameters (hidden, lr) rebuild the network; the lower
        # fine-tuning rate and the dendrite configuration are given here.
        model = DigitsMLP.load_from_checkpoint(root / "plain.ckpt", lr=1e-3, dendrites=dendrites)
    else:
        model = DigitsMLP(hidden=8, lr=1e-3, dendrites=dendrites)
        model.load_state_dict(torch.load(root / "plain.pt"))  # before or after perforation: both work
    loaded_acc = _trainer(1, args.root).test(model, data, verbose=False)[0]["test_acc"]

    # Step 3: fine-tune with dendrites. The first neuron phase is the fine-tuning's own: it
    # continues from the trained weights, and dendrites are added once it stops improving.
    pl.seed_everything(1)
    callback = pb.PerforatedCallback(
        monitor="val_loss", mode="min", neuron_patience=4, dendrite_patience=2, max_dendrites=2
    )
    trainer = _trainer(args.max_epochs, args.root, [callback])
    trainer.fit(model, data)
    result = {
        "plain_test_acc": plain_acc,
        "loaded_test_acc": loaded_acc,
        "test_acc": trainer.test(model, data, verbose=False)[0]["test_acc"],
        "dendrites": sum(layer.num_dendrites for layer in model.perforated_layers()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "plain_parameters": sum(p.numel() for p in plain.parameters()),
    }
    print(
        f"plain: test_acc {plain_acc:.4f} ({result['plain_parameters']} parameters); "
        f"loaded into {type(model).__name__}: {loaded_acc:.4f}; "
        f"fine-tuned with {result['dendrites']} dendrite sets: {result['test_acc']:.4f} "
        f"({result['parameters']} parameters)"
    )
    return result


if __name__ == "__main__":
    main()
