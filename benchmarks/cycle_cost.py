#!/usr/bin/env python
r"""What a whole perforated run costs against its baseline, and where the extra time goes.

Run from the repository root (``pb_lightning`` need not be installed)::

    python benchmarks/cycle_cost.py --quick --out /tmp/cc      # smoke test: digits MLP-8, < 60 s
    python benchmarks/cycle_cost.py --datasets digits mnist1d --seeds 2 \
        --benchmarks "MNIST-1D CNN-4" "Fashion-MNIST CNN-4" \
        --out benchmarks/results/cycle_cost                    # the README's run
    python benchmarks/cycle_cost.py --render --out benchmarks/results/cycle_cost   # re-render .md

For each accuracy benchmark (:mod:`accuracy`'s ``Bench`` definitions, trained by its Lightning
``train_one``: the runs users do), the dendritic ``pb`` run and the dendrite-free ``base`` run of
the same network and seed are fitted, and a :class:`PhaseClock` attributes every second of the
dendritic fit to the phase the model was in (neuron or dendrite) and to training or validation.
Reported per benchmark (mean over seeds):

* the dendritic run's wall time and epochs ÷ the baseline's (issue 22's target: ≤ 3× wall time
  on every benchmark, CNNs included, with default settings);
* the share of the dendritic run's wall time, epochs and training steps spent in dendrite
  phases, and the share of its wall time spent *validating during a dendrite phase*: the network
  is frozen then, so every such validation returns the same score and is pure cost;
* the test accuracy of both runs, so that a speed-up that costs accuracy shows.

One torch thread per run (``--threads``): the machine is shared, and the ratios, not the
absolute times, are the result. Wall times on a shared machine are noisy; epochs are not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent), str(_HERE)]

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from accuracy import benches, train_one  # noqa: E402
from common.cli import add_report_options  # noqa: E402
from machine import render_report, run_meta, save_report  # noqa: E402

from pb_lightning import in_dendrite_phase  # noqa: E402
from pb_lightning.cycle.schedule import BUDGET_UNITS  # noqa: E402

#: Issue 22's target for a dendritic run's wall time ÷ its baseline's, with default settings.
TARGET_WALL_RATIO = 3.0


class PhaseClock(pl.Callback):
    """Attribute a fit's wall time to (phase, activity): every interval between two hooks goes to
    the phase the model was in at the interval's start, and to "train" or "val".

    The phase is read from the model (:func:`~pb_lightning.in_dendrite_phase`), not from the
    callback's state machine, so the clock measures what the network did, whatever decided it.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)  # "neuron/train", "dendrite/val", ...
        self.steps: dict[str, int] = defaultdict(int)
        self.epochs: dict[str, float] = defaultdict(float)
        self.validations: dict[str, int] = defaultdict(int)
        self._epoch_steps: dict[str, int] = defaultdict(int)
        self._bucket = ""
        self._last = 0.0

    @staticmethod
    def _phase(pl_module: pl.LightningModule) -> str:
        return "dendrite" if in_dendrite_phase(pl_module) else "neuron"

    def _switch(self, bucket: str) -> None:
        now = time.perf_counter()
        if self._bucket:
            self.seconds[self._bucket] += now - self._last
        self._bucket, self._last = bucket, now

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._switch(f"{self._phase(pl_module)}/train")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_steps.clear()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        phase = self._phase(pl_module)
        self.steps[phase] += 1
        self._epoch_steps[phase] += 1
        self._switch(f"{phase}/train")

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        phase = self._phase(pl_module)
        self.validations[phase] += 1
        self._switch(f"{phase}/val")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._switch(f"{self._phase(pl_module)}/train")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # An epoch whose steps straddle a phase switch counts fractionally for each phase.
        total = sum(self._epoch_steps.values())
        for phase, n in self._epoch_steps.items():
            self.epochs[phase] += n / total

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._switch("")

    def report(self) -> dict[str, Any]:
        """Plain numbers for results.json."""
        return {
            "seconds": dict(self.seconds),
            "steps": dict(self.steps),
            "epochs": dict(self.epochs),
            "validations": dict(self.validations),
        }


