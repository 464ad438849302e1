#!/usr/bin/env python
r"""Against the reference package: pb_lightning next to ``perforatedai`` on the same job.

Run from the repository root with the main environment's Python::

    python benchmarks/reference_package.py           # full run: about 5 minutes on 2 CPU cores
    python benchmarks/reference_package.py --quick   # smoke test: small epoch budget, short timings

What it does
------------
1. **A separate environment for the reference package.** ``perforatedai`` is installed into its
   own virtual environment (``--venv``, default ``benchmarks/.venv-perforatedai``, git-ignored),
   never into the main one: it must not change the main environment's packages, and it pulls
   torchvision, matplotlib, pandas and more. ``torch`` is pinned (``torch==2.13.0``, the CPU build
   the main environment uses; an unpinned torch would pull a multi-GB CUDA build) and so is
   ``perforatedai`` (:data:`PERFORATEDAI_VERSION`). An existing environment with those versions is
   reused. If the installation fails (no registry, no wheel for this Python) the script prints a
   ``skipped: <reason>`` line and exits 0: a smoke test must not fail because a registry is down.
2. **Training.** The digits MLP of ``configs/digits.yaml`` (64-8-8-10, Adam lr 0.01, batch 64,
   the 60/20/20 split of ``pb_lightning.demos.digits.DigitsDataModule``) is trained

   * with ``perforatedai``'s free version (gradient-descent dendrites) by a worker script,
     ``_reference_worker.py``, run with the reference environment's Python, stdin closed and a
     timeout, following its flow: perforate the model, set the optimizer class, build the
     optimizer through the tracker, feed each validation loss to ``add_validation_score`` and
     rebuild the optimizer when it restructures the network;
   * with ``pb_lightning`` in this process: ``PerforatedCallback`` in a Lightning ``Trainer`` on
     ``DigitsMLP``/``DigitsDataModule``, the callback settings of ``configs/digits.yaml``.

   Both monitor the validation loss with a patience of 4 validations, at most 4 dendrite sets
   and 2 tries, no scheduler, and stop when their package says training is complete or after
   ``--max-epochs``. Neither writes logs, plots or checkpoints beyond what its algorithm needs
   (perforatedai saves and reloads its best model; that stays).
3. **Per-step time at equal D.** Models with D = 0, 1, 2, 4 dendrite sets per layer, made
   without training (pb_lightning: ``start_dendrite_phase`` + ``accept_dendrites``; perforatedai:
   its tracker's ``set_dendrite_training`` + ``set_neuron_training``, what its free version runs
   at every restructure), timed on the step of ``engine_speed.py`` (zero_grad, forward,
   cross-entropy, backward) for the digits MLP (batch 64) and a 784-512-512-10 MLP (batch 256),
   each block between two blocks of the same network not perforated. Both sides run the same
   timing code (it lives in the worker, which this script imports), with the same thread count,
   in alternating processes; the median over ``--repeats`` alternations is reported.

   The two packages' neuron phases do different work. perforatedai's free dendrites are trained
   by gradient descent in every neuron phase and pass gradients back to earlier layers;
   pb_lightning's accepted dendrites are frozen and their input is detached (the paper's
   design), so only their output weights train. pb_lightning is therefore timed twice: with the
   same work as the reference (``DendriteConfig(train_accepted_dendrites=True,
   perforation=False)``: that comparison measures the implementations) and with its default.

4. **Results** go to ``--output`` (default ``benchmarks/results/reference``; with ``--quick``,
   ``benchmarks/results/reference-quick.tmp``, git-ignored): ``results.json`` (every number,
   the settings of both packages, versions, machine, command), ``results.md`` (the tables) and
   the reference worker's console output (``perforatedai_*.log``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
for _path in (_ROOT, _HERE):  # runnable as `python benchmarks/reference_package.py` without an install
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import _reference_worker as shared  # noqa: E402
from common.cli import parse_ints  # noqa: E402
from engine_speed import grow  # noqa: E402

import pb_lightning as pb  # noqa: E402

#: The reference package's version, pinned so that the comparison is reproducible.
PERFORATEDAI_VERSION = "3.2.9"
#: The torch the reference environment gets: the main environment's CPU build.
TORCH_PIN = "torch==2.13.0"
_WORKER = _HERE / "_reference_worker.py"
_DEFAULT_VENV = _HERE / ".venv-perforatedai"
_NETS = ("digits", "large")


class Skipped(Exception):
    """The reference package cannot be used here (not a failure of either package)."""


# ---------------------------------------------------------------------------- environment
def _run(cmd: Sequence[str], *, timeout: float, log: Path | None = None, cwd: Path | None = None) -> str:
    """Run ``cmd`` with stdin closed and a timeout; return its output, raise on failure.

    stdin is closed because the reference package has code paths that call ``input()`` or
    ``pdb.set_trace()``: with no stdin they end (EOF) instead of waiting for a keyboard forever.
    """
    try:
        done = subprocess.run(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            cwd=cwd,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        out = err.output.decode(errors="replace") if isinstance(err.output, bytes) else (err.output or "")
        if log is not None:
            log.write_text(out)
        raise RuntimeError(f"`{shlex.join(cmd[:3])} ...` timed out after {timeout:.0f} s") from err
    if log is not None:
        log.write_text(done.stdout)
    if done.returncode != 0:
        tail = "\n".join(done.stdout.strip().splitlines()[-15:])
        raise RuntimeError(f"`{shlex.join(cmd[:4])} ...` exited with status {done.returncode}:\n{tail}")
    return done.stdout


def reference_versions(python: Path, work: Path) -> dict[str, str]:
    """The reference environment's package versions (raises if it is unusable)."""
    out = work / "versions.json"
    _run([str(python), str(_WORKER), "versions", "--out", str(out)], timeout=120, cwd=work)
    return json.loads(out.read_text())


