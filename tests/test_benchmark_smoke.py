"""The benchmark scripts run (in their quick mode), so they cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]


def test_engine_speed_quick_run_reports_every_configuration(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    result = subprocess.run(
        [sys.executable, str(_REPO / "benchmarks" / "engine_speed.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stale copies: none" in result.stdout
    data = json.loads(out.read_text())
    assert data["stale_copies_found"] is False
    assert [n["network"] for n in data["networks"]] == ["mlp", "conv"]
    for network in data["networks"]:
        assert network["neuron_phase"]
        assert network["dendrite_phase"]


def test_callback_overhead_quick_run_measures_bookkeeping(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    result = subprocess.run(
        [sys.executable, str(_REPO / "benchmarks" / "callback_overhead.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["epochs"] == 6
    assert 0 < data["bookkeeping_share_median"] < 1
    assert "start_dendrite_phase" in data["decisions"]
