"""Timing on a shared machine: steps timed without the garbage collector, medians, and how busy it was.

Only the standard library: ``_reference_worker.py`` imports this from the reference package's
environment, and both packages must be timed by the same code.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import time
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Keep the cyclic garbage collector out of a timed region."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def median_step(step: Callable[[], None], steps: int) -> float:
    """Median seconds per step over ``steps`` consecutive steps (robust to a neighbour's bursts)."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_seconds() -> tuple[float, float] | None:
    """Busy CPU seconds of the whole machine and of this process (``None`` off Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    me = os.times()
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), me.user + me.system


def others_share(start: tuple[float, float] | None, end: tuple[float, float] | None, wall: float) -> float:
    """Share of all CPUs that other processes used in between (NaN if unknown).

    Timings on a shared machine are only as good as it was quiet; this says how quiet it was.
    """
    if start is None or end is None or wall <= 0:
        return float("nan")
    others = (end[0] - start[0]) - (end[1] - start[1])
    return max(0.0, others / (wall * (os.cpu_count() or 1)))
