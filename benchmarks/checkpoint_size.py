#!/usr/bin/env python
"""What resumability costs: checkpoint size against a plain Lightning checkpoint, and memory held.

    python benchmarks/checkpoint_size.py --out benchmarks/results/checkpoint_size   # ~1 minute
    python benchmarks/checkpoint_size.py --quick --out /tmp/ckpt                     # smoke test
    python benchmarks/checkpoint_size.py --render --out benchmarks/results/checkpoint_size

A digits MLP (64-H-H-10, Adam) is trained through two dendrite cycles with a checkpoint after
every epoch. For each checkpoint: its size on disk, and the size of the *same* checkpoint without
the PerforatedCallback's state (what plain Lightning writes for the same model, optimizer and
loops). The callback's state is the phase machine (plain data), the history rows, and the weight
snapshots it needs to roll a rejected cycle back: the global best, and the phase best when it
differs. Target: at most 2× the plain checkpoint at every point of the cycle.

Memory: the snapshots the callback holds are counted by device. They are kept on the CPU (only
ever restored, with ``load_state_dict``), so the target of no extra accelerator memory holds by
construction; on this CPU-only machine the table shows where they live and how many bytes.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent), str(_HERE)]

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from common.cli import add_report_options, check_report_options  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from machine import render_report, run_meta, save_report  # noqa: E402

import pb_lightning as pb  # noqa: E402
from pb_lightning.demos.digits import DigitsDataModule, DigitsMLP  # noqa: E402


class _HeldMemory(pl.Callback):
    """After each epoch's decision: bytes of the snapshots the PerforatedCallback holds, by device."""

    def __init__(self, perforated: pb.PerforatedCallback) -> None:
        self.perforated = perforated
        self.by_epoch: dict[int, dict[str, int]] = {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        held: dict[str, int] = {}
        controller = self.perforated.driver.controller
        snapshots = {id(s): s for s in (controller.phase_best, controller.global_best) if s is not None}
        for snapshot in snapshots.values():
            for tensor in snapshot.values():
                held[tensor.device.type] = held.get(tensor.device.type, 0) + tensor.numel() * tensor.element_size()
        self.by_epoch[trainer.current_epoch] = held


def _size(obj: Any) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


def measure(hidden: int, epochs: int) -> dict[str, Any]:
    torch.manual_seed(0)
    callback = pb.PerforatedCallback("val_loss", "min", neuron_epochs=2, dendrite_epochs=2, max_dendrites=2)
    held = _HeldMemory(callback)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = ModelCheckpoint(dirpath=tmp, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        trainer = pl.Trainer(
            max_epochs=epochs,
            callbacks=[callback, held, checkpoints],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_train_batches=4,
        )
        model = DigitsMLP(hidden=hidden, lr=1e-3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, DigitsDataModule())
        rows = []
        for epoch in range(epochs):
            path = Path(tmp) / f"epoch={epoch}.ckpt"
            checkpoint = torch.load(path, weights_only=True)
            state_key = next(k for k in checkpoint["callbacks"] if k.startswith("PerforatedCallback"))
            state = checkpoint["callbacks"][state_key]
            plain = dict(checkpoint, callbacks={k: v for k, v in checkpoint["callbacks"].items() if k != state_key})
            plain.pop("pb_lightning", None)
            plain_size = _size(plain)
            history = state["recorder"]["rows"]
            rows.append(
                {
                    "epoch": epoch,
                    "after": history[-1]["action"] if history else "",
                    "phase": checkpoint["pb_lightning"]["dendrite_phase"] and "dendrite" or "neuron",
                    "dendrite_sets": checkpoint["pb_lightning"]["layers"][0]["dendrites"],
                    "snapshots_stored": sum(state[k] is not None for k in ("phase_best", "global_best")),
                    "bytes": path.stat().st_size,
                    "plain_bytes": plain_size,
                    "ratio": path.stat().st_size / plain_size,
                    "held": held.by_epoch.get(epoch, {}),
                }
            )
    return {"hidden": hidden, "rows": rows, "max_ratio": max(r["ratio"] for r in rows)}


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        "# Checkpoint size and memory held by the callback",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; machine: {meta['machine']} ({meta['cpu_count']} cores); commit `{meta['commit']}`",
        "",
    ]
    for net in report["networks"]:
        verdict = "met" if net["max_ratio"] <= 2 else "**missed**"
        lines += [
            f"## MLP 64-{net['hidden']}-{net['hidden']}-10: at most {net['max_ratio']:.2f}× a plain checkpoint "
            f"(target ≤ 2×: {verdict})",
            "",
            "| epoch | decision | phase | sets | snapshots stored | bytes | plain bytes | ratio | snapshots held |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in net["rows"]:
            held = ", ".join(f"{v:,} B on {k}" for k, v in sorted(r["held"].items())) or "none"
            lines.append(
                f"| {r['epoch']} | {r['after']} | {r['phase']} | {r['dendrite_sets']} | {r['snapshots_stored']} "
                f"| {r['bytes']:,} | {r['plain_bytes']:,} | {r['ratio']:.2f}× | {held} |"
            )
        lines.append("")
    lines.append(
        "Extra accelerator memory held by the callback: none — every snapshot is a CPU tensor (the last column), "
        "whatever device the model is on. Not measured on a GPU here (none was lent to this run)."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small network, 6 epochs")
    add_report_options(parser)
    args = parser.parse_args(argv)
    check_report_options(parser, args)
    if args.render:
        print(render_report(args.out, markdown))
        return {}
    torch.set_num_threads(1)
    sizes, epochs = ((16,), 6) if args.quick else ((16, 256), 10)
    report = {"meta": run_meta(argv), "networks": [measure(h, epochs) for h in sizes]}
    print(save_report(args.out, report, markdown) if args.out is not None else markdown(report))
    return report


if __name__ == "__main__":
    main()
