r"""``pb-lightning compare``: does Perforated Backpropagation pay on *this* model?

It takes the user's LightningCLI config and, for each seed, fits the arms that tell what the
dendrites themselves are worth (the statistics are in :mod:`pb_lightning.reporting.comparison`):

* ``dendrites``: the config as written.
* ``plain``: the same model and data without dendrites: the first neuron phase alone, its best
  weights kept (``max_dendrites=0``).
* ``restart``: the same schedule of warm restarts without dendrites (``restarts_only=True``):
  the control that separates the dendrites from the rollbacks and fresh optimizers around them.
* ``inert`` (optional): the same cycles with every accepted dendrite held at output weight 0
  (:func:`pb_lightning.engine.controls.make_dendrites_inert`).
* ``plain@W`` (with ``--width-arg`` and ``--widths``): plain networks of other widths, so that
  ``dendrites`` is also judged against a plain network of at most its parameter count.

Every fit runs **in this process**, each from a fresh ``LightningCLI(run=False)`` (new model,
data module, trainer, logger and callbacks) built from a per-fit copy of the config written to
``fits/<arm>-seed<seed>/config.yaml``. In-process is safe here because the global state a fit
leaves behind is reset before the next: ``seed_everything`` (run by LightningCLI from the
config's ``seed_everything``) reseeds Python, NumPy and torch, so the same seed gives every arm
the same initial weights and data order; ``torch._dynamo.reset()`` drops compiled graphs and
their recompile counts (a compiled user model would otherwise hit the recompile limit after a
few fits); loggers, checkpoints and ``output_dir`` are redirected into each fit's folder. It is
also what makes the ``inert`` arm possible (it changes the perforated layers' class on the live
model), and it saves the few seconds per fit of importing torch and Lightning again, which is
most of a ``--quick`` fit. A multi-device strategy that relaunches ``sys.argv`` (DDP) is not
supported: run the comparison on one device.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any
from unittest import mock

import lightning.pytorch as pl
import yaml
from lightning.pytorch.callbacks import Callback

from pb_lightning.errors import PerforationError, invalid
from pb_lightning.lightning.compare_config import (
    ARMS,
    DEFAULT_ARMS,
    QUICK_EPOCHS,
    RESULTS_FILE,
    CompareOptions,
    Job,
    config_hash,
    fit_name,
    load_previous,
    plan,
)
from pb_lightning.reporting import comparison
from pb_lightning.reporting.history import resolve_metric_kind
from pb_lightning.reporting.plot import matplotlib_available

log = logging.getLogger(__name__)

TABLE_FILE = "results.md"
PLOT_FILE = "results.png"
#: Bumped when the layout of ``results.json`` changes.
RESULTS_VERSION = 1


class _InertControl(Callback):
    """Applies the inert control once the module has perforated itself (in ``configure_model``,
    which runs after the callbacks' ``setup``), before the first dendrite phase."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from pb_lightning.engine.controls import make_dendrites_inert

        make_dendrites_inert(pl_module)


def _make_cli(config_path: Path) -> Any:
    from lightning.pytorch.cli import LightningCLI

    # LightningCLI warns when it is given args while sys.argv holds others (those of `compare`).
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        return LightningCLI(run=False, args=["--config", str(config_path)], save_config_kwargs={"overwrite": True})


def _perforated_callback(trainer: pl.Trainer) -> Any:
    from pb_lightning.lightning.callback import PerforatedCallback

    callbacks: list[pl.Callback] = trainer.callbacks  # type: ignore[attr-defined]  # a property Lightning types loosely
    return next(c for c in callbacks if isinstance(c, PerforatedCallback))


def _has_test_split(cli: Any) -> bool:
    from lightning.pytorch.utilities.model_helpers import is_overridden

    source = cli.datamodule if cli.datamodule is not None else cli.model
    return is_overridden("test_step", cli.model) and is_overridden("test_dataloader", source)


def _check_jobs(jobs: list[Job], scratch: Path) -> bool:
    """Instantiate each arm's config once (no fit) so that a config that does not parse, a model
    that is no PerforatedModule or an inert arm that cannot be inert fails now, not hours in.
    Returns whether the model has a test split."""
    has_test = False
    for job in (j for j in jobs if j.seed == jobs[0].seed):
        has_test = _check_job(job, scratch / job.arm)
    return has_test


def _check_job(job: Job, folder: Path) -> bool:
    from pb_lightning.lightning.module import PerforatedModule

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(job.config, sort_keys=False))
    try:
        cli = _make_cli(path)
    except SystemExit as error:  # jsonargparse reports its own error, then exits
        raise PerforationError(
            f"compare: the {job.arm!r} arm's config does not parse (the message above says why)."
        ) from error
    if not isinstance(cli.model, PerforatedModule):
        raise invalid("model.class_path", type(cli.model).__name__, "a pb_lightning.PerforatedModule subclass")
    learning = getattr(cli.model.dendrite_config, "learning", "correlation")
    if job.arm == "inert" and learning != "correlation":
        raise invalid("--arms", "inert", f"arms without 'inert': the model's dendrites use learning={learning!r}")
    return _has_test_split(cli)


