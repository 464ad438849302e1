"""What ``perforate`` wraps and how: the selectors a user writes, resolved against a model.

``perforate`` (:mod:`pb_lightning.engine.convert`) walks the model and decides, module by module;
this module answers each question it asks, as its public API:

- :func:`selector_list` and :func:`resolve_type_keys` turn the user's ``include``/``exclude``
  and ``{selector: value}`` arguments into checked selectors (``"type:pkg.Class"`` strings
  become the classes: :func:`type_selector` writes them);
- :func:`matches_any`: is a module selected;
- :func:`neuron_axis_of` and :func:`output_key_of`: where a selected module's neurons are;
- :func:`norm_after`: which norm layer its parent applies directly to its output (``with_norm``).
"""

from __future__ import annotations

import fnmatch
import importlib
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch.fx
from torch import nn

from pb_lightning.engine.banks import check_custom_module
from pb_lightning.errors import PerforationError, invalid

log = logging.getLogger(__name__)

#: What ``include``/``exclude`` accept: a module type, a glob over qualified names, or a filter.
Selector = Union[type[nn.Module], str, Callable[[nn.Module, str], bool]]
Selectors = Union[Selector, Sequence[Selector]]


#: Modules perforated when ``include`` is not given, with their neuron axis.
DEFAULT_NEURON_AXES: dict[type[nn.Module], int] = {
    nn.Linear: -1,
    nn.Conv1d: 1,
    nn.Conv2d: 1,
    nn.Conv3d: 1,
}

#: What ``output_selectors`` accept: the index (tuple or list output) or key (mapping output) of
#: the output that holds the neurons.
OutputKey = Union[int, str]

#: Recurrent layers: their output is ``(output, h_n)`` / ``(output, (h_n, c_n))``; the neurons are
#: the features (last axis) of ``output``.
RECURRENT_TYPES: tuple[type[nn.RNNBase], ...] = (nn.RNNBase,)

#: Normalisation layers that may be wrapped together with the module before them.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.GroupNorm,
)


#: How a module type is written as a string selector: ``"type:torch.nn.Linear"``.
TYPE_PREFIX = "type:"


def type_selector(cls: type[nn.Module]) -> str | None:
    """``cls`` as a string selector that :func:`perforate` resolves back to it (None if it cannot be).

    Checkpoints store hyperparameters as plain data: a class in them fails to load with
    ``weights_only=True``, so :class:`~pb_lightning.lightning.module.PerforatedModule` stores this instead.
    """
    name = f"{TYPE_PREFIX}{cls.__module__}.{cls.__qualname__}"
    try:
        return name if _resolve_type(name, "include") is cls else None
    except PerforationError:
        return None  # a class defined inside a function, or in a module that cannot be imported


def _resolve_type(selector: str, argument: str) -> type[nn.Module]:
    """The module type named by ``"type:package.module.Class"``."""
    path = selector[len(TYPE_PREFIX) :]
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):  # the longest importable module prefix
        try:
            found: object = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attribute in parts[split:]:
                found = getattr(found, attribute)
        except AttributeError:
            break
        if isinstance(found, type) and issubclass(found, nn.Module):
            return found
        break
    raise invalid(argument, selector, "'type:' followed by the importable name of an nn.Module class")


def resolve_type_keys(mapping: Mapping[Any, Any] | None, argument: str) -> dict[Any, Any]:
    """A ``{module type or name glob: value}`` mapping whose ``"type:pkg.Class"`` keys are resolved."""
    return {
        _resolve_type(k, argument) if isinstance(k, str) and k.startswith(TYPE_PREFIX) else k: v
        for k, v in (mapping or {}).items()
    }


def selector_list(selectors: Selectors | None, argument: str) -> list[Selector]:
    """``include``/``exclude`` as a checked list: one selector or many, ``"type:"`` strings resolved.

    Raises a :class:`PerforationError` naming ``argument`` for anything that is not a selector, so
    a typo fails at ``perforate`` rather than silently selecting nothing.
    """
    if selectors is None:
        return []
    items: list[Any] = list(selectors) if isinstance(selectors, (list, tuple)) else [selectors]
    items = [_resolve_type(i, argument) if isinstance(i, str) and i.startswith(TYPE_PREFIX) else i for i in items]
    for item in items:
        ok = isinstance(item, str) or callable(item)
        if isinstance(item, type) and not issubclass(item, nn.Module):
            ok = False
        if not ok:
            raise invalid(argument, item, "a module type, a glob over qualified names (str), or a filter(module, name)")
    return items


def matches_any(module: nn.Module, name: str, selectors: list[Selector]) -> bool:
    """Whether any selector of :func:`selector_list` picks ``module`` (qualified ``name``)."""
    for s in selectors:
        if isinstance(s, type):
            if isinstance(module, s):
                return True
        elif isinstance(s, str):
            if fnmatch.fnmatchcase(name, s):
                return True
        elif s(module, name):
            return True
    return False


