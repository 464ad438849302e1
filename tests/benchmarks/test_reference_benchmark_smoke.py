"""The reference-package benchmark runs in its quick mode (or says clearly why it cannot)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import run_benchmark

# Benchmark smoke tests: each runs a benchmark script (most in a subprocess).
pytestmark = pytest.mark.slow


def test_reference_benchmark_quick_run(tmp_path: Path) -> None:
    # Its own environment for perforatedai (torch from the local CPU wheel, perforatedai from
    # PyPI): about a minute the first time. Without a registry it prints "skipped: ..." and exits 0.
    result = run_benchmark(
        "reference_package.py",
        "--quick",
        "--venv",
        str(tmp_path / "venv"),
        "--output",
        str(tmp_path / "out"),
        timeout=900,
    )
    if "skipped:" in result.stdout:
        pytest.skip(result.stdout.strip().splitlines()[-1])
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data
    assert (tmp_path / "out" / "results.md").read_text().count("|") > 10