@contextlib.contextmanager
def _quiet_lightning(verbose: bool) -> Iterator[None]:
    # Nine fits' worth of Lightning banners and pb_lightning summaries would bury the progress
    # lines; each fit's own record is in its folder (pb_history.json, logs).
    names = [
        n
        for n in list(logging.root.manager.loggerDict)
        if n.split(".")[0] in ("lightning", "pytorch_lightning") or (n.startswith("pb_lightning.") and n != __name__)
    ]
    loggers = [logging.getLogger(n) for n in ["lightning.pytorch", "lightning.fabric", *names]]
    levels = [lg.level for lg in loggers]
    if not verbose:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _resolve_metric(results: dict[str, float], monitor: str, options: CompareOptions) -> str:
    if options.metric is not None:
        if options.metric not in results:
            raise invalid("--metric", options.metric, "one of the test metrics the model logs: " + ", ".join(results))
        return options.metric
    twin = monitor.replace("val", "test", 1)
    if twin in results:
        return twin
    if len(results) == 1:
        return next(iter(results))
    raise invalid("--metric", None, "the test metric to compare, one of " + ", ".join(results))


def _metric_mode(metric: str, monitor: str, callback_mode: str, options: CompareOptions) -> str:
    if options.metric_mode is not None:
        return options.metric_mode
    if metric in (monitor, monitor.replace("val", "test", 1)):
        return callback_mode
    kind = resolve_metric_kind("auto", metric)
    if kind == "accuracy":
        return "max"
    if kind == "error" or "loss" in metric.lower():
        return "min"
    raise invalid("--metric-mode", None, f"'min' or 'max': whether a lower or higher {metric} is better")


def run_fit(job: Job, folder: Path, results: dict[str, Any], options: CompareOptions) -> dict[str, Any]:
    """Fit one job in a fresh LightningCLI; test it when the model has a test split."""
    import torch

    from pb_lightning.engine.params import parameter_counts

    # A folder left by a fit that never finished (an interrupted comparison being resumed) holds
    # stale logs and checkpoints: the fit starts over from nothing.
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(job.config, sort_keys=False))
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    cli = _make_cli(path)
    callback = _perforated_callback(cli.trainer)
    if job.arm == "inert":
        cli.trainer.callbacks.append(_InertControl())
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if results["source"] == "test":
        # The model the callback left: its global best (the same rule for every arm).
        tested = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
        tested = {k: float(v) for k, v in tested.items()}
        if results.get("metric") is None:
            results["metric"] = _resolve_metric(tested, callback.monitor, options)
            results["mode"] = _metric_mode(results["metric"], callback.monitor, callback.mode, options)
        score = tested[results["metric"]]
    else:
        tested = {}
        if results.get("metric") is None:
            results["metric"], results["mode"] = callback.monitor, callback.mode
        score = float(callback.best_score)
    wall = time.perf_counter() - start
    fit = {
        "arm": job.arm,
        "seed": job.seed,
        "width": job.width,
        "score": float(score),
        "params": parameter_counts(cli.model)["total"],
        "wall_s": round(wall, 3),
        "epochs": cli.trainer.current_epoch,
        "dendrites": callback.machine.state.dendrites,
        "best_validation": None if callback.best_score is None else float(callback.best_score),
        "test": tested,
        "folder": str(folder),
    }
    del cli, callback
    gc.collect()
    return fit


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)  # a comparison killed mid-write keeps its previous results


