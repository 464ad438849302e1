#!/usr/bin/env python
r"""A torch.compile'd perforated training step against the eager one, and what compiling costs.

    python benchmarks/compile_speed.py --out benchmarks/results/compile_speed   # results.json + .md
    python benchmarks/compile_speed.py --quick --out /tmp/cs                     # smoke test
    python benchmarks/compile_speed.py --render --out benchmarks/results/compile_speed

The MLP of ``engine_speed.py`` (784-512-512-10, batch 128) in a neuron phase with D accepted sets
and in a dendrite phase with D sets and K candidates, one training step = forward, backward and
an SGD step. Each configuration is compiled once (inductor, ``fullgraph=True``: a graph break
would fail the run), then both forms are timed over the same batches, interleaved. Reported:
the median step of each, their ratio (target: compiled ≤ eager), the first compiled call's
seconds (the compilation) and the number of graphs dynamo compiled (1: no recompile).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent), str(_HERE)]

import torch  # noqa: E402
from common.cli import add_report_options  # noqa: E402
from machine import render_report, run_meta, save_report  # noqa: E402
from torch import nn  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

import pb_lightning as pb  # noqa: E402


def _model(widths: list[int], dendrites: int, candidates: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = pb.perforate(nn.Sequential(*layers[:-1]))
    model(torch.randn(2, widths[0]))
    for _ in range(dendrites):
        pb.start_dendrite_phase(model)
        pb.accept_dendrites(model)
    if candidates:
        pb.start_dendrite_phase(model, num_candidates=candidates)
    return model


def _stepper(model: nn.Module, forward: Any) -> Any:
    optimizer = torch.optim.SGD(pb.trainable_parameters(model), lr=1e-3)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(forward(x), y).backward()
        optimizer.step()

    return step


def measure(widths: list[int], batch: int, dendrites: int, candidates: int, repeats: int) -> dict[str, Any]:
    """Median eager and compiled step of one configuration (interleaved, same batches)."""
    eager_model = _model(widths, dendrites, candidates)
    compiled_model = copy.deepcopy(eager_model)
    torch._dynamo.reset()
    backend = CompileCounterWithBackend("inductor")
    eager = _stepper(eager_model, eager_model)
    compiled = _stepper(compiled_model, torch.compile(compiled_model, backend=backend, fullgraph=True))
    x, y = torch.randn(batch, widths[0]), torch.randint(0, widths[-1], (batch,))
    start = time.perf_counter()
    compiled(x, y)
    compile_s = time.perf_counter() - start
    for _ in range(3):
        eager(x, y)
        compiled(x, y)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(repeats):
        for name, step in (("eager", eager), ("compiled", compiled)):
            start = time.perf_counter()
            step(x, y)
            times[name].append(time.perf_counter() - start)
    eager_ms = 1e3 * statistics.median(times["eager"])
    compiled_ms = 1e3 * statistics.median(times["compiled"])
    phase = f"dendrite D={dendrites} K={candidates}" if candidates else f"neuron D={dendrites}"
    return {
        "configuration": phase,
        "eager_ms": eager_ms,
        "compiled_ms": compiled_ms,
        "ratio": compiled_ms / eager_ms,
        "compile_s": compile_s,
        "graphs": backend.frame_count,
    }


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        "# torch.compile: compiled against eager training step",
        "",
        f"`{meta['command']}` — {meta['date']}, commit `{meta['commit']}`, {meta['machine']}, "
        f"torch {meta['torch']}, {meta['threads']} torch thread(s); MLP {meta['widths']}, batch "
        f"{meta['batch']}, median of {meta['repeats']} interleaved steps.",
        "",
        "| configuration | eager ms | compiled ms | compiled ÷ eager | compile s | graphs | compiled ≤ eager |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['configuration']} | {r['eager_ms']:.2f} | {r['compiled_ms']:.2f} | {r['ratio']:.2f} "
            f"| {r['compile_s']:.1f} | {r['graphs']} | {'met' if r['ratio'] <= 1.0 else '**missed**'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small MLP, few repeats: checks that it runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per form (default 30; 3 with --quick)")
    add_report_options(parser, default=Path("benchmarks/results/compile_speed"))
    args = parser.parse_args(argv)
    if args.render:
        print(render_report(args.out, markdown))
        return 0
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", "pb_lightning: no candidate learned")  # timing-only models
    widths, batch = ([16, 12, 4], 8) if args.quick else ([784, 512, 512, 10], 128)
    repeats = args.repeats or (3 if args.quick else 30)
    configs = [(1, 0), (2, 4)] if args.quick else [(4, 0), (2, 4)]
    rows = []
    for dendrites, candidates in configs:
        rows.append(measure(widths, batch, dendrites, candidates, repeats))
        print(rows[-1], flush=True)
    meta = run_meta(argv) | {"threads": args.threads, "widths": widths, "batch": batch, "repeats": repeats}
    print(save_report(args.out, {"meta": meta, "rows": rows}, markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
