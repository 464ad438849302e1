"""Turning an ordinary model into a perforated one, and finding its perforated layers."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Union

from torch import nn

from pb_lightning.banks import check_custom_module
from pb_lightning.config import DendriteConfig
from pb_lightning.errors import PerforationError, invalid
from pb_lightning.layer import PerforatedLayer

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

#: Normalisation layers that may be wrapped together with the module before them.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.GroupNorm,
)


def _as_list(selectors: Selectors | None, argument: str) -> list[Selector]:
    if selectors is None:
        return []
    items = list(selectors) if isinstance(selectors, (list, tuple)) else [selectors]
    for item in items:
        ok = isinstance(item, str) or callable(item)
        if isinstance(item, type) and not issubclass(item, nn.Module):
            ok = False
        if not ok:
            raise invalid(argument, item, "a module type, a glob over qualified names (str), or a filter(module, name)")
    return items


def _matches(module: nn.Module, name: str, selectors: list[Selector]) -> bool:
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


def _neuron_axis(
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
    raise PerforationError(
        f"Module `{name}` ({type(module).__name__}) matched `include`, but pb_lightning does not know "
        f"which axis of its output indexes neurons. Name it: perforate(..., neuron_axes={{"
        f"{type(module).__name__}: -1}}) for a [batch, ..., features] output."
    )


def _norm_after(parent: nn.Module, child_name: str) -> str | None:
    """In an ``nn.Sequential``, the name of a normalisation layer directly after ``child_name``."""
    if not isinstance(parent, nn.Sequential):
        return None
    names = list(parent._modules)
    i = names.index(child_name)
    if i + 1 < len(names) and isinstance(parent._modules[names[i + 1]], NORM_TYPES):
        return names[i + 1]
    return None


def perforate(
    model: nn.Module,
    *,
    include: Selectors | None = None,
    exclude: Selectors | None = None,
    config: DendriteConfig | None = None,
    neuron_axes: Mapping[type[nn.Module] | str, int] | None = None,
    with_norm: bool | Mapping[str, str] = False,
) -> nn.Module:
    """Convert ``model`` in place so that the selected modules' neurons can grow dendrites.

    Each selected module is replaced by a :class:`~pb_lightning.layer.PerforatedLayer` that wraps
    it. Until dendrites are accepted the layer computes exactly what the module did, at the cost
    of one extra Python call.

    Args:
        model: the model to convert. Its root cannot itself be a module to wrap (wrap the model in
            a container, e.g. ``nn.Sequential(layer)``).
        include: which modules to perforate: module types, globs over qualified names
            (``"encoder.*"``), or filters ``filter(module, name) -> bool``; a module is selected if
            any of them matches. Default: every ``nn.Linear`` and ``nn.Conv1d/2d/3d``. A selected
            module is wrapped whole; modules inside it are not visited.
        exclude: modules never to perforate, in the same forms (it wins over ``include``).
        config: the engine configuration (default :class:`DendriteConfig()`). Each layer gets
            ``config.for_layer(name)``: the shared fields with the ``overrides`` whose globs match
            its qualified name.
        neuron_axes: for modules other than Linear and Conv, the axis of their output that indexes
            neurons, keyed by module type or name glob (e.g. ``{MyMixer: -1}``). Such a module's
            dendrites are fresh copies of it, run together with ``torch.func.vmap``.
        with_norm: wrap a module together with the normalisation layer that follows it, so that
            dendrites are added after the norm. ``True`` pairs a module with a norm layer directly
            after it in the same ``nn.Sequential``; a mapping ``{"conv1": "bn1"}`` names pairs by
            qualified name (for models that call their layers in ``forward``). The norm's old
            place becomes an ``nn.Identity``.

    Returns:
        ``model`` itself, converted.

    Raises:
        PerforationError: if nothing new matched, the root itself matched, or a selected module
            cannot carry dendrites.

    Example::

        >>> import torch
        >>> net = perforate(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)))
        >>> [(layer.name, layer.num_neurons, layer.num_dendrites) for layer in perforated_layers(net)]
        [('0', 8, 0), ('2', 2, 0)]
    """
    if not isinstance(model, nn.Module):
        raise invalid("model", type(model).__name__, "a torch.nn.Module")
    config = DendriteConfig() if config is None else config
    if not isinstance(config, DendriteConfig):
        raise invalid("config", config, "a pb_lightning.DendriteConfig")
    axes: dict[type[nn.Module] | str, int] = dict(neuron_axes or {})
    inc = _as_list(include, "include") or list(DEFAULT_NEURON_AXES)
    inc += [k for k in axes if k not in inc]
    exc = _as_list(exclude, "exclude")
    if not isinstance(with_norm, (bool, Mapping)):
        raise invalid("with_norm", with_norm, "a bool or a mapping {module name: norm name}")
    if isinstance(model, PerforatedLayer) or (_matches(model, "", inc) and not _matches(model, "", exc)):
        raise PerforationError(
            f"The model itself ({type(model).__name__}) is a module to perforate, and perforate() "
            "converts in place by replacing children. Wrap it in a container first, e.g. "
            "perforate(torch.nn.Sequential(model))."
        )
    modules = dict(model.named_modules())
    norm_pairs = dict(with_norm) if isinstance(with_norm, Mapping) else {}
    for target, norm_name in norm_pairs.items():
        for n in (target, norm_name):
            if n not in modules:
                raise invalid("with_norm", n, "qualified names of modules in the model")
        if not isinstance(modules[norm_name], NORM_TYPES):
            raise invalid(f"with_norm[{target!r}]", norm_name, "the name of a normalisation layer")

    already = [m for m in model.modules() if isinstance(m, PerforatedLayer)]
    # Plan every replacement first and change the model only once all of them are known to be
    # valid, so a refused layer never leaves the model half converted.
    replacements: list[tuple[nn.Module, str, nn.Module]] = []
    wrapped: list[str] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}{child_name}"
            if isinstance(child, PerforatedLayer):
                continue  # never wrap twice
            if isinstance(child, nn.MultiheadAttention) and include is None:
                # MultiheadAttention reads its projections' weights directly instead of calling
                # them: wrapped, they would carry dendrites that never run.
                continue
            if _matches(child, name, inc) and not _matches(child, name, exc):
                axis, neurons = _neuron_axis(child, name, axes)
                norm = None
                norm_name = norm_pairs.get(name) or (_norm_after(parent, child_name) if with_norm is True else None)
                if norm_name is not None:
                    full = norm_name if name in norm_pairs else f"{prefix}{norm_name}"
                    norm = modules[full]
                    holder_name, _, attr = full.rpartition(".")
                    holder = model.get_submodule(holder_name) if holder_name else model
                    replacements.append((holder, attr, nn.Identity()))
                layer = PerforatedLayer(
                    child, config=config.for_layer(name), neuron_axis=axis, num_neurons=neurons, norm=norm, name=name
                )
                replacements.append((parent, child_name, layer))
                wrapped.append(name)
            else:
                visit(child, f"{name}.")

    visit(model, "")
    if not wrapped:
        hint = (
            f" It already has {len(already)} perforated layers; perforate() does not wrap a module twice."
            if already
            else " By default pb_lightning wraps nn.Linear and nn.Conv1d/2d/3d; pass `include=` for other modules."
        )
        raise PerforationError(f"perforate() found no module to wrap in {type(model).__name__}.{hint}")
    unused = [p for p in config.overrides if not any(fnmatch.fnmatchcase(n, p) for n in wrapped)]
    if unused:
        raise invalid(
            "DendriteConfig.overrides",
            unused,
            "globs that each match a perforated layer; the layers are " + ", ".join(wrapped),
        )
    for holder, attr, replacement in replacements:
        setattr(holder, attr, replacement)
    log.info("Perforated %d modules: %s", len(wrapped), ", ".join(wrapped))
    return model


def perforated_layers(model: nn.Module) -> list[PerforatedLayer]:
    """The perforated layers of ``model`` in a stable order (the order of ``model.modules()``).

    Each layer reports ``name``, ``num_neurons``, ``num_dendrites`` and ``num_candidates``.
    """
    return [m for m in model.modules() if isinstance(m, PerforatedLayer)]
