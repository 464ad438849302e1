#!/usr/bin/env python
"""Resume soak: runs killed at random points, resumed, and compared with the uninterrupted run.

    python benchmarks/resume_soak.py --out benchmarks/results/resume_soak        # 20 kills, ~10 minutes
    python benchmarks/resume_soak.py --runs 2 --out /tmp/soak                     # smoke test
    python benchmarks/resume_soak.py --render --out benchmarks/results/resume_soak

The worker is the test suite's deterministic run, ``tests/scripts/kill_resume.py`` (digits MLP,
fixed two-epoch phases, two dendrite cycles, 10 epochs of 6 batches, single thread, deterministic
algorithms). Each of ``--runs`` kills is drawn from a seeded generator: a kind (mid-epoch batch,
after an epoch's decision before its checkpoint, after the checkpoint, inside an optimizer
rebuild, after the final stop) and where (epoch, batch, rebuild). Each killed run is resumed with
``fit(ckpt_path="last")`` and counts as exact when its decision history, dendrite counts, epoch
count and every weight tensor (bit for bit) equal the uninterrupted run's. Target: all of them.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent), str(_HERE)]

import torch  # noqa: E402
from common.cli import add_report_options, check_report_options  # noqa: E402
from machine import render_report, run_meta, save_report  # noqa: E402

_WORKER = _HERE.parent / "tests" / "scripts" / "kill_resume.py"
EPOCHS, BATCHES, REBUILDS = 10, 6, 5


def draw_point(rng: random.Random) -> str:
    """A random kill point of the worker's run (see the worker's docstring for the kinds)."""
    kind = rng.choice(["batch", "batch", "decided", "saved", "optimizer", "finished"])
    if kind == "batch":
        return f"batch:{rng.randrange(EPOCHS)}:{rng.randrange(BATCHES)}"
    if kind == "decided":
        return f"decided:{rng.randrange(EPOCHS)}"
    if kind == "saved":
        return f"saved:{rng.randrange(EPOCHS - 1)}"
    if kind == "optimizer":
        return f"optimizer:{rng.randint(1, REBUILDS)}"
    return "finished"


def _worker(out: Path, *args: str, kill_at: str | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "PB_KILL_AT"}
    if kill_at is not None:
        env["PB_KILL_AT"] = kill_at
    done = subprocess.run(
        [sys.executable, str(_WORKER), str(out), *args],
        cwd=out,
        env=env,
        capture_output=True,
        timeout=600,
        start_new_session=True,
    )
    return done.returncode


def _same(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """What differs between two runs' results (empty: exact)."""
    wrong = [key for key in ("history", "dendrites", "epochs") if a[key] != b[key]]
    theirs = a["weights"]
    wrong += [f"weight {k}" for k, v in b["weights"].items() if k not in theirs or not torch.equal(theirs[k], v)]
    return wrong


def soak(runs: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "full").mkdir()
        if _worker(root / "full") != 0:
            raise RuntimeError("the uninterrupted run failed")
        full = torch.load(root / "full" / "result.pt", weights_only=True)
        rows = []
        for i in range(runs):
            point, out = draw_point(rng), root / f"run{i}"
            out.mkdir()
            start = time.perf_counter()
            killed = _worker(out, kill_at=point)
            resumed = _worker(out, "--resume")
            row: dict[str, Any] = {"point": point, "killed": killed == -signal.SIGKILL, "resumed_ok": resumed == 0}
            if resumed == 0:
                result = torch.load(out / "result.pt", weights_only=True)
                row.update(
                    differences=_same(result, full),
                    resumed_from=None if result["resumed_from"] is None else Path(result["resumed_from"]).name,
                    batches_after_resume=result["batches_run"],
                )
            row["exact"] = row["killed"] and row["resumed_ok"] and not row.get("differences", ["failed"])
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print(f"{i + 1}/{runs} {point}: {'exact' if row['exact'] else 'NOT EXACT ' + str(row)}", flush=True)
    return {"runs": rows, "exact": sum(r["exact"] for r in rows), "total": runs, "seed": seed}


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        "# Resume soak: killed at random points, resumed, compared bit for bit",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; machine: {meta['machine']} ({meta['cpu_count']} cores); commit `{meta['commit']}`",
        "",
        f"**{report['exact']}/{report['total']} exact** (history, dendrite counts, epochs and every weight tensor "
        "equal to the uninterrupted run's; target: all).",
        "",
        "| # | kill point | resumed from | batches after resume | exact | differences |",
        "|---|---|---|---|---|---|",
    ]
    for i, row in enumerate(report["runs"], 1):
        start = row.get("resumed_from") or "scratch"
        lines.append(
            f"| {i} | `{row['point']}` | {start} | {row.get('batches_after_resume', '–')} "
            f"| {'yes' if row['exact'] else '**no**'} | {', '.join(row.get('differences', [])) or '–'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="how many killed-and-resumed runs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill points")
    add_report_options(parser)
    args = parser.parse_args(argv)
    check_report_options(parser, args)
    if args.render:
        print(render_report(args.out, markdown))
        return {}
    if args.runs < 1:
        parser.error(f"--runs must be >= 1, got {args.runs}")
    report = {"meta": run_meta(argv), **soak(args.runs, args.seed)}
    print(save_report(args.out, report, markdown) if args.out is not None else markdown(report))
    return report


if __name__ == "__main__":
    main()
