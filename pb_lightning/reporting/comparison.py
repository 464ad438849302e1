"""The statistics of ``pb-lightning compare``: paired per-seed gaps, their standard errors, the
envelope of the plain networks, the verdict and the Markdown table.

Framework-free on purpose (no Lightning, no torch): the numbers a user reads must be recomputable
from the saved per-fit results alone, in a test or a notebook, without re-running anything.

A *fit* is a mapping with at least ``arm``, ``seed``, ``score`` and ``params`` (the rows of
``results.json``). Every gap is **paired**: for each seed that both arms ran, the ``dendrites``
fit's score minus the other arm's, signed so that a positive gap means ``dendrites`` did better
(for a metric that is minimised, the other arm's score minus ``dendrites``'). Pairing removes the
seed's own luck (its initial weights and data order), which is shared by both fits of a seed.

A gap is **resolved** when ``|mean| > 2 · SE`` (SE: the sample standard deviation of the per-seed
gaps over ``sqrt(n)``), roughly a 95% interval that excludes zero. With one seed there is no
standard error and nothing is resolved. Two standard errors over few seeds is a loose test (a t
interval over 3 seeds would need about 4.3 SE); the verdict says "can resolve", not "significant".
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pb_lightning.reporting.history import resolve_metric_kind

#: The arm every gap is measured from.
REFERENCE = "dendrites"
#: Prefix of the wider (or narrower) plain networks' arms: ``plain@32``.
WIDTH_PREFIX = "plain@"
#: The controls, strongest first: the verdict leads with the first one that ran. ``restart`` has
#: the same schedule of warm restarts as ``dendrites``, so beating it is what shows the dendrites
#: themselves helped; ``inert`` has the same cycles with dendrites that cannot act.
CONTROL_ORDER = ("restart", "inert", "plain")
#: How many standard errors a mean gap must exceed to count as resolved.
RESOLVE_SE = 2.0


@dataclass(frozen=True)
class Gap:
    """The paired gap of ``dendrites`` to one other arm (or to the plain envelope).

    Attributes:
        other: the arm (``"envelope"`` for the plain networks' envelope).
        mean: mean per-seed gap, positive when ``dendrites`` is better.
        se: its standard error (``None`` with one seed).
        n: seeds paired.
        per_seed: ``{seed: gap}``.
    """

    other: str
    mean: float
    se: float | None
    n: int
    per_seed: dict[int, float]

    @property
    def resolved(self) -> bool:
        """``|mean| > 2 · SE`` (see the module docstring)."""
        return resolves(self.mean, self.se)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "per_seed": {str(k): v for k, v in self.per_seed.items()}, "resolved": self.resolved}


def standard_error(values: Sequence[float]) -> float | None:
    """Sample standard deviation over ``sqrt(n)``; ``None`` for fewer than two values.

    >>> standard_error([1.0, 2.0, 3.0])
    0.5773502691896258
    """
    if len(values) < 2:
        return None
    return statistics.stdev(values) / math.sqrt(len(values))


def resolves(mean: float, se: float | None) -> bool:
    """Whether the seeds can resolve a gap: ``|mean| > 2 · SE`` (never with one seed)."""
    return se is not None and abs(mean) > RESOLVE_SE * se


def _sign(mode: str) -> float:
    if mode not in ("min", "max"):
        raise ValueError(f"`mode` must be 'min' or 'max'; got {mode!r}.")
    return 1.0 if mode == "max" else -1.0


def _by_seed(fits: Iterable[Mapping[str, Any]], arm: str) -> dict[int, Mapping[str, Any]]:
    return {int(f["seed"]): f for f in fits if f["arm"] == arm}


def _gap(other: str, per_seed: dict[int, float]) -> Gap:
    values = [per_seed[s] for s in sorted(per_seed)]
    mean = statistics.fmean(values) if values else math.nan
    return Gap(other, mean, standard_error(values), len(values), dict(sorted(per_seed.items())))


def arms_in_order(fits: Iterable[Mapping[str, Any]]) -> list[str]:
    """The arms that ran: ``dendrites``, the controls, then the width arms by parameter count."""
    fits = list(fits)
    names = {f["arm"] for f in fits}
    fixed = [a for a in (REFERENCE, "restart", "inert", "plain") if a in names]
    widths = sorted(
        (a for a in names if a not in fixed),
        key=lambda a: statistics.fmean(f["params"] for f in fits if f["arm"] == a),
    )
    return fixed + widths


def paired_gaps(fits: Sequence[Mapping[str, Any]], mode: str) -> dict[str, Gap]:
    """The gap of ``dendrites`` to every other arm, over the seeds both ran."""
    sign = _sign(mode)
    reference = _by_seed(fits, REFERENCE)
    gaps = {}
    for arm in arms_in_order(fits):
        if arm == REFERENCE:
            continue
        other = _by_seed(fits, arm)
        per_seed = {s: sign * (reference[s]["score"] - other[s]["score"]) for s in reference if s in other}
        gaps[arm] = _gap(arm, per_seed)
    return gaps


def is_plain(arm: str) -> bool:
    """Whether ``arm`` is a plain network: ``plain`` or a width arm ``plain@W``."""
    return arm == "plain" or arm.startswith(WIDTH_PREFIX)


def envelope_gap(fits: Sequence[Mapping[str, Any]], mode: str) -> Gap | None:
    """The gap of ``dendrites`` to the best plain network **at or below its parameter count**, per seed.

    For each seed, the envelope is the best score among that seed's plain fits (``plain`` and the
    width arms) whose parameter count is at most the ``dendrites`` fit's. A seed with no such
    plain fit is left out. ``None`` when no width arm ran (the envelope would just be ``plain``).
    """
    if not any(f["arm"].startswith(WIDTH_PREFIX) for f in fits):
        return None
    sign = _sign(mode)
    per_seed = {}
    for seed, ref in _by_seed(fits, REFERENCE).items():
        plain = [f["score"] for f in fits if is_plain(f["arm"]) and f["seed"] == seed and f["params"] <= ref["params"]]
        if plain:
            best = max(plain) if mode == "max" else min(plain)
            per_seed[seed] = sign * (ref["score"] - best)
    return _gap("envelope", per_seed)


def _points(value: float, scale: float, unit: str, *, signed: bool = True) -> str:
    text = f"{value * scale:+.{_digits(scale)}f}" if signed else f"{value * scale:.{_digits(scale)}f}"
    return f"{text} {unit}".rstrip()


def _digits(scale: float) -> int:
    return 1 if scale >= 100 else 4


def format_gap(gap: Gap, scale: float = 1.0, unit: str = "") -> str:
    """``+0.4 ± 0.2 points`` (or ``+0.4 points (one seed)``)."""
    if gap.se is None:
        return f"{_points(gap.mean, scale, unit)} (one seed, no error bar)"
    return f"{gap.mean * scale:+.{_digits(scale)}f} ± {gap.se * scale:.{_digits(scale)}f} {unit}".rstrip()


def verdict(gaps: Mapping[str, Gap], envelope: Gap | None, scale: float = 1.0, unit: str = "") -> str:
    """One line: ``dendrites`` against the strongest control that ran, then against the plain envelope.

    Examples: ``dendrites beat restart by +0.4 ± 0.2 points over 3 seeds, but a plain network of
    at most the same size is 0.3 points better``; ``dendrites vs restart: +0.1 ± 0.3 points over 3
    seeds: no difference the seeds can resolve``.
    """
    control = next((c for c in CONTROL_ORDER if c in gaps), None)
    if control is None:
        control = next(iter(gaps), None)
    if control is None or gaps[control].n == 0:
        return "nothing to compare: no other arm ran on the same seeds as dendrites"
    gap = gaps[control]
    seeds = f"over {gap.n} seed{'s' if gap.n != 1 else ''}"
    if gap.resolved:
        word = "beat" if gap.mean > 0 else "trail"
        text = f"dendrites {word} {control} by {format_gap(gap, scale, unit)} {seeds}"
    else:
        why = "one seed cannot resolve any difference" if gap.se is None else "no difference the seeds can resolve"
        text = f"dendrites vs {control}: {format_gap(gap, scale, unit)} {seeds}: {why}"
    if envelope is None:
        return text
    if envelope.n == 0:
        return text + "; no plain network ran at or below its parameter count"
    size = "a plain network of at most the same size"
    if not envelope.resolved:
        return text + f"; against {size}: {format_gap(envelope, scale, unit)}, not resolved"
    amount = _points(abs(envelope.mean), scale, unit, signed=False)
    if envelope.mean < 0:
        return text + f", but {size} is {amount} better"
    return text + f", and {size} is {amount} worse"


def arm_summary(fits: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arm: fits, mean score and its SE, mean parameters, mean wall time."""
    summary = {}
    for arm in arms_in_order(fits):
        rows = [f for f in fits if f["arm"] == arm]
        scores = [float(f["score"]) for f in rows]
        summary[arm] = {
            "fits": len(rows),
            "score": statistics.fmean(scores),
            "score_se": standard_error(scores),
            "params": statistics.fmean(f["params"] for f in rows),
            "wall_s": statistics.fmean(f["wall_s"] for f in rows),
        }
    return summary


