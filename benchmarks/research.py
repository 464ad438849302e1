#!/usr/bin/env python
r"""Research harness: what do dendrites add once the schedule and the parameter count are controlled?

A plain PyTorch loop over :class:`~pb_lightning.PerforatedTracker` (no Lightning trainer: a
small fit takes seconds), on the data splits and models of ``benchmarks/accuracy.py``::

    python benchmarks/research.py --quick --out /tmp/research          # smoke test, < 60 s
    python benchmarks/research.py --benchmarks "MNIST-1D MLP-16" "MNIST-1D CNN-4" --seeds 5 \
        --out benchmarks/results/research
    python benchmarks/research.py --benchmarks "MNIST-1D MLP-16" --variants pb tanh --seeds 5 \
        --out benchmarks/results/research     # adds to the results already there (same key: skipped)
    python benchmarks/research.py --render --out benchmarks/results/research

Arms (each benchmark, each seed; the same seed gives the same initial weights at the same width
and the same batch order):

* ``base``: no dendrites; one neuron phase until its patience, then the best validation weights
  (``max_dendrites=0``: the first neuron phase of every dendritic run, alone).
* ``<variant>`` (``pb`` and every name given to ``--variants``, see :data:`VARIANTS`): dendrites
  with that :class:`~pb_lightning.DendriteConfig` (and schedule) override; ``pb`` is the default
  dense configuration.
* ``<variant>/inert``: the same run with :func:`pb_lightning.engine.controls.make_dendrites_inert` —
  identical cycles, dendrite phases and rollbacks, but every accepted dendrite's output weight is
  held at 0, so the dendrites cannot change the function. It isolates what the dendrites add from
  what the schedule adds.
* ``restart@W``: the plain network of width ``W`` through ``PhaseSchedule(restarts_only=True)``:
  the same warm restarts with rollback and retries, no dendrites (the *restart frontier*).
* ``width@W``: the plain network of width ``W``, trained like ``base`` (the *width frontier*;
  ``base`` is its point at the benchmark's own width).
* ``patient@W`` (only when named in ``--arms``): the plain network of width ``W`` with
  ``PATIENT_FACTOR`` times the benchmark's patience — whether the width frontier is short of
  training rather than of width. Not part of either frontier.

Validation decides everything (phase switches, rollbacks, the weights kept); the test split is
evaluated once, after each fit. Each dendritic arm is judged by three paired gaps, computed per
seed and reported as mean ± standard error over seeds (in accuracy points):

* to the **width frontier**: its test accuracy minus the accuracy of that seed's ``width@W``
  networks interpolated linearly in log(parameters) at the arm's own parameter count (outside the
  frontier's range: extrapolated from the end segment, and counted in ``extrapolated``);
* to the **restart frontier**: the same against that seed's ``restart@W`` networks;
* to its **inert control**: its accuracy minus its ``/inert`` arm's.

Results are written after every fit (``results.json``; ``results.md`` rendered from it), and a
re-run skips the fits already there, so variants and benchmarks can be added to one result set.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent), str(_HERE)]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from accuracy import Bench, benches  # noqa: E402
from common.cli import add_report_options, quiet_lightning  # noqa: E402
from machine import finish_report, render_report, resume_report, save_fit  # noqa: E402
from standard import plus_minus  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from pb_lightning import DendriteConfig, PerforatedTracker, PhaseSchedule, parameter_counts  # noqa: E402
from pb_lightning.engine.controls import make_dendrites_inert  # noqa: E402


@dataclass(frozen=True)
class Variant:
    """A dendritic arm: overrides of the default configuration, schedule and candidate LR.

    Args:
        config: :class:`~pb_lightning.DendriteConfig` fields (e.g. ``{"activation": "tanh"}``;
            ``{"fan_in": 4}`` once sparse dendrites exist).
        schedule: :class:`~pb_lightning.PhaseSchedule` fields on top of the benchmark's.
        candidate_lr: the candidates' learning rate as a multiple of the network's (the
            benchmarks' ``10``, ALGORITHM.md §7).
        pretrain_patience: if set, the first neuron phase runs with this (longer) patience: the
            network is trained to convergence before it grows, as users bring a trained model.
        max_epochs: if set, the epoch budget instead of the benchmark's.
        note: what the variant tests (for the report).
    """

    config: dict[str, Any] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=dict)
    candidate_lr: float = 10.0
    pretrain_patience: int | None = None
    max_epochs: int | None = None
    note: str = ""


def _timed(steps: int | None, budget: float = 2.5) -> dict[str, Any]:
    """A schedule judged every ``steps`` training steps (None: at validations), with a budget of
    ``budget`` times the first neuron phase's wall time: the schedule issue 22's later variants vary."""
    return {"dendrite_patience_steps": steps, "run_budget": budget, "run_budget_unit": "time"}


#: Named dendritic variants (``--variants``). A ``fan_in`` of ``k`` applies to every layer with
#: more than ``k`` inputs (features, or input channels for a conv); layers with at most ``k`` keep
#: dense dendrites (see :func:`dendrite_config`).
VARIANTS: dict[str, Variant] = {
    "pb": Variant(note="dense dendrites, default DendriteConfig"),
    "tanh": Variant({"activation": "tanh"}, note="tanh dendrite nonlinearity"),
    "relu": Variant({"activation": "relu"}, note="relu dendrite nonlinearity"),
    "relu-fan2": Variant(
        {"activation": "relu", "fan_in": 2, "fan_in_mode": "local"},
        note="relu dendrites, each seeing 2 inputs (local windows)",
    ),
    "relu-fan2-random": Variant(
        {"activation": "relu", "fan_in": 2, "fan_in_mode": "random"},
        note="relu dendrites, each seeing 2 random inputs (is relu-fan2's gain the windows' fit to the target?)",
    ),
    "relu-fan4": Variant(
        {"activation": "relu", "fan_in": 4, "fan_in_mode": "local"},
        note="relu dendrites, each seeing 4 inputs (local windows)",
    ),
    "trained": Variant(
        {"train_accepted_dendrites": True},
        note="accepted dendrites keep learning by gradient descent (as a new neuron's input weights do)",
    ),
    "trained-noperf": Variant(
        {"train_accepted_dendrites": True, "perforation": False},
        note="trained dendrites, and the error flows through them into earlier layers",
    ),
    "relu-fan2-trained": Variant(
        {"activation": "relu", "fan_in": 2, "fan_in_mode": "local", "train_accepted_dendrites": True},
        note="relu dendrites seeing 2 inputs, trained after acceptance",
    ),
    "relu-fan2-random-trained": Variant(
        {"activation": "relu", "fan_in": 2, "fan_in_mode": "random", "train_accepted_dendrites": True},
        note="relu dendrites seeing 2 random inputs, trained after acceptance (the windows' control)",
    ),
    "clr1": Variant(candidate_lr=1.0, note="candidate LR = network LR (default 10x)"),
    "clr100": Variant(candidate_lr=100.0, note="candidate LR = 100x network LR"),
    "k1": Variant({"num_candidates": 1}, note="one candidate per neuron (default pool of 4)"),
    "converged": Variant(pretrain_patience=40, note="first neuron phase with patience 40: converge, then grow"),
    **{
        f"steps{n}": Variant(
            schedule={"dendrite_patience_steps": n},
            note=f"dendrite phases end {n} training steps after the candidates stop improving (mid-epoch)",
        )
        for n in (10, 30)
    },
    # Issue 22's candidates for the default (dendrite phases judged by the plateau rule,
    # PhaseSchedule.candidate_plateau_fraction, every training step; and a run budget).
    **{
        f"plateau-steps{n}": Variant(
            schedule={"dendrite_patience_steps": n, "run_budget": None},
            note=f"dendrite phases end once {n} training steps add < 10% of the candidates' score; no run budget",
        )
        for n in (20, 100)
    },
    **{
        f"plateau-steps{n}-budget{b:g}": Variant(
            schedule={"dendrite_patience_steps": n, "run_budget": b, "run_budget_unit": "validations"},
            note=f"plateau over {n} steps, and the whole run at most {b:g}x the first neuron phase's validations",
        )
        for n in (20, 50, 100)
        for b in (2.5, 3.0)
    },
    # The budget in wall-clock seconds (run_budget_unit="time", the default since it was added).
    **{
        f"plateau-steps{n}-time{b:g}": Variant(
            schedule=_timed(n, b),
            note=f"plateau over {n} steps, and the whole run at most {b:g}x the first neuron phase's wall time",
        )
        for n in (20, 100)
        for b in (2.5, 2.8, 3.0)
    },
    # Judged at validations under the budget of time: the budget now bounds the wall time whatever
    # the phase rule, so the longer candidate training that cost the 3x target under a budget of
    # validations (plateau-val-budget2.5) is a question of accuracy only.
    **{
        f"plateau-val-time{b:g}": Variant(
            schedule=_timed(None, b),
            note=f"dendrite phases judged at validations only (plateau rule over dendrite_patience); {b:g}x wall time",
        )
        for b in (2.5,)
    },
    # ... and with a smaller plateau fraction, so phases run longer: close to the old rule's long
    # phases, which Friedman #1 wins by at equal cost (results/phases_end/equal_time).
    "plateau-val-frac0.03-time2.5": Variant(
        schedule={**_timed(None), "candidate_plateau_fraction": 0.03},
        note="plateau-val-time2.5 with candidate_plateau_fraction=0.03 (default 0.1): longer dendrite phases",
    ),
    # A higher candidate LR: can 20 steps learn what the old rule's long phases did on Friedman #1?
    "plateau-steps20-time2.5-clr30": Variant(
        candidate_lr=30.0,
        schedule=_timed(20),
        note="plateau-steps20-time2.5 (the default) with the candidates' LR at 30x the network's (the harness's 10x)",
    ),
    # More candidates per dendrite phase under the budget of time: the phases are a few percent
    # of a run, so a larger pool costs little and may find a better set per cycle.
    **{
        f"plateau-steps{n}-time2.5-k8": Variant(
            {"num_candidates": 8},
            schedule=_timed(n),
            note=f"plateau-steps{n}-time2.5 with 8 candidates per neuron (default 4)",
        )
        for n in (20, 100)
    },
    "plateau-steps100-budget2.5-tries3": Variant(
        schedule={"dendrite_patience_steps": 100, "run_budget": 2.5, "max_tries": 3, "run_budget_unit": "validations"},
        note="plateau-steps100-budget2.5 with max_tries=3: a run the budget has room for tries once more",
    ),
    **{
        f"plateau-val-budget{b:g}": Variant(
            schedule={"dendrite_patience_steps": None, "run_budget": b, "run_budget_unit": "validations"},
            note=f"dendrite phases judged at validations only (plateau rule over dendrite_patience); budget {b:g}x",
        )
        for b in (2.0, 2.5)
    },
    # Issue 22, second round: retry_window_factor (a retry's candidates judged over a longer
    # window) and cycle_neuron_patience (shorter neuron phases after the first) were measured as
    # retry-x2-tries3 and retry-x2-tries3-cyclepat5 on commit 60b9494 (results/phases_end/screen2)
    # and dropped with those settings: neither recovered accuracy (benchmarks/README.md).
    "long": Variant(schedule={"max_dendrites": 16, "max_tries": 4}, max_epochs=1000, note="longer budget"),
    **{
        f"fan{k}-{mode}": Variant(
            {"fan_in": k, "fan_in_mode": mode},
            note=f"sparse dendrites: each sees {k} inputs ({mode} {'windows' if mode == 'local' else 'choice'})",
        )
        for k in (2, 4, 8)
        for mode in ("local", "random", "learned")
    },
}


def _inputs(module: nn.Module) -> int | None:
    """What ``fan_in`` counts for a perforated module: input features, or input channels per group."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels // module.groups
    return None


def dendrite_config(net: nn.Module, overrides: dict[str, Any]) -> DendriteConfig:
    """The variant's configuration for ``net``: a ``fan_in`` larger than a layer's inputs means dense there."""
    options = dict(overrides)
    k = options.get("fan_in")
    if k is not None:
        small = {name: {"fan_in": None} for name, m in net.named_modules() if (n := _inputs(m)) is not None and n <= k}
        if small:
            options["overrides"] = {**small, **options.get("overrides", {})}
    return DendriteConfig(**options)


#: ``patient@W`` arms: plain networks trained with this many times the benchmark's patience.
PATIENT_FACTOR = 4

#: Widths of the frontiers, as multiples of the benchmark's width.
WIDTH_MULTIPLES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
RESTART_MULTIPLES = (1.0, 2.0, 4.0)


def _regression_mlp(in_features: int, lr: float) -> Any:
    """``in_features → width → width → 1`` with ReLU, as the classification MLPs but one real output."""

    def make(width: int, dendrites: DendriteConfig | None) -> Any:
        layers = [nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1)]
        return SimpleNamespace(net=nn.Sequential(*layers), lr=lr)

    return make