def compare(options: CompareOptions) -> dict[str, Any]:
    """Run the comparison; returns the results (also in ``results.json`` in the output folder)."""
    base, jobs = plan(options)
    out = options.output_dir
    digest = config_hash(base, options)
    previous = load_previous(options, digest)
    with _quiet_lightning(options.verbose), tempfile.TemporaryDirectory(prefix="pb_compare_check_") as scratch:
        has_test = _check_jobs(jobs, Path(scratch))
    out.mkdir(parents=True, exist_ok=True)
    results = previous or {
        "version": RESULTS_VERSION,
        "config": str(options.config),
        "config_hash": digest,
        "source": "test" if has_test else "validation",
        "metric": None,
        "mode": None,
        "fits": [],
    }
    results["settings"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(options).items()}
    if not has_test:
        log.info("compare: the data module has no test split: each fit is scored by its best validation score")
    done = {(f["arm"], f["seed"]) for f in results["fits"]}
    todo = [j for j in jobs if (j.arm, j.seed) not in done]
    if len(todo) < len(jobs):
        log.info("compare: --resume: %d of %d fits already in %s", len(jobs) - len(todo), len(jobs), out)
    start = time.perf_counter()
    durations: dict[str, list[float]] = {}
    for index, job in enumerate(todo, 1):
        log.info("compare: fit %d/%d: arm %s, seed %d", index, len(todo), job.arm, job.seed)
        with _quiet_lightning(options.verbose):
            fit = run_fit(job, out / "fits" / fit_name(job.arm, job.seed), results, options)
        results["fits"].append(fit)
        _write_json(out / RESULTS_FILE, results)
        durations.setdefault(job.arm, []).append(fit["wall_s"])
        elapsed = time.perf_counter() - start
        left = sum(_estimate(durations, j.arm) for j in todo[index:])
        log.info(
            "compare: fit %d/%d (%s, seed %d) took %.1f s: %s %.4f, %s parameters; elapsed %.0f s, about %.0f s left",
            *(index, len(todo), job.arm, job.seed, fit["wall_s"], results["metric"], fit["score"]),
            *(f"{fit['params']:,}", elapsed, left),
        )
    comparison.summarize(results)
    _write_json(out / RESULTS_FILE, results)
    (out / TABLE_FILE).write_text(comparison.report_text(results))
    if matplotlib_available():
        comparison.plot_comparison(results["fits"], out / PLOT_FILE, metric=results["metric"], scale=results["scale"])
    else:
        log.info("compare: matplotlib is not installed: no %s (pip install 'pb_lightning[plot]')", PLOT_FILE)
    return results


def _estimate(durations: dict[str, list[float]], arm: str) -> float:
    if arm in durations:
        return sum(durations[arm]) / len(durations[arm])
    every = [d for ds in durations.values() for d in ds]
    return sum(every) / len(every) if every else 0.0


def _parse_width(text: str) -> Any:
    # "32" → 32, "0.5" → 0.5, "wide" → "wide": the value as YAML would read it from the config.
    return yaml.safe_load(text)


def compare_command(argv: list[str]) -> None:
    """``pb-lightning compare --config CONFIG [--seeds N] [--arms ...] [--width-arg ARG --widths ...]``.

    The one place that writes to stdout: the table and the verdict, the command's product.
    Progress goes to the log (stderr); a bad argument exits with status 2 and says which.
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="pb-lightning compare",
        description="Fit the config with dendrites and its controls over several seeds: does it pay?",
    )
    parser.add_argument("--config", required=True, help="the LightningCLI YAML of the dendritic run")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (0, 1, ...); default 3")
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), help=f"of {', '.join(ARMS)}")
    parser.add_argument("--width-arg", default=None, help="the init argument that sets the width")
    parser.add_argument("--widths", nargs="+", type=_parse_width, default=[], help="widths of plain networks")
    parser.add_argument("--output", default=None, help="output folder (default pb_compare/<config name>)")
    parser.add_argument("--quick", action="store_true", help=f"short fits (at most {QUICK_EPOCHS} epochs)")
    parser.add_argument("--resume", action="store_true", help="keep the fits already in the output folder")
    parser.add_argument("--metric", default=None, help="the test metric to compare (default: from the monitor)")
    parser.add_argument("--metric-mode", choices=("min", "max"), default=None, help="whether lower/higher is better")
    parser.add_argument("--verbose", action="store_true", help="keep Lightning's own messages")
    ns = parser.parse_args(argv)
    options = CompareOptions(
        config=ns.config,
        seeds=ns.seeds,
        arms=tuple(ns.arms),
        width_arg=ns.width_arg,
        widths=tuple(ns.widths),
        output=ns.output,
        quick=ns.quick,
        resume=ns.resume,
        metric=ns.metric,
        metric_mode=ns.metric_mode,
        verbose=ns.verbose,
    )
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        results = compare(options)
    except PerforationError as error:
        parser.error(str(error))
    out = options.output_dir
    sys.stdout.write(comparison.report_text(results) + f"\nResults: {out / RESULTS_FILE}, {out / TABLE_FILE}\n")