def markdown_table(
    fits: Sequence[Mapping[str, Any]], mode: str, *, metric: str, scale: float = 1.0, unit: str = ""
) -> str:
    """The comparison as a Markdown table, one row per arm, plus the envelope row when it exists."""
    gaps = paired_gaps(fits, mode)
    envelope = envelope_gap(fits, mode)
    digits = _digits(scale)
    shown = f"{metric} (×{scale:g})" if scale != 1 else metric
    lines = [
        f"| arm | seeds | {shown} mean ± SE | parameters | dendrites − arm (paired) | resolved | wall s |",
        "|---|---:|---:|---:|---:|:---:|---:|",
    ]
    for arm, row in arm_summary(fits).items():
        se = "" if row["score_se"] is None else f" ± {row['score_se'] * scale:.{digits}f}"
        gap = gaps.get(arm)
        gap_text = "—" if gap is None else format_gap(gap, scale, unit)
        resolved = "" if gap is None else ("yes" if gap.resolved else "no")
        lines.append(
            f"| {arm} | {row['fits']} | {row['score'] * scale:.{digits}f}{se} | {row['params']:,.0f} "
            f"| {gap_text} | {resolved} | {row['wall_s']:.1f} |"
        )
    if envelope is not None:
        resolved = "yes" if envelope.resolved else "no"
        lines.append(
            f"| best plain ≤ dendrites' size | {envelope.n} | | | {format_gap(envelope, scale, unit)} | {resolved} | |"
        )
    return "\n".join(lines)


