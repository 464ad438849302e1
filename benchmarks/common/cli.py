"""Command-line plumbing the benchmark scripts share: integer lists, report options, quiet Lightning."""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path


def parse_ints(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)`` (an argparse ``type=`` for lists of sizes or seeds).

    >>> parse_ints("0, 1,2,")
    (0, 1, 2)
    """
    return tuple(int(v) for v in text.split(",") if v.strip())


def add_report_options(parser: argparse.ArgumentParser, *, default: Path | None = None) -> None:
    """``--out DIR`` (where ``results.json`` and ``results.md`` go) and ``--render`` (redo only the Markdown).

    Every script saves its report the same way (``machine.save_report``), so every script offers
    the same two options; with ``default=None`` the report is printed and saved only if asked.
    """
    parser.add_argument(
        "--out", type=Path, default=default, help="write OUT/results.json and OUT/results.md (rendered from the JSON)"
    )
    parser.add_argument(
        "--render", action="store_true", help="run nothing: regenerate OUT/results.md from OUT/results.json"
    )


def check_report_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse ``--render`` without a directory to render from."""
    if args.render and args.out is None:
        parser.error("--render needs --out DIR (the directory holding results.json)")


def quiet_lightning() -> None:
    """Only errors from Lightning and pb_lightning, and no warnings: a benchmark's output is its table."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pb_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