def neuron_axis_of(
    module: nn.Module, name: str, neuron_axes: Mapping[type[nn.Module] | str, int]
) -> tuple[int, int | None]:
    """The neuron axis of ``module``'s output and, where known without running it, the neuron count."""
    for key, axis in neuron_axes.items():
        if (isinstance(key, str) and fnmatch.fnmatchcase(name, key)) or (
            isinstance(key, type) and isinstance(module, key)
        ):
            if not isinstance(axis, int) or isinstance(axis, bool):
                raise invalid(f"neuron_axes[{key!r}]", axis, "an int (the axis of the module's output)")
            check_custom_module(module, name)
            return axis, None
    if isinstance(module, nn.Linear):
        if isinstance(module.weight, nn.parameter.UninitializedParameter):
            raise PerforationError(
                f"Module `{name}` is a lazy module; run one batch through the model before perforate()."
            )
        return -1, module.out_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if isinstance(module.weight, nn.parameter.UninitializedParameter):
            raise PerforationError(
                f"Module `{name}` is a lazy module; run one batch through the model before perforate()."
            )
        return 1, module.out_channels
    if isinstance(module, RECURRENT_TYPES):
        check_custom_module(module, name)
        features = module.proj_size or module.hidden_size
        return -1, features * (2 if module.bidirectional else 1)
    raise PerforationError(
        f"Module `{name}` ({type(module).__name__}) matched `include`, but pb_lightning does not know "
        f"which axis of its output indexes neurons. Name it: perforate(..., neuron_axes={{"
        f"{type(module).__name__}: -1}}) for a [batch, ..., features] output."
    )


def output_key_of(
    module: nn.Module, name: str, selectors: Mapping[type[nn.Module] | str, OutputKey]
) -> OutputKey | None:
    """Which entry of ``module``'s output holds the neurons (``None``: the output is a tensor)."""
    for key, value in selectors.items():
        if (isinstance(key, str) and fnmatch.fnmatchcase(name, key)) or (
            isinstance(key, type) and isinstance(module, key)
        ):
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise invalid(
                    f"output_selectors[{key!r}]",
                    value,
                    "an int (index into a tuple output) or a str (key of a dict output)",
                )
            return value
    if isinstance(module, RECURRENT_TYPES):
        return 0  # (output, h_n): the per-step features
    return None


def norm_after(parent: nn.Module, child_name: str, traced: dict[int, dict[str, str]]) -> str | None:
    """The name of the normalisation layer that ``parent`` applies directly to ``child_name``'s output.

    In an ``nn.Sequential`` that is the next layer. Elsewhere (a ``BasicBlock`` with ``self.conv1``
    and ``self.bn1``) the order of attributes says nothing about the order of calls — a pre-norm
    block registers its norm after the layer it precedes — so ``parent.forward`` is traced
    (``traced`` caches it per parent, taken before any of its children is replaced).
    """
    if isinstance(parent, nn.Sequential):
        names = list(parent._modules)
        i = names.index(child_name)
        if i + 1 < len(names) and isinstance(parent._modules[names[i + 1]], NORM_TYPES):
            return names[i + 1]
        return None
    if id(parent) not in traced:
        traced[id(parent)] = _traced_norm_pairs(parent)
    return traced[id(parent)].get(child_name)


class _ChildrenTracer(torch.fx.Tracer):
    """Traces one module's own ``forward``: every submodule call is recorded, none is entered."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _traced_norm_pairs(parent: nn.Module) -> dict[str, str]:
    """``{child: norm}`` for each child whose output ``parent.forward`` only feeds to a norm child.

    A pair is taken only when the graph proves that wrapping the two together computes the same:
    the child and the norm are each called once, the norm's only input is the child's output, and
    nothing else reads that output. A forward that cannot be traced (data-dependent control
    flow) gives no pairs.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _ChildrenTracer().trace(parent)
    except Exception as error:  # any failure to trace means: no proof, no pairing
        log.debug("with_norm: cannot trace %s.forward (%r); no norms paired there", type(parent).__name__, error)
        return {}
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(node)
    pairs = {}
    for target, nodes in calls.items():
        users = list(nodes[0].users)
        if len(nodes) != 1 or len(users) != 1 or users[0].op != "call_module":
            continue
        norm_node = users[0]
        norm_name = str(norm_node.target)
        if (
            isinstance(parent._modules.get(norm_name), NORM_TYPES)
            and len(calls[norm_name]) == 1
            and norm_node.args == (nodes[0],)
            and not norm_node.kwargs
        ):
            pairs[target] = norm_name
    return pairs
