#!/usr/bin/env python
"""Worker of ``reference_package.py``: the reference package's side of the comparison.

It runs inside the separate virtual environment that holds ``perforatedai``, so it may import
only torch, numpy, scikit-learn and perforatedai: never ``pb_lightning`` or lightning, which are
not installed there (and must not be, or the two packages' torch set-ups could differ).
``perforatedai`` is imported inside the functions that use it, because the orchestrator (in the
main environment, where perforatedai is absent) imports this module for the shared pieces:
the data split and the step timer, so that both packages are measured by the very same code.

Two jobs, chosen by the first argument, each writing one JSON document to ``--out``:

* ``train``: the digits MLP trained with perforatedai's five-step flow (perforate the model,
  set the optimizer, build it through the tracker, feed every validation score back, rebuild the
  optimizer whenever the tracker restructures the network) until the tracker says training is
  complete or the epoch budget runs out.
* ``timing``: per-step time of a model holding D dendrite sets, added without training through
  the tracker's own phase-switch methods, next to the same network not perforated.

The reference package is configured explicitly, never interactively: its configuration screen,
its three-dendrite test mode, its learning-rate search and its dashboard events are switched off
(see :func:`configure_reference`). Some of its error paths call ``pdb.set_trace()`` or
``input()``; the orchestrator runs this worker with stdin closed and a timeout, so such a path
ends the worker (pdb reads end-of-file and quits) instead of hanging the benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The timing primitives are shared with engine_speed.py (standard library only, so they run in
# the reference environment too): both packages are timed by the same code.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from common.timing import cpu_seconds, gc_paused, median_step, others_share

#: The digits MLP of ``configs/digits.yaml``: 64 -> 8 -> 8 -> 10.
DIGITS_SIZES = (64, 8, 8, 10)
#: The large MLP of ``engine_speed.py``, for the per-step comparison (batch 256).
LARGE_SIZES = (784, 512, 512, 10)


# ---------------------------------------------------------------------------- shared pieces
def digits_splits(seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """scikit-learn's digits split 60/20/20 exactly as ``pb_lightning.demos.digits.DigitsDataModule`` does.

    The split logic is repeated here (not imported) because this worker cannot import
    ``pb_lightning``; the orchestrator checks that both give the same split.
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    inputs = torch.tensor(x / 16.0, dtype=torch.float32)
    targets = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    n_train, n_val = int(0.6 * len(order)), int(0.2 * len(order))
    parts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    return {k: (inputs[i], targets[i]) for k, i in parts.items()}


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers with ReLU between them: the module layout of ``DigitsMLP.net``."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def training_step(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], None]:
    """``zero_grad``, forward, cross-entropy, backward: the step of ``engine_speed.py``.

    ``optimizer.step()`` is left out there too: its cost is linear in the parameters, not in the
    batch, and leaving it out keeps the model identical across repeats.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()

    def step() -> None:
        for p in params:
            p.grad = None
        F.cross_entropy(model(x), y).backward()

    return step


def time_against_baseline(
    baseline: Callable[[], None], variants: dict[str, Callable[[], None]], *, rounds: int, block_seconds: float
) -> dict[str, Any]:
    """Time each variant between two blocks of the plain network (A/B alternation), ``rounds`` times.

    Returns per variant the median step time (ms) and the median ratio to the neighbouring
    baseline blocks, plus the baseline's own median. The ratio cancels the slow drift of a
    shared machine; the absolute time is what the two packages are compared on.
    """
    estimates = {"": _warm(baseline)} | {k: _warm(v) for k, v in variants.items()}

    def steps(key: str) -> int:
        return max(3, round(block_seconds / max(estimates[key], 1e-6)))

    base: list[float] = []
    seconds: dict[str, list[float]] = {k: [] for k in variants}
    ratios: dict[str, list[float]] = {k: [] for k in variants}
    load_start = cpu_seconds()
    wall_start = time.perf_counter()
    with gc_paused():
        for r in range(rounds):
            keys = list(variants) if r % 2 == 0 else list(reversed(variants))
            before = median_step(baseline, steps(""))
            base.append(before)
            for key in keys:
                t = median_step(variants[key], steps(key))
                after = median_step(baseline, steps(""))
                base.append(after)
                seconds[key].append(t)
                ratios[key].append(t / (0.5 * (before + after)))
                before = after
    return {
        "others_cpu_share": others_share(load_start, cpu_seconds(), time.perf_counter() - wall_start),
        "baseline_ms": 1e3 * statistics.median(base),
        "variants": {
            k: {
                "ms": 1e3 * statistics.median(seconds[k]),
                "ratio": statistics.median(ratios[k]),
                "seconds_all": seconds[k],
                "ratio_all": ratios[k],
            }
            for k in variants
        },
    }


def _warm(step: Callable[[], None], steps: int = 10) -> float:
    median_step(step, steps)
    return median_step(step, steps)


# ---------------------------------------------------------------------------- perforatedai
def configure_reference(*, patience: int, max_dendrites: int, max_tries: int, maximizing: bool) -> dict[str, Any]:
    """Set perforatedai's globals so that it never prompts and runs a real experiment.

    Every setting is explicit, so a change of the package's defaults cannot silently change the
    benchmark. Returns the settings as applied, for the results file.
    """
    from perforatedai import globals_perforatedai as GPA

    pc = GPA.pc
    settings: dict[str, Any] = {
        # Off: the interactive configuration screen (a terminal UI that waits for keys and
        # may ask for a file name) that perforate_model opens unless the configuration is confirmed.
        "configuration_confirmed": True,
        # Off: the default test mode that adds three dendrites quickly and then ends training.
        "testing_dendrite_capacity": False,
        # Off: learning-rate search after each restructure (it needs a scheduler; pb_lightning's
        # digits job has none either).
        "find_best_lr": False,
        "dont_give_up_unless_learning_rate_lowered": False,
        # Off: HTTP events to a local dashboard, and intermediate test saves (pb_lightning's run
        # here writes no logs or checkpoints either). best_model saves stay: the tracker reloads
        # them when it restructures. Graphs are switched off with perforate_model(making_graphs=
        # False); drawing_pai stays at its default, True: in 3.2.9, False makes the first
        # add_validation_score fail in its plotting code (IndexError) even so.
        "dashboard_events_enabled": False,
        "drawing_pai": True,
        "test_saves": False,
        "verbose": False,
        "silent": False,
        # Switch strategy: the same patience and budgets as pb_lightning's digits job.
        "switch_mode": pc.DOING_HISTORY,
        "n_epochs_to_switch": patience,
        "max_dendrites": max_dendrites,
        "max_dendrite_tries": max_tries,
        "maximizing_score": maximizing,
        "use_cuda": False,
        "device": torch.device("cpu"),
    }
    for name, value in settings.items():
        getattr(pc, f"set_{name}")(value)
    return {k: (str(v) if isinstance(v, torch.device) else v) for k, v in settings.items()}


def _evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss = F.cross_entropy(logits, y).item()
        acc = (logits.argmax(1) == y).float().mean().item()
    model.train()
    return loss, acc


def dendrite_counts(model: nn.Module) -> dict[str, int]:
    """Dendrite sets per perforated layer, read from the modules themselves (not the tracker)."""
    from perforatedai import modules_perforatedai as PA

    return {
        name: int(m.dendrite_module.num_dendrites)
        for name, m in model.named_modules()
        if isinstance(m, PA.PAINeuronModule)
    }


def used_parameters(model: nn.Module) -> int:
    """Parameters the forward pass of the neuron phase uses.

    perforatedai's modules also hold, as parameters, a copy of each original layer
    (``dendrite_module.parent_module``, the template for new candidates), the candidates' cascade
    weights after they were accepted (``dendrites_to_candidates``), and every earlier, frozen
    version of the dendrite output weights (``dendrites_to_top``: only the newest is read). Its
    own ``count_params`` leaves out only the first, so both are reported; this count leaves out
    all three, and is the one comparable to ``pb_lightning.parameter_counts``.
    """
    from perforatedai import modules_perforatedai as PA

    stale = set()
    for module in model.modules():
        if isinstance(module, PA.PAINeuronModule):
            stale.update(id(p) for p in list(module.dendrites_to_top)[:-1])
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters():
        if "parent_module" in name or "dendrites_to_candidates" in name or id(p) in stale or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def train(args: argparse.Namespace) -> dict[str, Any]:
    """The reference package's five-step flow on the digits MLP (see the module docstring)."""
    from perforatedai import globals_perforatedai as GPA
    from perforatedai import utils_perforatedai as UPA

    torch.set_num_threads(args.threads)
    settings = configure_reference(
        patience=args.patience, max_dendrites=args.max_dendrites, max_tries=args.max_tries, maximizing=False
    )
    data = digits_splits(args.split_seed)
    (x_tr, y_tr), (x_val, y_val), (x_te, y_te) = data["train"], data["val"], data["test"]
    torch.manual_seed(args.seed)
    model: nn.Module = mlp((64, args.hidden, args.hidden, 10))
    params_before = sum(p.numel() for p in model.parameters())

    start = time.perf_counter()
    model = UPA.perforate_model(model, save_name="digits", making_graphs=False, maximizing_score=False)
    GPA.pai_tracker.set_optimizer(torch.optim.Adam)
    optimizer, _ = GPA.pai_tracker.setup_optimizer(model, {"params": model.parameters(), "lr": args.lr})
    history: list[dict[str, Any]] = []
    restructures = 0
    complete = False
    epochs = 0
    loader_gen = torch.Generator().manual_seed(args.seed)
    train_seconds = 0.0
    steps = 0
    while epochs < args.max_epochs and not complete:
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(y_tr), generator=loader_gen)
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            optimizer.zero_grad()
            F.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
            optimizer.step()
            steps += 1
        train_seconds += time.perf_counter() - t0
        epochs += 1
        val_loss, val_acc = _evaluate(model, x_val, y_val)
        model, restructured, complete = GPA.pai_tracker.add_validation_score(val_loss, model)
        if restructured and not complete:
            restructures += 1
            optimizer, _ = GPA.pai_tracker.setup_optimizer(model, {"params": model.parameters(), "lr": args.lr})
        history.append(
            {
                "epoch": epochs,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "restructured": bool(restructured),
                "complete": bool(complete),
                "dendrites": sum(dendrite_counts(model).values()) // max(1, len(dendrite_counts(model))),
            }
        )
    wall = time.perf_counter() - start
    _, test_acc = _evaluate(model, x_te, y_te)
    val_loss, _ = _evaluate(model, x_val, y_val)
    counts = dendrite_counts(model)
    return {
        "package": "perforatedai",
        "settings": settings,
        "epochs": epochs,
        "training_complete": bool(complete),
        "restructures": restructures,
        "test_acc": test_acc,
        "final_val_loss": val_loss,
        "best_val_loss": min(h["val_loss"] for h in history),
        "parameters_before": params_before,
        "parameters_after": used_parameters(model),
        "parameters_after_as_held": sum(p.numel() for p in model.parameters()),
        "parameters_after_count_params": int(UPA.count_params(model)),
        "dendrites_per_layer": counts,
        "tracker_dendrites_added": int(GPA.pai_tracker.member_vars["num_dendrites_added"]),
        "wall_seconds": wall,
        "train_seconds": train_seconds,
        "train_steps": steps,
        "history": history,
    }