def run_pair(
    bench_name: str,
    seed: int,
    quick: bool,
    patience_steps: int | None = None,
    run_budget: float | None = None,
    run_budget_unit: str | None = None,
) -> dict[str, Any]:
    """The baseline and the dendritic run of one benchmark and seed, with the dendritic run's clock.

    ``patience_steps``: end the dendritic run's dendrite phases in training steps
    (``PerforatedCallback(dendrite_patience_steps=...)``) instead of at validations only.
    """
    bench = next(b for group in benches(quick).values() for b in group if b.name == bench_name)
    base = train_one(bench, "base", bench.width, seed, quick)
    clock = PhaseClock()
    overrides: dict[str, Any] = {}
    if patience_steps is not None:
        overrides |= {"dendrite_patience_steps": patience_steps, "dendrite_epochs": None}
    if run_budget is not None:
        overrides["run_budget"] = run_budget
    if run_budget_unit is not None:
        overrides["run_budget_unit"] = run_budget_unit
    pb = train_one(bench, "pb", bench.width, seed, quick, extra_callbacks=[clock], schedule_overrides=overrides)
    phases = clock.report()
    clocked = sum(phases["seconds"].values())
    dendrite_s = sum(s for k, s in phases["seconds"].items() if k.startswith("dendrite/"))
    total_epochs = sum(phases["epochs"].values())
    total_steps = sum(phases["steps"].values())
    return {
        "benchmark": bench.name,
        "seed": seed,
        "base": base,
        "pb": pb,
        "phases": phases,
        "wall_ratio": pb["wall_s"] / base["wall_s"],
        "epoch_ratio": pb["epochs"] / max(1, base["epochs"]),
        "dendrite_wall_share": dendrite_s / clocked if clocked else 0.0,
        "dendrite_val_wall_share": phases["seconds"].get("dendrite/val", 0.0) / clocked if clocked else 0.0,
        "dendrite_epoch_share": phases["epochs"].get("dendrite", 0.0) / total_epochs if total_epochs else 0.0,
        "dendrite_step_share": phases["steps"].get("dendrite", 0) / total_steps if total_steps else 0.0,
    }


