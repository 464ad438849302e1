#!/usr/bin/env python
r"""Every dendritic arm of the research harness judged by one standard (``standard.py``).

For each benchmark, dendritic arm and group of five seeds (``0-4``, fresh ``5-9``): the paired gap
of the arm to the envelope of every plain alternative at its parameter count — plain networks of
every width (``base`` and ``width@W``), the restart schedule at every width (``restart@W``) and
longer patience at every width (``patient@W``, where run) — and the verdict. A configuration
*wins* only where the gap exceeds two standard errors on seeds 0-4 **and** on fresh seeds 5-9::

    python benchmarks/claims.py --results benchmarks/results/research/results.json \
        benchmarks/results/claims/fresh_seeds.json --out benchmarks/results/claims

Runs of several files are pooled (the same benchmark, arm and seed in two files: the later file
wins), so fresh seeds run elsewhere (on the commit that made the claim) join the original ones.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE)]

from standard import WIN_SE, envelope, mean_se, verdict  # noqa: E402

#: Arm-name prefixes of the plain families (``base`` joins the width frontier at its own width).
FAMILIES = {"width": ("base", "width@"), "restart": ("restart@",), "patient": ("patient@",)}


def family_of(arm: str) -> str | None:
    for family, prefixes in FAMILIES.items():
        if any(arm == p or (p.endswith("@") and arm.startswith(p)) for p in prefixes):
            return family
    return None


def pooled(paths: list[Path]) -> list[dict[str, Any]]:
    runs: dict[tuple[str, str, int], dict[str, Any]] = {}
    for path in paths:
        for run in json.loads(path.read_text())["runs"]:
            runs[(run["benchmark"], run["arm"], run["seed"])] = run
    return list(runs.values())


def judge(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (benchmark, dendritic arm, seed group): the gaps, the families, the verdict."""
    by_seed: dict[tuple[str, int], dict[str, dict[str, Any]]] = defaultdict(dict)
    for run in runs:
        by_seed[(run["benchmark"], run["seed"])][run["arm"]] = run
    gaps: dict[tuple[str, str, int], list[tuple[float, str, bool]]] = defaultdict(list)
    for (bench, seed), arms in sorted(by_seed.items()):
        families: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for name, run in arms.items():
            family = family_of(name)
            if family is not None:
                families[family].append((run["params"], run["test_acc"]))
        for name, run in arms.items():
            if run["kind"] != "dendrites":
                continue
            read = envelope(dict(families), run["params"])
            if read is not None:
                gaps[(bench, name, seed // 5)].append((run["test_acc"] - read[0], read[1], read[2]))
    rows = []
    for (bench, arm, group), values in sorted(gaps.items()):
        diffs = [g for g, _, _ in values]
        rows.append(
            {
                "benchmark": bench,
                "arm": arm,
                "seeds": f"{group * 5}-{group * 5 + 4}",
                "n": len(diffs),
                "gap": mean_se(diffs),
                "families": sorted({f for _, f, _ in values}),
                "beyond": sum(b for _, _, b in values),
                "verdict": verdict(diffs),
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]], commands: list[str]) -> str:
    lines = [
        "# Every dendritic arm against the envelope of plain alternatives",
        "",
        *[f"- `{c}`" for c in commands],
        "",
        "Paired gap (points; R² × 100 for regression) of each dendritic arm to the best plain family at its "
        "parameter count, per seed (width frontier, restart frontier, patient frontier where run); mean ± SE "
        f"over the seeds of the group. `wins`: above {WIN_SE:g} SE. A configuration wins only if it wins on "
        "seeds 0-4 and on fresh seeds 5-9.",
        "",
        "| benchmark | arm | seeds | n | gap to envelope | envelope from | verdict |",
        "|---|---|---|---:|---:|---|---|",
    ]
    for r in rows:
        mean, se = r["gap"]
        families = ", ".join(r["families"]) + (f" ({r['beyond']} beyond range)" if r["beyond"] else "")
        lines.append(
            f"| {r['benchmark']} | {r['arm']} | {r['seeds']} | {r['n']} | {100 * mean:+.2f} ± {100 * se:.2f} | "
            f"{families} | {r['verdict']} |"
        )
    survivors = {(r["benchmark"], r["arm"]) for r in rows if r["verdict"] == "wins" and r["seeds"] == "0-4"}
    fresh = {(r["benchmark"], r["arm"]): r["verdict"] for r in rows if r["seeds"] == "5-9"}
    lines += ["", "Wins on seeds 0-4, and what fresh seeds say:"]
    if not survivors:
        lines.append("- none")
    for bench, arm in sorted(survivors):
        lines.append(f"- {bench}, `{arm}`: fresh seeds 5-9: {fresh.get((bench, arm), 'not run')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", nargs="+", type=Path, required=True, help="research.py results.json files")
    parser.add_argument("--out", type=Path, default=None, help="write claims.json and claims.md here")
    args = parser.parse_args(argv)
    rows = judge(pooled(args.results))
    command = "python benchmarks/claims.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(rows, [command])
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "claims.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
        (args.out / "claims.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