def reference_model(sizes: Sequence[int], dendrites: int, x: Tensor, y: Tensor) -> nn.Module:
    """A perforatedai model of the MLP with ``dendrites`` sets, added without training.

    The tracker's own switch methods add them: ``set_dendrite_training`` (new candidate copies
    of every layer) then ``set_neuron_training`` (the candidates become dendrites), which is what
    its free version does at every restructure. One backward pass comes first because the
    modules learn their output size from their first gradient. The dendrites' output weights
    (zero after a switch) are drawn from N(0, 1) so that dendrites really change the output.
    ``frozen`` stops gradients into the dendrite layers themselves (only their output weights
    train), the work pb_lightning's default neuron phase does.
    """
    from perforatedai import globals_perforatedai as GPA
    from perforatedai import modules_perforatedai as PA
    from perforatedai import utils_perforatedai as UPA

    torch.manual_seed(0)
    model = UPA.perforate_model(mlp(sizes), save_name="timing", making_graphs=False, maximizing_score=False)
    F.cross_entropy(model(x), y).backward()
    for _ in range(dendrites):
        GPA.pai_tracker.set_dendrite_training()
        GPA.pai_tracker.set_neuron_training()
    layers = [m for m in model.modules() if isinstance(m, PA.PAINeuronModule)]
    with torch.no_grad():
        for layer in layers:
            if dendrites:
                layer.dendrites_to_top[-1].normal_()
    counts = dendrite_counts(model)
    if set(counts.values()) != {dendrites}:
        raise RuntimeError(f"expected {dendrites} dendrite sets per layer, found {counts}")
    return model


