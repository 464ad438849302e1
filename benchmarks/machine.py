"""What a benchmark result was measured on (CPU model, code commit, command), and how it is saved.

Results are only comparable on the same machine and the same code, so every report names both,
and the command that produced it. Reports are saved as JSON and their Markdown is generated from
that JSON alone, so a published table can always be regenerated from (and checked against) the
numbers behind it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else what :mod:`platform` knows."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return cpu


def git_commit() -> str:
    """The repository's commit (with ``+dirty`` for uncommitted changes), or ``"unknown"``.

    Changes to ``benchmarks/results/`` do not count: a benchmark run rewrites those tracked files
    itself, and the next run of the same code must not be reported as modified code.
    """
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        code_changes = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
        return commit + ("+dirty" if code_changes else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_meta(argv: Sequence[str] | None) -> dict[str, Any]:
    """What every benchmark report records about its run: the command, when, on what, with which code.

    ``argv`` is what the script's ``main`` was given (``None``: the command line), so the command
    shown is the one that can be pasted to reproduce the report. The date is UTC so that reports
    from different machines sort together.
    """
    args = list(argv) if argv is not None else sys.argv[1:]
    return {
        "command": "python " + shlex.join([Path(sys.argv[0]).as_posix(), *args]),  # quoted: it can be re-run
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "uname": " ".join(platform.uname()[:5]),
        "machine": cpu_model(),
        "commit": git_commit(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def save_report(out: Path, report: dict[str, Any], markdown: Callable[[dict[str, Any]], str]) -> str:
    """Write ``out/results.json``, then ``out/results.md`` rendered from that file; return the Markdown.

    The Markdown is generated from the JSON just written, not from the in-memory report, so that
    what is published is exactly what ``--render`` regenerates from the saved numbers.
    """
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=1) + "\n"
    (out / "results.json").write_text(text)
    rendered = markdown(json.loads(text))
    (out / "results.md").write_text(rendered + "\n")
    return rendered


def render_report(out: Path, markdown: Callable[[dict[str, Any]], str]) -> str:
    """Regenerate ``out/results.md`` from ``out/results.json`` (after a change of format); return it."""
    rendered = markdown(json.loads((out / "results.json").read_text()))
    (out / "results.md").write_text(rendered + "\n")
    return rendered


Summarize = Callable[[list[dict[str, Any]]], Any]


def resume_report(
    out: Path, argv: Sequence[str] | None, *, fresh: bool
) -> tuple[dict[str, Any], list[dict[str, Any]], set[tuple[str, str, int]], dict[str, Any]]:
    """The report a run of a fit-by-fit benchmark adds to: ``(meta, rows, done, previous meta)``.

    A re-run with the same ``--out`` keeps the fits already saved (``done``: their benchmark, arm
    and seed) and adds its command to the ``commands`` that made the report, so the report says
    every command behind its numbers. ``fresh`` (a smoke test) starts an empty report.
    """
    previous: dict[str, Any] = {}
    if (out / "results.json").is_file() and not fresh:
        previous = json.loads((out / "results.json").read_text())
    rows: list[dict[str, Any]] = list(previous.get("runs", []))
    done = {(r["benchmark"], r["arm"], r["seed"]) for r in rows}
    meta = run_meta(argv)
    meta["quick"] = fresh
    commands = previous.get("meta", {}).get("commands", [])
    meta["commands"] = [*commands, meta["command"]] if meta["command"] not in commands else commands
    return meta, rows, done, previous.get("meta", {})


def save_fit(
    out: Path,
    report: tuple[dict[str, Any], list[dict[str, Any]]],
    row: dict[str, Any],
    label: tuple[str, str, int],
    summarize: Summarize,
    markdown: Callable[[dict[str, Any]], str],
    widths: tuple[int, int] = (22, 16),
) -> None:
    """Add one fit's ``row`` to the report ``(meta, rows)``, print its line and save the report.

    Saved after every fit, so a long run that is stopped keeps every fit it finished, and a
    re-run with the same ``--out`` adds only the missing ones. ``label`` is (benchmark, arm, seed).
    """
    meta, rows = report
    row["commit"] = meta["commit"]
    rows.append(row)
    name, arm, seed = label
    print(
        f"{name:<{widths[0]}} {arm:<{widths[1]}} seed {seed}: test {row['test_acc']:.4f} params {row['params']:>6} "
        f"D {row['dendrites_per_layer']} epochs {row['epochs']:>4} {row['wall_s']:6.1f} s",
        flush=True,
    )
    save_report(out, {"meta": meta, "runs": rows, "summary": summarize(rows)}, markdown)


def finish_report(
    out: Path,
    report: tuple[dict[str, Any], list[dict[str, Any]]],
    summarize: Summarize,
    markdown: Callable[[dict[str, Any]], str],
    start: float,
) -> None:
    """Save the whole report, then print its Markdown and the run's time."""
    meta, rows = report
    print(save_report(out, {"meta": meta, "runs": rows, "summary": summarize(rows)}, markdown))
    print(f"done in {time.perf_counter() - start:.1f} s")