def _regression_bench(name: str, dataset: str, family: str, width: int, inputs: int, batch_size: int = 64) -> Bench:
    """One regression benchmark: an MLP of ``width`` at LR 3e-3, 400 epochs, patience 10."""
    return Bench(
        name,
        dataset,
        family,
        width,
        _regression_mlp(inputs, 3e-3),
        {"batch_size": batch_size},
        max_epochs=400,
        neuron_patience=10,
        task="regression",
    )


#: Regression targets (a regime the accuracy benchmark does not have): trained on the mean squared
#: error of standardised targets, decided on the validation loss, judged by the test R² (× 100 in
#: the tables, so the gaps read as points of explained variance).
REGRESSION_BENCHES = (
    _regression_bench("Friedman-1 MLP-4", "friedman", "Friedman MLP", 4, 10),
    # Width 2: a network far from the noise ceiling, where the width frontier is steep.
    _regression_bench("Friedman-1 MLP-2", "friedman", "Friedman MLP", 2, 10),
    _regression_bench("Friedman-3 MLP-4", "friedman3", "Friedman MLP", 4, 4),
    # Real, small and noisy (284 training points): the regime users bring most often.
    _regression_bench("diabetes MLP-4", "diabetes", "diabetes MLP", 4, 10, batch_size=32),
)