_AVERAGED = (
    "wall_ratio",
    "epoch_ratio",
    "dendrite_wall_share",
    "dendrite_val_wall_share",
    "dendrite_epoch_share",
    "dendrite_step_share",
)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per benchmark: means over seeds, and the target judged on the mean wall-time ratio."""
    by_bench: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_bench[row["benchmark"]].append(row)
    summary = []
    for name, runs in by_bench.items():
        entry: dict[str, Any] = {"benchmark": name, "seeds": len(runs)}
        for key in _AVERAGED:
            entry[key] = statistics.fmean(r[key] for r in runs)
        for variant in ("base", "pb"):
            entry[f"{variant}_test_acc"] = statistics.fmean(r[variant]["test_acc"] for r in runs)
            entry[f"{variant}_epochs"] = statistics.fmean(r[variant]["epochs"] for r in runs)
            entry[f"{variant}_wall_s"] = statistics.fmean(r[variant]["wall_s"] for r in runs)
        entry["pb_dendrites"] = statistics.fmean(r["pb"]["dendrites_per_layer"] for r in runs)
        # A budget of time: its unit (the pb run's own first neuron phase) against the base run,
        # and what the run spent in that unit. Older results (or a budget of validations) lack them.
        if all(r["pb"].get("budget_baseline_s") for r in runs):
            first = [r["pb"]["budget_baseline_s"] / r["base"]["wall_s"] for r in runs]
            entry["first_phase_vs_base"] = [min(first), max(first)]
            entry["spent_vs_first_phase"] = max(r["pb"]["budget_spent_s"] / r["pb"]["budget_baseline_s"] for r in runs)
        entry["target_met"] = entry["wall_ratio"] <= TARGET_WALL_RATIO
        summary.append(entry)
    return summary


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def markdown(report: dict[str, Any]) -> str:
    """The results table, rendered from results.json's runs (summarised here, so that results
    saved before a summary field existed render it too)."""
    meta = report["meta"]
    summary = summarize(report["runs"])
    lines = [
        "# Cycle cost: a dendritic run against its baseline",
        "",
        f"`{meta['command']}` — {meta['date']}, commit `{meta['commit']}`, {meta['machine']}, "
        f"torch {meta['torch']}, {meta['threads']} torch thread(s), load {meta['load_start']} → "
        f"{meta.get('load_end', '?')}.",
        "",
        "Means over seeds. *wall ×* and *epochs ×*: the `pb` run's fit ÷ the `base` run's (target: "
        f"wall ≤ {TARGET_WALL_RATIO:g}×). *In dendrite phases*: the share of the `pb` run's wall "
        "time, epochs and training steps spent with candidates attached; *frozen val*: the share of "
        "its wall time spent validating during a dendrite phase (the network is frozen then, so "
        "those validations all return the same score).",
        "",
        "| benchmark | seeds | base acc | pb acc | D | base epochs | pb epochs | base s | pb s "
        "| wall × | epochs × | dendrite wall | dendrite epochs | dendrite steps | frozen val "
        f"| ≤ {TARGET_WALL_RATIO:g}× |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['benchmark']} | {s['seeds']} | {s['base_test_acc']:.4f} | {s['pb_test_acc']:.4f} "
            f"| {s['pb_dendrites']:.1f} | {s['base_epochs']:.0f} | {s['pb_epochs']:.0f} "
            f"| {s['base_wall_s']:.1f} | {s['pb_wall_s']:.1f} | {s['wall_ratio']:.2f} | {s['epoch_ratio']:.2f} "
            f"| {_pct(s['dendrite_wall_share'])} | {_pct(s['dendrite_epoch_share'])} "
            f"| {_pct(s['dendrite_step_share'])} | {_pct(s['dendrite_val_wall_share'])} "
            f"| {'met' if s['target_met'] else '**missed**'} |"
        )
    missed = [s["benchmark"] for s in summary if not s["target_met"]]
    lines += [
        "",
        (
            f"Target (wall ≤ {TARGET_WALL_RATIO:g}× the baseline): **missed** on {', '.join(missed)}."
            if missed
            else f"Target (wall ≤ {TARGET_WALL_RATIO:g}× the baseline): met on every benchmark run here."
        ),
    ]
    budgeted = [s for s in summary if "first_phase_vs_base" in s]
    if budgeted:
        lines += [
            "",
            "The run budget's own accounting (a budget of time): the `pb` run's first neuron phase — the "
            "budget's unit — against the separate `base` run of the same epochs (range over seeds), and "
            "the most any run spent in that unit.",
            "",
            "| benchmark | pb first phase ÷ base run | spent ÷ first phase (max) |",
            "|---|---:|---:|",
            *(
                f"| {s['benchmark']} | {s['first_phase_vs_base'][0]:.2f}-{s['first_phase_vs_base'][1]:.2f} "
                f"| {s['spent_vs_first_phase']:.2f} |"
                for s in budgeted
            ),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: digits MLP-8, 1 seed, short phases")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per benchmark (default 2; 1 with --quick)")
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        choices=sorted(benches(False)),
        help="benchmark groups of accuracy.py (default: digits mnist1d; --quick: digits MLP-8 only)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument(
        "--dendrite-patience-steps",
        type=int,
        default=None,
        help="end the pb runs' dendrite phases this many training steps after the candidates converge",
    )
    parser.add_argument(
        "--benchmarks",
        nargs="+",
        default=[],
        help="further benchmarks by name (e.g. 'MNIST-1D CNN-4' 'Fashion-MNIST CNN-4'), after --datasets'",
    )
    parser.add_argument(
        "--run-budget",
        type=float,
        default=None,
        help="the pb runs' PerforatedCallback(run_budget=...) instead of the default",
    )
    parser.add_argument(
        "--run-budget-unit",
        choices=BUDGET_UNITS,
        default=None,
        help="the pb runs' PerforatedCallback(run_budget_unit=...) instead of the default (time)",
    )
    add_report_options(parser, default=Path("benchmarks/results/cycle_cost"))
    args = parser.parse_args(argv)
    if args.render:
        print(render_report(args.out, markdown))
        return 0
    torch.set_num_threads(args.threads)
    seeds = 1 if args.quick else args.seeds
    groups = args.datasets or ["digits", "mnist1d"]
    selected = [b.name for g in groups for b in benches(args.quick)[g]]
    if args.quick and args.datasets is None:
        selected = selected[:1]
    known = {b.name for group in benches(args.quick).values() for b in group}
    for name in args.benchmarks:
        if name not in known:
            parser.error(f"--benchmarks: unknown benchmark {name!r}; choose from {sorted(known)}")
        if name not in selected:
            selected.append(name)
    meta = run_meta(argv) | {
        "threads": args.threads,
        "seeds": seeds,
        "quick": args.quick,
        "lightning": pl.__version__,
        "load_start": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for seed in range(seeds):
        for name in selected:
            row = run_pair(name, seed, args.quick, args.dendrite_patience_steps, args.run_budget, args.run_budget_unit)
            rows.append(row)
            print(
                f"  {name:<24} seed {seed}: wall x{row['wall_ratio']:.2f} epochs x{row['epoch_ratio']:.2f} "
                f"dendrite wall {_pct(row['dendrite_wall_share'])} frozen val {_pct(row['dendrite_val_wall_share'])} "
                f"acc {row['base']['test_acc']:.4f} -> {row['pb']['test_acc']:.4f}",
                flush=True,
            )
            meta["total_s"] = time.perf_counter() - start
            meta["load_end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
            # Saved after every pair, so an interrupted run keeps what it measured.
            save_report(args.out, {"meta": meta, "runs": rows, "summary": summarize(rows)}, markdown)
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
