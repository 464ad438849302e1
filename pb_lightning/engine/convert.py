"""Turning an ordinary model into a perforated one, and finding its perforated layers."""

from __future__ import annotations

import fnmatch
import importlib
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch.fx
from torch import nn

from pb_lightning.attention import prepare_attention, weight_reading_parents
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

#: What ``output_selectors`` accept: the index (tuple or list output) or key (mapping output) of
#: the output that holds the neurons.
OutputKey = Union[int, str]

#: Recurrent layers: their output is ``(output, h_n)`` / ``(output, (h_n, c_n))``; the neurons are
#: the features (last axis) of ``output``.
RECURRENT_TYPES: tuple[type[nn.Module], ...] = (nn.RNNBase,)

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
    ``weights_only=True``, so :class:`~pb_lightning.module.PerforatedModule` stores this instead.
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


def _resolve_keys(mapping: Mapping[Any, Any] | None, argument: str) -> dict[Any, Any]:
    """A ``{module type or name glob: value}`` mapping whose ``"type:pkg.Class"`` keys are resolved."""
    return {
        _resolve_type(k, argument) if isinstance(k, str) and k.startswith(TYPE_PREFIX) else k: v
        for k, v in (mapping or {}).items()
    }


def _as_list(selectors: Selectors | None, argument: str) -> list[Selector]:
    if selectors is None:
        return []
    items = list(selectors) if isinstance(selectors, (list, tuple)) else [selectors]
    items = [_resolve_type(i, argument) if isinstance(i, str) and i.startswith(TYPE_PREFIX) else i for i in items]
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
    if isinstance(module, RECURRENT_TYPES):
        check_custom_module(module, name)
        features = module.proj_size or module.hidden_size  # type: ignore[attr-defined]
        return -1, features * (2 if module.bidirectional else 1)  # type: ignore[attr-defined]
    raise PerforationError(
        f"Module `{name}` ({type(module).__name__}) matched `include`, but pb_lightning does not know "
        f"which axis of its output indexes neurons. Name it: perforate(..., neuron_axes={{"
        f"{type(module).__name__}: -1}}) for a [batch, ..., features] output."
    )


