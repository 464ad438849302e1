"""Old module paths (before the engine/cycle/lightning layout), kept working for one release.

``pb_lightning.callback``, ``pb_lightning.schedule`` and the other flat modules moved into layer
folders. Users reach the old paths in more places than their own imports: LightningCLI YAML files
(``class_path: pb_lightning.callback.PerforatedCallback``) and pickled class paths in saved
objects. A meta-path finder maps each old path to its new module and emits one
:class:`DeprecationWarning` per old path (after the first import it is served from
``sys.modules``).

An old module that moved whole is the new module object itself, so classes and ``isinstance``
checks are identical. An old module that was split (``layer``, ``banks``, ``convert``, ``phases``,
``schedule``) becomes a small module that looks each name up in the new modules it was split into.
See CHANGELOG.md for the table of moves.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Sequence
from typing import Any

#: Old module (under ``pb_lightning.``) → the new modules that hold its names, in lookup order.
#: A dotted old name (``cycle.capacity``) is a module that moved out of a layer folder.
MOVED: dict[str, tuple[str, ...]] = {
    "attention": ("engine.attention",),
    "banks": ("engine.banks", "engine.sparse_banks"),
    "callback": ("lightning.callback",),
    "capacity": ("diagnostics.capacity",),
    "cli": ("lightning.cli",),
    "config": ("engine.config",),
    "controller": ("cycle.controller",),
    "controls": ("engine.controls",),
    "cycle.capacity": ("diagnostics.capacity",),
    "convert": ("engine.convert", "engine.selectors"),
    "correlation": ("engine.correlation",),
    "demo": ("demos.digits",),
    "history": ("reporting.history",),
    "inference": ("engine.inference",),
    "layer": ("engine.layer", "engine.candidates", "engine.cascade", "engine.outputs"),
    "module": ("lightning.module",),
    "optimizer_state": ("engine.optimizer_state",),
    "phases": ("engine.transitions", "engine.params", "engine.state"),
    "plot": ("reporting.plot",),
    "recorder": ("lightning.recorder",),
    "report": ("engine.params",),
    "schedule": ("cycle.schedule", "cycle.machine"),
    "scores": ("cycle.scores",),
    "tracker": ("loops.tracker",),
}

_PACKAGE = "pb_lightning"


def new_paths(old: str) -> list[str]:
    """The full new module paths for an old short name, e.g. ``"callback"``."""
    return [f"{_PACKAGE}.{new}" for new in MOVED[old]]


class _SplitModule(types.ModuleType):
    """Stands in for an old module whose names now live in several new modules."""

    def __init__(self, name: str, targets: Sequence[types.ModuleType]) -> None:
        super().__init__(name, f"Moved: see {', '.join(t.__name__ for t in targets)}.")
        self._targets = tuple(targets)

    def __getattr__(self, name: str) -> Any:
        for target in self._targets:
            if hasattr(target, name):
                return getattr(target, name)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")

    def __dir__(self) -> list[str]:
        return sorted({n for t in self._targets for n in dir(t)})


class _AliasLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        old = spec.name.removeprefix(_PACKAGE + ".")
        paths = new_paths(old)
        warnings.warn(
            f"`{spec.name}` moved to `{'`, `'.join(paths)}`; the old path will be removed in the next release.",
            DeprecationWarning,
            stacklevel=2,
        )
        targets = [importlib.import_module(p) for p in paths]
        return targets[0] if len(targets) == 1 else _SplitModule(spec.name, targets)

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the module is an existing one (or a lookup over existing ones)."""


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(_PACKAGE + ".") or fullname.removeprefix(_PACKAGE + ".") not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader())


_FINDER = _AliasFinder()


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
