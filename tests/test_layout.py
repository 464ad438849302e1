"""The package layout: engine → cycle → lightning, old paths aliased, every subpackage packaged."""

from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest
import setuptools

import pb_lightning
from pb_lightning import _moved
from tests.helpers import run_python

_REPO = Path(__file__).resolve().parents[1]
_PACKAGE = _REPO / "pb_lightning"


def _modules(subpackage: str) -> list[str]:
    root = _PACKAGE / subpackage
    return sorted(
        "pb_lightning." + ".".join(p.relative_to(_PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        for p in root.rglob("*.py")
    )


@pytest.mark.slow  # a fresh interpreter
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
    out = run_python("-c", code, cwd=_REPO)
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


def private_imports(source: str, module: str) -> list[str]:
    """``"imported.module:_name"`` for every private name ``module``'s source imports from another module.

    A leading underscore says "internal to this module": importing it elsewhere couples two modules
    through a name neither documents as an interface. Importing a private *submodule* of a package
    (``from pb_lightning import _moved``) is the package using its own part, and is allowed.
    """
    package = module.rsplit(".", 1)[0] if not module.endswith("__init__") else module.removesuffix(".__init__")
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom):
            continue
        source_module = node.module or ""
        if node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            source_module = ".".join([*base, *([source_module] if source_module else [])])
        for alias in node.names:
            name = alias.name
            if not name.startswith("_") or name.startswith("__"):
                continue
            folder = _REPO.joinpath(*source_module.split("."))
            if (folder / f"{name}.py").is_file() or (folder / name / "__init__.py").is_file():
                continue  # a private submodule, not a private name
            found.append(f"{source_module}:{name}")
    return found


def test_private_imports_are_found() -> None:
    # The checker itself: a test that cannot fail proves nothing.
    code = (
        "from pb_lightning.engine.cascade import _hidden, dendrite_sets\n"
        "from .banks import _also_hidden\n"
        "from pb_lightning import _moved\n"
        "from __future__ import annotations\n"
    )
    assert private_imports(code, "pb_lightning.engine.layer") == [
        "pb_lightning.engine.cascade:_hidden",
        "pb_lightning.engine.banks:_also_hidden",
    ]


def test_no_module_imports_another_modules_private_names() -> None:
    # Each module's public names are its interface; a `_name` used by another module means the
    # two are one concept split in two, or an interface nobody named (see README, Layout).
    found: dict[str, set[str]] = {}
    for path in _PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(_REPO).with_suffix("").parts)
        names = private_imports(path.read_text(), module)
        if names:
            found[str(path.relative_to(_REPO))] = set(names)
    assert found == {}


@pytest.mark.parametrize(("front_end", "limit"), [("lightning/callback.py", 200), ("loops/tracker.py", 160)])
def test_the_front_ends_stay_thin_adapters_of_the_cycle_driver(front_end: str, limit: int) -> None:
    # The orchestration lives once, in cycle/driver.py; a front end that grows is repeating it.
    assert len((_PACKAGE / front_end).read_text().splitlines()) <= limit


def test_pyproject_finds_every_subpackage() -> None:
    found = set(setuptools.find_packages(str(_REPO), include=["pb_lightning*"]))
    on_disk = {".".join(p.parent.relative_to(_REPO).parts) for p in _PACKAGE.rglob("__init__.py")}
    assert found == on_disk
    assert {"pb_lightning.engine", "pb_lightning.cycle", "pb_lightning.lightning"} <= found
