"""The package layout: engine → cycle → lightning, old paths aliased, every subpackage packaged."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import setuptools

import pb_lightning
from pb_lightning import _moved

_REPO = Path(__file__).resolve().parents[1]
_PACKAGE = _REPO / "pb_lightning"


def _modules(subpackage: str) -> list[str]:
    root = _PACKAGE / subpackage
    return sorted(
        "pb_lightning." + ".".join(p.relative_to(_PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        for p in root.rglob("*.py")
    )


def test_the_engine_and_cycle_import_without_lightning() -> None:
    # A fresh interpreter: this test process has long imported Lightning.
    names = [
        "pb_lightning",
        *(m for layer in ("engine", "cycle", "diagnostics", "loops", "reporting") for m in _modules(layer)),
    ]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=_REPO)
    assert out.stdout.strip() == "[]", out.stdout


def test_engine_and_cycle_never_import_the_lightning_layer() -> None:
    # The one-way dependency engine → cycle → diagnostics → lightning/loops, checked on the source text.
    front_ends = ("pb_lightning.lightning", "pb_lightning.loops", "lightning")
    for layer, forbidden in (
        ("engine", ("pb_lightning.cycle", "pb_lightning.diagnostics", *front_ends)),
        ("cycle", ("pb_lightning.diagnostics", *front_ends)),
        ("diagnostics", front_ends),
    ):
        for path in (_PACKAGE / layer).rglob("*.py"):
            for line in path.read_text().splitlines():
                stripped = line.strip()
                if stripped.startswith(("import ", "from ")):
                    module = stripped.split()[1]
                    assert not any(module == f or module.startswith(f + ".") for f in forbidden), (path, line)


def test_the_lightning_names_load_on_first_access() -> None:
    from pb_lightning.lightning.callback import PerforatedCallback
    from pb_lightning.lightning.module import PerforatedModule

    assert pb_lightning.PerforatedCallback is PerforatedCallback
    assert pb_lightning.PerforatedModule is PerforatedModule
    assert sorted(pb_lightning.__all__) == pb_lightning.__all__
    for name in pb_lightning.__all__:
        assert getattr(pb_lightning, name) is not None
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = pb_lightning.no_such_name


@pytest.mark.parametrize("old", sorted(_moved.MOVED))
def test_an_old_module_path_warns_and_gives_the_same_objects(old: str) -> None:
    full = f"pb_lightning.{old}"
    sys.modules.pop(full, None)
    with pytest.warns(DeprecationWarning, match=rf"`{full}` moved to `pb_lightning\."):
        alias = importlib.import_module(full)
    targets = [importlib.import_module(p) for p in _moved.new_paths(old)]
    if len(targets) == 1:
        assert alias is targets[0]
    for target in targets:
        for name, value in vars(target).items():
            if not name.startswith("__") and getattr(target, name) is value and _defined_in(value, target):
                assert getattr(alias, name) is value, (old, name)
    # Served from sys.modules from then on: warned once.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert importlib.import_module(full) is alias


def _defined_in(value: object, module: object) -> bool:
    return getattr(value, "__module__", None) == module.__name__  # type: ignore[attr-defined]


def test_old_class_paths_resolve_to_the_new_classes() -> None:
    # LightningCLI YAML files and pickles name classes by their old module path.
    from pb_lightning.cycle.schedule import PhaseSchedule
    from pb_lightning.demos.digits import DigitsMLP
    from pb_lightning.lightning.callback import PerforatedCallback

    for path, cls in (
        ("pb_lightning.callback.PerforatedCallback", PerforatedCallback),
        ("pb_lightning.schedule.PhaseSchedule", PhaseSchedule),
        ("pb_lightning.demo.DigitsMLP", DigitsMLP),
    ):
        module, _, name = path.rpartition(".")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            assert getattr(importlib.import_module(module), name) is cls


def test_no_module_is_over_400_lines() -> None:
    long = {
        str(p.relative_to(_REPO)): n for p in _PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long


@pytest.mark.parametrize(("front_end", "limit"), [("lightning/callback.py", 200), ("loops/tracker.py", 160)])
def test_the_front_ends_stay_thin_adapters_of_the_cycle_driver(front_end: str, limit: int) -> None:
    # The orchestration lives once, in cycle/driver.py; a front end that grows is repeating it.
    assert len((_PACKAGE / front_end).read_text().splitlines()) <= limit


def test_pyproject_finds_every_subpackage() -> None:
    found = set(setuptools.find_packages(str(_REPO), include=["pb_lightning*"]))
    on_disk = {".".join(p.parent.relative_to(_REPO).parts) for p in _PACKAGE.rglob("__init__.py")}
    assert found == on_disk
    assert {"pb_lightning.engine", "pb_lightning.cycle", "pb_lightning.lightning"} <= found
