"""Turning an ordinary model into a perforated one, and finding its perforated layers."""

from __future__ import annotations

import fnmatch
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from pb_lightning.engine.attention import prepare_attention, weight_reading_parents
from pb_lightning.engine.config import DendriteConfig
from pb_lightning.engine.layer import PerforatedLayer
from pb_lightning.engine.plain_keys import hook_plain_norm_keys
from pb_lightning.engine.selectors import (
    DEFAULT_NEURON_AXES,
    NORM_TYPES,
    RECURRENT_TYPES,
    OutputKey,
    Selectors,
    matches_any,
    neuron_axis_of,
    norm_after,
    output_key_of,
    resolve_type_keys,
    selector_list,
)
from pb_lightning.errors import PerforationError, invalid

log = logging.getLogger(__name__)


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

    Each selected module is replaced by a :class:`~pb_lightning.engine.layer.PerforatedLayer` that wraps
    it. Until dendrites are accepted the layer computes exactly what the module did, at the cost
    of one extra Python call.

    Attention blocks are converted first where their projections are selected (see
    :mod:`pb_lightning.engine.attention`): ``nn.MultiheadAttention`` gets ``q_proj``/``k_proj``/``v_proj``
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
            neurons, keyed by module type or name glob: ``{MyBlock: 0}`` (a str also names the field
            of a named tuple or dataclass output). Dendrites are added to
            that entry; the others pass through unchanged. Recurrent layers default to ``0``
            (``output``, not ``h_n``): a model that reads ``h_n`` would not see the dendrites; read
            ``output[:, -1]`` instead, or, for a GRU, select ``1``.

    Returns:
        ``model`` itself, converted.

    Raises:
        PerforationError: if nothing new matched, the root itself matched, a selected module
            cannot carry dendrites, ``include`` names a module whose parent reads its weights, or a
            module to wrap (or its norm) is registered under two names (shared by two parents).

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
    axes: dict[type[nn.Module] | str, int] = resolve_type_keys(neuron_axes, "neuron_axes")
    outputs: dict[type[nn.Module] | str, OutputKey] = resolve_type_keys(output_selectors, "output_selectors")
    inc = selector_list(include, "include") or list(DEFAULT_NEURON_AXES)
    inc += [k for k in axes if k not in inc]
    exc = selector_list(exclude, "exclude")
    if not isinstance(with_norm, (bool, Mapping)):
        raise invalid("with_norm", with_norm, "a bool or a mapping {module name: norm name}")
    if isinstance(model, PerforatedLayer) or (matches_any(model, "", inc) and not matches_any(model, "", exc)):
        raise PerforationError(
            f"The model itself ({type(model).__name__}) is a module to perforate, and perforate() "
            "converts in place by replacing children. Wrap it in a container first, e.g. "
            "perforate(torch.nn.Sequential(model))."
        )

    def selected(module: nn.Module, name: str) -> bool:
        return (
            not isinstance(module, PerforatedLayer)
            and matches_any(module, name, inc)
            and not matches_any(module, name, exc)
        )

    converted = prepare_attention(model, selected, lambda module, name: matches_any(module, name, exc))
    modules = dict(model.named_modules())
    norm_pairs = _check_norm_pairs(with_norm, modules)
    aliases = _aliases(model)
    already = [m for m in model.modules() if isinstance(m, PerforatedLayer)]
    readers = weight_reading_parents(model)
    # Plan every replacement first and change the model only once all of them are known to be
    # valid, so a refused layer never leaves the model half converted.
    plan = _Plan()
    traced: dict[int, dict[str, str]] = {}

    def visit(parent: nn.Module, prefix: str, read_by: str | None, shared: tuple[str, str] | None) -> None:
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}{child_name}"
            if isinstance(child, PerforatedLayer):
                continue  # never wrap twice
            reader = read_by or (f"`{prefix[:-1]}`: {readers[id(parent)]}" if id(parent) in readers else None)
            here = shared or _second_name(name, aliases.get(id(child), []))
            if matches_any(child, name, inc) and not matches_any(child, name, exc):
                if reader is not None:
                    if include is not None:
                        raise PerforationError(
                            f"Module `{name}` matched `include`, but its parent {reader}: its dendrites would "
                            "never run. Exclude it, or use torch's own nn.MultiheadAttention / "
                            "nn.TransformerEncoderLayer (perforate() converts those so that they call their "
                            "projections)."
                        )
                    plan.skipped[name] = f"its parent {reader}"
                    continue
                _refuse_shared(name, here)
                norm_name = _resolve_norm(parent, prefix, child_name, norm_pairs, with_norm, traced)
                norm = None
                if norm_name is not None:
                    _refuse_shared(norm_name, _second_name(norm_name, aliases.get(id(modules[norm_name]), [])))
                    norm = modules[norm_name]
                    holder_name, _, attr = norm_name.rpartition(".")
                    holder = model.get_submodule(holder_name) if holder_name else model
                    plan.replacements.append((holder, attr, nn.Identity()))
                    plan.paired.append(f"{name} + {norm_name}")
                    plan.paired_norms.add(norm_name)
                layer = _wrap_child(child, name, config, axes, outputs, norm)
                plan.replacements.append((parent, child_name, layer))
                plan.wrapped.append(name)
            else:
                if matches_any(child, name, exc) and matches_any(child, name, inc):
                    plan.skipped[name] = "matched `exclude`"
                visit(child, f"{name}.", reader, here)

    visit(model, "", None, None)
    wrapped, paired = plan.wrapped, plan.paired
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
    for holder, attr, replacement in plan.replacements:
        setattr(holder, attr, replacement)
    for pair in plan.paired:
        hook_plain_norm_keys(model, *pair.split(" + "))
    _record(model, wrapped, plan.skipped, plan.paired_norms, converted)
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


