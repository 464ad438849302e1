"""``pb-lightning`` (and ``python -m pb_lightning``): a LightningCLI for perforated training runs.

``pb-lightning fit --config configs/digits.yaml`` trains (models and data modules are chosen by
``class_path`` in the YAML; any :class:`~pb_lightning.lightning.module.PerforatedModule` works), and
``pb-lightning plot RUN_DIR`` redraws a run's history plot from its ``pb_history.json``, and
``pb-lightning compare --config configs/digits.yaml --seeds 3`` fits the config against its
controls (no dendrites, the restart schedule alone, ...) to tell whether dendrites pay on it
(:mod:`pb_lightning.lightning.compare`).
"""

from __future__ import annotations

import argparse
import sys

from lightning.pytorch.cli import LightningCLI


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the LightningCLI (``args`` defaults to ``sys.argv[1:]``)."""
    # overwrite=True: re-running a config into the same log directory must not fail on the saved
    # config.yaml (docs/LIGHTNING_NOTES.md §5).
    return LightningCLI(save_config_kwargs={"overwrite": True}, args=args)


def plot_command(args: list[str]) -> None:
    """``pb-lightning plot RUN_DIR [--output PNG] [--monitor NAME]``."""
    from pb_lightning.reporting.plot import plot_run

    parser = argparse.ArgumentParser(prog="pb-lightning plot", description="Redraw a run's history plot.")
    parser.add_argument("run_dir", help="a run's log directory (holding pb_history.json) or the file itself")
    parser.add_argument("--output", default=None, help="the PNG to write (default: RUN_DIR/pb_history.png)")
    parser.add_argument("--monitor", default=None, help="the y-axis label (default: from pb_report.json)")
    options = parser.parse_args(args)
    path = plot_run(options.run_dir, options.output, monitor=options.monitor)
    sys.stdout.write(f"{path}\n")


def console(argv: list[str] | None = None) -> None:
    """Entry point of the ``pb-lightning`` command (returns nothing, so the exit status is 0)."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["plot"]:
        plot_command(args[1:])
    elif args[:1] == ["compare"]:
        from pb_lightning.lightning.compare import compare_command

        compare_command(args[1:])
    else:
        # From the command line, let LightningCLI read sys.argv itself: given `args` while
        # sys.argv holds the same, it warns that `args` is meant for calls from within Python.
        main(argv)
