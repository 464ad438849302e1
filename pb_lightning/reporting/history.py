"""The run's history (one row per decision) and the final report computed from it.

Framework-free and plain data: the Lightning callback appends a row after every end-of-epoch
validation, writes ``pb_history.json`` (a list of records, so ``pandas.read_json`` loads it as a
table) and ``pb_report.json``, and :mod:`pb_lightning.reporting.plot` draws the picture from the same rows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pb_lightning.cycle.scores import format_scores

MetricKind = Literal["auto", "accuracy", "error", "other"]

HISTORY_FILE = "pb_history.json"
REPORT_FILE = "pb_report.json"
#: The action of the row appended when training ends (after the final restore).
END = "end"


def resolve_metric_kind(kind: MetricKind, monitor: str) -> str:
    """``"auto"`` guesses from the monitored metric's name: ``*acc*`` → accuracy, ``*err*`` → error."""
    if kind != "auto":
        return kind
    name = monitor.lower()
    if "acc" in name:
        return "accuracy"
    if "err" in name:
        return "error"
    return "other"


def _error(score: float, kind: str) -> float | None:
    if kind == "accuracy":
        return (100.0 if score > 1.0 else 1.0) - score
    if kind == "error":
        return score
    return None


def final_report(
    rows: list[dict[str, Any]], *, monitor: str, metric_kind: str, mode: str | None = None
) -> dict[str, Any]:
    """The numbers of the end-of-training report, recomputed from the history rows alone.

    * ``best_before_dendrites``: the global best when the first dendrite phase started (the best
      of the network without dendrites);
    * ``final_best``: the global best at the end;
    * ``remaining_error_reduction``: ``(err_before − err_after) / err_before`` when the metric is
      an accuracy (error = 1 − accuracy, or 100 − accuracy for percentages) or an error;
    * ``parameters_before`` / ``parameters_after``, ``dendrites_per_layer``;
    * ``cycles_accepted`` / ``cycles_rejected``.
    """
    if not rows:
        return {"monitor": monitor, "mode": mode, "validations": 0}
    first_cycle = next((r for r in rows if r["action"] in ("start_dendrite_phase", "restart", "stop", END)), rows[-1])
    before = first_cycle["global_best"]
    end = rows[-1]
    after = end["global_best"]
    reduction = None
    err_before = None if before is None else _error(before, metric_kind)
    err_after = None if after is None else _error(after, metric_kind)
    if err_before is not None and err_after is not None and err_before > 0:
        reduction = (err_before - err_after) / err_before
    return {
        "monitor": monitor,
        "mode": mode,
        "metric_kind": metric_kind,
        "validations": sum(1 for r in rows if r["action"] != END),
        "best_before_dendrites": before,
        "final_best": after,
        "remaining_error_reduction": reduction,
        "parameters_before": rows[0]["parameters_before"],
        "parameters_after": end["parameters"],
        "dendrites_per_layer": end["dendrites_per_layer"],
        "cycles_accepted": end["cycles_accepted"],
        "cycles_rejected": end["cycles_rejected"],
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as the lines the callback logs."""

    def known(value: float | None) -> float | None:
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else value

    monitor = report["monitor"]
    # With the digits that tell the two apart: a real improvement must never read as equal scores.
    before, final = format_scores(known(report.get("best_before_dendrites")), known(report.get("final_best")))
    lines = ["pb_lightning summary", f"  best {monitor} before dendrites: {before}", f"  final best {monitor}: {final}"]
    if report.get("remaining_error_reduction") is not None:
        lines.append(f"  remaining error reduced by {100 * report['remaining_error_reduction']:.1f}%")
    layers = ", ".join(f"{name}: {count}" for name, count in report.get("dendrites_per_layer", {}).items())
    lines += [
        f"  parameters: {report.get('parameters_before')} before, {report.get('parameters_after')} after",
        f"  dendrite sets per layer: {layers}",
        f"  cycles accepted: {report.get('cycles_accepted')}, rejected: {report.get('cycles_rejected')}",
    ]
    return "\n".join(lines)


def save_history(directory: str | Path, rows: list[dict[str, Any]], report: dict[str, Any] | None = None) -> Path:
    """Write ``pb_history.json`` (and ``pb_report.json`` if given) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / HISTORY_FILE
    path.write_text(json.dumps(rows, indent=1, default=_jsonable))
    if report is not None:
        (directory / REPORT_FILE).write_text(json.dumps(report, indent=1, default=_jsonable))
    return path


def load_history(path: str | Path) -> list[dict[str, Any]]:
    """Read a history written by :func:`save_history` (a file, or the directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / HISTORY_FILE
    if not path.exists():
        raise FileNotFoundError(f"No pb_lightning history at {path}; a run writes {HISTORY_FILE} into its log dir.")
    return json.loads(path.read_text())


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
