"""The benchmark scripts run (in their quick mode), so they cannot rot."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import run_benchmark


def test_engine_speed_quick_run_reports_every_configuration(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    result = run_benchmark("engine_speed.py", "--quick", "--json", str(out))
    assert "stale copies: none" in result.stdout
    data = json.loads(out.read_text())
    assert data["stale_copies_found"] is False
    assert [n["network"] for n in data["networks"]] == ["mlp", "conv"]
    for network in data["networks"]:
        assert network["neuron_phase"]
        assert network["dendrite_phase"]


def test_callback_overhead_quick_run_measures_bookkeeping(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    run_benchmark("callback_overhead.py", "--quick", "--json", str(out))
    data = json.loads(out.read_text())
    assert data["epochs"] == 6
    assert 0 < data["bookkeeping_share_median"] < 1
    assert "start_dendrite_phase" in data["decisions"]
