"""Parameters by role: what the current phase trains, optimizer groups, and counts (docs/ALGORITHM.md §6)."""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from pb_lightning.engine.convert import perforated_layers

#: What a parameter is to the algorithm. The order is the order of the optimizer groups.
Role = Literal["network", "dendrite_output_weights", "dendrites", "candidates"]
ROLES: tuple[Role, ...] = ("network", "dendrite_output_weights", "dendrites", "candidates")


def parameter_roles(model: nn.Module) -> list[tuple[Role, nn.Parameter]]:
    """Every parameter of ``model`` (each once, in ``model.parameters()`` order) with its role.

    * ``"network"``: the original weights.
    * ``"dendrite_output_weights"``: the output weights ``w`` of accepted dendrites.
    * ``"dendrites"``: the other accepted-dendrite weights (fused bank, cascade).
    * ``"candidates"``: the transient candidate pool of a dendrite phase.

    The one place that decides roles, so that the optimizer groups and the parameter counts can
    never disagree about what is a dendrite.
    """
    layers = perforated_layers(model)
    output_ids = {id(layer.output_weight) for layer in layers if layer.output_weight is not None}
    candidate_ids = {id(p) for layer in layers if layer.candidates is not None for p in layer.candidates.parameters()}
    dendrite_ids = {id(p) for layer in layers for p in layer.dendrite_parameters()} - output_ids

    def role(p: nn.Parameter) -> Role:
        if id(p) in output_ids:
            return "dendrite_output_weights"
        if id(p) in candidate_ids:
            return "candidates"
        if id(p) in dendrite_ids:
            return "dendrites"
        return "network"

    return [(role(p), p) for p in model.parameters()]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the current phase trains (``requires_grad``), without duplicates."""
    return [p for p in model.parameters() if p.requires_grad]


def parameter_groups(
    model: nn.Module, *, weight_decay: float = 0.0, candidate_lr: float | None = None
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for the current phase, each named by its ``"name"`` key.

    * ``"network"``: the original weights (neuron phase).
    * ``"dendrite_output_weights"``: the ``w`` of accepted dendrites, always with weight decay 0
      — decay would hold freshly accepted dendrites at their initial ``w = 0`` (docs/ALGORITHM.md §9).
    * ``"dendrites"``: accepted dendrite weights, if configured to keep training.
    * ``"candidates"``: the candidate pool (dendrite phase), with ``lr=candidate_lr`` if given.

    Only trainable parameters appear, every one exactly once; empty groups are left out.

    Example::

        >>> import torch
        >>> from pb_lightning import perforate
        >>> net = perforate(torch.nn.Sequential(torch.nn.Linear(4, 2)))
        >>> opt = torch.optim.AdamW(parameter_groups(net, weight_decay=0.01), lr=1e-3)
        >>> [g["name"] for g in opt.param_groups]
        ['network']
    """
    groups: dict[Role, list[nn.Parameter]] = {name: [] for name in ROLES}
    for name, p in parameter_roles(model):
        if p.requires_grad:
            groups[name].append(p)
    options: dict[Role, dict[str, Any]] = {
        "network": {"weight_decay": weight_decay},
        "dendrite_output_weights": {"weight_decay": 0.0},
        "dendrites": {"weight_decay": weight_decay},
        "candidates": {"weight_decay": weight_decay} | ({} if candidate_lr is None else {"lr": candidate_lr}),
    }
    return [{"name": name, "params": params, **options[name]} for name, params in groups.items() if params]


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Count ``model``'s parameters: original, accepted dendrites, their total, and candidates.

    * ``"original"``: every parameter that is not part of a dendrite (the network as built).
    * ``"dendrites"``: accepted dendrites — their fused weights, cascade weights and output
      weights ``w``. Only real weights count: the cascade stores exactly one weight per earlier
      dendrite of each neuron.
    * ``"total"``: ``original + dendrites``, the size of the model you deploy.
    * ``"candidates"``: the transient candidate pool of a dendrite phase (not in ``total``).

    Example::

        >>> import torch
        >>> from pb_lightning import perforate
        >>> parameter_counts(perforate(torch.nn.Sequential(torch.nn.Linear(4, 2))))
        {'original': 10, 'dendrites': 0, 'total': 10, 'candidates': 0}
    """
    counts = dict.fromkeys(ROLES, 0)
    for name, p in parameter_roles(model):
        counts[name] += p.numel()
    original = counts["network"]
    dendrites = counts["dendrites"] + counts["dendrite_output_weights"]
    candidates = counts["candidates"]
    return {"original": original, "dendrites": dendrites, "total": original + dendrites, "candidates": candidates}
