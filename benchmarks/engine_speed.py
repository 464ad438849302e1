#!/usr/bin/env python
r"""Engine speed and memory benchmark: what D accepted dendrite sets and K candidates cost.

Run from the repository root (``pb_lightning`` need not be installed: the script puts the
repository root on ``sys.path``)::

    python benchmarks/engine_speed.py                  # full run: about 1 minute on 2 quiet CPU cores
    python benchmarks/engine_speed.py --quick          # smoke test: tiny sizes, 1 thread, a few seconds
    python benchmarks/engine_speed.py --json out.json  # also write every number as JSON
    python benchmarks/engine_speed.py --out benchmarks/results/engine_speed  # results.json + results.md
    python benchmarks/engine_speed.py --render --out benchmarks/results/engine_speed  # re-render results.md
    python benchmarks/engine_speed.py --fan-in 16,4    # also time sparse dendrites (both fused strategies)

Workloads
---------
Two networks, every Linear/Conv perforated with the default :class:`~pb_lightning.DendriteConfig`
(cascade, sigmoid, accepted dendrites frozen, perforation on):

* ``mlp``: 784-512-512-10 with ReLU, batch 256;
* ``conv``: Conv2d(1,16,3,p=1)-ReLU-MaxPool-Conv2d(16,32,3,p=1)-ReLU-MaxPool-Flatten-Linear(1568,10),
  28x28 input, batch 128.

A model with D accepted sets is made without training: D times ``start_dendrite_phase`` then
``accept_dendrites``, after which every output weight ``w`` is drawn from N(0, 1) so the dendrites
really change the output. A *step* is ``optimizer.zero_grad(set_to_none=True)``, forward,
cross-entropy and ``backward()``. ``optimizer.step()`` is left out: its cost is linear in the
parameters (not in the batch) and leaving it out keeps every model identical across repeats.
Dendrite-phase steps are timed only after the correlation warm-up, once candidates get gradients
(the script checks that they do).

FLOP model (the "ideal")
------------------------
Counted are the multiply-accumulates (MACs) of every Linear and Conv operation, measured once with
forward hooks on the unperforated network: ``m_l`` for layer ``l`` per batch, ``M = Σ_l m_l``, and
``g_l = 1`` when the layer's input needs a gradient (every layer but the first: the data needs
none, so the first layer's backward computes only its weight gradient).

* unperforated step: ``Σ_l m_l (2 + g_l)`` (forward, weight gradient, input gradient);
* neuron phase with D accepted sets: that plus ``D·M``. Accepted dendrites are frozen and their
  input is detached, so they run forward only (under ``no_grad``); ``w`` gets its gradient from
  the saved activations, which is elementwise work;
* dendrite phase with D accepted sets and K candidates: ``Σ_l m_l (1 + g_l)`` (the network is
  frozen: forward plus the input gradients that carry each neuron's error E back) ``+ D·M``
  (accepted dendrites, forward) ``+ 2K·M`` (candidates: forward and weight gradient; their input
  is detached, so no input gradient).

Not counted: elementwise work (activations, the cascade ``Σ_{e<d} c_{d,e} a_e`` with
D(D-1)/2 MACs per neuron and position, ``Σ_d w_d a_d``, the correlation moments), pooling, the
loss and Python overhead. The *ideal* ratio of a configuration is its counted MACs over those of
the unperforated step; the *measured* ratio is its step time over the unperforated step time.
Targets: measured/ideal <= 1.25 for every configuration, and measured <= 1.05 at D = 0 (the
wrapper alone).

Timing method
-------------
Medians of ratios taken within one run, on a noisy 2-core machine: ``torch.set_num_threads(2)``;
each workload is warmed up; then, for several rounds, blocks of steps of every configuration are
timed, each block between two blocks of the unperforated baseline (A/B alternation, the variant
order reversed every other round), and each block's median per-step time is divided by the mean
of its two neighbouring baseline blocks. The reported ratio is the median over rounds (with its
interquartile range); Python's garbage collector is paused inside the timed region. The
dendrite-phase row's "vs neuron D+K" column divides, round by round, its ratio by that of a
neuron-phase model with D+K accepted sets: what a candidate costs next to an accepted set.

No statistic rescues a run that shares its cores with another busy process for its whole length
(two threads that must meet at every op slow small steps down up to tenfold), so the script also
reports which share of the CPUs other processes used while each network was timed (from
``/proc/stat``) and prints a warning above 10%. Compare numbers only from quiet runs.

Sparse dendrites (``--fan-in K``)
--------------------------------
With ``--fan-in K`` (or a list such as ``16,4``) every layer's dendrites see ``K`` inputs
(``fan_in_mode="random"``; a layer with fewer inputs sees all of them). A sparse bank can run its one fused op two ways
(:class:`~pb_lightning.engine.sparse_banks.SparseBank`): ``masked`` scatters the compact weights into a dense zero
weight and runs the dense op; ``gather`` gathers each dendrite's K inputs and contracts them in one
batched multiply (Linear: an einsum; Conv: a grouped conv with a group per dendrite). For a
neuron-phase model (D accepted sets) and a dendrite-phase model (D accepted, K candidates), the two
strategies are timed interleaved against the dense model of the same shape (same A/B scheme as
above, the dense model in the baseline's place); the table gives their step times over the dense
step's. ``real MACs`` is the share of the dense dendrites' multiply-accumulates that sparse
dendrites need.

Memory method
-------------
Byte accounting rather than RSS: parameters and buffers, the activations autograd saves for
backward (captured with ``torch.autograd.graph.saved_tensors_hooks`` during forward, deduplicated
by storage, parameters excluded) and the gradients after backward. Their sum bounds what a step
holds at once (saved activations are freed during backward as gradients appear), transient
workspaces such as the temporaries of one op apart. It is exact and
deterministic (one step, no repeats, no allocator caching in the number) and says what holds the
memory; the maximum RSS of a subprocess would also count glibc's caching and torch's import.

Stale copies
------------
After several cycles (dendrite phase with a few optimizer steps, accept, neuron-phase steps, and a
fresh optimizer each phase as a training loop would make), the parameters reachable from the model
must hold exactly ``parameter_counts(model)["total"]`` elements, and the live ``nn.Parameter`` objects
that the garbage collector can find (created since the check began) must be exactly the model's
own: none may be left behind by a replaced bank, an old output weight or a dropped candidate pool.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ROOT = Path(__file__).resolve().parents[1]
for _path in (_ROOT, _ROOT / "benchmarks"):  # runnable as `python benchmarks/engine_speed.py`, no install
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# The timing primitives are shared with the reference-package worker: both benchmarks time steps
# with the same code.
from common.cli import add_report_options, check_report_options, parse_ints  # noqa: E402
from common.timing import cpu_seconds, gc_paused, median_step, others_share  # noqa: E402
from machine import render_report, run_meta, save_report  # noqa: E402

import pb_lightning as pb  # noqa: E402
from pb_lightning.engine.candidates import CandidatePool  # noqa: E402
from pb_lightning.engine.sparse_banks import SparseBank, fan_in_inputs  # noqa: E402

#: Targets of the issue: measured/ideal time ratio, and the wrapper's overhead at D = 0.
_IDEAL_FACTOR = 1.25
_WRAPPER_OVERHEAD = 1.05
_MB = 1024.0**2
#: ``--keep-heap``: glibc malloc settings under which freed memory stays mapped and is reused. By
#: default glibc maps allocations above a (dynamic, at most 32 MiB) threshold afresh and returns
#: the heap's free top to the system, so a step's large tensors fault their pages in again at every
#: step (3.8 us per 4 KiB page on this project's VM). Read by glibc at process start: the script
#: re-executes itself with them set.
_KEEP_HEAP = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 1024**2),
    "MALLOC_TRIM_THRESHOLD_": str(16 * 1024**3),
    "MALLOC_TOP_PAD_": str(256 * 1024**2),
}
#: ``--dtype`` values: the autocast dtype of the steps (``None``: plain float32).
_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------- workloads
@dataclass(frozen=True)
class Network:
    """A benchmark network: a builder, its input batch shape and its number of classes.

    ``device`` is where its models and batches live; ``autocast`` (``None``: float32) is the
    dtype its steps run under ``torch.autocast`` — what Lightning's ``precision="bf16-mixed"``
    does: float32 weights, bf16 matmuls and convolutions, float32 correlation statistics.
    """

    name: str
    build_cpu: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int = 10
    device: str = "cpu"
    autocast: torch.dtype | None = None

    def build(self) -> nn.Module:
        """A fresh network on :attr:`device` (drawn on the CPU first: the same weights everywhere)."""
        return self.build_cpu().to(self.device)

    def autocast_context(self) -> contextlib.AbstractContextManager[Any]:
        """The step's precision context (a no-op in float32)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=self.autocast)