@dataclass
class _Plan:
    """Every change ``perforate()`` will make, collected before the model is touched."""

    replacements: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)
    wrapped: list[str] = field(default_factory=list)
    paired: list[str] = field(default_factory=list)
    paired_norms: set[str] = field(default_factory=set)
    skipped: dict[str, str] = field(default_factory=dict)


def _check_norm_pairs(with_norm: bool | Mapping[str, str], modules: Mapping[str, nn.Module]) -> dict[str, str]:
    """The ``{module: norm}`` pairs named in ``with_norm`` (none for a bool), each checked.

    Both names must be modules of the model, the second a normalisation layer, and no norm may be
    paired twice: it moves into one wrapper, so a second one would not get it.
    """
    if not isinstance(with_norm, Mapping):
        return {}
    pairs = dict(with_norm)
    for target, norm_name in pairs.items():
        for n in (target, norm_name):
            if n not in modules:
                raise invalid("with_norm", n, "qualified names of modules in the model")
        if not isinstance(modules[norm_name], NORM_TYPES):
            raise invalid(f"with_norm[{target!r}]", norm_name, "the name of a normalisation layer")
    norms = list(pairs.values())
    twice = sorted({n for n in norms if norms.count(n) > 1})
    if twice:
        raise invalid("with_norm", pairs, f"a mapping that pairs each norm with one module ({', '.join(twice)} twice)")
    return pairs


def _resolve_norm(
    parent: nn.Module,
    prefix: str,
    child_name: str,
    norm_pairs: Mapping[str, str],
    with_norm: bool | Mapping[str, str],
    traced: dict[int, dict[str, str]],
) -> str | None:
    """The qualified name of the norm to wrap together with ``parent.child_name``, if any.

    A name from the ``with_norm`` mapping is already qualified; one found under ``with_norm=True``
    (the next layer of a Sequential, or the traced forward of the parent) is a sibling's name.
    """
    name = f"{prefix}{child_name}"
    if name in norm_pairs:
        return norm_pairs[name]
    if with_norm is True:
        sibling = norm_after(parent, child_name, traced)
        return None if sibling is None else f"{prefix}{sibling}"
    return None


def _wrap_child(
    child: nn.Module,
    name: str,
    config: DendriteConfig,
    axes: Mapping[type[nn.Module] | str, int],
    outputs: Mapping[type[nn.Module] | str, OutputKey],
    norm: nn.Module | None,
) -> PerforatedLayer:
    """The :class:`PerforatedLayer` that replaces ``child`` (named ``name``), with its layer config."""
    axis, neurons = neuron_axis_of(child, name, axes)
    return PerforatedLayer(
        child,
        config=config.for_layer(name),
        neuron_axis=axis,
        num_neurons=neurons,
        norm=norm,
        name=name,
        output_key=output_key_of(child, name, outputs),
    )


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every name under which each submodule is registered, by ``id``.

    ``named_modules()`` lists a module once however often it is registered, so a module held by
    two parents (or twice by one) looks like any other there; its direct registrations show it.
    """
    names: dict[int, list[str]] = {}
    for parent_name, parent in model.named_modules():
        for key, child in parent._modules.items():
            if child is not None:
                names.setdefault(id(child), []).append(f"{parent_name}.{key}" if parent_name else key)
    return names


def _second_name(name: str, registered: list[str]) -> tuple[str, str] | None:
    """``(name, another name of the same module)``, or ``None`` if it is registered only once."""
    others = [n for n in registered if n != name]
    return (name, others[0]) if others else None


def _refuse_shared(name: str, shared: tuple[str, str] | None) -> None:
    """Raise if the module ``name`` (or a container above it, ``shared[0]``) has a second name."""
    if shared is None:
        return
    first, second = shared
    other = second + name[len(first) :]
    via = "" if first == name else f" (through `{first}`, which is also `{second}`)"
    raise PerforationError(
        f"Module `{name}` is also reachable as `{other}`{via}: one module registered under two names. Wrapping "
        "it under one name would leave the other calling it without dendrites, and wrapping both would give it "
        "two sets. Give each place its own module (copy.deepcopy), or `exclude` it under every name."
    )


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

    Shown at fit start by :class:`~pb_lightning.lightning.callback.PerforatedCallback` (like Lightning's
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
        # A custom module's neurons are counted from its first output: before that, say so.
        count = layer.num_neurons
        neurons = "neurons counted at its first forward" if count is None else f"{count} neurons"
        lines.append(f"  {names[id(layer)]:<40} {kind}{extra}: {neurons}, {layer.num_dendrites} dendrite sets{output}")
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
