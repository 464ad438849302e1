"""Runs a script's ``main(argv)`` in forked children of one process that has imported it once.

    python tests/scripts/fork_server.py SCRIPT

Why: the kill/resume tests start about fifty processes, and each spent about five seconds
importing torch and Lightning before a training run of one or two. A child forked from a process
that has imported them, and has run nothing, is still a fresh process for what those tests check
— nothing of an earlier run is in it, it resumes from the checkpoint on disk alone, and a SIGKILL
(to its own process group: each child is a session leader) takes it and nothing else — but it
starts at once. Scripts that start processes of their own from ``sys.argv`` (DDP ranks) are not
for this server: their ``__main__`` would be this file.

Protocol, one JSON object per line: a request on stdin ``{"argv": [...], "env": {...}, "cwd":
PATH, "stdout": PATH, "stderr": PATH, "timeout": SECONDS}``; the reply on stdout ``{"returncode":
N}``, negative for a child ended by signal -N (as :mod:`subprocess` reports it). A child still
running after its timeout is killed (returncode ``-9``, and a line saying so in its stderr file).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any


def _load(script: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(script.stem, script)
    if spec is None or spec.loader is None:
        raise SystemExit(f"fork_server: cannot import {script}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _child(module: ModuleType, request: dict[str, Any]) -> None:
    """The forked child: its own session, the request's directory, environment and output files."""
    code = 1
    try:
        os.setsid()
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, key in ((1, "stdout"), (2, "stderr")):
            target = os.open(request[key], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        sys.argv = [module.__file__ or module.__name__, *request["argv"]]
        try:
            module.main(request["argv"])
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if isinstance(stop.code, str):
                print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait(pid: int, timeout: float, stderr: str) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            with open(stderr, "a") as f:
                f.write(f"\nfork_server: killed after its timeout of {timeout} s\n")
            return -signal.SIGKILL
        time.sleep(0.01)


def main() -> None:
    module = _load(Path(sys.argv[1]).resolve())
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(module, request)
        returncode = _wait(pid, float(request.get("timeout", 600)), request["stderr"])
        sys.stdout.write(json.dumps({"returncode": returncode}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
