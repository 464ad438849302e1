#!/usr/bin/env python
r"""Accuracy and compression benchmark: do dendrites beat the same network, and a wider one?

Run from the repository root (``pb_lightning`` need not be installed)::

    python benchmarks/accuracy.py --quick --out /tmp/acc     # smoke test: < 60 s, digits + spirals
    python benchmarks/accuracy.py --seeds 5 --out benchmarks/results/accuracy   # digits, spirals, MNIST-1D MLPs
    python benchmarks/accuracy.py --datasets digits spirals mnist1d mnist1d_cnn fashion \
        --seeds 5 --jobs 2 --out benchmarks/results/accuracy                    # the README's run: ~1 hour

MNIST-1D needs ``pip install mnist1d`` (the ``bench`` extra); Fashion-MNIST needs
``apt-get install -y dataset-fashion-mnist``. Nothing is downloaded and nothing is written
outside ``--out``.

Variants (each benchmark, each seed)
------------------------------------
* ``base``: the same network without dendrites. It is trained by a
  :class:`~pb_lightning.PerforatedCallback` with ``max_dendrites=0``: the same neuron-phase
  patience as the dendritic runs, after which the callback stops and restores the best
  validation weights. So the baseline is trained *exactly* like the first neuron phase of the
  dendritic runs (the "equally trained" baseline), with no separate EarlyStopping/ModelCheckpoint
  logic that could differ in subtle ways.
* ``pb``: pb_lightning's correlation dendrites with the default :class:`~pb_lightning.DendriteConfig`
  and the callback's default schedule (dendrite patience 3, up to 8 sets, 2 tries); the neuron
  patience and the monitored metric are per benchmark (see :func:`benches`: ``val_loss`` with
  patience 5, but ``val_acc`` with patience 10 on MNIST-1D, whose validation loss rises long
  before its accuracy stops improving).
* ``grad``: gradient-descent dendrites, ``DendriteConfig(learning="gradient", num_candidates=1)``
  (the reference package's free behaviour), same schedule.
* ``wide``: the network without dendrites, its width chosen so that its parameter count is as
  close as possible to the *same seed's* final ``pb`` model (``parameter_counts()["total"]``),
  trained like ``base``. Dendrites add parameters; this is the baseline that says whether they
  are better spent on dendrites than on width.
* ``inert`` (with ``--controls``): ``pb``'s run with
  :func:`pb_lightning.engine.controls.make_dendrites_inert` — the same cycles and rollbacks through the
  Lightning callback, dendrite output weights held at 0. What it gains over ``base`` is the schedule's.
* ``restart`` (with ``--controls``): the plain network through ``PerforatedCallback(restarts_only=True)``.
  ``benchmarks/research.py`` runs these controls at several widths (the frontiers); here they check
  that the Lightning path agrees with it.

Validation decides everything (phase switches, the restored best weights); the test split is only
evaluated once, at the end of each fit. Reported per variant: mean ± std over seeds of test
accuracy, the remaining-error reduction ``(err_base − err_x) / err_base`` (paired by seed), the
total parameters, dendrite sets per layer, epochs and wall time.

Compression
-----------
The digits and MNIST-1D MLPs, the MNIST-1D CNNs and the Fashion-MNIST CNN are run at ¼ and/or ½
of a *full* width; the full-width network is also trained without dendrites (variant ``full``).
The compression table lists every ¼/½ variant against it and names the smallest dendritic
model whose mean test accuracy reaches the full-width baseline's mean minus its std, with its
parameter fraction.

Processes
---------
``--jobs 2`` runs two (benchmark, seed) units at a time, one torch thread each; ``--jobs 1``
(the default with ``--quick``) runs in-process with two threads. Never more than 2 on a 2-core
machine. Results are written after every finished unit, so an interrupted run keeps what it did.
Wall times on a shared machine are noisy: compare epochs first.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent), str(_HERE)]

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from common.cli import quiet_lightning  # noqa: E402
from machine import run_meta  # noqa: E402

from pb_lightning import DendriteConfig, PerforatedCallback  # noqa: E402
from pb_lightning.engine.controls import is_inert, make_dendrites_inert  # noqa: E402
from pb_lightning.engine.params import parameter_counts  # noqa: E402

VARIANTS = ("base", "pb", "grad", "wide", "inert", "restart")
DENDRITIC = ("pb", "grad")
#: ``--controls``: the same seed's ``pb`` run with its dendrites held inert, and the plain network
#: through the restart schedule (see ``research.py`` for the frontiers built from them).
CONTROLS = ("inert", "restart")


@dataclass(frozen=True)
class Bench:
    """One benchmark: a data set, a model family and the width under test.

    ``make(width, dendrites)`` builds the model; ``width`` is the hidden width (MLP) or channel
    count (CNN), the knob the parameter-matched baseline turns.
    """

    name: str
    dataset: str
    family: str
    width: int
    make: Callable[[int, DendriteConfig | None], Any]
    data: dict[str, Any] = field(default_factory=dict)
    max_epochs: int = 400
    full_width: int | None = None  # compression: the full width this one is a fraction of
    monitor: str = "val_loss"  # what PerforatedCallback decides on ("val_loss": min, "val_acc": max)
    neuron_patience: int = 5
    task: str = "classification"  # or "regression" (research.py only: MSE loss, R² reported)


def _mlp(in_features: int, num_classes: int, lr: float) -> Callable[[int, DendriteConfig | None], Any]:
    def make(width: int, dendrites: DendriteConfig | None) -> Any:
        from models import MLP

        return MLP(in_features, width, depth=2, num_classes=num_classes, lr=lr, dendrites=dendrites)

    return make


def _cnn1d(width: int, dendrites: DendriteConfig | None) -> Any:
    from models import CNN1D

    return CNN1D(channels=width, dendrites=dendrites)


def _fashion(width: int, dendrites: DendriteConfig | None) -> Any:
    from models import FashionCNN

    return FashionCNN(channels=width, dendrites=dendrites)


def benches(quick: bool) -> dict[str, list[Bench]]:
    """The benchmarks of each ``--datasets`` name."""
    # digits: lr 1e-3 as in the main job (configs/digits.yaml); at 1e-2 the validation loss
    # bottoms out after ~10 epochs and no later cycle can beat it.
    digits = _mlp(64, 10, 1e-3)
    # MNIST-1D: the validation loss of a narrow MLP starts rising long before its validation
    # accuracy stops improving (measured: loss minimum near epoch 80, accuracy still rising at
    # 200 for width 32, lr 1e-3), so it decides on val_acc with a longer patience.
    mnist1d = _mlp(40, 10, 3e-3)
    m1d: dict[str, Any] = {"monitor": "val_acc", "neuron_patience": 10, "max_epochs": 300}
    # The narrow CNNs keep gaining from dendrites at 300 epochs (CNN-4 pb runs hit that cap with
    # 3-4 sets), so they get a longer budget; the dendrite-free variants stop early anyway.
    m1d_cnn: dict[str, Any] = {**m1d, "max_epochs": 500}
    m1d_cnn_data: dict[str, Any] = {"batch_size": 100, "image_shape": (1, 40)}
    return {
        "digits": [
            Bench("digits MLP-8", "digits", "digits MLP", 8, digits, {"batch_size": 64}, full_width=32),
            Bench("digits MLP-16", "digits", "digits MLP", 16, digits, {"batch_size": 64}, full_width=32),
        ],
        "spirals": [
            Bench("spirals MLP 2-8-8-2", "spirals", "spirals MLP", 8, _mlp(2, 2, 1e-2), {"batch_size": 32}),
        ],
        "mnist1d": [
            Bench("MNIST-1D MLP-16", "mnist1d", "MNIST-1D MLP", 16, mnist1d, {"batch_size": 100}, full_width=64, **m1d),
            Bench("MNIST-1D MLP-32", "mnist1d", "MNIST-1D MLP", 32, mnist1d, {"batch_size": 100}, full_width=64, **m1d),
        ],
        "mnist1d_cnn": [
            Bench(
                f"MNIST-1D CNN-{width}",
                "mnist1d",
                "MNIST-1D CNN",
                width,
                _cnn1d,
                m1d_cnn_data,
                full_width=16,
                **m1d_cnn,
            )
            for width in (4, 8)
        ],
        "fashion": [
            Bench(
                "Fashion-MNIST CNN-4",
                "fashion",
                "Fashion CNN",
                4,
                _fashion,
                {"batch_size": 128, "limit_train": 12000},
                max_epochs=100,
                full_width=16,
            ),
        ],
    }


#: ``--max-dendrites``: cap on dendrite sets per layer for ``pb``/``grad`` (None: the callback's default, 8).
MAX_DENDRITES: int | None = None


def schedule(bench: Bench, quick: bool) -> dict[str, Any]:
    """The callback's settings: defaults (but the benchmark's monitor and neuron patience) for
    real runs; fixed short phases for ``--quick``, which only checks that everything runs."""
    monitor = {"monitor": bench.monitor, "mode": "min" if bench.monitor == "val_loss" else "max"}
    if quick:
        return {**monitor, "neuron_epochs": 3, "dendrite_epochs": 2, "max_dendrites": 1}
    cap = {} if MAX_DENDRITES is None else {"max_dendrites": MAX_DENDRITES}
    return {**monitor, "neuron_patience": bench.neuron_patience, **cap}


def param_count(bench: Bench, width: int) -> int:
    return sum(p.numel() for p in bench.make(width, None).parameters())


def matched_width(bench: Bench, target: int) -> int:
    """The width whose dendrite-free parameter count is closest to ``target`` (ties: the smaller)."""
    best, best_gap = 1, math.inf
    width = 1
    while True:
        count = param_count(bench, width)
        gap = abs(count - target)
        if gap < best_gap:
            best, best_gap = width, gap
        if count > target:
            return best
        width += 1


def train_one(
    bench: Bench,
    variant: str,
    width: int,
    seed: int,
    quick: bool,
    extra_callbacks: Sequence[pl.Callback] = (),
    schedule_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit one variant of one benchmark with one seed and evaluate it on the test split once.

    ``extra_callbacks`` run beside the :class:`~pb_lightning.PerforatedCallback` (after it), so
    another benchmark (``cycle_cost.py``) can observe exactly this run; ``schedule_overrides``
    are further callback arguments (e.g. ``dendrite_patience_steps``).
    """
    from models import ArrayDataModule

    quiet_lightning()
    data = ArrayDataModule(bench.dataset, **bench.data)
    data.setup()  # generates the data (MNIST-1D reseeds global RNGs) before the run is seeded
    pl.seed_everything(seed, workers=True, verbose=False)
    dendrites = {
        "pb": DendriteConfig(),
        "inert": DendriteConfig(),
        "grad": DendriteConfig(learning="gradient", num_candidates=1),
    }.get(variant)
    model = bench.make(width, dendrites)
    sched = schedule(bench, quick)
    if variant == "inert":
        model.configure_model()  # perforate now (fit's own call then finds it done) ...
        make_dendrites_inert(model)  # ... so the control applies before the first dendrite phase
    elif variant == "restart":
        sched["restarts_only"] = True
    elif variant not in DENDRITIC:
        sched["max_dendrites"] = 0
    callback = PerforatedCallback(**(sched | (schedule_overrides or {})))
    trainer = pl.Trainer(
        max_epochs=12 if quick else bench.max_epochs,
        callbacks=[callback, *extra_callbacks],
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=False,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    fit_seconds = time.perf_counter() - start
    (test,) = trainer.test(model, data, verbose=False)
    counts = parameter_counts(model)
    layers = model.perforated_layers()
    return {
        "benchmark": bench.name,
        "variant": variant,
        "seed": seed,
        "width": width,
        "test_acc": float(test["test_acc"]),
        "monitor": bench.monitor,
        "best_val_score": float(callback.machine.state.global_best),
        "params": counts["total"],
        "params_original": counts["original"],
        "params_dendrites": counts["dendrites"],
        "dendrites_per_layer": max((layer.num_dendrites for layer in layers), default=0),
        "inert": is_inert(model),
        "restarts_only": callback.machine.schedule.restarts_only,
        "epochs": trainer.current_epoch,
        "wall_s": fit_seconds,
        # What a budget of time measured (None for a budget of validations): the first neuron
        # phase's seconds, the budget's unit, and all the seconds the run reported.
        "budget_baseline_s": callback.machine.state.baseline_seconds,
        "budget_spent_s": callback.machine.state.seconds,
    }


def run_unit(args: tuple[str, int, str, bool, int, int | None]) -> list[dict[str, Any]]:
    """One (benchmark, seed) unit: base, pb, grad, then wide matched to this seed's pb model
    (and with ``kind == "controls"`` the ``inert`` and ``restart`` controls).

    ``kind == "full"`` trains only the full-width dendrite-free network (compression).
    """
    global MAX_DENDRITES
    bench_name, seed, kind, quick, threads, MAX_DENDRITES = args
    torch.set_num_threads(threads)
    bench = next(b for group in benches(quick).values() for b in group if b.name == bench_name)
    if kind == "full":
        assert bench.full_width is not None
        row = train_one(bench, "base", bench.full_width, seed, quick)
        return [{**row, "benchmark": f"{bench.family} full ({bench.full_width})", "variant": "full"}]
    rows = [train_one(bench, v, bench.width, seed, quick) for v in ("base", "pb", "grad")]
    wide = matched_width(bench, rows[1]["params"])
    rows.append(train_one(bench, "wide", wide, seed, quick))
    if kind == "controls":
        rows += [train_one(bench, v, bench.width, seed, quick) for v in CONTROLS]
    return rows


# ------------------------------------------------------------------------------------------ summary
def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per benchmark and variant: mean ± std over seeds, and error reductions paired by seed."""
    by_bench: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for row in rows:
        by_bench.setdefault(row["benchmark"], {}).setdefault(row["variant"], {})[row["seed"]] = row
    summary: dict[str, Any] = {}
    for bench, variants in by_bench.items():
        base = variants.get("base", {})
        out: dict[str, Any] = {}
        for variant, seeds in variants.items():
            reductions = []
            for seed, row in seeds.items():
                if seed in base and variant != "base":
                    err_base, err_x = 1 - base[seed]["test_acc"], 1 - row["test_acc"]
                    reductions.append((err_base - err_x) / err_base if err_base > 0 else math.nan)
            stats = {
                key: _mean_std([float(r[key]) for r in seeds.values()])
                for key in ("test_acc", "params", "epochs", "wall_s", "dendrites_per_layer", "width")
            }
            stats["error_reduction"] = _mean_std(reductions) if reductions else (math.nan, math.nan)
            stats["seeds"] = sorted(seeds)
            out[variant] = stats
        summary[bench] = out
    return summary


def compression(rows: list[dict[str, Any]], quick: bool) -> list[dict[str, Any]]:
    """Per MLP family: the full-width baseline against every ¼/½-width variant."""
    summary = summarize(rows)
    result = []
    for group in benches(quick).values():
        for bench in group:
            if bench.full_width is None:
                continue
            full_name = f"{bench.family} full ({bench.full_width})"
            if full_name not in summary or bench.name not in summary:
                continue
            if any(r["family"] == bench.family for r in result):
                continue
            full = summary[full_name]["full"]
            acc_full, std_full = full["test_acc"]
            candidates = []
            for b in (b for g in benches(quick).values() for b in g if b.family == bench.family):
                for variant, stats in summary.get(b.name, {}).items():
                    candidates.append(
                        {
                            "benchmark": b.name,
                            "variant": variant,
                            "fraction": f"{b.width}/{b.full_width}",
                            "test_acc": stats["test_acc"],
                            "params": stats["params"][0],
                            "param_fraction": stats["params"][0] / full["params"][0],
                            "matches": stats["test_acc"][0] >= acc_full - std_full,
                        }
                    )
            matching = [c for c in candidates if c["matches"] and c["variant"] in DENDRITIC]
            smallest = min(matching, key=lambda c: c["params"]) if matching else None
            result.append(
                {
                    "family": bench.family,
                    "full_width": bench.full_width,
                    "full": {"test_acc": full["test_acc"], "params": full["params"][0], "seeds": full["seeds"]},
                    "rows": candidates,
                    "smallest_matching_dendritic": smallest,
                }
            )
    return result


def targets(summary: dict[str, Any], comp: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's three targets, checked on the numbers (not asserted: reported)."""
    mnist_family = {b: s for b, s in summary.items() if ("MNIST" in b) and "pb" in s}
    best_mnist = max(
        ((b, s["pb"]["error_reduction"][0]) for b, s in mnist_family.items()), key=lambda t: t[1], default=None
    )
    gaps = [s["pb"]["test_acc"][0] - s["wide"]["test_acc"][0] for s in summary.values() if "pb" in s and "wide" in s]
    comp_hits = [
        c["smallest_matching_dendritic"]
        for c in comp
        if c["smallest_matching_dendritic"] is not None and c["smallest_matching_dendritic"]["param_fraction"] <= 0.5
    ]
    return {
        "error_reduction_29pct_mnist_family": {
            "best": best_mnist,
            "met": best_mnist is not None and best_mnist[1] >= 0.29,
        },
        "pb_beats_param_matched_on_average": {
            "mean_acc_gap_pb_minus_wide": statistics.fmean(gaps) if gaps else math.nan,
            "met": bool(gaps) and statistics.fmean(gaps) > 0,
        },
        "compression_half_params": {"hits": comp_hits, "met": bool(comp_hits)},
    }


# ----------------------------------------------------------------------------------------- markdown
def _pm(pair: tuple[float, float] | list[float], scale: float = 1.0, digits: int = 2) -> str:
    mean, std = pair
    if math.isnan(mean):
        return "–"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    """The Markdown report, generated from the JSON alone."""
    meta = results["meta"]
    lines = [
        "# Accuracy and compression benchmark",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}",
        f"- machine: {meta['uname']} (processor: `{meta['processor'] or 'n/a'}`), {meta['cpu_count']} CPUs; "
        f"load average at start {meta['load_start']}, at end {meta.get('load_end', 'n/a')}",
        f"- torch {meta['torch']}, lightning {meta['lightning']}, python {meta['python']}; "
        f"pb_lightning commit {meta.get('commit', 'unknown')}",
        f"- seeds: {meta['seeds']}; jobs: {meta['jobs']}; total wall time {meta.get('total_s', math.nan):.0f} s",
        "",
        "Test accuracy (%) and remaining-error reduction vs `base` (%, paired by seed), mean ± std over seeds. "
        "`base`: no dendrites, trained like the first neuron phase (`max_dendrites=0`); `pb`: correlation "
        "dendrites (defaults); `grad`: gradient-descent dendrites; `wide`: no dendrites, width matched to "
        "the same seed's `pb` parameter count.",
        "",
        "| benchmark | variant | width | test acc % | error reduction % | params | dendrite sets/layer | epochs "
        "| wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for bench, variants in results["summary"].items():
        for variant in (*VARIANTS, "full"):
            if variant not in variants:
                continue
            s = variants[variant]
            lines.append(
                f"| {bench} | {variant} | {_pm(s['width'], digits=1)} | {_pm(s['test_acc'], 100)} | "
                f"{_pm(s['error_reduction'], 100, 1) if variant not in ('base', 'full') else '–'} | "
                f"{_pm(s['params'], digits=0)} | {_pm(s['dendrites_per_layer'], digits=1)} | "
                f"{_pm(s['epochs'], digits=0)} | {_pm(s['wall_s'], digits=1)} |"
            )
    if results["compression"]:
        lines += [
            "",
            "## Compression",
            "",
            "Full-width dendrite-free baseline against ¼- and ½-width networks; `matches`: mean test accuracy "
            "≥ the full-width mean − its std.",
            "",
        ]
        for c in results["compression"]:
            lines += [
                "| family | model | variant | test acc % | params | fraction of full params | matches full |",
                "|---|---|---|---:|---:|---:|---|",
            ]
            lines.append(
                f"| {c['family']} | full width {c['full_width']} | base | {_pm(c['full']['test_acc'], 100)} | "
                f"{c['full']['params']:.0f} | 1.00 | – |"
            )
            for r in c["rows"]:
                lines.append(
                    f"| {c['family']} | {r['benchmark']} ({r['fraction']}) | {r['variant']} | "
                    f"{_pm(r['test_acc'], 100)} | {r['params']:.0f} | {r['param_fraction']:.2f} | "
                    f"{'yes' if r['matches'] else 'no'} |"
                )
            s = c["smallest_matching_dendritic"]
            lines.append("")
            lines.append(
                f"**{c['family']}**: smallest dendritic model matching the full width: "
                + (
                    f"{s['benchmark']} `{s['variant']}`, {s['param_fraction']:.0%} of the parameters "
                    f"({_pm(s['test_acc'], 100)}% vs {_pm(c['full']['test_acc'], 100)}%)."
                    if s
                    else "none."
                )
            )
            lines.append("")
    t = results["targets"]
    best = t["error_reduction_29pct_mnist_family"]["best"]
    lines += [
        "",
        "## Targets",
        "",
        "- ≥ 29% remaining-error reduction (`pb` vs `base`) on an MNIST-family benchmark: "
        + (f"best {best[0]} {best[1]:.1%} — " if best else "no MNIST-family run — ")
        + ("**met**" if t["error_reduction_29pct_mnist_family"]["met"] else "**not met**"),
        "- `pb` better than the parameter-matched `wide` on average: mean accuracy gap "
        f"{t['pb_beats_param_matched_on_average']['mean_acc_gap_pb_minus_wide'] * 100:+.2f} points — "
        + ("**met**" if t["pb_beats_param_matched_on_average"]["met"] else "**not met**"),
        "- compression (match full width with ≤ 50% of its parameters): "
        + ("**met**" if t["compression_half_params"]["met"] else "**not met**"),
        "",
    ]
    return "\n".join(lines)


def write(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any], quick: bool) -> dict[str, Any]:
    summary = summarize(rows)
    comp = compression(rows, quick)
    results = {"meta": meta, "runs": rows, "summary": summary, "compression": comp, "targets": targets(summary, comp)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    (out / "results.md").write_text(markdown(json.loads((out / "results.json").read_text())))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=5, help="seeds per benchmark (default 5; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, short fixed phases, < 60 s")
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        choices=["digits", "spirals", "mnist1d", "mnist1d_cnn", "fashion"],
        help="benchmarks to run (default: digits spirals mnist1d; --quick: digits spirals)",
    )
    parser.add_argument("--no-compression", action="store_true", help="skip the full-width baselines")
    parser.add_argument("--controls", action="store_true", help="also run the inert and restart controls")
    parser.add_argument("--jobs", type=int, default=None, help="parallel processes (1 or 2; default 2, 1 with --quick)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/accuracy"), help="output directory")
    parser.add_argument("--max-dendrites", type=int, default=None, help="cap dendrite sets per layer (default 8)")
    parser.add_argument("--render", action="store_true", help="only regenerate OUT/results.md from OUT/results.json")
    args = parser.parse_args(argv)
    if args.render:
        (args.out / "results.md").write_text(markdown(json.loads((args.out / "results.json").read_text())))
        print((args.out / "results.md").read_text())
        return 0
    quick = args.quick
    seeds = 1 if quick and "--seeds" not in (argv or sys.argv) else args.seeds
    datasets = args.datasets or (["digits", "spirals"] if quick else ["digits", "spirals", "mnist1d"])
    jobs = max(1, min(2, args.jobs if args.jobs is not None else (1 if quick else 2)))
    threads = 2 if jobs == 1 else 1
    selected = [b for d in datasets for b in benches(quick)[d]]
    units: list[tuple[str, int, str, bool, int, int | None]] = []
    cap = args.max_dendrites
    for seed in range(seeds):
        kind = "controls" if args.controls else "variants"
        units += [(b.name, seed, kind, quick, threads, cap) for b in selected]
        if not args.no_compression:
            fams = {b.family: b for b in selected if b.full_width is not None}
            units += [(b.name, seed, "full", quick, threads, cap) for b in fams.values()]
    meta = run_meta(argv)
    meta["processor"] = meta.pop("machine")  # this report names the CPU model `processor` (markdown reads it)
    meta |= {
        "lightning": pl.__version__,
        "seeds": seeds,
        "jobs": jobs,
        "quick": quick,
        "datasets": datasets,
        "max_dendrites": cap,
        "load_start": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    print(f"{len(units)} units ({seeds} seeds, {datasets}), {jobs} process(es)", flush=True)

    def done(unit_rows: list[dict[str, Any]]) -> None:
        rows.extend(unit_rows)
        for r in unit_rows:
            print(
                f"  {r['benchmark']:<26} {r['variant']:<5} seed {r['seed']} width {r['width']:>3}: "
                f"test {r['test_acc']:.4f} params {r['params']:>6} D {r['dendrites_per_layer']} "
                f"epochs {r['epochs']:>3} {r['wall_s']:6.1f} s",
                flush=True,
            )
        meta["total_s"] = time.perf_counter() - start
        meta["load_end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        write(args.out, rows, meta, quick)

    if jobs == 1:
        for unit in units:
            done(run_unit(unit))
    else:
        with mp.get_context("spawn").Pool(jobs, maxtasksperchild=1) as pool:
            for unit_rows in pool.imap_unordered(run_unit, units):
                done(unit_rows)
    results = write(args.out, rows, meta, quick)
    print((args.out / "results.md").read_text())
    print(f"done in {time.perf_counter() - start:.1f} s; wrote {args.out / 'results.json'} and results.md")
    return 0 if results["runs"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
