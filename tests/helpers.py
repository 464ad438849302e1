"""Small models, the one subprocess runner and other helpers shared by several test files.

One copy of each, so that a test file reads as what it proves, and a fix to a helper (a timeout,
the output a failure shows) reaches every test that uses it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pb_lightning as pb
from pb_lightning.engine.layer import PerforatedLayer

_REPO = Path(__file__).resolve().parents[1]


class Mixer(nn.Module):
    """A custom module (not Linear/Conv): pb_lightning must be told its neuron axis.

    Its dendrites are fresh copies of it, run together with ``torch.func.vmap``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x))


def run_command(
    command: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
    new_session: bool = False,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in a child process and return it with its text output captured.

    The tests that need a fresh process (a kill, DDP ranks, a console script, an import without
    Lightning) all come through here. ``check`` asserts a zero exit status and shows the end of
    stderr when it is not; a test that expects a failure passes ``check=False`` and asserts what
    it expects. ``new_session`` puts the child in its own process group, so that a kill takes
    every process it started (DDP ranks) with it.
    """
    result = subprocess.run(
        list(command),
        cwd=cwd,
        env=None if env is None else dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        start_new_session=new_session,
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_python(*args: str, **options: Any) -> subprocess.CompletedProcess[str]:
    """:func:`run_command` with this interpreter: ``run_python("script.py", "--flag")``."""
    return run_command([sys.executable, *args], **options)


class ForkServer:
    """Runs ``script``'s ``main(argv)`` in fresh processes forked from one that imported it once.

    For the tests that start many short runs of one script (the kill/resume cases): each child
    skips the seconds of importing torch and Lightning, and is otherwise what
    :func:`run_python` starts — a new process in its own session, its own directory, environment
    and output (``tests/scripts/fork_server.py`` says why that holds). A script that launches more
    processes from ``sys.argv`` (DDP ranks) goes through :func:`run_python` instead.
    """

    def __init__(self, script: Path) -> None:
        self.script = script
        self._server = subprocess.Popen(
            [sys.executable, str(_REPO / "tests" / "scripts" / "fork_server.py"), str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(
        self, *args: str, cwd: Path, env: Mapping[str, str], timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        """One run: its exit status (negative: the signal that ended it) and its text output."""
        out, err = cwd / ".fork_stdout", cwd / ".fork_stderr"
        request = {"argv": list(args), "env": dict(env), "cwd": str(cwd), "stdout": str(out), "stderr": str(err)}
        request["timeout"] = timeout
        stdin, stdout = self._server.stdin, self._server.stdout
        assert stdin is not None
        assert stdout is not None
        stdin.write(json.dumps(request) + "\n")
        stdin.flush()
        reply = stdout.readline()
        assert reply, f"the fork server for {self.script.name} exited (status {self._server.poll()})"
        returncode = json.loads(reply)["returncode"]
        command = [sys.executable, str(self.script), *args]
        return subprocess.CompletedProcess(command, returncode, out.read_text(), err.read_text())

    def close(self) -> None:
        assert self._server.stdin is not None
        self._server.stdin.close()
        self._server.wait(timeout=60)


def run_benchmark(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``benchmarks/<script>`` with this interpreter and assert that it exited cleanly."""
    return run_python(str(_REPO / "benchmarks" / script), *args, timeout=timeout)


def fast_trainer(root: Path, callbacks: list[pl.Callback], max_epochs: int, **kwargs: Any) -> pl.Trainer:
    """A quiet Trainer for tests: no logger, bar, summary, sanity check or checkpoints unless asked."""
    options: dict[str, Any] = {
        "default_root_dir": root,
        "max_epochs": max_epochs,
        "callbacks": callbacks,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
    }
    options.update(kwargs)
    return pl.Trainer(**options)


class PlainClassifier(pl.LightningModule):
    """A LightningModule without dendrites around ``net`` (a demo model's network: same ``net.*`` keys).

    What a user trained before adopting pb_lightning: its checkpoints and state dicts are the
    input of the fine-tuning routes and of the errors for loading them the wrong way.
    """

    def __init__(self, net: nn.Module, lr: float = 1e-2) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class WeightReader(nn.Module):
    """A parent that uses its child's weights instead of calling it (what torch's fast paths do)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(F.linear(x, self.lin.weight, self.lin.bias)))


def grow_one_set(model: nn.Module, *inputs: Any) -> nn.Module:
    """One dendrite phase (a forward/backward) and an acceptance: a model with a dendrite set to test.

    The accepted set has output weight 0, so the model still computes what it did; see
    :func:`dendrite_change` for whether that set can change anything.
    """
    model.train()
    model(*inputs)
    pb.start_dendrite_phase(model)
    out = model(*inputs)
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    pb.accept_dendrites(model)
    return model


def dendrite_change(model: nn.Module, layer: PerforatedLayer, inputs: tuple[Any, ...], mode: str) -> float:
    """How much giving ``layer``'s dendrites an output weight of 0.5 moves the output in ``mode``.

    Zero means the dendrites never run in that mode (a parent bypasses the layer); the output
    weight is restored afterwards.
    """

    def run() -> Tensor:
        model.train(mode == "train")
        if mode == "inference_mode":
            with torch.inference_mode():
                return model(*inputs).clone()
        with torch.set_grad_enabled(mode in ("train", "eval")):
            return model(*inputs).detach()

    saved = layer.output_weight.detach().clone()
    with torch.no_grad():
        layer.output_weight.zero_()
    before = run()
    with torch.no_grad():
        layer.output_weight.fill_(0.5)
    after = run()
    with torch.no_grad():
        layer.output_weight.copy_(saved)
    return float((after - before).abs().max())
