"""Every Python example in the README runs, so the documentation cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

_README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCKS = re.findall(r"```python\n(.*?)```", _README.read_text(), flags=re.DOTALL)


def test_the_readme_has_examples() -> None:
    assert _BLOCKS


@pytest.mark.slow  # README runs: each example trains a model
@pytest.mark.parametrize("index", range(len(_BLOCKS)))
def test_readme_example_runs(index: int) -> None:
    exec(compile(_BLOCKS[index], f"README.md example {index}", "exec"), {"__name__": "__readme__"})
