"""A run killed at any moment (SIGKILL) and resumed with fit(ckpt_path="last") ends as if never killed."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

_SCRIPT = Path(__file__).resolve().parent / "scripts" / "kill_resume.py"


def _start(out: Path, *extra: str) -> subprocess.Popen[str]:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, str(_SCRIPT), str(out), *extra],
        cwd=out,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _finish(process: subprocess.Popen[str], out: Path) -> dict[str, Any]:
    assert process.wait(timeout=600) == 0
    return torch.load(out / "result.pt", weights_only=True)


def _kill_during_epoch(process: subprocess.Popen[str], epoch: int, delay: float) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        if line.strip() == f"EPOCH {epoch}":
            time.sleep(delay)  # somewhere inside the epoch (or, if it is short, the next one)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
            return
    pytest.fail(f"the run ended before epoch {epoch}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("full")
    return _finish(_start(out), out)


# Epochs 0-1: neuron phase; 2-3: dendrite phase; 4-5: neuron phase after the first acceptance;
# 6-7: second dendrite phase; 8-9: last neuron phase, then the machine stops training.
@pytest.mark.parametrize("epoch", [0, 2, 3, 5, 7])
def test_killed_and_resumed_run_has_the_same_history_and_structure(
    epoch: int, uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    assert uninterrupted["history"].count("accept") == 2
    _kill_during_epoch(_start(tmp_path), epoch, delay=random.Random(epoch).uniform(0.0, 0.3))
    resumed = _finish(_start(tmp_path, "--resume"), tmp_path)
    assert resumed["history"] == uninterrupted["history"]
    assert resumed["dendrites"] == uninterrupted["dendrites"]
    assert resumed["epochs"] == uninterrupted["epochs"]
