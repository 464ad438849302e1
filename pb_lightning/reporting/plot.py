"""The history plot: the monitored score by epoch, phases shaded, cycles marked.

matplotlib is an optional dependency (``pip install pb_lightning[plot]``); it is imported only
when a plot is drawn, with the headless Agg backend so that training servers need no display.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pb_lightning.reporting.history import END, REPORT_FILE, load_history

PLOT_FILE = "pb_history.png"


def matplotlib_available() -> bool:
    """Whether a plot can be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_history(
    rows: list[dict[str, Any]], path: str | Path, *, monitor: str = "score", mode: str | None = None
) -> Path:
    """Draw ``rows`` (from :mod:`pb_lightning.reporting.history`) into the PNG file ``path``.

    The monitored score against epoch, dendrite phases shaded, accepted cycles (▲) and rejected
    ones (✕) marked, the global best as a step line, and the parameter count on a second axis.
    A positive score that is minimised (a loss) is drawn on a log scale, so that the late epochs,
    where dendrites act, are not squashed by the first ones.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["action"] != END] or rows
    epochs = [r["epoch"] for r in rows]
    scores = [math.nan if r["score"] is None else r["score"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    try:
        shaded = False
        for r in rows:
            if r["phase"] == "dendrite":
                ax.axvspan(
                    r["epoch"] - 0.5,
                    r["epoch"] + 0.5,
                    color="tab:orange",
                    alpha=0.18,
                    lw=0,
                    label=None if shaded else "dendrite phase",
                )
                shaded = True
        ax.plot(epochs, scores, "-o", ms=3, color="tab:blue", label=monitor)
        best = [math.nan if r["global_best"] is None else r["global_best"] for r in rows]
        ax.step(epochs, best, where="post", color="tab:green", ls="--", lw=1.2, label="global best")
        for action, marker, color, label in (
            ("accept", "^", "tab:green", "dendrites accepted"),
            ("retry", "x", "tab:red", "cycle rejected (retry)"),
            ("stop", "s", "black", "training complete"),
        ):
            points = [(r["epoch"], s) for r, s in zip(rows, scores, strict=True) if r["action"] == action]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.scatter(xs, ys, marker=marker, s=70, color=color, zorder=5, label=label)
        finite = [v for v in scores if not math.isnan(v)]
        if mode == "min" and finite and min(finite) > 0:
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(monitor)
        ax.set_title(f"pb_lightning: {monitor} by epoch, neuron and dendrite phases")
        ax.grid(alpha=0.3)
        params = ax.twinx()
        params.step(
            epochs,
            [r["parameters"] for r in rows],
            where="post",
            color="tab:purple",
            lw=1,
            alpha=0.7,
            label="parameters",
        )
        params.set_ylabel("parameters")
        handles, labels = ax.get_legend_handles_labels()
        more_handles, more_labels = params.get_legend_handles_labels()
        ax.legend(
            handles + more_handles,
            labels + more_labels,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.12),
            ncol=4,
            fontsize=8,
            frameon=False,
        )
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def plot_run(run_dir: str | Path, output: str | Path | None = None, *, monitor: str | None = None) -> Path:
    """Redraw the plot of a finished (or running) run from its ``pb_history.json``."""
    run_dir = Path(run_dir)
    rows = load_history(run_dir)
    folder = run_dir if run_dir.is_dir() else run_dir.parent
    report = json.loads((folder / REPORT_FILE).read_text()) if (folder / REPORT_FILE).exists() else {}
    target = Path(output) if output is not None else folder / PLOT_FILE
    return plot_history(rows, target, monitor=monitor or report.get("monitor", "score"), mode=report.get("mode"))
