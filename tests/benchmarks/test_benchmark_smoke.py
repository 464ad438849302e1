"""The benchmark scripts run (in their quick mode), so they cannot rot."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

from tests.helpers import run_benchmark, run_python

# Benchmark smoke tests: each runs a benchmark script (most in a subprocess).
pytestmark = pytest.mark.slow

_BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _assert_render_regenerates(script: str, out: Path) -> str:
    """``--render`` rebuilds results.md from results.json alone, byte for byte; return that Markdown.

    The published tables must be reproducible from the saved numbers, so the file written by the
    run is deleted and regenerated, and the two must be identical.
    """
    written = (out / "results.md").read_text()
    (out / "results.md").unlink()
    rendered = run_benchmark(script, "--render", "--out", str(out))
    assert (out / "results.md").read_text() == written
    assert written.strip() in rendered.stdout
    return written


def test_engine_speed_quick_run_reports_every_configuration(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    results = tmp_path / "results"
    args = ("--quick", "--json", str(out), "--out", str(results))
    result = run_benchmark("engine_speed.py", *args)
    assert "stale copies: none" in result.stdout
    data = json.loads(out.read_text())
    assert data["stale_copies_found"] is False
    assert [n["network"] for n in data["networks"]] == ["mlp", "conv"]
    for network in data["networks"]:
        assert network["neuron_phase"]
        assert network["dendrite_phase"]
    saved = json.loads((results / "results.json").read_text())
    assert json.dumps(saved["networks"]) == json.dumps(data["networks"])  # NaN-safe (CPU share off Linux)
    assert saved["meta"]["command"].endswith("engine_speed.py " + " ".join(args))
    markdown = _assert_render_regenerates("engine_speed.py", results)
    assert f"- command: `{saved['meta']['command']}`" in markdown
    assert "| network | D | step ms | measured x | FLOP ideal x | measured/ideal | target |" in markdown
    assert "stale copies: none" in markdown
    # What the run printed is what it rendered from the saved JSON.
    assert result.stdout.strip() == markdown.strip()


def test_callback_overhead_quick_run_measures_bookkeeping(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    results = tmp_path / "results"
    args = ("--quick", "--json", str(out), "--out", str(results))
    result = run_benchmark("callback_overhead.py", *args)
    data = json.loads(out.read_text())
    assert data["epochs"] == 6
    assert 0 < data["bookkeeping_share_median"] < 1
    assert "start_dendrite_phase" in data["decisions"]
    saved = json.loads((results / "results.json").read_text())
    assert saved == data
    assert saved["meta"]["command"].endswith("callback_overhead.py " + " ".join(args))
    markdown = _assert_render_regenerates("callback_overhead.py", results)
    assert f"- command: `{saved['meta']['command']}`" in markdown
    assert "| measure | value |" in markdown
    assert markdown.strip() in result.stdout


def test_resume_soak_kills_resumes_and_compares(tmp_path: Path) -> None:
    results = tmp_path / "results"
    result = run_benchmark("resume_soak.py", "--runs", "1", "--seed", "3", "--out", str(results))
    saved = json.loads((results / "results.json").read_text())
    assert saved["total"] == 1
    (run,) = saved["runs"]
    assert run["killed"]
    assert run["resumed_ok"]
    assert saved["exact"] == int(run["exact"]) == int(not run["differences"])
    markdown = _assert_render_regenerates("resume_soak.py", results)
    assert f"**{saved['exact']}/1 exact**" in markdown
    assert markdown.strip() in result.stdout


def test_checkpoint_size_quick_run_compares_with_a_plain_checkpoint(tmp_path: Path) -> None:
    results = tmp_path / "results"
    result = run_benchmark("checkpoint_size.py", "--quick", "--out", str(results))
    saved = json.loads((results / "results.json").read_text())
    (network,) = saved["networks"]
    assert len(network["rows"]) == 6
    for row in network["rows"]:
        assert row["bytes"] > row["plain_bytes"] > 0
        assert set(row["held"]) <= {"cpu"}
    assert network["max_ratio"] == max(row["ratio"] for row in network["rows"])
    markdown = _assert_render_regenerates("checkpoint_size.py", results)
    assert markdown.strip() in result.stdout


def test_engine_speed_runs_in_bf16_autocast_on_the_cpu(tmp_path: Path) -> None:
    """``--dtype bf16`` steps under autocast: bf16 activations are saved, the statistics stay float32."""
    out = tmp_path / "speed.json"
    result = run_benchmark("engine_speed.py", "--quick", "--device", "cpu", "--dtype", "bf16", "--json", str(out))
    data = json.loads(out.read_text())
    assert (data["settings"]["device"], data["settings"]["dtype"]) == ("cpu", "bf16")
    assert "- device: cpu; precision: torch.autocast(bf16)" in result.stdout
    fp32 = _engine_speed_module()
    mlp = fp32.networks(True)[0]
    x, y = fp32.batch(mlp)
    plain = fp32.step_memory(fp32.baseline_model(mlp), x, y, network="mlp", configuration="unperforated")
    bf16 = next(m for m in data["networks"][0]["memory"] if m["configuration"] == "unperforated")
    # The float32 input batch is saved either way; every hidden activation is half the size.
    assert bf16["saved_activations"] < plain.saved_activations
    assert bf16["parameters_and_buffers"] == plain.parameters_and_buffers  # weights stay float32


def test_engine_speed_refuses_cuda_without_a_gpu_naming_the_option() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is valid here")
    result = run_python(str(_BENCHMARKS / "engine_speed.py"), "--quick", "--device", "cuda", timeout=120, check=False)
    assert result.returncode == 2
    assert "--device cuda: no CUDA device is available" in result.stderr
    assert "--device cpu" in result.stderr


def _engine_speed_module() -> types.ModuleType:
    """``benchmarks/engine_speed.py`` imported in this process (it puts its own folder on the path)."""
    spec = importlib.util.spec_from_file_location("engine_speed_under_test", _BENCHMARKS / "engine_speed.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_engine_speed_keep_heap_reruns_itself_under_the_malloc_settings(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    result = run_benchmark("engine_speed.py", "--quick", "--keep-heap", "--json", str(out))
    data = json.loads(out.read_text())
    assert data["settings"]["keep_heap"] is True
    assert data["meta"]["malloc_environment"]["MALLOC_TRIM_THRESHOLD_"] == str(16 * 1024**3)
    assert "- allocator: glibc malloc keeps freed memory (`--keep-heap`: MALLOC_MMAP_THRESHOLD_=" in result.stdout
