"""Who changes a model's structure when the cycle decides: the :class:`Restructurer` protocol.

The cycle decides *when* candidates are added, installed or dropped; *how* belongs to whoever
owns the model. A plain PyTorch loop owns nothing but the ``nn.Module``, so its restructurer
calls :mod:`pb_lightning.engine.transitions` (:class:`EngineRestructurer`); a Lightning run owns a
:class:`~pb_lightning.lightning.module.PerforatedModule`, whose own methods have the same names, so
the module itself is the restructurer and a user who overrides them sees every restructure.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import nn

from pb_lightning.engine import transitions


@runtime_checkable
class Restructurer(Protocol):
    """The three structural changes of the cycle, bound to one model."""

    def start_dendrite_phase(self) -> None:
        """Add candidates to every perforated layer and freeze the network."""

    def accept_dendrites(self) -> Any:
        """Install every neuron's best candidate and return to the neuron phase."""

    def discard_candidates(self) -> None:
        """Drop the candidates and return to the neuron phase."""


class EngineRestructurer:
    """A :class:`Restructurer` for a plain ``nn.Module``, through :mod:`pb_lightning.engine.transitions`.

    Example::

        >>> import torch, pb_lightning as pb
        >>> model = pb.perforate(torch.nn.Sequential(torch.nn.Linear(3, 2)))
        >>> EngineRestructurer(model).start_dendrite_phase(); pb.in_dendrite_phase(model)
        True
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def start_dendrite_phase(self) -> None:
        transitions.start_dendrite_phase(self.model)

    def accept_dendrites(self) -> Any:
        return transitions.accept_dendrites(self.model)

    def discard_candidates(self) -> None:
        transitions.discard_candidates(self.model)