def _mlp(sizes: Sequence[int]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    return build


def _convnet(channels: tuple[int, int, int], image: int, num_classes: int) -> Callable[[], nn.Module]:
    c0, c1, c2 = channels

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(c0, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * (image // 4) ** 2, num_classes),
        )

    return build


def networks(quick: bool, device: str = "cpu", autocast: torch.dtype | None = None) -> list[Network]:
    """The issue's two networks, or tiny ones of the same shape for ``--quick``."""
    where = {"device": device, "autocast": autocast}
    if quick:
        return [
            Network("mlp", _mlp((64, 32, 32, 10)), (32, 64), **where),
            Network("conv", _convnet((1, 4, 8), 8, 10), (8, 1, 8, 8), **where),
        ]
    return [
        Network("mlp", _mlp((784, 512, 512, 10)), (256, 784), **where),
        Network("conv", _convnet((1, 16, 32), 28, 10), (128, 1, 28, 28), **where),
    ]


def batch(network: Network, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A fixed random batch: inputs and class targets."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(network.input_shape, generator=gen)
    y = torch.randint(0, network.num_classes, (network.input_shape[0],), generator=gen)
    return x.to(network.device), y.to(network.device)


def perforated_model(
    network: Network, num_dendrites: int, *, seed: int = 0, config: pb.DendriteConfig | None = None
) -> nn.Module:
    """The network perforated, with ``num_dendrites`` accepted sets whose output weights are nonzero.

    The same seed as :func:`baseline_model` gives the same network weights, so only the dendrites
    differ from the baseline.
    """
    torch.manual_seed(seed)
    return grow(pb.perforate(network.build(), config=config), num_dendrites)


def grow(model: nn.Module, num_dendrites: int) -> nn.Module:
    """Give a perforated model ``num_dendrites`` accepted sets without training, output weights ~ N(0, 1).

    Nonzero output weights make the dendrites really change the output, as trained ones would.
    """
    for _ in range(num_dendrites):
        # One candidate suffices: nothing is trained, we only need the structure.
        pb.start_dendrite_phase(model, num_candidates=1)
        pb.accept_dendrites(model)
    with torch.no_grad():
        for layer in pb.perforated_layers(model):
            if layer.output_weight is not None:
                layer.output_weight.normal_()
    return model


def sparse_config(network: Network, fan_in: int) -> pb.DendriteConfig:
    """Random fan-in ``fan_in`` everywhere; a layer with fewer inputs (a first conv) sees them all."""
    overrides = {
        name: {"fan_in": inputs}
        for name, m in network.build().named_modules()
        if (inputs := fan_in_inputs(m)) is not None and inputs < fan_in
    }
    return pb.DendriteConfig(fan_in=fan_in, fan_in_mode="random", overrides=overrides)


def set_strategy(model: nn.Module, strategy: str) -> None:
    """Make every sparse bank of ``model`` run its forward with ``strategy`` (an instance attribute)."""
    for m in model.modules():
        if isinstance(m, SparseBank):
            m.strategy = strategy


def sparse_model(network: Network, num_dendrites: int, config: pb.DendriteConfig, *, seed: int = 0) -> nn.Module:
    """Like :func:`perforated_model`, with ``config`` (sparse dendrites)."""
    torch.manual_seed(seed)
    return grow(pb.perforate(network.build(), config=config), num_dendrites)


def baseline_model(network: Network, *, seed: int = 0) -> nn.Module:
    """The same network, not perforated."""
    torch.manual_seed(seed)
    return network.build()


def make_step(model: nn.Module, x: Tensor, y: Tensor, network: Network | None = None) -> Callable[[], None]:
    """One training step without ``optimizer.step()`` (see the module docstring).

    With ``network`` the step runs in its precision, and on an accelerator it ends by waiting for
    the device, so that a timed step is the device's work and not only its launch.
    """
    optimizer = torch.optim.SGD(pb.trainable_parameters(model), lr=0.0)
    model.train()
    precision = contextlib.nullcontext if network is None else network.autocast_context
    cuda = x.device.type == "cuda"

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with precision():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()

    return step


# ---------------------------------------------------------------------------- FLOP model
@dataclass(frozen=True)
class LayerMacs:
    """Forward MACs of one Linear/Conv call over a batch, and whether its input needs a gradient."""

    name: str
    macs: int
    input_needs_grad: bool


def count_macs(model: nn.Module, x: Tensor) -> list[LayerMacs]:
    """Forward MACs of every Linear/Conv call of one training-mode forward pass, via forward hooks.

    A Linear or Conv output element costs ``weight[0].numel()`` MACs (``in_features``, or
    ``in_channels/groups · prod(kernel)``), whatever the spatial size or stride.
    """
    found: list[LayerMacs] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
        per_output = module.weight[0].numel()  # type: ignore[index]
        found.append(LayerMacs(names[module], output.numel() * per_output, bool(inputs[0].requires_grad)))

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
    ]
    try:
        model.train()
        model(x)
    finally:
        for h in handles:
            h.remove()
    return found


@dataclass(frozen=True)
class FlopModel:
    """The counted MACs of a step in each configuration (see the module docstring)."""

    layers: tuple[LayerMacs, ...]

    @property
    def forward(self) -> int:
        """``M``: one forward pass of the network (= of one dendrite set of every layer)."""
        return sum(layer.macs for layer in self.layers)

    @property
    def _input_grads(self) -> int:
        return sum(layer.macs for layer in self.layers if layer.input_needs_grad)

    def baseline(self) -> int:
        """Unperforated step: forward, weight gradients, input gradients."""
        return 2 * self.forward + self._input_grads

    def neuron_phase(self, d: int) -> int:
        """Neuron phase: the baseline step plus D frozen sets, forward only."""
        return self.baseline() + d * self.forward

    def dendrite_phase(self, d: int, k: int) -> int:
        """Dendrite phase: frozen network (forward + input gradients), D accepted forward, K candidates x2."""
        return self.forward + self._input_grads + d * self.forward + 2 * k * self.forward


# ---------------------------------------------------------------------------- timing
def warm_up(step: Callable[[], None], steps: int) -> float:
    """Run ``steps`` steps (allocator, kernels, correlation warm-up); return a per-step time estimate."""
    median_step(step, steps - steps // 2)
    return median_step(step, steps // 2)


@contextlib.contextmanager
def others_cpu_share(result: dict[str, float]) -> Iterator[None]:
    """Measure which share of all CPUs *other* processes used while the block ran.

    Timings are only as good as the machine was quiet: a busy neighbour can slow small steps on
    two threads tenfold (threads wait on each other). The share is reported so that a reader can
    tell a noisy run from a slow engine. Stores ``result["others_cpu_share"]`` (NaN off Linux).
    """
    start, wall = cpu_seconds(), time.perf_counter()
    try:
        yield
    finally:
        result["others_cpu_share"] = others_share(start, cpu_seconds(), time.perf_counter() - wall)


@dataclass
class Timing:
    """Per-round measurements of one configuration against the interleaved baseline."""

    seconds: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)


def interleaved_timings(
    baseline: Callable[[], None],
    variants: dict[str, Callable[[], None]],
    estimates: dict[str, float],
    *,
    rounds: int,
    block_seconds: float,
) -> tuple[Timing, dict[str, Timing]]:
    """Time every variant between two baseline blocks, ``rounds`` times (A/B alternation).

    ``estimates`` (seconds per step, from the warm-up, with ``""`` for the baseline) sets how many
    steps a block holds, so that every block lasts about ``block_seconds``.
    """

    def steps_for(key: str) -> int:
        return max(1, round(block_seconds / max(estimates[key], 1e-6)))

    base = Timing()
    out = {key: Timing() for key in variants}
    with gc_paused():
        for r in range(rounds):
            keys = list(variants) if r % 2 == 0 else list(reversed(variants))
            before = median_step(baseline, steps_for(""))
            base.seconds.append(before)
            for key in keys:
                t = median_step(variants[key], steps_for(key))
                after = median_step(baseline, steps_for(""))
                base.seconds.append(after)
                out[key].seconds.append(t)
                out[key].ratios.append(t / (0.5 * (before + after)))
                before = after
    return base, out


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(p25, median, p75); degenerate inputs give the median three times."""
    med = statistics.median(values)
    if len(values) < 2:
        return med, med, med
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, med, q3


# ---------------------------------------------------------------------------- memory
@dataclass
class MemoryRow:
    """Bytes a step holds, split by what holds them (see the module docstring)."""

    network: str
    configuration: str
    parameters_and_buffers: int
    saved_activations: int
    gradients: int
    #: Of ``parameters_and_buffers``: the candidates' best-score snapshots (``best_*`` buffers).
    snapshots: int = 0

    @property
    def total(self) -> int:
        """Parameters, buffers, saved activations and gradients together."""
        return self.parameters_and_buffers + self.saved_activations + self.gradients


def step_memory(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    network: str,
    configuration: str,
    precision: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> MemoryRow:
    """Account one training step's memory with saved-tensor hooks (run after warm-up), in ``precision``."""
    model.train()
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:  # weights saved for backward are parameters
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    for p in model.parameters():
        p.grad = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), precision():
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    held = sum(t.nbytes for t in model.parameters()) + sum(b.nbytes for b in model.buffers())
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    snapshots = sum(b.nbytes for name, b in model.named_buffers() if name.rpartition(".")[2].startswith("best_"))
    return MemoryRow(network, configuration, held, sum(saved.values()), grads, snapshots)


# ---------------------------------------------------------------------------- stale copies
def _live_parameters() -> tuple[int, int]:
    """Number and total size of the ``nn.Parameter`` objects the garbage collector can find."""
    gc.collect()
    # ``type(o) is`` rather than isinstance: isinstance reads ``__class__``, which on some of
    # torch's deprecated module-level objects emits a FutureWarning (an error under pytest here).
    params = [o for o in gc.get_objects() if type(o) is nn.Parameter]
    return len(params), sum(p.numel() for p in params)


def _live_pools() -> int:
    return sum(1 for o in gc.get_objects() if type(o) is CandidatePool)


def _train(model: nn.Module, x: Tensor, y: Tensor, steps: int) -> None:
    """A few real optimizer steps with an optimizer built for the current phase, then dropped."""
    optimizer = torch.optim.SGD(pb.trainable_parameters(model), lr=1e-3)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def stale_copy_check(network: Network, *, cycles: int, candidates: int) -> list[dict[str, int]]:
    """Run accept cycles and count what is reachable from the model and what is alive in the process."""
    x, y = batch(network)
    before_count, before_numel = _live_parameters()
    model = perforated_model(network, 0)
    warmup = pb.perforated_layers(model)[0].config.warmup_steps
    rows = []
    for cycle in range(1, cycles + 1):
        pb.start_dendrite_phase(model, num_candidates=candidates)
        _train(model, x, y, warmup + 3)  # past the correlation warm-up: candidates really learn
        pb.accept_dendrites(model)
        _train(model, x, y, 2)
        count, numel = _live_parameters()
        rows.append(
            {
                "cycle": cycle,
                "dendrites": pb.perforated_layers(model)[0].num_dendrites,
                # Counted without keeping a list alive: it would hold this cycle's replaced tensors
                # into the next cycle's census.
                "model_parameter_tensors": sum(1 for _ in model.parameters()),
                "model_numel": sum(p.numel() for p in model.parameters()),
                "parameter_counts_total": pb.parameter_counts(model)["total"],
                "live_parameter_tensors": count - before_count,
                "live_numel": numel - before_numel,
                "live_candidate_pools": _live_pools(),
            }
        )
    return rows


def _stale_ok(row: dict[str, int]) -> bool:
    return (
        row["model_numel"] == row["parameter_counts_total"]
        and row["live_parameter_tensors"] == row["model_parameter_tensors"]
        and row["live_numel"] == row["model_numel"]
        and row["live_candidate_pools"] == 0
    )


# ---------------------------------------------------------------------------- the benchmark
@dataclass
class Settings:
    """What to run; ``--quick`` shrinks everything."""

    quick: bool
    dendrites: tuple[int, ...]
    phase_dendrites: tuple[int, ...]
    candidates: tuple[int, ...]
    rounds: int
    block_seconds: float
    threads: int
    stale_cycles: int
    fan_in: tuple[int, ...] = ()
    sparse_dendrites: int = 4
    device: str = "cpu"
    dtype: str = "fp32"
    keep_heap: bool = False
    compile_statistics: bool = False


@dataclass
class NeuronRow:
    """One neuron-phase configuration against the unperforated network."""

    network: str
    dendrites: int
    step_ms: float
    ratio: float
    ratio_p25: float
    ratio_p75: float
    ideal: float
    ok: bool | None


@dataclass
class DendriteRow:
    """One dendrite-phase configuration against the unperforated network and a neuron-phase D+K model."""

    network: str
    dendrites: int
    candidates: int
    step_ms: float
    ratio: float
    ratio_p25: float
    ratio_p75: float
    ideal: float
    vs_neuron_phase: float
    ok: bool | None


@dataclass
class SparseRow:
    """Sparse dendrites' step time by fused strategy, against dense dendrites of the same shape."""

    network: str
    configuration: str
    fan_in: int
    dense_ms: float
    masked_ms: float
    gather_ms: float
    masked_vs_dense: float
    gather_vs_dense: float
    real_macs: float
    dense_dendrite_parameters: int
    sparse_dendrite_parameters: int


def _within(measured: float, ideal: float, d: int) -> bool:
    if measured / ideal > _IDEAL_FACTOR:
        return False
    return d != 0 or measured <= _WRAPPER_OVERHEAD


@dataclass
class NetworkResult:
    """Everything measured on one network."""

    network: str
    flops: FlopModel
    neuron: list[NeuronRow]
    dendrite: list[DendriteRow]
    memory: list[MemoryRow]
    baseline_ms: float
    others_cpu_share: float
    sparse: list[SparseRow] = field(default_factory=list)
    sparse_others_cpu_share: float = float("nan")


def _real_mac_share(network: Network, config: pb.DendriteConfig, x: Tensor) -> float:
    """Multiply-accumulates of one sparse dendrite set over those of a dense one."""
    model = network.build()
    layers = count_macs(model, x)
    modules = dict(model.named_modules())
    sparse = 0.0
    for layer in layers:
        inputs = fan_in_inputs(modules[layer.name])
        k = config.for_layer(layer.name).fan_in
        sparse += layer.macs * (k / inputs if k is not None and inputs else 1.0)
    return sparse / sum(layer.macs for layer in layers)


def bench_sparse(network: Network, settings: Settings) -> list[SparseRow]:
    """Both sparse strategies against dense dendrites, in one neuron-phase and one dendrite-phase model."""
    return [row for fan_in in settings.fan_in for row in _bench_sparse(network, settings, fan_in)]


def _bench_sparse(network: Network, settings: Settings, fan_in: int) -> list[SparseRow]:
    x, y = batch(network)
    config = sparse_config(network, fan_in)
    d = settings.sparse_dendrites
    k = max(settings.candidates)
    shapes = {
        f"neuron D={d}": (d, None),
        f"dendrite D={min(settings.phase_dendrites[-1], d)} K={k}": (min(settings.phase_dendrites[-1], d), k),
    }
    rows = []
    for label, (num, candidates) in shapes.items():
        models = {"dense": perforated_model(network, num)}
        for strategy in ("masked", "gather"):
            models[strategy] = sparse_model(network, num, config)
        for strategy, model in models.items():
            if candidates is not None:
                pb.start_dendrite_phase(model, num_candidates=candidates)
            set_strategy(model, strategy)
        steps = {key: make_step(model, x, y, network) for key, model in models.items()}
        estimates = {key: warm_up(step, pb.DendriteConfig().warmup_steps + 4) for key, step in steps.items()}
        estimates[""] = estimates.pop("dense")
        dense, timings = interleaved_timings(
            steps["dense"],
            {key: steps[key] for key in ("masked", "gather")},
            estimates,
            rounds=settings.rounds,
            block_seconds=settings.block_seconds,
        )
        counts = {key: pb.parameter_counts(model) for key, model in models.items()}
        rows.append(
            SparseRow(
                network=network.name,
                configuration=label,
                fan_in=fan_in,
                dense_ms=1e3 * statistics.median(dense.seconds),
                masked_ms=1e3 * statistics.median(timings["masked"].seconds),
                gather_ms=1e3 * statistics.median(timings["gather"].seconds),
                masked_vs_dense=statistics.median(timings["masked"].ratios),
                gather_vs_dense=statistics.median(timings["gather"].ratios),
                real_macs=_real_mac_share(network, config, x),
                dense_dendrite_parameters=counts["dense"]["dendrites"] + counts["dense"]["candidates"],
                sparse_dendrite_parameters=counts["masked"]["dendrites"] + counts["masked"]["candidates"],
            )
        )
    return rows


def bench_network(network: Network, settings: Settings) -> NetworkResult:
    """Build every configuration of one network, time them interleaved, and account their memory."""
    x, y = batch(network)
    flops = FlopModel(tuple(count_macs(baseline_model(network), x)))
    neuron_ds = sorted(set(settings.dendrites) | {d + k for d in settings.phase_dendrites for k in settings.candidates})
    phase_keys = {(d, k): f"d{d}k{k}" for d in settings.phase_dendrites for k in settings.candidates}

    models: dict[str, nn.Module] = {"": baseline_model(network)}
    for d in neuron_ds:
        models[f"n{d}"] = perforated_model(network, d)
    phase_config = pb.DendriteConfig(compile_statistics=settings.compile_statistics)
    for (d, k), key in phase_keys.items():
        models[key] = perforated_model(network, d, config=phase_config)
        pb.start_dendrite_phase(models[key], num_candidates=k)

    steps = {key: make_step(model, x, y, network) for key, model in models.items()}
    warmup_steps = pb.DendriteConfig().warmup_steps + 4  # candidates learn only after the warm-up
    estimates = {key: warm_up(step, warmup_steps) for key, step in steps.items()}
    for key in phase_keys.values():
        if any(p.grad is None for p in pb.trainable_parameters(models[key])):
            raise RuntimeError(f"{network.name} {key}: candidates got no gradient after the warm-up.")

    cpu: dict[str, float] = {}
    with others_cpu_share(cpu):
        base, timings = interleaved_timings(
            steps[""],
            {k: s for k, s in steps.items() if k},
            estimates,
            rounds=settings.rounds,
            block_seconds=settings.block_seconds,
        )
    check = not settings.quick

    neuron_rows = []
    for d in settings.dendrites:
        t = timings[f"n{d}"]
        q1, med, q3 = _quartiles(t.ratios)
        ideal = flops.neuron_phase(d) / flops.baseline()
        neuron_rows.append(
            NeuronRow(
                network=network.name,
                dendrites=d,
                step_ms=1e3 * statistics.median(t.seconds),
                ratio=med,
                ratio_p25=q1,
                ratio_p75=q3,
                ideal=ideal,
                ok=_within(med, ideal, d) if check else None,
            )
        )
    dendrite_rows = []
    for (d, k), key in phase_keys.items():
        t = timings[key]
        q1, med, q3 = _quartiles(t.ratios)
        ideal = flops.dendrite_phase(d, k) / flops.baseline()
        # Round by round, so that both sides of the quotient saw the same machine state.
        versus = [a / b for a, b in zip(t.ratios, timings[f"n{d + k}"].ratios, strict=True)]
        dendrite_rows.append(
            DendriteRow(
                network=network.name,
                dendrites=d,
                candidates=k,
                step_ms=1e3 * statistics.median(t.seconds),
                ratio=med,
                ratio_p25=q1,
                ratio_p75=q3,
                ideal=ideal,
                vs_neuron_phase=statistics.median(versus),
                ok=(med / ideal <= _IDEAL_FACTOR) if check else None,
            )
        )

    # Every neuron-phase model, so that a dendrite phase's memory compares with D+K accepted sets.
    labels = {"": "unperforated"} | {f"n{d}": f"neuron D={d}" for d in neuron_ds}
    labels |= {key: f"dendrite D={d} K={k}" for (d, k), key in phase_keys.items()}
    memory = [
        step_memory(models[key], x, y, network=network.name, configuration=label, precision=network.autocast_context)
        for key, label in labels.items()
    ]
    sparse_cpu: dict[str, float] = {"others_cpu_share": float("nan")}
    sparse: list[SparseRow] = []
    if settings.fan_in:
        with others_cpu_share(sparse_cpu):
            sparse = bench_sparse(network, settings)
    return NetworkResult(
        network=network.name,
        flops=flops,
        neuron=neuron_rows,
        dendrite=dendrite_rows,
        memory=memory,
        baseline_ms=1e3 * statistics.median(base.seconds),
        others_cpu_share=cpu["others_cpu_share"],
        sparse=sparse,
        sparse_others_cpu_share=sparse_cpu["others_cpu_share"],
    )


# ---------------------------------------------------------------------------- output
def build_report(
    results: list[NetworkResult],
    stale: list[dict[str, int]],
    settings: Settings,
    *,
    meta: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    """Every number of the run as a JSON-serialisable dict: what is saved, and all :func:`markdown` reads."""
    misses = [row for r in results for row in [*r.neuron, *r.dendrite] if row.ok is False]
    return {
        "meta": meta,
        "settings": asdict(settings),
        "networks": [
            {
                "network": r.network,
                "forward_macs": r.flops.forward,
                "baseline_step_macs": r.flops.baseline(),
                "layers": [asdict(layer) for layer in r.flops.layers],
                "baseline_ms": r.baseline_ms,
                "others_cpu_share": r.others_cpu_share,
                "neuron_phase": [asdict(row) for row in r.neuron],
                "dendrite_phase": [asdict(row) for row in r.dendrite],
                "memory": [asdict(m) | {"total": m.total} for m in r.memory],
                **(
                    {"sparse": [asdict(row) for row in r.sparse], "sparse_others_cpu_share": r.sparse_others_cpu_share}
                    if r.sparse
                    else {}
                ),
            }
            for r in results
        ],
        "stale_copies": stale,
        "targets_missed": len(misses),
        "stale_copies_found": not all(_stale_ok(c) for c in stale),
        "seconds": seconds,
    }


def _status(ok: bool | None) -> str:
    return "n/a (quick)" if ok is None else ("ok" if ok else "**MISS**")


def _spread(row: dict[str, Any]) -> str:
    return f"{row['ratio']:.2f}x ({row['ratio_p25']:.2f}-{row['ratio_p75']:.2f})"


def markdown(report: dict[str, Any]) -> str:
    """The Markdown tables, generated from the report alone (so a saved results.json re-renders)."""
    meta, settings, nets = report["meta"], report["settings"], report["networks"]
    lines = [
        f"## pb_lightning engine speed ({'quick smoke run' if settings['quick'] else 'full run'})\n",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}, {meta['cpu_count']} CPUs; torch {meta['torch']}, python {meta['python']}; "
        f"pb_lightning commit {meta['commit']}\n",
        f"{meta['threads']} torch threads; "
        f"{settings['rounds']} interleaved rounds of ~{settings['block_seconds'] * 1e3:.0f} ms blocks; "
        "ratios are medians over rounds (interquartile range in brackets).\n",
    ]
    if "device" in settings:  # results from before --device/--dtype render as they did
        where = meta.get("device", settings["device"])
        precision = "float32" if settings["dtype"] == "fp32" else f"torch.autocast({settings['dtype']})"
        lines.insert(3, f"- device: {where}; precision: {precision}")
    if settings.get("keep_heap"):
        tuned = ", ".join(f"{k}={v}" for k, v in _KEEP_HEAP.items())
        lines.insert(4, f"- allocator: glibc malloc keeps freed memory (`--keep-heap`: {tuned})")
    if settings.get("compile_statistics"):
        lines.insert(4, "- dendrite phase: `DendriteConfig(compile_statistics=True)` (torch.compile, inductor)")
    for r in nets:
        lines.append(
            f"- `{r['network']}`: forward {r['forward_macs'] / 1e6:.1f} M MACs per batch, unperforated step "
            f"{r['baseline_step_macs'] / 1e6:.1f} M MACs and {r['baseline_ms']:.2f} ms; other processes used "
            f"{r['others_cpu_share']:.0%} of the CPUs while it was timed."
        )
    if any(r["others_cpu_share"] > 0.1 for r in nets):
        lines.append("\n**Warning: the machine was busy; these timings measure the neighbours as much as the engine.**")
    lines += [
        f"\n### Neuron phase: step time vs. the unperforated network "
        f"(target: measured/ideal <= {_IDEAL_FACTOR}, D=0 overhead <= {_WRAPPER_OVERHEAD - 1:.0%})\n",
        "| network | D | step ms | measured x | FLOP ideal x | measured/ideal | target |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for n in (row for r in nets for row in r["neuron_phase"]):
        lines.append(
            f"| {n['network']} | {n['dendrites']} | {n['step_ms']:.2f} | {_spread(n)} | {n['ideal']:.2f}x | "
            f"{n['ratio'] / n['ideal']:.2f} | {_status(n['ok'])} |"
        )
    lines += [
        "\n### Dendrite phase: step time with K candidates "
        f"(ratios vs. the unperforated network; target: measured/ideal <= {_IDEAL_FACTOR})\n",
        "| network | D | K | step ms | measured x | FLOP ideal x | measured/ideal | vs neuron phase D+K | target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for d in (row for r in nets for row in r["dendrite_phase"]):
        lines.append(
            f"| {d['network']} | {d['dendrites']} | {d['candidates']} | {d['step_ms']:.2f} | {_spread(d)} | "
            f"{d['ideal']:.2f}x | {d['ratio'] / d['ideal']:.2f} | {d['vs_neuron_phase']:.2f}x | {_status(d['ok'])} |"
        )
    sparse = [row for r in nets for row in r.get("sparse", [])]
    if sparse:
        lines += [
            "\n### Sparse dendrites (fan_in k, random inputs): step time of each fused "
            "strategy over dense dendrites of the same shape\n",
            "| network | configuration | k | dense ms | masked ms | gather ms | masked / dense | gather / dense | "
            "real MACs | dendrite params dense -> sparse |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for row in sparse:
            lines.append(
                f"| {row['network']} | {row['configuration']} | {row['fan_in']} | {row['dense_ms']:.2f} | "
                f"{row['masked_ms']:.2f} | "
                f"{row['gather_ms']:.2f} | {row['masked_vs_dense']:.2f}x | {row['gather_vs_dense']:.2f}x | "
                f"{row['real_macs']:.1%} | {row['dense_dendrite_parameters']} -> {row['sparse_dendrite_parameters']} |"
            )
        lines += [
            f"\n- `{r['network']}`: other processes used {r['sparse_others_cpu_share']:.0%} of the CPUs "
            "while its sparse cells were timed."
            for r in nets
            if "sparse" in r
        ]
    lines += [
        "\n### Memory held by one step (parameters + buffers, saved activations, gradients)\n",
    ]
    # Results saved before the snapshot column existed render as they did.
    detailed = all("snapshots" in m for r in nets for m in r["memory"])
    if detailed:
        lines += [
            "| network | configuration | params+buffers MB | of which snapshots MB | saved activations MB | "
            "gradients MB | total MB | x unperf. | x neuron D+K |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
    else:
        lines += [
            "| network | configuration | params+buffers MB | saved activations MB | gradients MB | total MB | "
            "x unperf. |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
    for r in nets:
        base_total = r["memory"][0]["total"]
        totals = {m["configuration"]: m["total"] for m in r["memory"]}
        for m in r["memory"]:
            if not detailed:
                lines.append(
                    f"| {m['network']} | {m['configuration']} | {m['parameters_and_buffers'] / _MB:.2f} | "
                    f"{m['saved_activations'] / _MB:.2f} | {m['gradients'] / _MB:.2f} | {m['total'] / _MB:.2f} | "
                    f"{m['total'] / base_total:.2f} |"
                )
                continue
            versus = ""
            if m["configuration"].startswith("dendrite "):
                d, k = (int(part.split("=")[1]) for part in m["configuration"].split()[1:])
                same_sets = totals.get(f"neuron D={d + k}")
                versus = "" if same_sets is None else f"{m['total'] / same_sets:.2f}"
            lines.append(
                f"| {m['network']} | {m['configuration']} | {m['parameters_and_buffers'] / _MB:.2f} | "
                f"{m['snapshots'] / _MB:.2f} | {m['saved_activations'] / _MB:.2f} | {m['gradients'] / _MB:.2f} | "
                f"{m['total'] / _MB:.2f} | {m['total'] / base_total:.2f} | {versus} |"
            )
    lines += [
        "\n### Stale copies after accept cycles "
        "(`total` = parameter_counts(model)['total']; live = nn.Parameter objects the garbage collector "
        "finds, created since the check began)\n",
        "| cycle | D | model tensors | model numel | `total` | live tensors | live numel | live pools | |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in report["stale_copies"]:
        lines.append(
            f"| {c['cycle']} | {c['dendrites']} | {c['model_parameter_tensors']} | {c['model_numel']} | "
            f"{c['parameter_counts_total']} | {c['live_parameter_tensors']} | {c['live_numel']} | "
            f"{c['live_candidate_pools']} | {'ok' if _stale_ok(c) else '**STALE**'} |"
        )
    lines.append(
        f"\n{report['targets_missed']} speed target(s) missed; "
        f"stale copies: {'FOUND' if report['stale_copies_found'] else 'none'}; {report['seconds']:.1f} s."
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny networks and few repeats (a smoke test)")
    parser.add_argument("--json", type=Path, default=None, help="also write all results to this JSON file")
    add_report_options(parser)
    parser.add_argument("--dendrites", type=parse_ints, default=(0, 1, 2, 4, 8), help="D values (default 0,1,2,4,8)")
    parser.add_argument(
        "--phase-dendrites", type=parse_ints, default=(0, 2), help="D for the dendrite phase (default 0,2)"
    )
    parser.add_argument("--candidates", type=parse_ints, default=(1, 4), help="K for the dendrite phase (default 1,4)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 9; 2 with --quick)")
    parser.add_argument("--block-seconds", type=float, default=None, help="length of a timed block (default 0.1)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default 2; 1 with --quick, a smoke test)"
    )
    parser.add_argument(
        "--fan-in", type=parse_ints, default=(), help="also time sparse dendrites with these fan-ins, e.g. 16,4"
    )
    parser.add_argument("--sparse-dendrites", type=int, default=4, help="D of the sparse neuron-phase cell (default 4)")
    parser.add_argument("--fail-on-miss", action="store_true", help="exit with status 1 if a target is missed")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where models and batches live (default cpu)"
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(_DTYPES),
        default="fp32",
        help="fp32, or bf16: steps under torch.autocast(bfloat16), as precision='bf16-mixed' (default fp32)",
    )
    parser.add_argument(
        "--keep-heap",
        action="store_true",
        help="run under glibc malloc settings that keep freed memory for reuse (no page faults per step)",
    )
    parser.add_argument(
        "--compile-statistics",
        action="store_true",
        help="dendrite-phase models use DendriteConfig(compile_statistics=True) (compiled in the warm-up)",
    )
    args = parser.parse_args(argv)
    check_report_options(parser, args)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            "--device cuda: no CUDA device is available here (torch.cuda.is_available() is False; "
            f"torch {torch.__version__}); run on a machine with a GPU, or use --device cpu"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the Markdown, optionally save JSON (and Markdown); return the exit status."""
    args = parse_args(argv)
    if args.render:
        print(render_report(args.out, markdown))
        return 0
    if args.keep_heap and any(os.environ.get(k) != v for k, v in _KEEP_HEAP.items()):
        command = [sys.executable, str(Path(__file__).resolve()), *(sys.argv[1:] if argv is None else argv)]
        sys.stdout.flush()
        os.execve(sys.executable, command, {**os.environ, **_KEEP_HEAP})
    meta = run_meta(argv)
    settings = Settings(
        quick=args.quick,
        dendrites=args.dendrites,
        phase_dendrites=args.phase_dendrites,
        candidates=args.candidates,
        rounds=args.rounds or (2 if args.quick else 9),
        block_seconds=args.block_seconds or (0.002 if args.quick else 0.1),
        # One thread for the smoke test: it checks that everything runs, and tiny ops on two
        # threads beside other processes wait on each other for milliseconds.
        threads=args.threads or (1 if args.quick else 2),
        stale_cycles=2 if args.quick else 4,
        fan_in=args.fan_in,
        sparse_dendrites=args.sparse_dendrites,
        device=args.device,
        dtype=args.dtype,
        keep_heap=args.keep_heap,
        compile_statistics=args.compile_statistics,
    )
    torch.set_num_threads(settings.threads)
    meta["threads"] = torch.get_num_threads()
    if settings.keep_heap:  # what this process really runs under
        meta["malloc_environment"] = {k: os.environ.get(k) for k in _KEEP_HEAP}
    start = time.perf_counter()
    nets = networks(settings.quick, settings.device, _DTYPES[settings.dtype])
    if settings.device == "cuda":
        meta["device"] = torch.cuda.get_device_name()
    # First, while nothing else is alive: the gc census must not see the other benchmark models.
    stale = stale_copy_check(nets[0], cycles=settings.stale_cycles, candidates=2)
    results = [bench_network(network, settings) for network in nets]
    report = build_report(results, stale, settings, meta=meta, seconds=time.perf_counter() - start)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    # With --out, what is printed is what was rendered from the saved JSON (the same text).
    print(save_report(args.out, report, markdown) if args.out is not None else markdown(report))
    failed = report["targets_missed"] > 0 or report["stale_copies_found"]
    return 1 if args.fail_on_miss and failed else 0


if __name__ == "__main__":
    sys.exit(main())