def timing(args: argparse.Namespace) -> dict[str, Any]:
    """Per-step time of perforatedai models with D dendrite sets (see :func:`reference_model`)."""
    torch.set_num_threads(args.threads)
    configure_reference(patience=10, max_dendrites=100, max_tries=2, maximizing=False)
    from perforatedai import globals_perforatedai as GPA

    GPA.pc.set_silent(True)
    out: dict[str, Any] = {}
    for name, sizes, batch in (("digits", DIGITS_SIZES, 64), ("large", LARGE_SIZES, 256)):
        if name not in args.networks:
            continue
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, sizes[0], generator=gen)
        y = torch.randint(0, sizes[-1], (batch,), generator=gen)
        torch.manual_seed(0)
        plain = mlp(sizes)
        variants: dict[str, Callable[[], None]] = {}
        params: dict[str, int] = {}
        for d in args.dendrites:
            model = reference_model(sizes, d, x, y)
            variants[str(d)] = training_step(model, x, y)
            params[str(d)] = used_parameters(model)
        result = time_against_baseline(
            training_step(plain, x, y), variants, rounds=args.rounds, block_seconds=args.block_seconds
        )
        result["parameters"] = params
        out[name] = result
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options (set by ``reference_package.py``)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("job", choices=("train", "timing", "versions"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--max-dendrites", type=int, default=4)
    parser.add_argument("--max-tries", type=int, default=2)
    parser.add_argument("--dendrites", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2, 4])
    parser.add_argument("--networks", type=lambda s: s.split(","), default=["digits", "large"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block-seconds", type=float, default=0.2)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one job and write its JSON result; the exit status is 0 only if the job finished."""
    args = parse_args(argv)
    if args.job == "versions":
        from importlib.metadata import version

        result: dict[str, Any] = {
            "python": sys.version.split()[0],
            **{p: version(p) for p in ("torch", "perforatedai", "numpy", "scikit-learn")},
        }
    elif args.job == "train":
        result = train(args)
    else:
        result = timing(args)
    result["pid"] = os.getpid()
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
