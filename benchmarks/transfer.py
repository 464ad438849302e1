#!/usr/bin/env python
r"""Transfer harness: dendrites added to a *trained* network, against other ways to add capacity there.

Every public claim for Perforated Backpropagation we know of adds dendrites to a network that was
already trained. There, width is not free: a trained network cannot simply be trained wider from
scratch, so the fair competitors are other ways of adding trainable capacity to it. Each benchmark
trains a plain network on a *source* task (one per seed), moves it to a *target* task with little
data, and fine-tunes it through every arm, all from the same trained weights::

    python benchmarks/transfer.py --quick --out /tmp/transfer            # smoke test, < 60 s
    python benchmarks/transfer.py --seeds 5 --out benchmarks/results/transfer
    python benchmarks/transfer.py --seeds 5 --first-seed 5 --out benchmarks/results/transfer  # fresh seeds
    python benchmarks/transfer.py --render --out benchmarks/results/transfer

Arms (the same seed gives the same trained source network, the same new head and the same batch
order in every arm):

* ``finetune``: plain fine-tuning of every weight, stopped by the same neuron-phase patience the
  dendritic runs use (:class:`~pb_lightning.cycle.machine.PhaseMachine` with ``max_dendrites=0``),
  keeping the best validation weights.
* ``patient``: the same with ``PATIENT_FACTOR`` times the patience (is plain fine-tuning short of
  training?).
* ``restart``: plain fine-tuning through ``PhaseSchedule(restarts_only=True)``: the dendritic
  schedule's warm restarts, rollbacks and retries, without dendrites.
* ``<variant>`` and ``<variant>/inert``: dendrites (``VARIANTS`` of ``research.py``; default
  ``pb``, the dense default, and the sparse relu dendrites trained after acceptance of
  benchmarks/README.md: ``relu-fan2-random-trained`` and ``relu-fan2-trained``) and their inert
  controls (same cycles, dendrite outputs held at 0).
* ``lora@r``: LoRA adapters of rank ``r`` through the ``peft`` package (``LoraConfig`` on the
  layers the dendrites wrap, the head retrained through ``modules_to_save``), the trained weights
  frozen: the adapter recipe users already fine-tune with.
* ``lora-full@r``: the same adapters with every trained weight trainable too, as the dendritic
  arms train every weight: parameters added, nothing frozen.
* ``widen@m``: the trained network made ``m`` times wider by a function-preserving widening
  (Net2WiderNet, :func:`widen`), then fine-tuned as ``finetune``.

Every claim is judged by one standard (benchmarks/README.md, "One standard for every claim"): per
seed, the **envelope** at a dendritic arm's parameter count is the best of every non-dendritic arm
family there (``finetune``, ``patient``, ``restart`` — at the network's own size, below the arm's —
and the ``widen``, ``lora`` and ``lora-full`` frontiers, interpolated in log(parameters)); the arm
*wins* only if its mean paired gap to the envelope exceeds two standard errors, and the win repeats
on five fresh seeds (``--first-seed 5``).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent), str(_HERE)]

import numpy as np  # noqa: E402
import standard  # noqa: E402
import torch  # noqa: E402
from common.cli import add_report_options, quiet_lightning  # noqa: E402
from machine import finish_report, render_report, resume_report, save_fit  # noqa: E402
from research import VARIANTS, batches, dendrite_config, evaluate, loss_fn  # noqa: E402
from standard import WIN_SE, mean_se, plus_minus, verdict  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from pb_lightning import PerforatedTracker, PhaseSchedule, parameter_counts, perforated_layers  # noqa: E402
from pb_lightning.cycle.machine import PhaseMachine  # noqa: E402
from pb_lightning.engine.controls import make_dendrites_inert  # noqa: E402

Splits = dict[str, tuple[Tensor, Tensor]]

#: ``patient`` arms: plain fine-tuning with this many times the benchmark's patience.
PATIENT_FACTOR = 4


# ---------------------------------------------------------------------------------------------- data
def _split(x: np.ndarray, y: np.ndarray, n_train: int, n_val: int, seed: int) -> Splits:
    """A fixed random split (the data's own seed, never the training seed) into train and val."""
    order = np.random.default_rng(seed).permutation(len(y))[: n_train + n_val]
    tr, va = order[:n_train], order[n_train:]
    return {"train": _tensors(x[tr], y[tr]), "val": _tensors(x[va], y[va])}


def _tensors(x: np.ndarray, y: np.ndarray) -> tuple[Tensor, Tensor]:
    target = torch.as_tensor(y, dtype=torch.float32 if y.dtype.kind == "f" else torch.long)
    return torch.as_tensor(x, dtype=torch.float32), target


def _per_class(y: np.ndarray, classes: range, sizes: tuple[int, ...], seed: int) -> list[np.ndarray]:
    """Disjoint fixed draws of each class in ``classes``: one index array per entry of ``sizes``
    (e.g. ``(300, 100)``: 300 training and 100 validation examples of every class)."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in sizes]
    for c in classes:
        pool = rng.permutation(np.flatnonzero(y == c))
        bounds = np.cumsum((0, *sizes))
        for k in range(len(sizes)):
            parts[k].append(pool[bounds[k] : bounds[k + 1]])
    return [np.concatenate(p) for p in parts]


def fashion_tasks(per_class: int = 300) -> tuple[Splits, Splits]:
    """Fashion-MNIST: classes 0–4 (source, 1,200 per class) → classes 5–9 (``per_class`` images each).

    Tops, trousers, pullovers, dresses and coats teach the features; sandals, shirts, sneakers,
    bags and ankle boots are the new task, with a few hundred images per class (and a third of
    that for validation). Labels are renumbered 0–4 in both; the test part is every test image of
    the task's classes.
    """
    from models import fashion_arrays

    x, y, xt, yt = fashion_arrays()
    x, xt = x.reshape(len(x), -1), xt.reshape(len(xt), -1)

    def task(classes: range, n_train: int, n_val: int, seed: int) -> Splits:
        tr, va = _per_class(y, classes, (n_train, n_val), seed)
        test = np.isin(yt, list(classes))
        shift = classes.start
        return {
            "train": _tensors(x[tr], y[tr] - shift),
            "val": _tensors(x[va], y[va] - shift),
            "test": _tensors(xt[test], yt[test] - shift),
        }

    return task(range(0, 5), 1200, 200, 11), task(range(5, 10), per_class, per_class // 3, 12)


def _mnist1d(**overrides: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST-1D generated offline (global RNG state kept, as ``models.mnist1d_arrays`` does)."""
    import random

    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    for key, value in overrides.items():
        setattr(args, key, value)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return (d["x"].astype(np.float32), np.asarray(d["y"]), d["x_test"].astype(np.float32), np.asarray(d["y_test"]))


def mnist1d_tasks(per_class: int = 100) -> tuple[Splits, Splits]:
    """MNIST-1D as published (source) → a shifted MNIST-1D with ``per_class`` examples per digit.

    The target draws new sequences (another data seed) with a third more shear and half again the
    correlated and the independent noise: the same ten templates seen through a harder, shifted
    process — a new sensor, the regime fine-tuning is for. Inputs are standardised with the source's statistics.
    """
    x, y, xt, yt = _mnist1d()
    mean, std = x.mean(), x.std()
    source = _split((x - mean) / std, y, 3200, 800, 21)
    source["test"] = _tensors((xt - mean) / std, yt)
    x2, y2, xt2, yt2 = _mnist1d(seed=7, shear_scale=1.0, corr_noise_scale=0.375, iid_noise_scale=0.03)
    tr, va = _per_class(y2, range(10), (per_class, per_class // 2), 22)
    target = {
        "train": _tensors((x2[tr] - mean) / std, y2[tr]),
        "val": _tensors((x2[va] - mean) / std, y2[va]),
        "test": _tensors((xt2 - mean) / std, yt2),
    }
    return source, target


def shifted_friedman(x: np.ndarray) -> np.ndarray:
    """The target function: Friedman #1's terms on other inputs and with other weights.

    ``10 sin(pi x1 x3) + 20 (x2 - 0.3)^2 + 5 x4 + 10 x6``: the same kinds of term (a multiplicative
    interaction, a quadratic, linear terms) as the source ``10 sin(pi x1 x2) + 20 (x3 - 0.5)^2 +
    10 x4 + 5 x5``, moved: what the trained features know is related, not the answer.
    """
    return 10 * np.sin(np.pi * x[:, 0] * x[:, 2]) + 20 * (x[:, 1] - 0.3) ** 2 + 5 * x[:, 3] + 10 * x[:, 5]


def friedman_tasks(n_target: int = 200) -> tuple[Splits, Splits]:
    """Friedman #1 (3,000 points, source) → :func:`shifted_friedman` with ``n_target`` training points.

    Targets are standardised with each task's own training statistics, inputs are uniform on
    [0, 1] in both, so the scores (R²) of the two tasks are on the same footing.
    """
    from sklearn.datasets import make_friedman1

    x, y = make_friedman1(n_samples=4000, n_features=10, noise=1.0, random_state=1234)
    rng = np.random.default_rng(4321)
    x2 = rng.uniform(size=(n_target + n_target // 2 + 2000, 10))
    y2 = shifted_friedman(x2) + rng.normal(scale=1.0, size=len(x2))

    def task(x: np.ndarray, y: np.ndarray, n_train: int, n_val: int) -> Splits:
        mean, std = y[:n_train].mean(), y[:n_train].std()
        y = ((y - mean) / std).astype(np.float32)
        x = x.astype(np.float32)
        return {
            "train": _tensors(x[:n_train], y[:n_train]),
            "val": _tensors(x[n_train : n_train + n_val], y[n_train : n_train + n_val]),
            "test": _tensors(x[n_train + n_val :], y[n_train + n_val :]),
        }

    return task(x, y, 3000, 500), task(x2, y2, n_target, n_target // 2)


# ---------------------------------------------------------------------------------------- benchmarks
@dataclass(frozen=True)
class TransferBench:
    """One transfer benchmark: a source and a target task and the MLP moved between them.

    Args:
        tasks: builds (source, target) splits.
        width: the MLP's hidden width (two hidden layers).
        inputs / source_outputs / target_outputs: the MLP's sizes; a new head (freshly initialised
            from the seed) replaces the source's when ``new_head``.
        task: ``classification`` (accuracy, cross-entropy) or ``regression`` (R², squared error).
        lr, batch_size, patience, max_epochs: the training of every arm (the source too).
        widen: the ``widen@m`` multiples; ``lora_ranks``: the ``lora@r`` and ``lora-full@r`` ranks,
            chosen to bracket the dendritic arms' parameter counts.
    """

    name: str
    tasks: Callable[[], tuple[Splits, Splits]]
    width: int
    inputs: int
    source_outputs: int
    target_outputs: int
    task: str = "classification"
    new_head: bool = True
    lr: float = 3e-3
    batch_size: int = 64
    patience: int = 10
    max_epochs: int = 300
    widen: tuple[float, ...] = (1.5, 2.0, 3.0, 4.0, 6.0)
    lora_ranks: tuple[int, ...] = (2, 8, 32)

    @property
    def monitor_mode(self) -> str:
        return "min" if self.task == "regression" else "max"


BENCHES: dict[str, TransferBench] = {
    b.name: b
    for b in (
        TransferBench("Fashion 0-4 → 5-9 MLP-32", fashion_tasks, 32, 784, 5, 5, lr=1e-3),
        TransferBench("MNIST-1D → shifted MLP-32", mnist1d_tasks, 32, 40, 10, 10, lr=3e-3),
        TransferBench(
            "Friedman-1 → shifted MLP-8",
            friedman_tasks,
            8,
            10,
            1,
            1,
            task="regression",
            new_head=False,
            lr=3e-3,
            batch_size=32,
            lora_ranks=(1, 4, 16),
        ),
    )
}


def mlp(inputs: int, width: int, outputs: int) -> nn.Sequential:
    """``inputs → width → width → outputs`` with ReLU: layers ``0``, ``2`` and the head ``4``."""
    return nn.Sequential(
        nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, outputs)
    )


HEAD = "4"


# ------------------------------------------------------------------------------------------- widening
@torch.no_grad()
def widen(net: nn.Sequential, width: int, generator: torch.Generator) -> nn.Sequential:
    """Net2WiderNet (Chen et al. 2016): the same function with ``width`` units in every hidden layer.

    For each hidden ``Linear`` followed (after an elementwise activation) by another ``Linear``,
    every new unit copies the incoming weights and bias of a randomly chosen existing unit, and the
    next layer's outgoing weights of each original unit are shared among it and its copies. The
    shares are random positive fractions summing to one (not equal halves): with equal shares the
    copies would receive equal gradients and stay identical forever; with unequal ones the function
    is still exactly preserved and the copies diverge as they train.
    """
    linears = [i for i, m in enumerate(net) if isinstance(m, nn.Linear)]
    new = copy.deepcopy(net)
    for i, j in zip(linears, linears[1:], strict=False):
        layer, following = new[i], new[j]
        old = layer.out_features
        if width < old:
            raise ValueError(f"width={width} is narrower than the layer's {old} units: widening only adds units")
        source = torch.cat([torch.arange(old), torch.randint(old, (width - old,), generator=generator)])
        share = torch.rand(width, generator=generator) + 0.5
        totals = torch.zeros(old).index_add_(0, source, share)
        share = share / totals[source]
        wider = nn.Linear(layer.in_features, width)
        wider.weight.copy_(layer.weight[source])
        wider.bias.copy_(layer.bias[source])
        nxt = nn.Linear(width, following.out_features)
        nxt.weight.copy_(following.weight[:, source] * share)
        nxt.bias.copy_(following.bias)
        new[i], new[j] = wider, nxt
    return new


# ------------------------------------------------------------------------------------------------ LoRA
def lora(net: nn.Module, rank: int, targets: list[str], train_base: bool) -> tuple[nn.Module, int]:
    """``net`` with ``peft`` LoRA adapters of ``rank`` on ``targets``; returns it and the adapters' size.

    The head is retrained through ``modules_to_save`` (when it is not a target); ``train_base``
    makes every original weight trainable too. The returned count is the adapters' parameters
    only (``modules_to_save`` keeps a second copy of the head, which is no new capacity).
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=targets,
        modules_to_save=None if HEAD in targets else [HEAD],
        init_lora_weights=True,
    )
    model = get_peft_model(net, config)
    added = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    if train_base:
        for name, p in model.named_parameters():
            if "original_module" not in name:
                p.requires_grad_(True)
    return model, added


# ----------------------------------------------------------------------------------------------- fits
@dataclass(frozen=True)
class Arm:
    """One fine-tuning recipe: ``kind`` is finetune | patient | restart | widen | lora | lora-full |
    dendrites | inert; ``size`` is the widening multiple or the LoRA rank."""

    name: str
    kind: str
    size: float | None = None
    variant: str | None = None


def arms_for(bench: TransferBench, variants: list[str]) -> list[Arm]:
    arms = [Arm("finetune", "finetune"), Arm("patient", "patient"), Arm("restart", "restart")]
    for v in variants:
        arms += [Arm(v, "dendrites", variant=v), Arm(f"{v}/inert", "inert", variant=v)]
    arms += [Arm(f"widen@{m:g}", "widen", m) for m in bench.widen]
    arms += [Arm(f"lora@{r}", "lora", r) for r in bench.lora_ranks]
    arms += [Arm(f"lora-full@{r}", "lora-full", r) for r in bench.lora_ranks]
    return arms


def train_plain(
    net: nn.Module, data: Splits, bench: TransferBench, seed: int, patience: int, max_epochs: int
) -> tuple[nn.Module, int]:
    """Fine-tune every trainable parameter until ``patience`` validations bring no improvement.

    The stopping rule is the dendritic runs' own first neuron phase (a :class:`PhaseMachine` with
    ``max_dendrites=0``), and the best validation weights are kept, so the plain arms and the
    dendritic arms stop by the same rule.
    """
    machine = PhaseMachine(
        bench.monitor_mode, PhaseSchedule(neuron_patience=patience, max_dendrites=0, run_budget=None)
    )
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=bench.lr)
    generator = torch.Generator().manual_seed(seed)
    criterion = loss_fn(bench.task)
    best = copy.deepcopy(net.state_dict())
    epochs = 0
    while epochs < max_epochs:
        net.train()
        for x, y in batches(*data["train"], bench.batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            criterion(net(x), y).backward()
            optimizer.step()
        epochs += 1
        acc, loss = evaluate(net, *data["val"], bench.task)
        decision = machine.step(loss if bench.monitor_mode == "min" else acc)
        if decision.new_phase_best:
            best = copy.deepcopy(net.state_dict())
        if decision.action != "continue":
            break
    net.load_state_dict(best)
    return net, epochs


def train_tracked(
    net: nn.Module, data: Splits, bench: TransferBench, seed: int, arm: Arm, max_epochs: int, quick: bool
) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune through :class:`~pb_lightning.PerforatedTracker`: the dendritic and restart arms."""
    schedule: dict[str, Any] = {"neuron_patience": bench.patience}
    if quick:
        # Fixed 2 + 1-epoch phases, as research.py --quick: every arm's cycles run within 8 epochs.
        schedule = {"neuron_epochs": 2, "dendrite_epochs": 1, "max_dendrites": 2, "dendrite_patience_steps": None}
    if arm.kind == "restart":
        schedule["restarts_only"] = True
    variant = VARIANTS[arm.variant] if arm.variant is not None else VARIANTS["pb"]
    if arm.variant is not None:
        schedule |= variant.schedule
    tracker = PerforatedTracker(
        bench.monitor_mode, PhaseSchedule(**schedule), candidate_lr=variant.candidate_lr * bench.lr, verbose=False
    )
    model = tracker.initialize(net, config=dendrite_config(net, variant.config))
    if arm.kind == "inert":
        make_dendrites_inert(model)
    tracker.set_optimizer(torch.optim.Adam, lr=bench.lr)
    optimizer, _ = tracker.setup_optimizer(model)
    generator = torch.Generator().manual_seed(seed)
    criterion = loss_fn(bench.task)
    epochs, complete = 0, False
    while epochs < max_epochs and not complete:
        model.train()
        for x, y in batches(*data["train"], bench.batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            criterion(model(x), y).backward()
            optimizer.step()
            if tracker.add_training_step(model):
                optimizer, _ = tracker.setup_optimizer(model)
        epochs += 1
        acc, loss = evaluate(model, *data["val"], bench.task)
        model, restructured, complete = tracker.add_validation_score(
            loss if bench.monitor_mode == "min" else acc, model
        )
        if restructured and not complete:
            optimizer, _ = tracker.setup_optimizer(model)
    if not complete:
        tracker.finish(model)
    state = tracker.machine.state
    layers = perforated_layers(model)
    return model, {
        "epochs": epochs,
        "params": parameter_counts(model)["total"],
        "dendrites_per_layer": max((layer.num_dendrites for layer in layers), default=0),
        "accepted_cycles": state.accepted_cycles,
        "rejected_cycles": state.rejected_cycles,
    }


def pretrain(bench: TransferBench, source: Splits, seed: int, quick: bool) -> tuple[nn.Sequential, dict[str, Any]]:
    """The seed's source network: a plain MLP trained on the source task (best validation weights)."""
    torch.manual_seed(seed)
    net = mlp(bench.inputs, bench.width, bench.source_outputs)
    start = time.perf_counter()
    net, epochs = train_plain(
        net, source, bench, seed, 2 if quick else bench.patience, 6 if quick else bench.max_epochs
    )
    score, _ = evaluate(net, *source["test"], bench.task)
    return net, {"source_test": score, "source_epochs": epochs, "source_wall_s": time.perf_counter() - start}


def moved(bench: TransferBench, trained: nn.Sequential, seed: int) -> nn.Sequential:
    """The trained network, with a fresh head (seeded) when the target's outputs are new classes."""
    net = copy.deepcopy(trained)
    if bench.new_head:
        torch.manual_seed(10_000 + seed)
        head = net[int(HEAD)]
        net[int(HEAD)] = nn.Linear(head.in_features, bench.target_outputs)
    return net


def _params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def fit(
    bench: TransferBench, arm: Arm, seed: int, trained: nn.Sequential, target: Splits, quick: bool
) -> dict[str, Any]:
    """Fine-tune one arm from the seed's trained network; evaluate the kept weights on test once."""
    net = moved(bench, trained, seed)
    torch.manual_seed(seed)
    max_epochs = 8 if quick else bench.max_epochs
    patience = 2 if quick else bench.patience
    start = time.perf_counter()
    info: dict[str, Any] = {"dendrites_per_layer": 0, "accepted_cycles": 0, "rejected_cycles": 0}
    if arm.kind in ("finetune", "patient", "widen"):
        if arm.kind == "widen":
            net = widen(net, round(bench.width * float(arm.size or 1)), torch.Generator().manual_seed(seed))
        factor = PATIENT_FACTOR if arm.kind == "patient" else 1
        net, epochs = train_plain(net, target, bench, seed, factor * patience, max_epochs)
        info |= {"epochs": epochs, "params": _params(net)}
    elif arm.kind in ("lora", "lora-full"):
        base_params = _params(net)
        # The layers perforate() wraps in these MLPs (every Linear). Frozen adapters retrain the head
        # in full instead (it is new, or the task's readout), as the usual PEFT recipe does.
        full = arm.kind == "lora-full"
        targets = ["0", "2", HEAD] if full else ["0", "2"]
        model, added = lora(net, int(arm.size or 1), targets, train_base=full)
        model, epochs = train_plain(model, target, bench, seed, patience, max_epochs)
        net = model
        info |= {"epochs": epochs, "params": base_params + added}
    else:
        net, tracked = train_tracked(net, target, bench, seed, arm, max_epochs, quick)
        info |= tracked
    wall = time.perf_counter() - start
    test, _ = evaluate(net, *target["test"], bench.task)
    val, _ = evaluate(net, *target["val"], bench.task)
    return {
        "benchmark": bench.name,
        "task": bench.task,  # for "regression", the score fields hold R²
        "arm": arm.name,
        "kind": arm.kind,
        "variant": arm.variant,
        "size": arm.size,
        "seed": seed,
        "test_acc": test,
        "val_acc": val,
        **info,
        "wall_s": wall,
    }


# ------------------------------------------------------------------------------------------- summary
NON_DENDRITIC = ("finetune", "patient", "restart", "widen", "lora", "lora-full")


def envelope(rows: dict[str, dict[str, Any]], params: float) -> tuple[float, str, bool] | None:
    """The best non-dendritic score of one seed at ``params`` parameters (:func:`standard.envelope`).

    ``rows`` maps arm names to that seed's runs. The families: ``finetune``, ``patient`` and
    ``restart`` (one point each, at the network's own size), and the ``widen`` (from ``finetune``
    up), ``lora`` and ``lora-full`` frontiers.
    """
    families: dict[str, list[tuple[float, float]]] = {}
    for run in rows.values():
        families.setdefault(run["kind"], []).append((run["params"], run["test_acc"]))
    if "finetune" in families:
        families.setdefault("widen", []).extend(families["finetune"])
    return standard.envelope({k: v for k, v in families.items() if k in NON_DENDRITIC}, params)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per benchmark and seed range (``0-4``, fresh ``5-9``…): every arm's mean ± SE and the gaps."""
    out: dict[str, Any] = {}
    for bench in dict.fromkeys(r["benchmark"] for r in rows):
        brows = [r for r in rows if r["benchmark"] == bench]
        groups = sorted({r["seed"] // 5 for r in brows})
        for group in groups:
            grows = [r for r in brows if r["seed"] // 5 == group]
            by_seed: dict[int, dict[str, dict[str, Any]]] = {}
            for r in grows:
                by_seed.setdefault(r["seed"], {})[r["arm"]] = r
            arms: dict[str, Any] = {}
            for name in dict.fromkeys(r["arm"] for r in grows):
                runs = {s: by_seed[s][name] for s in by_seed if name in by_seed[s]}
                first = next(iter(runs.values()))
                stats: dict[str, Any] = {"kind": first["kind"], "seeds": sorted(runs)}
                for key in ("test_acc", "params", "epochs", "wall_s", "dendrites_per_layer"):
                    stats[key] = mean_se([float(r[key]) for r in runs.values()])
                finetune = {s: by_seed[s]["finetune"]["test_acc"] for s in runs if "finetune" in by_seed[s]}
                stats["vs_finetune"] = mean_se([r["test_acc"] - finetune[s] for s, r in runs.items() if s in finetune])
                if first["kind"] == "dendrites":
                    gaps, families, beyond = [], [], 0
                    for s, r in runs.items():
                        plain = {k: v for k, v in by_seed[s].items() if v["kind"] in NON_DENDRITIC}
                        read = envelope(plain, r["params"])
                        if read is not None:
                            value, family, extra = read
                            gaps.append(r["test_acc"] - value)
                            families.append(family)
                            beyond += extra
                    stats["vs_envelope"] = mean_se(gaps)
                    stats["envelope_families"] = sorted(set(families))
                    stats["beyond"] = beyond
                    stats["verdict"] = verdict(gaps)
                    inert = {s: by_seed[s].get(f"{name}/inert") for s in runs}
                    stats["vs_inert"] = mean_se(
                        [r["test_acc"] - inert[s]["test_acc"] for s, r in runs.items() if inert[s] is not None]
                    )
                arms[name] = stats
            sources = {r["seed"]: r["source_test"] for r in grows if "source_test" in r}
            out[f"{bench} | seeds {group * 5}-{group * 5 + 4}"] = {
                "source_test": mean_se(list(sources.values())),
                "arms": arms,
            }
    return out


def markdown(results: dict[str, Any]) -> str:
    """The Markdown report, generated from the JSON alone."""
    meta = results["meta"]
    lines = [
        "# Transfer harness: dendrites on a trained network, against adapters, widening and restarts",
        "",
        "- commands (each adds the fits not already in `results.json`):",
        *[f"  - `{c}`" for c in meta.get("commands", [meta["command"]])],
        f"- last run: {meta['date']}; machine: {meta['machine']}, {meta['cpu_count']} CPUs, 1 torch thread",
        f"- fits: {len(results['runs'])}; wall time of the fits {sum(r['wall_s'] for r in results['runs']):.0f} s"
        + ("; **quick mode** (numbers mean nothing)" if meta.get("quick") else ""),
        "",
        "Test accuracy % (R² × 100 for regression), mean ± standard error over seeds. *vs finetune*: paired "
        "gap to plain fine-tuning. *vs envelope*: paired gap to the best non-dendritic arm family at the "
        "arm's parameter count, per seed (finetune, patient, restart; the widen, lora and lora-full "
        f"frontiers interpolated in log(parameters)); *verdict*: `wins` if the gap exceeds {WIN_SE:g} SE. "
        "A win counts only once it repeats on fresh seeds (the `seeds 5-9` section).",
    ]
    for key, group in results["summary"].items():
        arms = group["arms"]
        lines += [
            "",
            f"## {key}",
            "",
            f"The trained source networks' test score: {plus_minus(group['source_test'])}.",
            "",
        ]
        lines += [
            "| arm | params | test | vs finetune | vs envelope | verdict | vs inert | D/layer | epochs | s/fit |",
            "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
        ]
        for name, s in arms.items():
            gap = plus_minus(s.get("vs_envelope"), sign=True) if "vs_envelope" in s else "–"
            if s.get("envelope_families"):
                gap += f" ({', '.join(s['envelope_families'])}" + (
                    f"; {s['beyond']} beyond its range)" if s["beyond"] else ")"
                )
            vs_finetune = plus_minus(s["vs_finetune"], sign=True) if name != "finetune" else "–"
            vs_inert = plus_minus(s["vs_inert"], sign=True) if "vs_inert" in s else "–"
            lines.append(
                f"| {name} | {plus_minus(s['params'], 1, 0)} | {plus_minus(s['test_acc'])} | {vs_finetune} | {gap} | "
                f"{s.get('verdict', '–')} | {vs_inert} | {plus_minus(s['dendrites_per_layer'], 1, 1)} | "
                f"{plus_minus(s['epochs'], 1, 0)} | {plus_minus(s['wall_s'], 1, 1)} |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--benchmarks",
        nargs="+",
        default=None,
        choices=sorted(BENCHES),
        metavar="NAME",
        help=f"transfer benchmarks (default: all): {sorted(BENCHES)}",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["pb", "relu-fan2-random-trained", "relu-fan2-trained"],
        choices=sorted(VARIANTS),
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--arms", nargs="+", default=None, help="only these arm names (default: all)")
    parser.add_argument("--quick", action="store_true", help="smoke test: one benchmark, 2 seeds, short phases")
    add_report_options(parser, default=Path("benchmarks/results/transfer"))
    args = parser.parse_args(argv)
    if args.render:
        print(render_report(args.out, markdown))
        return 0
    quiet_lightning()
    torch.set_num_threads(1)
    names = args.benchmarks or (["Friedman-1 → shifted MLP-8"] if args.quick else list(BENCHES))
    seeds = 2 if args.quick and "--seeds" not in (argv or sys.argv) else args.seeds
    meta, rows, done, _ = resume_report(args.out, argv, fresh=args.quick)
    start = time.perf_counter()
    for name in names:
        bench = BENCHES[name]
        source, target = bench.tasks()
        for seed in range(args.first_seed, args.first_seed + seeds):
            arms = [a for a in arms_for(bench, args.variants) if not args.arms or a.name in args.arms]
            arms = [a for a in arms if (name, a.name, seed) not in done]
            if not arms:
                continue
            trained, source_info = pretrain(bench, source, seed, args.quick)
            for arm in arms:
                row = fit(bench, arm, seed, trained, target, args.quick) | source_info
                save_fit(args.out, (meta, rows), row, (name, arm.name, seed), summarize, markdown, widths=(28, 28))
    finish_report(args.out, (meta, rows), summarize, markdown, start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
