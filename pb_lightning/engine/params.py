"""Parameter counts split the way the compression use needs them (ALGORITHM.md §6)."""

from __future__ import annotations

from torch import nn

from pb_lightning.convert import perforated_layers


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
    layers = perforated_layers(model)
    dendrite_ids = {id(p) for layer in layers for p in layer.dendrite_parameters()}
    candidate_ids = {id(p) for layer in layers if layer.candidates is not None for p in layer.candidates.parameters()}
    original = dendrites = candidates = 0
    for p in model.parameters():
        if id(p) in dendrite_ids:
            dendrites += p.numel()
        elif id(p) in candidate_ids:
            candidates += p.numel()
        else:
            original += p.numel()
    return {"original": original, "dendrites": dendrites, "total": original + dendrites, "candidates": candidates}