def _output_key(
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


def _norm_after(parent: nn.Module, child_name: str, traced: dict[int, dict[str, str]]) -> str | None:
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


def perforate(
    model: nn.Module,
    *,
    include: Selectors | None = None,
    exclude: Selectors | None = None,
    config: DendriteConfig | None = None,
    neuron_axes: Mapping[type[nn.Module] | str, int] | None = None,
    with_norm: bool | Mapping[str, str] = False,
    output_selectors: Mapping[type[nn.Module] | str, OutputKey] | None = None,
) -> nn.Module:
    """Convert ``model`` in place so that the selected modules' neurons can grow dendrites.

    Each selected module is replaced by a :class:`~pb_lightning.layer.PerforatedLayer` that wraps
    it. Until dendrites are accepted the layer computes exactly what the module did, at the cost
    of one extra Python call.

    Attention blocks are converted first where their projections are selected (see
    :mod:`pb_lightning.attention`): ``nn.MultiheadAttention`` gets ``q_proj``/``k_proj``/``v_proj``
    ``nn.Linear`` children that it calls (with ``out_proj``), and ``nn.TransformerEncoderLayer``
    loses its fast path, so their dendrites run in every mode. Children of modules that read their
    weights instead of calling them (an attention block left unconverted) are never wrapped: by
    default they are skipped, and naming them in ``include`` is an error.

    Args:
        model: the model to convert. Its root cannot itself be a module to wrap (wrap the model in
            a container, e.g. ``nn.Sequential(layer)``).
        include: which modules to perforate: module types, globs over qualified names
            (``"encoder.*"``), or filters ``filter(module, name) -> bool``; a module is selected if
            any of them matches. Default: every ``nn.Linear`` and ``nn.Conv1d/2d/3d``, attention
            projections included. A selected module is wrapped whole; modules inside it are not
            visited. A type may also be given as a string, ``"type:torch.nn.Linear"`` (for
            configuration files and checkpoints). Recurrent layers (``nn.LSTM``, ``nn.GRU``,
            ``nn.RNN``) are perforated only when included; their dendrites are fresh copies of the
            layer, added to its per-step output.
        exclude: modules never to perforate, in the same forms (it wins over ``include``).
        config: the engine configuration (default :class:`DendriteConfig()`). Each layer gets
            ``config.for_layer(name)``: the shared fields with the ``overrides`` whose globs match
            its qualified name.
        neuron_axes: for modules other than Linear, Conv and recurrent layers, the axis of their
            output that indexes neurons, keyed by module type or name glob (e.g. ``{MyMixer: -1}``).
            Such a module's dendrites are fresh copies of it, run together with ``torch.func.vmap``
            (one after another where vmap cannot batch the module).
        with_norm: wrap a module together with the normalisation layer that follows it, so that
            dendrites are added after the norm. ``True`` pairs a module with a norm layer directly
            after it in the same ``nn.Sequential``, and a module held as an attribute with the
            norm its parent's ``forward`` applies directly (and only) to its output, as in a
            ResNet block's ``self.bn1(self.conv1(x))`` — found by tracing that ``forward`` with
            ``torch.fx``; a forward that cannot be traced gets no pairs. A mapping
            ``{"conv1": "bn1"}`` names pairs by qualified name. The norm's old place becomes an
            ``nn.Identity``. ``True`` that pairs nothing warns.
        output_selectors: for modules whose output is a tuple (or dict), which entry holds the
            neurons, keyed by module type or name glob: ``{MyBlock: 0}``. Dendrites are added to
            that entry; the others pass through unchanged. Recurrent layers default to ``0``
            (``output``, not ``h_n``): a model that reads ``h_n`` would not see the dendrites; read
            ``output[:, -1]`` instead, or, for a GRU, select ``1``.

    Returns:
        ``model`` itself, converted.

    Raises:
        PerforationError: if nothing new matched, the root itself matched, a selected module
            cannot carry dendrites, or ``include`` names a module whose parent reads its weights.

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
    for argument, value in (("neuron_axes", neuron_axes), ("output_selectors", output_selectors)):
        if value is not None and not isinstance(value, Mapping):
            raise invalid(argument, value, "a mapping {module type or name glob: value}")
    axes: dict[type[nn.Module] | str, int] = _resolve_keys(neuron_axes, "neuron_axes")
    outputs: dict[type[nn.Module] | str, OutputKey] = _resolve_keys(output_selectors, "output_selectors")
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

    def selected(module: nn.Module, name: str) -> bool:
        return (
            not isinstance(module, PerforatedLayer) and _matches(module, name, inc) and not _matches(module, name, exc)
        )

    converted = prepare_attention(model, selected, lambda module, name: _matches(module, name, exc))
    modules = dict(model.named_modules())
    norm_pairs = dict(with_norm) if isinstance(with_norm, Mapping) else {}
    for target, norm_name in norm_pairs.items():
        for n in (target, norm_name):
            if n not in modules:
                raise invalid("with_norm", n, "qualified names of modules in the model")
        if not isinstance(modules[norm_name], NORM_TYPES):
            raise invalid(f"with_norm[{target!r}]", norm_name, "the name of a normalisation layer")

    already = [m for m in model.modules() if isinstance(m, PerforatedLayer)]
    readers = weight_reading_parents(model)
    # Plan every replacement first and change the model only once all of them are known to be
    # valid, so a refused layer never leaves the model half converted.
    replacements: list[tuple[nn.Module, str, nn.Module]] = []
    wrapped: list[str] = []
    paired: list[str] = []
    paired_norms: set[str] = set()
    traced: dict[int, dict[str, str]] = {}
    skipped: dict[str, str] = {}

    def visit(parent: nn.Module, prefix: str, read_by: str | None) -> None:
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}{child_name}"
            if isinstance(child, PerforatedLayer):
                continue  # never wrap twice
            reader = read_by or (f"`{prefix[:-1]}`: {readers[id(parent)]}" if id(parent) in readers else None)
            if _matches(child, name, inc) and not _matches(child, name, exc):
                if reader is not None:
                    if include is not None:
                        raise PerforationError(
                            f"Module `{name}` matched `include`, but its parent {reader}: its dendrites would "
                            "never run. Exclude it, or use torch's own nn.MultiheadAttention / "
                            "nn.TransformerEncoderLayer (perforate() converts those so that they call their "
                            "projections)."
                        )
                    skipped[name] = f"its parent {reader}"
                    continue
                axis, neurons = _neuron_axis(child, name, axes)
                norm = None
                norm_name = norm_pairs.get(name) or (
                    _norm_after(parent, child_name, traced) if with_norm is True else None
                )
                if norm_name is not None:
                    full = norm_name if name in norm_pairs else f"{prefix}{norm_name}"
                    norm = modules[full]
                    holder_name, _, attr = full.rpartition(".")
                    holder = model.get_submodule(holder_name) if holder_name else model
                    replacements.append((holder, attr, nn.Identity()))
                    paired.append(f"{name} + {full}")
                    paired_norms.add(full)
                layer = PerforatedLayer(
                    child,
                    config=config.for_layer(name),
                    neuron_axis=axis,
                    num_neurons=neurons,
                    norm=norm,
                    name=name,
                    output_key=_output_key(child, name, outputs),
                )
                replacements.append((parent, child_name, layer))
                wrapped.append(name)
            else:
                if _matches(child, name, exc) and _matches(child, name, inc):
                    skipped[name] = "matched `exclude`"
                visit(child, f"{name}.", reader)

    visit(model, "", None)
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
    _record(model, wrapped, skipped, paired_norms, converted)
    log.info("Perforated %d modules: %s", len(wrapped), ", ".join(wrapped))
    if paired:
        log.info("Wrapped together with their norms: %s", ", ".join(paired))
    elif with_norm is True:
        warnings.warn(
            "pb_lightning: perforate(with_norm=True) found no normalisation layer to pair: a norm is paired only "
            "when it directly follows a perforated module in an nn.Sequential, or when the parent's forward "
            "applies it directly and only to that module's output (traced with torch.fx). Name the pairs "
            "instead, e.g. with_norm={'conv1': 'bn1'}, or leave with_norm=False.",
            stacklevel=2,
        )
    return model


_RECORD = "_pb_conversion"


def _skip_reason(module: nn.Module) -> str | None:
    """Why a module with parameters of its own that ``include`` did not select was left alone."""
    if isinstance(module, NORM_TYPES):
        return "normalisation layer (kept as is; `with_norm` adds dendrites after it instead of before)"
    if isinstance(module, nn.Embedding):
        return "embedding (a lookup table: no neurons to grow dendrites on)"
    if isinstance(module, RECURRENT_TYPES):
        return (
            f"recurrent layer (not perforated by default; include=[nn.{type(module).__name__}] grows dendrites on "
            "its per-step output)"
        )
    return None


def _record(
    model: nn.Module, wrapped: list[str], skipped: dict[str, str], paired: set[str], converted: list[str]
) -> None:
    """Remember what ``perforate()`` did, for :func:`perforation_summary` (not part of the state)."""
    inside = {id(m) for layer in perforated_layers(model) for m in layer.modules()}
    for name, module in model.named_modules():
        if name in skipped or id(module) in inside or not any(True for _ in module.parameters(recurse=False)):
            continue
        reason = _skip_reason(module)
        if reason is not None:
            skipped[name] = reason
    record = model.__dict__.setdefault(_RECORD, {"skipped": {}, "paired": [], "converted": []})
    record["skipped"].update(skipped)
    for name in wrapped:
        record["skipped"].pop(name, None)
    record["paired"] += sorted(paired)
    record["converted"] += converted


def perforation_summary(model: nn.Module) -> str:
    """What was perforated in ``model`` and what was skipped, and why: a multi-line text.

    Shown at fit start by :class:`~pb_lightning.callback.PerforatedCallback` (like Lightning's
    model summary), so that a layer left without dendrites is visible before training, not after.
    """
    records = [(prefix, m.__dict__[_RECORD]) for prefix, m in model.named_modules() if _RECORD in m.__dict__]
    lines = []
    layers = perforated_layers(model)
    names = {id(layer): name for name, layer in model.named_modules()}
    lines.append(f"pb_lightning: {len(layers)} perforated modules")
    for layer in layers:
        kind = type(layer.module).__name__
        extra = f" + {type(layer.norm).__name__}" if layer.norm is not None else ""
        output = f", dendrites added to output[{layer.output_key!r}]" if layer.output_key is not None else ""
        lines.append(
            f"  {names[id(layer)]:<40} {kind}{extra}: {layer.num_neurons} neurons, {layer.num_dendrites} dendrite "
            f"sets{output}"
        )
    converted = [f"{p}.{n}" if p and n else p or n for p, r in records for n in r["converted"]]
    if converted:
        lines.append(f"  converted to call their projections as modules: {', '.join(converted)}")
    skipped = [(f"{p}.{n}" if p else n, why) for p, r in records for n, why in r["skipped"].items()]
    if skipped:
        lines.append(f"skipped ({len(skipped)}):")
        lines.extend(f"  {name:<40} {why}" for name, why in skipped)
    return "\n".join(lines)


def perforated_layers(model: nn.Module) -> list[PerforatedLayer]:
    """The perforated layers of ``model`` in a stable order (the order of ``model.modules()``).

    Each layer reports ``name``, ``num_neurons``, ``num_dendrites`` and ``num_candidates``.
    """
    return [m for m in model.modules() if isinstance(m, PerforatedLayer)]