def ensure_reference_env(venv: Path, version: str, work: Path, *, timeout: float) -> dict[str, str]:
    """Create (or reuse) the reference environment; return its versions. Raises :class:`Skipped`."""
    python = venv / "bin" / "python"
    wanted_torch = TORCH_PIN.split("==")[1]
    if python.exists():
        with contextlib.suppress(RuntimeError, json.JSONDecodeError):
            found = reference_versions(python, work)
            if found.get("perforatedai") == version and found.get("torch", "").split("+")[0] == wanted_torch:
                print(f"reusing {venv} (perforatedai {version}, torch {found['torch']})")
                return found
    print(f"creating {venv}: {TORCH_PIN}, perforatedai=={version}, scikit-learn (a few minutes) ...", flush=True)
    constraints = work / "constraints.txt"
    # perforatedai depends on torch and torchvision unpinned: the constraint keeps pip from
    # replacing the CPU torch with a CUDA build while resolving them.
    constraints.write_text(TORCH_PIN + "\n")
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--quiet"]
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [*pip, TORCH_PIN],
        [*pip, "-c", str(constraints), f"perforatedai=={version}", "scikit-learn", "numpy"],
    ]
    for cmd in steps:
        try:
            _run(cmd, timeout=timeout)
        except RuntimeError as err:
            raise Skipped(f"could not install the reference package: {err}") from err
    try:
        return reference_versions(python, work)
    except RuntimeError as err:
        raise Skipped(f"the reference environment does not import: {err}") from err


def run_worker(python: Path, job: str, args: list[str], *, log: Path, timeout: float) -> dict[str, Any]:
    """Run one worker job in a scratch directory (perforatedai writes its files into the cwd)."""
    with tempfile.TemporaryDirectory(prefix="perforatedai-") as scratch:
        out = Path(scratch) / "result.json"
        _run([str(python), str(_WORKER), job, "--out", str(out), *args], timeout=timeout, log=log, cwd=Path(scratch))
        return json.loads(out.read_text())


