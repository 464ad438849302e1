"""Shared fixtures: every test starts from the same seed and leaves no files in the repository."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import settings

_REPO = Path(__file__).resolve().parents[1]
#: A script that regenerates a checkpoint fixture by hand: --doctest-modules would import it, and so
#: run its whole fit, at collection.
collect_ignore = ["fixtures/make_format_v0.py"]


@pytest.fixture(autouse=True)
def _seed_and_threads() -> Iterator[None]:
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    # Test tensors are tiny: one thread avoids spinning workers fighting over the 2 cores.
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _leave_no_artifacts_behind() -> Iterator[None]:
    def snapshot() -> set[str]:
        found = set()
        for top in ("tests", "pb_lightning", "examples", "configs", "benchmarks"):
            for root, dirs, files in os.walk(_REPO / top):
                dirs[:] = [d for d in dirs if d != "__pycache__" and not d.startswith(".")]
                found.update(str(Path(root) / f) for f in files)
        return found

    before = snapshot()
    yield
    new = snapshot() - before
    assert not new, f"test left files behind: {sorted(new)}"


# Hypothesis keeps no example database: tests must not write into the repository.
settings.register_profile("pb_lightning", database=None)
settings.load_profile("pb_lightning")
