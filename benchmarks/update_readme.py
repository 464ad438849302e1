#!/usr/bin/env python
"""Copy the benchmarks' generated tables into ``benchmarks/README.md``.

    python benchmarks/update_readme.py           # rewrite the marked blocks of the README
    python benchmarks/update_readme.py --check   # exit 1 if a block differs from its results.md

Each benchmark script writes ``results.json`` and renders ``results.md`` from it. The README
embeds those renderings between markers::

    <!-- results: results/engine_speed -->
    ... (generated: do not edit) ...
    <!-- /results -->

so the published tables are the scripts' output, never hand-copied numbers; the test suite runs
``--check`` so that a README edited by hand, or a result re-run without updating the README, fails.
Headings of the embedded file are shifted to sit below the README section that holds them
(its top heading becomes level 4).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
README = _HERE / "README.md"
_BLOCK = re.compile(r"(<!-- results: (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.DOTALL)
_TOP_LEVEL = 4


def demote(markdown: str, top: int = _TOP_LEVEL) -> str:
    """Shift every heading so that the shallowest one is at level ``top``."""
    levels = [len(m.group(1)) for m in re.finditer(r"^(#+) ", markdown, re.MULTILINE)]
    if not levels:
        return markdown
    shift = top - min(levels)
    return re.sub(r"^(#+) ", lambda m: "#" * max(1, len(m.group(1)) + shift) + " ", markdown, flags=re.MULTILINE)


def updated(readme: str, root: Path = _HERE) -> str:
    """``readme`` with every marked block replaced by its (demoted) ``results.md``."""

    def block(match: re.Match[str]) -> str:
        source = root / match.group("path") / "results.md"
        if not source.is_file():
            raise FileNotFoundError(f"README block names {match.group('path')!r}, but {source} does not exist")
        body = demote(source.read_text().strip()) + "\n"
        return match.group(1) + body + match.group(4)

    return _BLOCK.sub(block, readme)


def main(argv: list[str] | None = None) -> int:
    """Rewrite the README's result blocks, or with ``--check`` report whether they are current."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the README is not up to date")
    args = parser.parse_args(argv)
    current = README.read_text()
    new = updated(current)
    if args.check:
        if new != current:
            print(f"{README} is out of date: run `python benchmarks/update_readme.py`", file=sys.stderr)
            return 1
        print(f"{README} is up to date ({len(_BLOCK.findall(current))} result blocks)")
        return 0
    README.write_text(new)
    print(f"updated {len(_BLOCK.findall(current))} result blocks in {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
