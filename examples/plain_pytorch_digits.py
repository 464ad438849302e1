"""The source document's five steps in a plain PyTorch loop (no Lightning), offline.

    python examples/plain_pytorch_digits.py [--max-epochs 300]

A narrow MLP on scikit-learn's digits. The tracker decides from the validation accuracy when to
switch between neuron and dendrite phases, and says when training is complete.
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.optim.lr_scheduler import StepLR

# Step 1: import.
import pb_lightning as pb


def load(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Digits split 60/20/20 with a fixed seed, pixels in [0, 1]."""
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train, n_val = int(0.6 * len(y)), int(0.2 * len(y))
    parts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    return {k: (x[i], y[i]) for k, i in parts.items()}


def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        return 100.0 * (model(data[0]).argmax(1) == data[1]).float().mean().item()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=300)
    parser.add_argument("--neuron-patience", type=int, default=6)
    parser.add_argument("--dendrite-patience", type=int, default=2)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    data = load()
    tracker = pb.PerforatedTracker(
        "max",
        pb.PhaseSchedule(
            neuron_patience=args.neuron_patience, dendrite_patience=args.dendrite_patience, max_dendrites=3
        ),
        candidate_lr=0.05,
    )
    model = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 10))
    # Step 2: convert the model so its neurons can grow dendrites.
    model = tracker.initialize(model)
    # Steps 3-4: optimizer and scheduler, set up through the tracker for the current phase.
    tracker.set_optimizer(torch.optim.Adam, lr=5e-3)
    tracker.set_scheduler(StepLR, step_size=50, gamma=0.5)
    optimizer, scheduler = tracker.setup_optimizer(model)
    x_train, y_train = data["train"]
    epochs = 0
    for _ in range(args.max_epochs):
        epochs += 1
        model.train()
        for batch in torch.randperm(len(y_train)).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
        scheduler.step()
        # Step 5: report the validation score; the tracker restructures and decides.
        model, restructured, complete = tracker.add_validation_score(accuracy(model, data["val"]), model)
        if complete:
            break
        if restructured:
            optimizer, scheduler = tracker.setup_optimizer(model)
    else:
        model = tracker.finish(model)  # the epoch budget ran out: keep the best model
    result = {
        "epochs": epochs,
        "val_accuracy": accuracy(model, data["val"]),
        "test_accuracy": accuracy(model, data["test"]),
        "dendrites": max(layer.num_dendrites for layer in pb.perforated_layers(model)),
        "parameters": pb.parameter_counts(model)["total"],
    }
    state = tracker.machine.state
    result["best_before_dendrites"] = state.baseline if state.baseline is not None else float("nan")
    result["cycles_accepted"] = state.accepted_cycles
    return result


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(main())
