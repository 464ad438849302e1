"""``benchmarks/README.md`` publishes the benchmarks' generated tables, not hand-copied numbers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import update_readme

from tests.helpers import run_benchmark


def test_readme_result_blocks_match_the_saved_results() -> None:
    """Every marked block equals its results.md (run `python benchmarks/update_readme.py` after a re-run)."""
    readme = update_readme.README.read_text()
    assert readme.count("<!-- results: ") >= 4  # engine speed, reference, accuracy, callback overhead
    assert update_readme.updated(readme) == readme
    run_benchmark("update_readme.py", "--check")


def test_blocks_are_replaced_with_demoted_results_and_check_sees_stale_ones(tmp_path: Path) -> None:
    (tmp_path / "results" / "x").mkdir(parents=True)
    (tmp_path / "results" / "x" / "results.md").write_text("# Title\n\n| a |\n|---|\n| 1 |\n\n## Part\n")
    readme = "intro\n<!-- results: results/x -->\nold numbers\n<!-- /results -->\noutro\n"
    new = update_readme.updated(readme, root=tmp_path)
    expected = "#### Title\n\n| a |\n|---|\n| 1 |\n\n##### Part\n"
    assert new == f"intro\n<!-- results: results/x -->\n{expected}<!-- /results -->\noutro\n"
    assert update_readme.updated(new, root=tmp_path) == new  # idempotent: a current README is left alone


def test_a_block_naming_missing_results_is_an_error(tmp_path: Path) -> None:
    readme = "<!-- results: results/none -->\n<!-- /results -->\n"
    with pytest.raises(FileNotFoundError, match="results/none"):
        update_readme.updated(readme, root=tmp_path)
