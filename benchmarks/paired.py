#!/usr/bin/env python
r"""Two arms of the research harness side by side, paired by benchmark and seed.

``research.py`` writes one ``results.json`` per result set; an arm run on another commit (an old
default, before a change of rule) lives in another set. This script pairs any two arms, each
named ``FILE:ARM``, over the (benchmark, seed) pairs both have, and prints a Markdown table::

    python benchmarks/paired.py --new benchmarks/results/research/results.json:plateau-steps20-budget2.5 \
        --old benchmarks/results/phases_end/old_default.json:pb --base benchmarks/results/research/results.json:base

Per benchmark: the seeds both arms ran, each arm's mean test score (accuracy, or R² for
regression, × 100), the paired gap new − old as mean ± standard error over seeds, whether the
new arm is worse by more than one standard error (issue 22's bar), and each arm's mean epochs
(with ``--base``: as a multiple of the base arm's epochs on the same seeds) and dendrite sets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from standard import mean_se


def _arm(spec: str) -> dict[tuple[str, int], dict[str, Any]]:
    """``FILE:ARM`` → {(benchmark, seed): run}."""
    path, _, arm = spec.rpartition(":")
    if not path or not arm:
        raise SystemExit(f"--new/--old/--base take FILE:ARM; got {spec!r}")
    runs = json.loads(Path(path).read_text())["runs"]
    return {(r["benchmark"], r["seed"]): r for r in runs if r["arm"] == arm}


def at_budget(run: dict[str, Any], budget: float, threshold: float = 1e-4) -> dict[str, Any]:
    """``run`` as it would have ended at ``budget`` times its own first neuron phase's seconds.

    Why: the old default's accuracy came from runs of 3-7x the baseline's epochs, so a gap to it
    mixes the rule with the compute. Cut at the budget the new default runs under, the old run
    answers the question of equal cost: what would it have left a user who stopped it then?
    Reads the ``trajectory`` a run records when its harness is patched as
    ``results/phases_end/equal_time/old_default_trajectory.patch`` (one entry per validation:
    seconds of training so far, without the recording's own test evaluations; phase; validation
    score; the judged weights' test score; dendrite sets).
    """
    limit = budget * run["first_phase_s"] if run.get("first_phase_s") is not None else float("inf")
    return _cut(run, [v for v in run["trajectory"] if v["t"] <= limit], threshold)


def at_epochs(run: dict[str, Any], epochs: int, threshold: float = 1e-4) -> dict[str, Any]:
    """``run`` cut after ``epochs`` epochs: the same question as :func:`at_budget` without the
    clock's noise (a run's seconds depend on what else the machine ran), at the price of counting a
    dendrite-phase epoch, which costs more, as one."""
    return _cut(run, [v for v in run["trajectory"] if v["epoch"] <= epochs], threshold)


def _cut(run: dict[str, Any], seen: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """The run ended after the validations ``seen``: it leaves its best weights by then, those of
    the first neuron-phase validation that beat every earlier one by the schedule's default margin
    (``threshold`` of the best, as ``PhaseMachine.is_improvement``; frozen dendrite-phase scores
    never count)."""
    seen = seen or run["trajectory"][:1]
    sign = -1.0 if run["mode"] == "min" else 1.0
    kept: dict[str, Any] | None = None
    for v in seen:
        if v["phase"] != "neuron":
            continue
        if kept is None or sign * (v["val"] - kept["val"]) > abs(kept["val"]) * threshold:
            kept = v
    kept = kept or seen[-1]
    return {
        **run,
        "test_acc": kept["test"],
        "epochs": seen[-1]["epoch"],
        "dendrites_per_layer": kept["dendrites"],
        "wall_s": seen[-1]["t"],
    }


def table(new: dict, old: dict, base: dict | None = None) -> str:
    """The Markdown table of :func:`paired` rows."""
    by_bench: dict[str, list[tuple[int, dict, dict]]] = defaultdict(list)
    for key, run in new.items():
        if key in old:
            by_bench[key[0]].append((key[1], run, old[key]))
    lines = [
        "| benchmark | seeds | new | old | new − old (paired) | worse by > 1 SE | epochs new / old"
        + (" (× base)" if base else "")
        + " | D new / old |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for bench, rows in sorted(by_bench.items()):
        gaps = [100 * (n["test_acc"] - o["test_acc"]) for _, n, o in rows]
        mean, se = mean_se(gaps)
        worse = len(gaps) > 1 and mean < -se
        epochs_new = statistics.fmean(n["epochs"] for _, n, _ in rows)
        epochs_old = statistics.fmean(o["epochs"] for _, _, o in rows)
        epochs = f"{epochs_new:.0f} / {epochs_old:.0f}"
        if base:
            seeds = [s for s, _, _ in rows if (bench, s) in base]
            if seeds:
                b = statistics.fmean(base[(bench, s)]["epochs"] for s in seeds)
                epochs = f"{epochs_new:.0f} / {epochs_old:.0f} ({epochs_new / b:.1f}× / {epochs_old / b:.1f}×)"
        d_new = statistics.fmean(n["dendrites_per_layer"] for _, n, _ in rows)
        d_old = statistics.fmean(o["dendrites_per_layer"] for _, _, o in rows)
        lines.append(
            f"| {bench} | {len(rows)} | {100 * statistics.fmean(n['test_acc'] for _, n, _ in rows):.2f} "
            f"| {100 * statistics.fmean(o['test_acc'] for _, _, o in rows):.2f} | {mean:+.2f} ± {se:.2f} "
            f"| {'**yes**' if worse else 'no'} | {epochs} | {d_new:.1f} / {d_old:.1f} |"
        )
    return "\n".join(lines)


def story(new: dict) -> str:
    """Why the new arm's runs ended and where their epochs went (runs recorded with research.py's
    ``run_story`` fields; empty if none has them)."""
    by_bench: dict[str, list[dict]] = defaultdict(list)
    for (bench, _), run in new.items():
        if "stop" in run:
            by_bench[bench].append(run)
    if not by_bench:
        return ""
    lines = [
        "| benchmark | runs | ended by | accepted / rejected cycles | epochs | first neuron phase "
        "| later neuron phases | dendrite phases | rolled back |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for bench, runs in sorted(by_bench.items()):
        stops = defaultdict(int)
        for r in runs:
            stops[r["stop"]] += 1
        epochs = statistics.fmean(r["epochs"] for r in runs)

        def share(key: str, runs: list[dict] = runs, epochs: float = epochs) -> str:
            value = 100 * statistics.fmean(r[key] for r in runs) / epochs
            return f"{value:.1f}%" if value < 10 else f"{value:.0f}%"

        later = statistics.fmean(r["neuron_epochs"] - r["first_phase_epochs"] for r in runs)
        lines.append(
            f"| {bench} | {len(runs)} | {', '.join(f'{k} {v}' for k, v in sorted(stops.items()))} "
            f"| {statistics.fmean(r['accepted_cycles'] for r in runs):.1f} / "
            f"{statistics.fmean(r['rejected_cycles'] for r in runs):.1f} | {epochs:.0f} "
            f"| {share('first_phase_epochs')} | {100 * later / epochs:.0f}% | {share('dendrite_epochs')} "
            f"| {share('rolled_back_epochs')} |"
        )
    return "\n".join(lines)


def by_length(new: dict, old: dict, base: dict, limit: float = 3.0, uncut: dict | None = None) -> str:
    """The paired gap split by how long the old arm's run was: seeds whose old run lasted at most
    ``limit`` times the base arm's epochs (what a run within issue 22's 3x target could match)
    and those that ran longer. ``uncut``: the old runs' whole lengths, where ``old`` was cut."""
    lengths = uncut or old
    groups: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for key, run in new.items():
        if key in old and key in base:
            gap = 100 * (run["test_acc"] - old[key]["test_acc"])
            long = lengths[key]["epochs"] > limit * max(1, base[key]["epochs"])
            for name in (key[0], "all benchmarks"):
                groups[name][long].append(gap)

    def cell(gaps: list[float]) -> str:
        return f"{len(gaps)} | {statistics.fmean(gaps):+.2f}" if gaps else "0 | –"

    lines = [
        f"| benchmark | seeds old ≤ {limit:g}× base epochs | gap | seeds old > {limit:g}× | gap |",
        "|---|---:|---:|---:|---:|",
    ]
    names = sorted(n for n in groups if n != "all benchmarks") + ["all benchmarks"]
    lines += [f"| {n} | {cell(groups[n][0])} | {cell(groups[n][1])} |" for n in names if n in groups]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--new", required=True, help="FILE:ARM of the new arm")
    parser.add_argument("--old", required=True, help="FILE:ARM of the arm it is compared with")
    parser.add_argument("--base", default=None, help="FILE:ARM of the dendrite-free base arm (epochs as a multiple)")
    parser.add_argument(
        "--old-at-budget",
        type=float,
        default=None,
        metavar="B",
        help="cut each old run at B times its own first neuron phase's seconds (runs with a trajectory)",
    )
    parser.add_argument(
        "--old-at-new-epochs",
        action="store_true",
        help="cut each old run after the new run's epochs on the same seed (runs with a trajectory)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the table to OUT/results.md")
    args = parser.parse_args(argv)
    new, old = _arm(args.new), _arm(args.old)
    uncut, intro, how = old, "", ""
    if args.old_at_budget is not None or args.old_at_new_epochs:
        if args.old_at_budget is not None and args.old_at_new_epochs:
            parser.error("--old-at-budget and --old-at-new-epochs are two cuts: give one")
        if args.old_at_budget is not None and args.old_at_budget < 1:
            parser.error(
                f"--old-at-budget must be >= 1 (a multiple of the first neuron phase); got {args.old_at_budget}"
            )
        missing = sorted({k[0] for k, r in old.items() if "trajectory" not in r})
        if missing:
            parser.error(f"cutting the old runs needs runs recorded with a trajectory; none in {missing}")
        # The trajectory read whole must give back the run's own score: the check of the recording.
        faithful = sum(_cut(r, r["trajectory"], 1e-4)["test_acc"] == r["test_acc"] for r in old.values())
        if args.old_at_new_epochs:
            how = "after the new run's epochs on the same seed"
            old = {k: at_epochs(r, new[k]["epochs"]) for k, r in old.items() if k in new}
        else:
            how = f"at {args.old_at_budget:g}× its own first neuron phase's seconds"
            old = {k: at_budget(r, args.old_at_budget) for k, r in old.items()}
        intro = (
            f"The old arm cut {how}: the best weights it had found by then. Uncut, the trajectory gives "
            f"back every run's own test score on {faithful} of {len(uncut)} runs.\n\n"
        )
    text = intro + table(new, old, _arm(args.base) if args.base else None)
    if args.base:
        text += (
            "\n\nThe gap (mean, points) split by how long the old run was, as a multiple of the base "
            "arm's epochs on the same seed"
            + (" (the old run's whole length)" if uncut is not old else "")
            + ":\n\n"
            + by_length(new, old, _arm(args.base), uncut=uncut)
        )
    if runs_story := story(new):
        text += (
            "\n\nWhy the new arm's runs ended, and where their epochs went (shares of the run's epochs; "
            "*dendrite phases*: validations made in one, so a phase ended mid-epoch by "
            "`dendrite_patience_steps` counts in the epoch that goes on in the neuron phase; "
            "*rolled back*: the dendrite and neuron phases of cycles rolled back, budget-cut ones included):\n\n"
            + runs_story
        )
    print(text)
    if args.out is not None:
        new_arm, old_arm = args.new.rpartition(":")[2], args.old.rpartition(":")[2]
        command = " ".join(
            ["python benchmarks/paired.py", *(f"'{a}'" if " " in a else a for a in (argv or sys.argv[1:]))]
        )
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(
            f"# `{new_arm}` against `{old_arm}`{' cut ' + how if how else ''}, paired by seed\n\n`{command}`\n\n"
            "Test accuracy (R² for Friedman) × 100, mean over the seeds both arms ran; gap: mean ± "
            "standard error of the per-seed differences.\n\n" + text + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
