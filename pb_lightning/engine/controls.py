"""Experimental controls: switches that exist only to measure what the dendrites themselves add.

A dendritic run differs from its baseline in two ways at once: it has dendrites, and it trains
under a schedule of warm restarts (each cycle rolls back to the best weights, rebuilds the
optimizer and retries when it does not improve). To separate the two, a benchmark runs
*controls* beside the real thing:

* :func:`make_dendrites_inert` — the **inert control**: the same cycles, the same dendrite
  phases (candidates are still trained and accepted, the network is still frozen for as long),
  the same rollbacks, but every accepted dendrite's output weight ``w`` is held at exactly 0 and
  never trained, so the dendrites cannot change the network's function. Whatever an inert run
  gains over the baseline is the schedule's doing, not the dendrites'.
* ``PhaseSchedule(restarts_only=True)`` (:mod:`pb_lightning.cycle.schedule`) — the plain network put
  through the restart schedule without any dendrite phase.

An inert model is useless in practice, so this switch is deliberately not a
:class:`~pb_lightning.DendriteConfig` field or a callback argument (a config file cannot turn it
on), it is not exported from the package's top level, it must be applied by name to an already
perforated model, it logs a warning, and the layers say ``INERT CONTROL`` in their ``repr``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pb_lightning.engine.convert import perforated_layers
from pb_lightning.engine.layer import PerforatedLayer
from pb_lightning.errors import PerforationError

log = logging.getLogger(__name__)


class InertPerforatedLayer(PerforatedLayer):
    """A :class:`PerforatedLayer` whose accepted dendrites are held at output weight 0 (a control).

    Everything else — candidates, correlation learning, acceptance, cascade, state dict layout —
    is the ordinary layer's. Only the neuron phase's trainability differs: where the ordinary
    layer makes ``w`` trainable, this one zeroes it and freezes it, so it is never in an optimizer
    built from the trainable parameters (and gets no gradient if an optimizer holds it anyway).
    The rule runs after every acceptance, after every return to the neuron phase and whenever a
    checkpoint or rollback rebuilds the accepted sets, so no path leaves a trainable ``w``.
    """

    def _set_neuron_phase_trainability(self) -> None:
        super()._set_neuron_phase_trainability()
        if self.output_weight is not None:
            with torch.no_grad():
                self.output_weight.zero_()
            self.output_weight.requires_grad_(False)

    def extra_repr(self) -> str:
        return "INERT CONTROL (dendrite output weights held at 0), " + super().extra_repr()


def make_dendrites_inert(model: nn.Module) -> nn.Module:
    """Turn ``model``'s perforated layers into inert controls, in place; returns ``model``.

    Call it right after :func:`pb_lightning.perforate` (or ``PerforatedTracker.initialize``), before
    any dendrite is accepted: the layers keep growing dendrites exactly as before, but those
    dendrites never affect the output (see the module docstring). For benchmarks only.

    Raises:
        PerforationError: if ``model`` has no perforated layers, or already has accepted dendrites
            (their trained output weights would be silently erased).
    """
    layers = perforated_layers(model)
    if not layers:
        raise PerforationError(
            f"make_dendrites_inert: {type(model).__name__} has no perforated layers; perforate it first."
        )
    grown = [layer.name for layer in layers if layer.num_dendrites > 0]
    if grown:
        raise PerforationError(
            f"make_dendrites_inert: layers {grown} already have accepted dendrites; apply the inert control "
            "to a freshly perforated model, before its first dendrite phase."
        )
    gradient = [layer.name for layer in layers if layer.config.learning != "correlation"]
    if gradient:
        raise PerforationError(
            f"make_dendrites_inert: layers {gradient} use DendriteConfig(learning='gradient'), whose candidates "
            "feed the output during the dendrite phase, so no control can hold them inert; use correlation learning."
        )
    for layer in layers:
        if not isinstance(layer, InertPerforatedLayer):
            layer.__class__ = InertPerforatedLayer
    log.warning(
        "pb_lightning: INERT CONTROL enabled on %d layers: accepted dendrites will be held at output weight 0 "
        "and cannot change the model. This is a benchmark control, not a training mode.",
        len(layers),
    )
    return model


def is_inert(model: nn.Module) -> bool:
    """Whether any perforated layer of ``model`` is an inert control (for reports and guards)."""
    return any(isinstance(layer, InertPerforatedLayer) for layer in perforated_layers(model))
