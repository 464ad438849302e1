"""A run killed at any point (SIGKILL) and resumed with ``fit(ckpt_path="last")`` ends as if never killed.

The kills are deterministic: ``tests/scripts/kill_resume.py`` sends SIGKILL to itself at a point
the test names (``PB_KILL_AT``), so each case kills at the same place on every machine. Under
single-thread deterministic settings the resumed run must end with the uninterrupted run's
decision history, dendrite counts, epoch count and bit-identical weights.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "kill_resume.py"

# The uninterrupted run (neuron_epochs=2, dendrite_epochs=2, max_dendrites=2; 6 batches an epoch):
# epochs 0-1 neuron phase (decision at 1: start_dendrite_phase), 2-3 dendrite phase (3: accept),
# 4-5 neuron phase (5: the cycle improved, start the next dendrite phase), 6-7 dendrite phase
# (7: accept), 8-9 neuron phase (9: stop, restoring the global best).
EXPECTED_ACTIONS = {2: "start_dendrite_phase", 4: "accept", 6: "start_dendrite_phase", 8: "accept", 10: "stop"}

# Kill point -> epochs whose checkpoint the resumed run starts after (None: killed before the first
# checkpoint, so the resumed run starts from scratch). The resumed run must run exactly the rest:
# 6 batches for each remaining epoch of the 10, no more (trained past) and no fewer (skipped).
POINTS = {
    "batch:0:3": None,  # neuron phase, mid-epoch, before any checkpoint
    "decided:1": 1,  # the epoch that starts the dendrite phase, before its checkpoint
    "saved:1": 2,  # ... and after it
    "batch:2:2": 2,  # mid-dendrite-phase
    "decided:3": 3,  # the acceptance, before its checkpoint
    "optimizer:2": 3,  # right after the first acceptance, before the optimizer is rebuilt
    "saved:3": 4,  # the acceptance, after its checkpoint
    "batch:5:4": 5,  # the neuron phase after an acceptance, mid-epoch
    "decided:5": 5,  # the verdict on the first cycle + the second dendrite phase
    "batch:7:1": 7,  # the second dendrite phase
    "decided:9": 9,  # the final stop, before its checkpoint
    "finished": 10,  # after the final stop and its checkpoint
}


def _run(out: Path, *args: str, kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PB_KILL_AT", None)
    if kill_at is not None:
        env["PB_KILL_AT"] = kill_at
    return subprocess.run(
        [sys.executable, str(_SCRIPT), str(out), *args],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,  # its own process group: a kill takes every DDP rank with it
    )


def _result(out: Path) -> dict[str, Any]:
    return torch.load(out / "result.pt", weights_only=True)


def _kill_and_resume(out: Path, point: str, *args: str) -> dict[str, Any]:
    """Run until SIGKILL at ``point``, resume with ``--resume``, and return the resumed run's result."""
    killed = _run(out, *args, kill_at=point)
    assert killed.returncode == -signal.SIGKILL, f"the run was not killed at {point}: {killed.stderr[-2000:]}"
    assert not (out / "result.pt").exists()
    resumed = _run(out, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return _result(out)


def _assert_same_run(resumed: dict[str, Any], full: dict[str, Any]) -> None:
    assert resumed["history"] == full["history"]
    assert resumed["dendrites"] == full["dendrites"]
    assert resumed["epochs"] == full["epochs"]
    assert resumed["weights"].keys() == full["weights"].keys()
    different = [k for k, v in full["weights"].items() if not torch.equal(resumed["weights"][k], v)]
    assert not different, f"weights differ from the uninterrupted run's: {different}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("full")
    done = _run(out)
    assert done.returncode == 0, done.stderr[-3000:]
    result = _result(out)
    result["dir"] = out
    assert {v: a for v, a in result["history"] if a != "continue"} == EXPECTED_ACTIONS
    assert result["dendrites"] == [2, 2, 2]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("point", list(POINTS))
def test_killed_and_resumed_run_ends_exactly_as_the_uninterrupted_one(
    point: str, uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    result = _kill_and_resume(tmp_path, point)
    done_epochs = POINTS[point]
    assert (result["resumed_from"] is None) == (done_epochs is None)
    assert result["batches_run"] == 6 * (10 - (done_epochs or 0))
    _assert_same_run(result, uninterrupted)


# With mode="max" on val_loss every cycle fails its verdict: epoch 5 retries (restoring the
# global best, fresh candidates), epoch 7 accepts again, epoch 9 stops after the second failed
# try, rolling back to the network without dendrites.
FAILING_ACTIONS = {2: "start_dendrite_phase", 4: "accept", 6: "retry", 8: "accept", 10: "stop"}
FAILING_POINTS = {"decided:5": 5, "saved:5": 6, "batch:6:3": 6, "decided:9": 9}


@pytest.fixture(scope="module")
def uninterrupted_failing(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("failing")
    done = _run(out, "--mode", "max")
    assert done.returncode == 0, done.stderr[-3000:]
    result = _result(out)
    assert {v: a for v, a in result["history"] if a != "continue"} == FAILING_ACTIONS
    assert result["dendrites"] == [0, 0, 0]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("point", list(FAILING_POINTS))
def test_a_run_killed_around_a_retry_or_a_failed_stop_resumes_exactly(
    point: str, uninterrupted_failing: dict[str, Any], tmp_path: Path
) -> None:
    result = _kill_and_resume(tmp_path, point, "--mode", "max")
    assert result["batches_run"] == 6 * (10 - FAILING_POINTS[point])
    _assert_same_run(result, uninterrupted_failing)


@pytest.mark.slow
def test_resuming_a_finished_run_trains_nothing_and_keeps_the_weights(
    uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    __import__("shutil").copytree(uninterrupted["dir"], out)
    resumed = _run(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = _result(out)
    assert result["resumed_from"] is not None
    assert result["batches_run"] == 0
    assert "this run had already finished" in resumed.stderr
    _assert_same_run(result, uninterrupted)


@pytest.mark.slow
def test_a_torn_last_checkpoint_fails_with_an_error_naming_the_file(
    uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    killed = _run(tmp_path, kill_at="write:4")
    assert killed.returncode == -signal.SIGKILL
    torn = tmp_path / "ckpt" / "last.ckpt"
    assert torn.stat().st_size > 0
    resumed = _run(tmp_path, "--resume")
    assert resumed.returncode != 0
    assert not (tmp_path / "result.pt").exists()  # never trained on, never finished from garbage
    assert f"the checkpoint {torn} cannot be read" in resumed.stderr
    # The epoch's own checkpoint, written just before last.ckpt, is intact: resuming from it
    # explicitly (what the error suggests) ends as the uninterrupted run.
    (epoch_file,) = (tmp_path / "ckpt").glob("epoch=4-*.ckpt")
    assert "cannot be read" not in _run(tmp_path, "--resume", "--ckpt", str(epoch_file)).stderr
    _assert_same_run(_result(tmp_path), uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["batch:2:2", "decided:3"])
def test_killed_and_resumed_ddp_run_ends_exactly_as_the_uninterrupted_one(point: str, tmp_path: Path) -> None:
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    full = _run(full_dir, "--devices", "2")
    assert full.returncode == 0, full.stderr[-3000:]
    result = _kill_and_resume(killed_dir, point, "--devices", "2")
    assert result["resumed_from"] is not None
    _assert_same_run(result, _result(full_dir))


# With --steps (dendrite_patience_steps=2) each dendrite phase ends mid-epoch, at the training
# step its candidates converge: epoch 2 is a whole dendrite epoch, the acceptance comes inside
# epoch 3 (recorded under validation 3), the next dendrite phase starts at epoch 4's end and is
# accepted inside epoch 6; the run stops at epoch 7's end: 8 epochs instead of 10.
STEPS_ACTIONS = [(2, "start_dendrite_phase"), (3, "accept"), (5, "start_dendrite_phase"), (6, "accept"), (8, "stop")]
STEPS_POINTS = {
    "batch:2:3": 2,  # a dendrite phase that will end in steps, mid-epoch
    "optimizer:2": 3,  # inside the mid-epoch acceptance, before the optimizer is rebuilt
    "batch:3:5": 3,  # late in the epoch whose acceptance came mid-epoch
    "decided:3": 3,  # that epoch's first neuron-phase validation, before its checkpoint
    "optimizer:4": 6,  # inside the second mid-epoch acceptance
}


@pytest.fixture(scope="module")
def uninterrupted_steps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("steps")
    done = _run(out, "--steps")
    assert done.returncode == 0, done.stderr[-3000:]
    result = _result(out)
    assert [(v, a) for v, a in result["history"] if a != "continue"] == STEPS_ACTIONS
    assert result["dendrites"] == [2, 2, 2]
    assert result["epochs"] == 8
    return result


@pytest.mark.slow
@pytest.mark.parametrize("point", list(STEPS_POINTS))
def test_a_run_killed_around_a_mid_epoch_acceptance_resumes_exactly(
    point: str, uninterrupted_steps: dict[str, Any], tmp_path: Path
) -> None:
    result = _kill_and_resume(tmp_path, point, "--steps")
    assert result["batches_run"] == 6 * (8 - STEPS_POINTS[point])
    _assert_same_run(result, uninterrupted_steps)