def plot_comparison(
    fits: Sequence[Mapping[str, Any]], path: Any, *, metric: str, scale: float = 1.0, title: str = ""
) -> None:
    """Score against parameters for every arm (mean ± SE over seeds both ways) into the PNG ``path``.

    matplotlib is imported here (headless Agg backend); the caller checks that it is installed.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    try:
        plain = []
        for arm, row in arm_summary(fits).items():
            params = [f["params"] for f in fits if f["arm"] == arm]
            xerr = standard_error(params)
            yerr = None if row["score_se"] is None else row["score_se"] * scale
            marker = "o" if is_plain(arm) else ("*" if arm == REFERENCE else "s")
            ax.errorbar(row["params"], row["score"] * scale, xerr=xerr, yerr=yerr, fmt=marker, ms=9, capsize=4)
            ax.annotate(arm, (row["params"], row["score"] * scale), textcoords="offset points", xytext=(6, 6))
            if is_plain(arm):
                plain.append((row["params"], row["score"] * scale))
        if len(plain) > 1:
            xs, ys = zip(*sorted(plain), strict=True)
            ax.plot(xs, ys, "--", color="grey", lw=1, label="plain networks")
            ax.legend()
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(f"{metric} (×{scale:g})" if scale != 1 else metric)
        ax.set_title(title or f"pb-lightning compare: {metric} against parameters (mean ± SE over seeds)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def scale_and_unit(metric: str, fits: list[dict[str, Any]]) -> tuple[float, str]:
    """Accuracies and error rates in [0, 1] are reported in points (×100); anything else as is."""
    kind = resolve_metric_kind("auto", metric)
    if kind in ("accuracy", "error") and all(0 <= f["score"] <= 1 for f in fits):
        return 100.0, "points"
    return 1.0, ""


def summarize(results: dict[str, Any]) -> None:
    """Fill in ``results``' gaps, envelope and verdict from its fits."""
    fits, mode = results["fits"], results["mode"]
    scale, unit = scale_and_unit(results["metric"], fits)
    gaps = paired_gaps(fits, mode)
    envelope = envelope_gap(fits, mode)
    results["scale"], results["unit"] = scale, unit
    results["gaps"] = {arm: gap.as_dict() for arm, gap in gaps.items()}
    results["envelope"] = None if envelope is None else envelope.as_dict()
    results["verdict"] = verdict(gaps, envelope, scale, unit)


def report_text(results: dict[str, Any]) -> str:
    """The table and the verdict, as ``results.md`` holds them and the command prints them."""
    source = (
        f"{results['metric']} on the test split"
        if results["source"] == "test"
        else f"best {results['metric']} on the validation split (the data module has no test split)"
    )
    better = "higher" if results["mode"] == "max" else "lower"
    table = markdown_table(
        results["fits"], results["mode"], metric=results["metric"], scale=results["scale"], unit=results["unit"]
    )
    quick = " (--quick: short fits, a smoke test)" if results["settings"]["quick"] else ""
    return (
        f"Score: {source}, {better} is better{quick}. Gaps are paired per seed, positive when dendrites do "
        f"better; resolved: |mean| > 2 SE.\n\n{table}\n\nVerdict: {results['verdict']}\n"
    )