# ---------------------------------------------------------------------------- pb_lightning
def _quiet_lightning() -> None:
    """Keep Lightning's start-up tips out of the output; pb_lightning's decisions stay visible."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def train_pb_lightning(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """The digits job of ``configs/digits.yaml`` without logger or checkpoints, timed."""
    import lightning.pytorch as pl

    from pb_lightning.demos.digits import DigitsDataModule, DigitsMLP

    _quiet_lightning()
    torch.set_num_threads(args.threads)
    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(batch_size=args.batch_size, seed=args.split_seed)
    model = DigitsMLP(
        hidden=args.hidden,
        lr=args.lr,
        dendrites=pb.DendriteConfig(num_candidates=4, activation="sigmoid", normalization="pearson"),
    )
    params_before = pb.parameter_counts(model)["total"]
    callback = pb.PerforatedCallback(
        monitor="val_loss",
        mode="min",
        neuron_patience=args.patience,
        dendrite_patience=2,
        max_dendrites=args.max_dendrites,
        max_tries=args.max_tries,
    )
    trainer = pl.Trainer(
        max_epochs=args.max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    wall = time.perf_counter() - start
    with contextlib.redirect_stdout(io.StringIO()):  # the test table Lightning prints
        test = trainer.test(model, datamodule=data, verbose=False)[0]
    report = callback.report or {}
    counts = pb.parameter_counts(model)
    # A STOP decided by a validation (not the one finish() gives when the epoch budget ends).
    stopped = any(row["action"] == "stop" for row in callback.machine.state.history)
    return {
        "package": "pb_lightning",
        "seed": seed,
        "epochs": trainer.current_epoch,
        "training_complete": stopped,
        "test_acc": float(test["test_acc"]),
        "best_val_loss": report.get("final_best"),
        "best_val_loss_before_dendrites": report.get("best_before_dendrites"),
        "parameters_before": params_before,
        "parameters_after": counts["total"],
        "dendrites_per_layer": report.get("dendrites_per_layer", {}),
        "cycles_accepted": report.get("cycles_accepted"),
        "cycles_rejected": report.get("cycles_rejected"),
        "wall_seconds": wall,
    }


def pb_model(sizes: Sequence[int], dendrites: int, config: pb.DendriteConfig) -> torch.nn.Module:
    """A pb_lightning MLP with ``dendrites`` accepted sets, made without training (as in engine_speed)."""
    torch.manual_seed(0)
    return grow(pb.perforate(shared.mlp(sizes), config=config), dendrites)


#: pb_lightning's configurations in the per-step comparison (see the module docstring).
PB_CONFIGS = {
    "same_work": pb.DendriteConfig(train_accepted_dendrites=True, perforation=False),
    "default": pb.DendriteConfig(),
}


def time_pb_lightning(args: argparse.Namespace) -> dict[str, Any]:
    """Per-step time of pb_lightning models, by the worker's timing code (same as the reference's)."""
    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {}
    for name, sizes, batch in (("digits", shared.DIGITS_SIZES, 64), ("large", shared.LARGE_SIZES, 256)):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, sizes[0], generator=gen)
        y = torch.randint(0, sizes[-1], (batch,), generator=gen)
        torch.manual_seed(0)
        plain = shared.mlp(sizes)
        variants = {}
        params = {}
        for d in args.dendrites:
            for label, config in PB_CONFIGS.items():
                if d == 0 and label != "default":
                    continue  # without dendrites the two configurations are the same model
                model = pb_model(sizes, d, config)
                key = f"{d}" if d == 0 else f"{d}-{label}"
                variants[key] = shared.training_step(model, x, y)
                params[key] = pb.parameter_counts(model)["total"]
        result = shared.time_against_baseline(
            shared.training_step(plain, x, y), variants, rounds=args.rounds, block_seconds=args.block_seconds
        )
        result["parameters"] = params
        out[name] = result
    return out


# ---------------------------------------------------------------------------- report
def _median(runs: list[dict[str, Any]], network: str, key: str, field: str) -> float:
    return statistics.median(v for run in runs for v in run[network]["variants"][key][field])


def step_rows(reference: list[dict[str, Any]], ours: list[dict[str, Any]], dendrites: Sequence[int]) -> list[dict]:
    """One row per network and D: medians over all alternations and rounds, and the speed-ups.

    A speed-up is the ratio of the two packages' *relative* step times (each block divided by
    the neighbouring blocks of the plain network in the same process), not of their absolute
    times: the plain network is the same code in both processes, so the quotient cancels a
    neighbour's load that changed between the two processes' turns. Absolute medians are
    reported too.
    """
    rows = []
    for network in _NETS:
        for d in dendrites:
            keys = {
                "perforatedai": (reference, str(d)),
                "pb_same_work": (ours, "0" if d == 0 else f"{d}-same_work"),
                "pb_default": (ours, "0" if d == 0 else f"{d}-default"),
            }
            row: dict[str, Any] = {"network": network, "dendrites": d}
            for label, (runs, key) in keys.items():
                row[f"{label}_ms"] = 1e3 * _median(runs, network, key, "seconds_all")
                row[f"{label}_x_plain"] = _median(runs, network, key, "ratio_all")
                row[f"{label}_parameters"] = runs[0][network]["parameters"][key]
            row["speedup_same_work"] = row["perforatedai_x_plain"] / row["pb_same_work_x_plain"]
            row["speedup_default"] = row["perforatedai_x_plain"] / row["pb_default_x_plain"]
            row["plain_ms_perforatedai_process"] = statistics.median(r[network]["baseline_ms"] for r in reference)
            row["plain_ms_pb_process"] = statistics.median(r[network]["baseline_ms"] for r in ours)
            rows.append(row)
    return rows


def _layers(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items()) or "-"


def markdown(results: dict[str, Any]) -> str:
    """The tables of ``results.md`` (also printed)."""
    env = results["environment"]
    lines = [
        f"### Results ({results['date']}, `{results['command']}`)",
        "",
        f"Machine: {env['machine']}; {env['cpus']} CPUs, torch threads {results['settings']['threads']}. "
        f"Main environment: Python {env['python']}, torch {env['torch']}, lightning {env['lightning']}, "
        f"pb_lightning {env['pb_lightning']} (commit {env.get('commit', 'unknown')}). "
        f"Reference environment: Python {env['reference']['python']}, "
        f"torch {env['reference']['torch']}, perforatedai {env['reference']['perforatedai']}.",
        "",
        "#### Training the digits MLP (64-8-8-10, Adam lr 0.01, batch 64, monitor val_loss)",
        "",
        "| package | dendrite learning | seed | test acc | best val loss | parameters before → after "
        "| dendrite sets per layer | epochs | ended by | wall s |",
        "|---|---|---:|---:|---:|---|---|---:|---|---:|",
    ]
    for run in results["training"]:
        learning = (
            "gradient descent (free version)" if run["package"] == "perforatedai" else "correlation, 4 candidates"
        )
        budget = results["settings"]["max_epochs"]
        ended = "package: complete" if run["training_complete"] else f"epoch budget ({budget})"
        lines.append(
            f"| {run['package']} | {learning} | {run['seed']} | {run['test_acc']:.4f} | {run['best_val_loss']:.4f} | "
            f"{run['parameters_before']} → {run['parameters_after']} | {_layers(run['dendrites_per_layer'])} | "
            f"{run['epochs']} | {ended} | {run['wall_seconds']:.1f} |"
        )
    lines += [
        "",
        "#### Per-step time at equal D (zero_grad + forward + cross-entropy + backward; median ms)",
        "",
        "perforatedai: gradient-descent dendrites (trained, gradients flow through them). "
        "pb_lightning *same work*: `DendriteConfig(train_accepted_dendrites=True, perforation=False)`; "
        "*default*: accepted dendrites frozen, input detached (the paper's neuron phase). "
        "Each cell: median ms per step, and in brackets the step time relative to the plain network "
        "timed beside it in the same process. Speed-up = perforatedai's relative time / pb_lightning's.",
        "",
        "| network | D | perforatedai | pb_lightning same work | speed-up | pb_lightning default | speed-up "
        "| parameters (perforatedai / pb same work / pb default) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results["per_step"]:
        net = "digits 64-8-8-10, batch 64" if r["network"] == "digits" else "784-512-512-10, batch 256"
        cells = {
            k: f"{r[k + '_ms']:.3f} ({r[k + '_x_plain']:.2f}x)" for k in ("perforatedai", "pb_same_work", "pb_default")
        }
        lines.append(
            f"| {net} | {r['dendrites']} | {cells['perforatedai']} | {cells['pb_same_work']} | "
            f"{r['speedup_same_work']:.2f}x | {cells['pb_default']} | {r['speedup_default']:.2f}x | "
            f"{r['perforatedai_parameters']} / {r['pb_same_work_parameters']} / {r['pb_default_parameters']} |"
        )
    shares = results["others_cpu_share"]
    plain = {r["network"]: (r["plain_ms_perforatedai_process"], r["plain_ms_pb_process"]) for r in results["per_step"]}
    lines += [
        "",
        "The same network not perforated took "
        + "; ".join(f"{n}: {a:.3f} ms (reference process) / {b:.3f} ms (pb_lightning's)" for n, (a, b) in plain.items())
        + f". Other processes used {min(shares):.0%}-{max(shares):.0%} of the CPUs while steps were timed.",
    ]
    misses = [f"{r['network']} D={r['dendrites']}" for r in results["per_step"] if r["speedup_same_work"] <= 1.0]
    verdict = "**met**." if not misses else f"**missed** at {', '.join(misses)}."
    lines.append(f"\nTarget (pb_lightning faster per step than the reference at every D, same work): {verdict}")
    return "\n".join(lines) + "\n"


def _environment(meta: dict[str, Any], reference: dict[str, str]) -> dict[str, Any]:
    """Both environments, from the run's metadata (:func:`machine.run_meta`) and the worker's report."""
    import lightning

    return {
        "machine": meta["machine"],
        "commit": meta["commit"],
        "cpus": meta["cpu_count"],
        "python": meta["python"],
        "torch": meta["torch"],
        "lightning": lightning.__version__,
        "pb_lightning": pb.__version__,
        "reference": reference,
    }


# ---------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small epoch budget and short timings (a smoke test)")
    parser.add_argument("--venv", type=Path, default=_DEFAULT_VENV, help="reference environment (made if needed)")
    parser.add_argument("--perforatedai-version", default=PERFORATEDAI_VERSION, help="pinned reference version")
    parser.add_argument("--output", type=Path, default=None, help="results directory")
    parser.add_argument("--max-epochs", type=int, default=None, help="epoch budget (default 200; 12 with --quick)")
    parser.add_argument("--seeds", type=parse_ints, default=None, help="training seeds (default 0-4; 0 with --quick)")
    parser.add_argument("--dendrites", type=parse_ints, default=(0, 1, 2, 4), help="D values timed (default 0,1,2,4)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="alternations of the two timing processes (3; 1)")
    parser.add_argument("--rounds", type=int, default=None, help="A/B rounds per timing process (default 5; 2)")
    parser.add_argument("--block-seconds", type=float, default=None, help="length of a timed block (0.2; 0.02)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per reference job (default 900; 300)")
    parser.add_argument(
        "--render", action="store_true", help="run nothing: regenerate OUTPUT/results.md from OUTPUT/results.json"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args.max_epochs = args.max_epochs or (12 if quick else 200)
    args.seeds = args.seeds or ((0,) if quick else (0, 1, 2, 3, 4))
    args.repeats = args.repeats or (1 if quick else 3)
    args.rounds = args.rounds or (2 if quick else 5)
    args.block_seconds = args.block_seconds or (0.02 if quick else 0.2)
    args.timeout = args.timeout or (300 if quick else 900)
    args.output = args.output or (_HERE / "results" / ("reference-quick.tmp" if quick else "reference"))
    # The job of configs/digits.yaml.
    args.hidden, args.lr, args.batch_size, args.split_seed = 8, 0.01, 64, 0
    args.patience, args.max_dendrites, args.max_tries = 4, 4, 2
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Set up, train both, time both, write the results; return the exit status."""
    args = parse_args(argv)
    if args.render:
        from machine import render_report

        print(render_report(args.output, markdown))
        return 0
    from machine import run_meta

    meta = run_meta(argv)
    start = time.perf_counter()
    args.output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="reference-") as scratch:
        try:
            reference = ensure_reference_env(
                args.venv.resolve(), args.perforatedai_version, Path(scratch), timeout=args.timeout
            )
        except Skipped as err:
            print(f"skipped: {err}")
            return 0
    python = args.venv.resolve() / "bin" / "python"
    common = [f"--threads={args.threads}", f"--hidden={args.hidden}", f"--lr={args.lr}"]
    common += [f"--batch-size={args.batch_size}", f"--split-seed={args.split_seed}"]

    # The two packages must see the same data: compare the split with pb_lightning's own.
    from pb_lightning.demos.digits import DigitsDataModule

    dm = DigitsDataModule(seed=args.split_seed)
    dm.setup()
    ours = shared.digits_splits(args.split_seed)
    for part in ("train", "val", "test"):
        if not torch.equal(dm._splits[part].tensors[0], ours[part][0]):
            raise RuntimeError(f"the worker's {part} split differs from DigitsDataModule's")

    training: list[dict[str, Any]] = []
    for seed in args.seeds:
        print(f"perforatedai: training the digits MLP, seed {seed} ...", flush=True)
        run = run_worker(
            python,
            "train",
            [
                *common,
                f"--seed={seed}",
                f"--max-epochs={args.max_epochs}",
                f"--patience={args.patience}",
                f"--max-dendrites={args.max_dendrites}",
                f"--max-tries={args.max_tries}",
            ],
            log=args.output / f"perforatedai_train_seed{seed}.log",
            timeout=args.timeout,
        )
        run["seed"] = seed
        training.append(run)
        print(f"pb_lightning: training the digits MLP, seed {seed} ...", flush=True)
        training.append(train_pb_lightning(args, seed))

    print("per-step timing (alternating the two processes) ...", flush=True)
    reference_timing: list[dict[str, Any]] = []
    pb_timing: list[dict[str, Any]] = []
    dendrites = ",".join(str(d) for d in args.dendrites)
    for i in range(args.repeats):
        reference_timing.append(
            run_worker(
                python,
                "timing",
                [
                    f"--threads={args.threads}",
                    f"--dendrites={dendrites}",
                    f"--rounds={args.rounds}",
                    f"--block-seconds={args.block_seconds}",
                ],
                log=args.output / "perforatedai_timing.log",
                timeout=args.timeout,
            )
        )
        pb_timing.append(time_pb_lightning(args))
        print(f"  alternation {i + 1}/{args.repeats} done", flush=True)

    results: dict[str, Any] = {
        "command": meta["command"],
        "date": meta["date"],
        "environment": _environment(meta, reference),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "reference_settings": training[0].get("settings", {}),
        "training": training,
        "per_step": step_rows(reference_timing, pb_timing, args.dendrites),
        "others_cpu_share": [run[n]["others_cpu_share"] for run in [*reference_timing, *pb_timing] for n in _NETS],
        "timing_raw": {"perforatedai": reference_timing, "pb_lightning": pb_timing},
    }
    results["seconds"] = time.perf_counter() - start
    from machine import save_report

    text = save_report(args.output, results, markdown)  # results.md is rendered from the saved JSON
    print("\n" + text)
    print(f"wrote {args.output / 'results.json'} and results.md; {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
