#!/usr/bin/env python
"""The callback's own cost: bookkeeping time per epoch, and the wall time of whole cycles.

    python benchmarks/callback_overhead.py            # the digits main job, 80 epochs
    python benchmarks/callback_overhead.py --quick    # smoke test: a few epochs
    python benchmarks/callback_overhead.py --json out.json
    python benchmarks/callback_overhead.py --out benchmarks/results/callback_overhead  # results.json + .md
    python benchmarks/callback_overhead.py --render --out benchmarks/results/callback_overhead  # re-render .md

The digits job of ``configs/digits.yaml`` (64-8-8-10 MLP, batch 64) is trained with
``PerforatedCallback``, every hook of which is wrapped in a timer. *Bookkeeping* is the time
spent inside the callback's hooks (deciding, snapshotting weights, restructuring, rebuilding the
optimizer, recording the history), measured per epoch against the epoch's wall time; the
target is at most 3% of an epoch. Work the callback causes elsewhere — candidates training in
a dendrite phase — is the method itself, not bookkeeping, and is not counted. Cycle wall time
is measured from each ``start_dendrite_phase`` (or ``retry``) decision to the decision that ends
the neuron phase after the acceptance.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent), str(_HERE)]  # runnable as `python benchmarks/callback_overhead.py`, no install

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from common.cli import add_report_options, check_report_options  # noqa: E402
from machine import render_report, run_meta, save_report  # noqa: E402

import pb_lightning as pb  # noqa: E402
from pb_lightning.demos.digits import DigitsDataModule, DigitsMLP  # noqa: E402

_HOOKS = (
    "on_fit_start",
    "on_train_start",
    "on_train_epoch_start",
    "on_validation_epoch_start",
    "on_validation_end",
    "on_train_epoch_end",
    "on_before_backward",
    "on_train_end",
    "on_fit_end",
)


class _TimedCallback(pb.PerforatedCallback):
    """PerforatedCallback whose hooks add their duration to a per-epoch account."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spent: dict[int, float] = defaultdict(float)
        for name in _HOOKS:
            setattr(self, name, self._timed(getattr(self, name)))

    def _timed(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        def run(trainer: pl.Trainer, *args: Any) -> Any:
            start = time.perf_counter()
            try:
                return hook(trainer, *args)
            finally:
                self.spent[trainer.current_epoch] += time.perf_counter() - start

        return run


class _EpochClock(pl.Callback):
    def __init__(self) -> None:
        self.start: dict[int, float] = {}
        self.seconds: dict[int, float] = {}

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start[trainer.current_epoch] = time.perf_counter()

    def close(self, epoch: int) -> None:
        self.seconds[epoch] = time.perf_counter() - self.start[epoch]


def markdown(result: dict[str, Any]) -> str:
    """The Markdown table, generated from the result alone (so a saved results.json re-renders)."""
    meta = result["meta"]
    lines = [
        f"## PerforatedCallback overhead on the digits job "
        f"({result['epochs']} epochs, {result['fit_seconds']:.1f} s)\n",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}, {meta['cpu_count']} CPUs; torch {meta['torch']}, "
        f"lightning {meta['lightning']}, python {meta['python']}; pb_lightning commit {meta['commit']}\n",
        "| measure | value |\n|---|---:|",
        f"| median epoch | {result['median_epoch_seconds'] * 1000:.1f} ms |",
        f"| bookkeeping, median share of an epoch | {100 * result['bookkeeping_share_median']:.2f}% (target <= 3%) |",
        f"| bookkeeping, largest share (an epoch with a restructure) | {100 * result['bookkeeping_share_max']:.2f}% |",
        f"| bookkeeping, whole fit | {result['bookkeeping_seconds_total']:.3f} s |",
    ]
    for i, (n, seconds) in enumerate(zip(result["cycle_epochs"], result["cycle_seconds_estimate"], strict=True)):
        lines.append(f"| cycle {i + 1}: epochs from dendrite-phase start to the next | {n} (~{seconds:.1f} s) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train the digits job with timed hooks, print the Markdown table, optionally save it; return the numbers.

    The result dict is returned (not just printed) so that a caller can check the numbers; with
    ``--render`` it is the one loaded from ``OUT/results.json``.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 6 epochs, short fixed phases")
    parser.add_argument("--epochs", type=int, default=80, help="maximum epochs (default 80)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result to this JSON file")
    add_report_options(parser)
    args = parser.parse_args(argv)
    check_report_options(parser, args)
    if args.render:
        print(render_report(args.out, markdown))
        return json.loads((args.out / "results.json").read_text())
    meta = run_meta(argv) | {"lightning": pl.__version__, "threads": 2}
    torch.set_num_threads(meta["threads"])
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("pb_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    epochs = 6 if args.quick else args.epochs
    pl.seed_everything(0, verbose=False)
    schedule = (
        {"neuron_epochs": 2, "dendrite_epochs": 1, "max_dendrites": 2}
        if args.quick
        else {"neuron_patience": 4, "dendrite_patience": 2, "max_dendrites": 4}
    )
    callback = _TimedCallback("val_loss", "min", **schedule)
    clock = _EpochClock()

    class _Close(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            clock.close(trainer.current_epoch)

    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[clock, callback, _Close()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    started = time.perf_counter()
    trainer.fit(DigitsMLP(hidden=8, lr=0.01), DigitsDataModule())
    total = time.perf_counter() - started
    shares = [callback.spent[e] / clock.seconds[e] for e in clock.seconds if clock.seconds[e] > 0]
    history = callback.machine.state.history
    cycles, begin = [], None
    for entry in history:
        if entry["action"] in ("start_dendrite_phase", "retry"):
            if begin is not None:
                cycles.append(entry["validation"] - begin)
            begin = entry["validation"]
    epoch_seconds = statistics.median(clock.seconds.values())
    result = {
        "meta": meta,
        "epochs": len(clock.seconds),
        "fit_seconds": total,
        "median_epoch_seconds": epoch_seconds,
        "bookkeeping_share_median": statistics.median(shares),
        "bookkeeping_share_max": max(shares),
        "bookkeeping_seconds_total": sum(callback.spent.values()),
        "cycle_epochs": cycles,
        "cycle_seconds_estimate": [c * epoch_seconds for c in cycles],
        "decisions": [h["action"] for h in history if h["action"] != "continue"],
    }
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    # With --out, what is printed is what was rendered from the saved JSON (the same text).
    print(save_report(args.out, result, markdown) if args.out is not None else markdown(result))
    return result


if __name__ == "__main__":
    main()
