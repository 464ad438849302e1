"""A run killed at any point (SIGKILL) and resumed with ``fit(ckpt_path="last")`` ends as if never killed.

The kills are deterministic: ``tests/scripts/kill_resume.py`` sends SIGKILL to itself at a point
the test names (``PB_KILL_AT``), so each case kills at the same place on every machine. Under
single-thread deterministic settings the resumed run must end with the uninterrupted run's
decision history, dendrite counts, epoch count and bit-identical weights.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
import torch

from tests.helpers import ForkServer, run_python

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "kill_resume.py"
# Process-level: every case runs the script in fresh processes (killed, then resumed).
pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class _Scenario:
    """One configuration of the deterministic run, what its uninterrupted run must do, and where to kill it.

    The uninterrupted run's expectations are checked before any killed run is compared with it:
    a resumed run equal to an uninterrupted run that itself went wrong would prove nothing.
    """

    args: tuple[str, ...]
    #: The history's decisions other than "continue", as (validation, action), in order.
    actions: list[tuple[int, str]]
    dendrites: list[int]
    epochs: int
    #: Kill point -> epochs whose checkpoint the resumed run starts after (None: killed before the
    #: first checkpoint, so the resumed run starts from scratch). The resumed run must run exactly
    #: the rest: 6 batches for each remaining epoch, no more (trained past) and no fewer (skipped).
    points: dict[str, int | None]


# The uninterrupted run (neuron_epochs=2, dendrite_epochs=2, max_dendrites=2; 6 batches an epoch):
# epochs 0-1 neuron phase (decision at 1: start_dendrite_phase), 2-3 dendrite phase (3: accept),
# 4-5 neuron phase (5: the cycle improved, start the next dendrite phase), 6-7 dendrite phase
# (7: accept), 8-9 neuron phase (9: stop, restoring the global best).
_ACTIONS = [(2, "start_dendrite_phase"), (4, "accept"), (6, "start_dendrite_phase"), (8, "accept"), (10, "stop")]

SCENARIOS = {
    "default": _Scenario(
        args=(),
        actions=_ACTIONS,
        dendrites=[2, 2, 2],
        epochs=10,
        points={
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
        },
    ),
    # With mode="max" on val_loss every cycle fails its verdict: epoch 5 retries (restoring the
    # global best, fresh candidates), epoch 7 accepts again, epoch 9 stops after the second failed
    # try, rolling back to the network without dendrites.
    "failing": _Scenario(
        args=("--mode", "max"),
        actions=[(2, "start_dendrite_phase"), (4, "accept"), (6, "retry"), (8, "accept"), (10, "stop")],
        dendrites=[0, 0, 0],
        epochs=10,
        points={"decided:5": 5, "saved:5": 6, "batch:6:3": 6, "decided:9": 9},
    ),
    # With --steps (dendrite_patience_steps=2) each dendrite phase ends mid-epoch, at the training
    # step its candidates converge: epoch 2 is a whole dendrite epoch, the acceptance comes inside
    # epoch 3 (recorded under validation 3), the next dendrite phase starts at epoch 4's end and is
    # accepted inside epoch 6; the run stops at epoch 7's end: 8 epochs instead of 10.
    "steps": _Scenario(
        args=("--steps",),
        actions=[(2, "start_dendrite_phase"), (3, "accept"), (5, "start_dendrite_phase"), (6, "accept"), (8, "stop")],
        dendrites=[2, 2, 2],
        epochs=8,
        points={
            "batch:2:3": 2,  # a dendrite phase that will end in steps, mid-epoch
            "optimizer:2": 3,  # inside the mid-epoch acceptance, before the optimizer is rebuilt
            "batch:3:5": 3,  # late in the epoch whose acceptance came mid-epoch
            "decided:3": 3,  # that epoch's first neuron-phase validation, before its checkpoint
            "optimizer:4": 6,  # inside the second mid-epoch acceptance
        },
    ),
    # Two DDP ranks (each its own process, one process group: a kill takes both) take the same
    # decisions as the single process.
    "ddp": _Scenario(
        args=("--devices", "2"),
        actions=_ACTIONS,
        dendrites=[2, 2, 2],
        epochs=10,
        points={"batch:2:2": 2, "decided:3": 3},
    ),
}


class _Runner(Protocol):
    def __call__(self, out: Path, *args: str, kill_at: str | None = None) -> subprocess.CompletedProcess[str]: ...


@pytest.fixture(scope="module")
def run() -> Iterator[_Runner]:
    """Runs the script in a fresh process, killed at ``kill_at`` if given.

    Forked from one process that has imported it (``ForkServer``: the ~50 runs of this module
    skip ~5 s of imports each), except the DDP runs: their ranks are started from ``sys.argv``.
    Either way a child is its own process group, so a kill takes every process it started.
    """
    server = ForkServer(_SCRIPT)

    def run(out: Path, *args: str, kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
        out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("PB_KILL_AT", None)
        if kill_at is not None:
            env["PB_KILL_AT"] = kill_at
        if "--devices" in args:
            return run_python(str(_SCRIPT), str(out), *args, cwd=out, env=env, new_session=True, check=False)
        return server.run(str(out), *args, cwd=out, env=env)

    yield run
    server.close()


def _result(out: Path) -> dict[str, Any]:
    return torch.load(out / "result.pt", weights_only=True)


def _kill_and_resume(run: _Runner, out: Path, point: str, *args: str) -> dict[str, Any]:
    """Run until SIGKILL at ``point``, resume with ``--resume``, and return the resumed run's result."""
    killed = run(out, *args, kill_at=point)
    assert killed.returncode == -signal.SIGKILL, f"the run was not killed at {point}: {killed.stderr[-2000:]}"
    assert not (out / "result.pt").exists()
    resumed = run(out, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return _result(out)


def _assert_same_run(resumed: dict[str, Any], full: dict[str, Any]) -> None:
    assert resumed["history"] == full["history"]
    assert resumed["global_steps"] == full["global_steps"]
    assert resumed["dendrites"] == full["dendrites"]
    assert resumed["epochs"] == full["epochs"]
    assert resumed["weights"].keys() == full["weights"].keys()
    different = [k for k, v in full["weights"].items() if not torch.equal(resumed["weights"][k], v)]
    assert not different, f"weights differ from the uninterrupted run's: {different}"


@pytest.fixture(scope="module")
def uninterrupted(run: _Runner, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict[str, Any]]:
    """The uninterrupted run of a scenario, by name: run once for the module, checked on every use.

    A factory rather than a parametrised fixture: every test asks for the scenario it compares
    with, so the order the tests run in (shuffled or not) never runs a scenario twice.
    """
    runs: dict[str, tuple[subprocess.CompletedProcess[str], Path]] = {}

    def get(name: str) -> dict[str, Any]:
        scenario = SCENARIOS[name]
        if name not in runs:
            out = tmp_path_factory.mktemp(name)
            runs[name] = (run(out, *scenario.args), out)
        done, out = runs[name]
        assert done.returncode == 0, done.stderr[-3000:]
        result = _result(out)
        result["dir"] = out
        assert [(v, a) for v, a in result["history"] if a != "continue"] == scenario.actions
        # A decision taken mid-epoch shares the last validation's number, never its training step.
        positions = [(v, step) for (v, _), step in zip(result["history"], result["global_steps"], strict=True)]
        assert positions == sorted(set(positions))
        assert result["dendrites"] == scenario.dendrites
        assert result["epochs"] == scenario.epochs
        return result

    return get


@pytest.mark.parametrize(
    ("scenario", "point"),
    [
        # Under pytest-xdist a scenario's cases share one worker, so its uninterrupted run (the
        # module-scoped `uninterrupted`) runs once; different scenarios run side by side.
        pytest.param(name, point, marks=pytest.mark.xdist_group(f"kill_resume_{name}"))
        for name, scenario in SCENARIOS.items()
        for point in scenario.points
    ],
)
def test_killed_and_resumed_run_ends_exactly_as_the_uninterrupted_one(
    scenario: str, point: str, uninterrupted: Callable[[str], dict[str, Any]], run: _Runner, tmp_path: Path
) -> None:
    full = uninterrupted(scenario)
    setup = SCENARIOS[scenario]
    result = _kill_and_resume(run, tmp_path, point, *setup.args)
    done_epochs = setup.points[point]
    assert (result["resumed_from"] is None) == (done_epochs is None)
    assert result["batches_run"] == 6 * (setup.epochs - (done_epochs or 0))
    _assert_same_run(result, full)


@pytest.mark.xdist_group("kill_resume_default")  # compares with the default scenario's run
def test_resuming_a_finished_run_trains_nothing_and_keeps_the_weights(
    uninterrupted: Callable[[str], dict[str, Any]], run: _Runner, tmp_path: Path
) -> None:
    full = uninterrupted("default")
    out = tmp_path / "run"
    shutil.copytree(full["dir"], out)
    resumed = run(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = _result(out)
    assert result["resumed_from"] is not None
    assert result["batches_run"] == 0
    assert "this run had already finished" in resumed.stderr
    _assert_same_run(result, full)


@pytest.mark.xdist_group("kill_resume_default")  # compares with the default scenario's run
def test_a_torn_last_checkpoint_fails_with_an_error_naming_the_file(
    uninterrupted: Callable[[str], dict[str, Any]], run: _Runner, tmp_path: Path
) -> None:
    full = uninterrupted("default")
    killed = run(tmp_path, kill_at="write:4")
    assert killed.returncode == -signal.SIGKILL
    torn = tmp_path / "ckpt" / "last.ckpt"
    assert torn.stat().st_size > 0
    resumed = run(tmp_path, "--resume")
    assert resumed.returncode != 0
    assert not (tmp_path / "result.pt").exists()  # never trained on, never finished from garbage
    assert f"the checkpoint {torn} cannot be read" in resumed.stderr
    # The epoch's own checkpoint, written just before last.ckpt, is intact: resuming from it
    # explicitly (what the error suggests) ends as the uninterrupted run.
    (epoch_file,) = (tmp_path / "ckpt").glob("epoch=4-*.ckpt")
    assert "cannot be read" not in run(tmp_path, "--resume", "--ckpt", str(epoch_file)).stderr
    _assert_same_run(_result(tmp_path), full)