def all_benches() -> dict[str, Bench]:
    return {b.name: b for group in [*benches(False).values(), REGRESSION_BENCHES] for b in group}


# ---------------------------------------------------------------------------------------------- data
def splits(bench: Bench, limit_train: int | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Train/val/test tensors exactly as ``accuracy.py``'s ``ArrayDataModule`` builds them."""
    from models import ArrayDataModule

    options = dict(bench.data)
    options.pop("batch_size", None)
    if limit_train is not None:
        options["limit_train"] = limit_train
    data = ArrayDataModule(bench.dataset, **options)
    data.setup()
    return {name: tuple(ds.tensors) for name, ds in data._splits.items()}  # type: ignore[misc]


def batches(x: Tensor, y: Tensor, size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    order = torch.randperm(len(y), generator=generator)
    for i in range(0, len(y), size):
        idx = order[i : i + size]
        yield x[idx], y[idx]


def loss_fn(task: str) -> Any:
    """The training loss: cross-entropy for classification, mean squared error for regression."""
    if task == "regression":
        return lambda out, y: F.mse_loss(out.squeeze(-1), y)
    return F.cross_entropy


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, task: str = "classification") -> tuple[float, float]:
    """(score, mean loss) in eval mode: accuracy and cross-entropy, or R² and squared error."""
    model.eval()
    score, loss = 0.0, 0.0
    for i in range(0, len(y), 2048):
        out, target = model(x[i : i + 2048]), y[i : i + 2048]
        if task == "regression":
            loss += float(((out.squeeze(-1) - target) ** 2).sum())
        else:
            score += int((out.argmax(1) == target).sum())
            loss += float(F.cross_entropy(out, target, reduction="sum"))
    model.train()
    if task == "regression":
        score = 1.0 - loss / float(((y - y.mean()) ** 2).sum())  # R²: the share of the variance explained
        return score, loss / len(y)
    return score / len(y), loss / len(y)


# ----------------------------------------------------------------------------------------------- fit
@dataclass(frozen=True)
class Arm:
    """One fit's recipe: ``kind`` is base | width | restart | dendrites | inert."""

    name: str
    kind: str
    width: int
    variant: str | None = None


def schedule_for(bench: Bench, arm: Arm, quick: bool, patience: int | None = None) -> PhaseSchedule:
    if quick:
        base: dict[str, Any] = {"neuron_epochs": 2, "dendrite_epochs": 1, "max_dendrites": 2}
    else:
        base = {"neuron_patience": patience or bench.neuron_patience}
    if arm.kind in ("base", "width", "patient"):
        base["max_dendrites"] = 0
    if arm.kind == "patient" and not quick:
        base["neuron_patience"] = PATIENT_FACTOR * bench.neuron_patience
    if arm.kind == "restart":
        base["restarts_only"] = True
    if arm.variant is not None:
        base |= VARIANTS[arm.variant].schedule
        if base.get("dendrite_patience_steps") is not None:  # --quick's fixed dendrite phases would exclude it
            base.pop("dendrite_epochs", None)
    return PhaseSchedule(**base)


def fit(bench: Bench, arm: Arm, seed: int, data: dict[str, tuple[Tensor, Tensor]], quick: bool) -> dict[str, Any]:
    """Train one arm with one seed; evaluate the kept weights on the test split once."""
    variant = VARIANTS[arm.variant] if arm.variant is not None else Variant()
    torch.manual_seed(seed)
    template = bench.make(arm.width, None)  # the benchmark's module: its network and its learning rate
    net, lr = template.net, template.lr
    mode = "min" if bench.monitor == "val_loss" else "max"
    pretrain = variant.pretrain_patience if arm.kind in ("dendrites", "inert") else None
    sched = schedule_for(bench, arm, quick, patience=pretrain)
    tracker = PerforatedTracker(mode, sched, candidate_lr=variant.candidate_lr * lr)
    model = tracker.initialize(net, config=dendrite_config(net, variant.config))
    if arm.kind == "inert":
        make_dendrites_inert(model)
    tracker.set_optimizer(torch.optim.Adam, lr=lr)
    optimizer, _ = tracker.setup_optimizer(model)
    generator = torch.Generator().manual_seed(seed)
    (x_train, y_train), (x_val, y_val) = data["train"], data["val"]
    batch_size = bench.data.get("batch_size", 64)
    max_epochs = 8 if quick else (variant.max_epochs or bench.max_epochs)
    epochs, complete, start = 0, False, time.perf_counter()
    criterion = loss_fn(bench.task)
    correlations: list[float] = []
    while epochs < max_epochs and not complete:
        model.train()
        for x, y in batches(x_train, y_train, batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            criterion(model(x), y).backward()
            optimizer.step()
            if tracker.add_training_step(model):  # dendrite_patience_steps: accepted mid-epoch
                optimizer, _ = tracker.setup_optimizer(model)
        epochs += 1
        acc, loss = evaluate(model, x_val, y_val, bench.task)
        before = tracker.machine.state.phase
        model, restructured, complete = tracker.add_validation_score(loss if mode == "min" else acc, model)
        if before == "dendrite" and tracker.machine.state.phase == "neuron" and tracker.machine.state.candidate_best:
            correlations.append(float(tracker.machine.state.candidate_best))
        if pretrain is not None and tracker.machine.state.validations and tracker.machine.state.baseline is not None:
            # Once the network has converged, the dendritic cycles run with the benchmark's patience.
            tracker.machine.schedule = schedule_for(bench, arm, quick)
            pretrain = None
        if restructured and not complete:
            optimizer, _ = tracker.setup_optimizer(model)
    if not complete:
        tracker.finish(model)
    wall = time.perf_counter() - start
    test_acc, _ = evaluate(model, *data["test"], bench.task)
    val_acc, val_loss = evaluate(model, x_val, y_val, bench.task)
    counts = parameter_counts(model)
    state = tracker.machine.state
    return {
        "benchmark": bench.name,
        "task": bench.task,  # for "regression", the *_acc fields hold R²
        "arm": arm.name,
        "kind": arm.kind,
        "variant": arm.variant,
        "width": arm.width,
        "seed": seed,
        "test_acc": test_acc,
        "val_acc": val_acc,
        "val_loss": val_loss,
        "params": counts["total"],
        "dendrites_per_layer": max((layer.num_dendrites for layer in _layers(model)), default=0),
        "accepted_cycles": state.accepted_cycles,
        "rejected_cycles": state.rejected_cycles,
        "accept_correlation": statistics.fmean(correlations) if correlations else None,
        "epochs": epochs,
        "wall_s": wall,
        **run_story(state.history, complete),
    }


def run_story(history: list[dict[str, Any]], complete: bool) -> dict[str, Any]:
    """Why a run ended and where its epochs went, from the machine's history.

    ``stop``: ``max_tries`` | ``budget`` | ``max_dendrites`` | ``max_epochs`` (the harness's cap)
    | ``other``. ``neuron_epochs`` / ``dendrite_epochs``: validations in each phase (the first
    neuron phase's in ``first_phase_epochs``); ``rolled_back_epochs``: validations of the cycles
    whose verdict was a rollback (their dendrite and neuron phases), budget-cut ones included.
    """
    seen: set[int] = set()
    rows = [r for r in history if not (r["validation"] in seen or seen.add(r["validation"]))]  # one per validation
    neuron = sum(r["phase"] == "neuron" for r in rows)
    first = next((r["validation"] for r in rows if r["action"] == "start_dendrite_phase"), None)
    start, rolled = None, 0
    for r in history:
        if r["action"] in ("start_dendrite_phase", "retry", "restart") and start is None:
            start = r["validation"]
        if "did not beat the global best" in r["reason"] and start is not None:
            rolled += r["validation"] - start
            start = r["validation"] if r["action"] in ("retry", "restart") else None
        elif "during a dendrite phase" in r["reason"] and start is not None:
            rolled += r["validation"] - start  # the budget ended the phase: its candidates were dropped
        elif r["action"] in ("start_dendrite_phase", "restart"):
            start = r["validation"]
    last = history[-1]["reason"] if history else ""
    if not complete:
        stop = "max_epochs"
    elif "max_tries=" in last:
        stop = "max_tries"
    elif "run_budget=" in last:
        stop = "budget"
    elif "max_dendrites" in last:
        stop = "max_dendrites"
    else:
        stop = "other"
    return {
        "stop": stop,
        "first_phase_epochs": first if first is not None else neuron,
        "neuron_epochs": neuron,
        "dendrite_epochs": len(rows) - neuron,
        "rolled_back_epochs": rolled,
    }


def _layers(model: nn.Module) -> list[Any]:
    from pb_lightning import perforated_layers

    return perforated_layers(model)


def arms_for(bench: Bench, variants: list[str], quick: bool) -> list[Arm]:
    """Every arm of one benchmark: base, the variants and their inert controls, both frontiers."""
    w = bench.width
    widths = sorted({max(1, round(w * m)) for m in (WIDTH_MULTIPLES[:4] if quick else WIDTH_MULTIPLES)})
    restart = sorted({max(1, round(w * m)) for m in (RESTART_MULTIPLES[:2] if quick else RESTART_MULTIPLES)})
    arms = [Arm("base", "base", w)]
    for v in variants:
        arms += [Arm(v, "dendrites", w, v), Arm(f"{v}/inert", "inert", w, v)]
    arms += [Arm(f"restart@{r}", "restart", r) for r in restart]
    # ``base`` is the frontier's point at the benchmark's own width (the same training).
    arms += [Arm(f"width@{x}", "width", x) for x in widths if x != w]
    # Run only when named in --arms: is the width frontier short of training, not of width?
    arms += [Arm(f"patient@{x}", "patient", x) for x in widths]
    return arms


# ------------------------------------------------------------------------------------------- summary
def _mean_se(values: list[float]) -> tuple[float, float, int]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan, 0
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return statistics.fmean(values), se, len(values)


def interpolate(points: list[tuple[float, float]], params: float) -> tuple[float, bool]:
    """Accuracy of a frontier of (params, acc) points at ``params``, linear in log(params).

    Returns the value and whether it was extrapolated (outside the frontier's parameter range).
    """
    pts = sorted(points)
    xs = [math.log(p) for p, _ in pts]
    ys = [a for _, a in pts]
    x = math.log(params)
    if len(pts) == 1:
        return ys[0], x != xs[0]
    if xs[0] <= x <= xs[-1]:
        return float(np.interp(x, xs, ys)), False
    i, j = (0, 1) if x < xs[0] else (-2, -1)
    slope = (ys[j] - ys[i]) / (xs[j] - xs[i]) if xs[j] != xs[i] else 0.0
    return ys[j] + slope * (x - xs[j]), True


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per benchmark: every arm's mean ± SE, and each dendritic arm's paired gaps."""
    out: dict[str, Any] = {}
    for bench in dict.fromkeys(r["benchmark"] for r in rows):
        brows = [r for r in rows if r["benchmark"] == bench]
        by_arm: dict[str, dict[int, dict[str, Any]]] = {}
        for r in brows:
            by_arm.setdefault(r["arm"], {})[r["seed"]] = r
        base = by_arm.get("base", {})
        frontier = {k: v for k, v in by_arm.items() if k.startswith("width@") or k == "base"}
        restart = {k: v for k, v in by_arm.items() if k.startswith("restart@")}
        patient = {k: v for k, v in by_arm.items() if k.startswith("patient@")}

        def front(arms: dict[str, dict[int, dict[str, Any]]], seed: int) -> list[tuple[float, float]]:
            return [(a[seed]["params"], a[seed]["test_acc"]) for a in arms.values() if seed in a]

        arms: dict[str, Any] = {}
        for name, seeds in by_arm.items():
            kind = next(iter(seeds.values()))["kind"]
            stats: dict[str, Any] = {
                "kind": kind,
                "width": next(iter(seeds.values()))["width"],
                "seeds": sorted(seeds),
            }
            for key in ("test_acc", "params", "epochs", "wall_s", "dendrites_per_layer", "accept_correlation"):
                stats[key] = _mean_se([r[key] for r in seeds.values() if r[key] is not None])
            stats["vs_base"] = _mean_se([r["test_acc"] - base[s]["test_acc"] for s, r in seeds.items() if s in base])
            if kind in ("dendrites", "inert", "restart", "base", "patient"):
                frontiers = [("vs_width_frontier", frontier), ("vs_restart_frontier", restart)]
                if patient and kind != "patient":
                    frontiers.append(("vs_patient_frontier", patient))
                for label, arms_ in frontiers:
                    gaps, extrapolated = [], 0
                    for s, r in seeds.items():
                        pts = front(arms_, s)
                        if len(pts) >= 2:
                            value, extra = interpolate(pts, r["params"])
                            gaps.append(r["test_acc"] - value)
                            extrapolated += extra
                    stats[label] = (*_mean_se(gaps), extrapolated)
            if kind == "dendrites":
                inert = by_arm.get(f"{name}/inert", {})
                stats["vs_inert"] = _mean_se(
                    [r["test_acc"] - inert[s]["test_acc"] for s, r in seeds.items() if s in inert]
                )
            arms[name] = stats
        out[bench] = arms
    return out


def _gap(stats: dict[str, Any], key: str) -> str:
    if key not in stats:
        return "–"
    text = plus_minus(stats[key][:2], sign=True)
    extra = stats[key][3] if len(stats[key]) > 3 else 0
    return text + (f" ({extra} extrapolated)" if extra else "")


def _order(name: str) -> tuple[int, int, str]:
    if name == "base":
        return (0, 0, name)
    if name.startswith("restart@"):
        return (2, int(name.split("@")[1]), name)
    if name.startswith("width@"):
        return (3, int(name.split("@")[1]), name)
    if name.startswith("patient@"):
        return (4, int(name.split("@")[1]), name)
    return (1, 0, name)


def markdown(results: dict[str, Any]) -> str:
    """The Markdown report, generated from the JSON alone."""
    meta = results["meta"]
    lines = [
        "# Research harness: dendrites against their controls",
        "",
        "- commands (each adds the fits not already in `results.json`):",
        *[f"  - `{c}`" for c in meta.get("commands", [meta["command"]])],
        f"- last run: {meta['date']}; machine: {meta['machine']}, {meta['cpu_count']} CPUs, 1 torch thread",
        f"- torch {meta['torch']}, python {meta['python']}; pb_lightning commits of the fits: "
        + ", ".join(sorted({str(r.get("commit", meta["commit"])) for r in results["runs"]})),
        f"- fits: {len(results['runs'])}; wall time of the fits {sum(r['wall_s'] for r in results['runs']):.0f} s"
        + (
            "; **quick mode** (fixed 2+1-epoch phases, 8 epochs: checks the pipeline, numbers mean nothing)"
            if meta.get("quick")
            else ""
        ),
        "",
        "Test accuracy (%), mean ± standard error over seeds. Gaps are in accuracy points, computed per seed "
        "and then averaged: *vs width frontier* / *vs restart frontier*: the arm's accuracy minus that seed's "
        "plain (`width@W`) / restart-schedule (`restart@W`) networks interpolated in log(parameters) at the arm's "
        "parameter count (`n` extrapolated: seeds outside the frontier's range); *vs inert*: minus its own inert "
        "control (same cycles, dendrite output weights held at 0); *vs patient frontier* (where run): minus "
        "plain networks trained with 4x the patience (`patient@W`). Validation decides everything; test is "
        "evaluated once per fit.",
    ]
    variants = meta.get("variant_notes", {})
    if variants:
        lines += ["", "Variants: " + "; ".join(f"`{k}`: {v}" for k, v in variants.items()) + "."]
    for bench, arms in results["summary"].items():
        limits = sorted({r["limit_train"] for r in results["runs"] if r["benchmark"] == bench and "limit_train" in r})
        regression = any(r.get("task") == "regression" for r in results["runs"] if r["benchmark"] == bench)
        patient = any("vs_patient_frontier" in s for s in arms.values())
        lines += [
            "",
            f"## {bench}" + (f" (training split subsampled to the first {limits[0]} examples)" if limits else ""),
            *(["", "Regression: the score is the test R² × 100; gaps are points of explained variance."] * regression),
            "",
            f"| arm | width | params | {'test R² ×100' if regression else 'test acc %'} "
            "| vs base | vs width frontier | vs restart frontier | "
            + ("vs patient frontier | " if patient else "")
            + "vs inert | D/layer | epochs | s/fit | seeds |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if patient else ""),
        ]
        for name in sorted(arms, key=_order):
            s = arms[name]

            lines.append(
                f"| {name} | {s['width']} | {plus_minus(s['params'], 1, 0)} | {plus_minus(s['test_acc'])} | "
                f"{plus_minus(s['vs_base'], sign=True) if name != 'base' else '–'} | {_gap(s, 'vs_width_frontier')} | "
                f"{_gap(s, 'vs_restart_frontier')} | "
                + (f"{_gap(s, 'vs_patient_frontier')} | " if patient else "")
                + f"{_gap(s, 'vs_inert')} | {plus_minus(s['dendrites_per_layer'], 1, 1)} | "
                f"{plus_minus(s['epochs'], 1, 0)} | {plus_minus(s['wall_s'], 1, 1)} | {len(s['seeds'])} |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmarks", nargs="+", default=None, help="benchmark names of accuracy.py")
    parser.add_argument("--variants", nargs="+", default=["pb"], choices=sorted(VARIANTS), help="dendritic arms")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--arms", nargs="+", default=None, help="only these arm names (default: all)")
    parser.add_argument("--limit-train", type=int, default=None, help="subsample the training split")
    parser.add_argument("--quick", action="store_true", help="smoke test: digits MLP-8, 2 seeds, short phases")
    add_report_options(parser, default=Path("benchmarks/results/research"))
    args = parser.parse_args(argv)
    if args.render:
        print(render_report(args.out, markdown))
        return 0
    quiet_lightning()
    torch.set_num_threads(1)
    quick = args.quick
    names = args.benchmarks or (["digits MLP-8"] if quick else ["MNIST-1D MLP-16", "MNIST-1D CNN-4"])
    seeds = 2 if quick and "--seeds" not in (argv or sys.argv) else args.seeds
    table = all_benches()
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; valid: {sorted(table)}")
    meta, rows, done, previous = resume_report(args.out, argv, fresh=quick)
    meta["variant_notes"] = {**previous.get("variant_notes", {}), **{v: VARIANTS[v].note for v in args.variants}}
    start = time.perf_counter()
    for name in names:
        bench = table[name]
        data = splits(bench, args.limit_train)
        for seed in range(args.first_seed, args.first_seed + seeds):
            for arm in arms_for(bench, args.variants, quick):
                wanted = arm.name in args.arms if args.arms else arm.kind != "patient"
                if not wanted or (name, arm.name, seed) in done:
                    continue
                row = fit(bench, arm, seed, data, quick)
                if args.limit_train is not None:
                    row["limit_train"] = args.limit_train
                done.add((name, arm.name, seed))
                save_fit(args.out, (meta, rows), row, (name, arm.name, seed), summarize, markdown)
    finish_report(args.out, (meta, rows), summarize, markdown, start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
