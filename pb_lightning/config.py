"""The one typed, validated configuration object of the dendrite engine.

All options that change how dendrites are built and trained live in :class:`DendriteConfig`, a
frozen dataclass checked at construction. Nothing is read from globals, so two models in one
process can use different settings, and a LightningCLI YAML maps onto the fields one to one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pb_lightning.errors import invalid

Activation = Literal["sigmoid", "tanh", "relu"]
Learning = Literal["correlation", "gradient"]
Normalization = Literal["pearson", "error_energy", "raw"]

_ACTIVATIONS: tuple[str, ...] = ("sigmoid", "tanh", "relu")
_LEARNINGS: tuple[str, ...] = ("correlation", "gradient")
_NORMALIZATIONS: tuple[str, ...] = ("pearson", "error_energy", "raw")


@dataclass(frozen=True)
class DendriteConfig:
    """How dendrites are built and how candidates learn.

    Args:
        num_candidates: candidate sets added per perforated layer at the start of a dendrite
            phase (the pool K). The best candidate of each neuron is accepted. ``1`` reproduces
            the reference package; Cascade-Correlation used up to 8.
        activation: the dendrite nonlinearity ``f`` in ``a = f(z)``.
        learning: ``"correlation"`` trains candidates to correlate with their neuron's error
            (ALGORITHM.md §3, the default). ``"gradient"`` adds the candidate's output to the
            network (through a trainable output weight) and trains it by ordinary gradient
            descent on the task loss: the reference package's free behaviour, for ablations.
            It needs ``num_candidates=1`` because every candidate then changes the output.
        normalization: how the covariance between a candidate's output ``V`` and its neuron's
            error ``E`` is normalised. ``"pearson"`` divides by both standard deviations, so the
            score is a correlation in [0, 1] and does not depend on the loss scale (mixed
            precision, a loss multiplied by a constant); it is the default. ``"error_energy"``
            divides by the mean of ``E²`` (Cascade-Correlation). ``"raw"`` does not normalise.
        perforation: detach a dendrite's input so that no error flows through dendrites into
            earlier layers (ALGORITHM.md §2). ``False`` is for ablations and only changes the
            neuron phase: candidates always see a detached input, because the network is frozen
            during the dendrite phase and their objective must not leak into other layers'
            errors.
        cascade: let each dendrite also see the outputs of the earlier dendrites of its neuron.
        train_accepted_dendrites: keep training accepted dendrites by gradient descent in the
            neuron phase (a newer vendor default). ``False`` freezes them, as in the paper.
        init_scale: multiplies the default PyTorch initialisation of new dendrite weights.
        statistics_momentum: decay of the exponential moving averages that hold the running
            means, variances and covariance of ``V`` and ``E``.
        warmup_steps: training steps at the start of a dendrite phase in which statistics are
            gathered but candidates are not updated, so that the sign and the means they follow
            are estimates rather than one batch's noise.
        eps: added to variances before they divide anything.

    Example::

        >>> DendriteConfig(num_candidates=8, activation="tanh").num_candidates
        8
        >>> DendriteConfig(num_candidates=0)
        Traceback (most recent call last):
        ...
        pb_lightning.errors.PerforationError: `DendriteConfig.num_candidates` must be an int >= 1; got 0.
    """

    num_candidates: int = 4
    activation: Activation = "sigmoid"
    learning: Learning = "correlation"
    normalization: Normalization = "pearson"
    perforation: bool = True
    cascade: bool = True
    train_accepted_dendrites: bool = False
    init_scale: float = 1.0
    statistics_momentum: float = 0.99
    warmup_steps: int = 5
    eps: float = 1e-8

    def __post_init__(self) -> None:
        _check_int("num_candidates", self.num_candidates, minimum=1)
        _check_choice("activation", self.activation, _ACTIVATIONS)
        _check_choice("learning", self.learning, _LEARNINGS)
        _check_choice("normalization", self.normalization, _NORMALIZATIONS)
        for name in ("perforation", "cascade", "train_accepted_dendrites"):
            if not isinstance(getattr(self, name), bool):
                raise invalid(f"DendriteConfig.{name}", getattr(self, name), "a bool")
        _check_float("init_scale", self.init_scale, "a finite float > 0", lambda v: v > 0)
        _check_float("statistics_momentum", self.statistics_momentum, "a float in [0, 1)", lambda v: 0 <= v < 1)
        _check_int("warmup_steps", self.warmup_steps, minimum=0)
        _check_float("eps", self.eps, "a finite float > 0", lambda v: v > 0)
        if self.learning == "gradient" and self.num_candidates != 1:
            raise invalid(
                "DendriteConfig.num_candidates",
                self.num_candidates,
                "1 when learning='gradient' (gradient-descent candidates all feed the network's "
                "output, so there is no pool to choose from); use learning='correlation' for a pool",
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, for checkpoints and loggers' hyperparameters."""
        return asdict(self)


def _check_int(name: str, value: object, *, minimum: int) -> None:
    # bool is an int subclass; True as a pool size is almost certainly a mistake.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise invalid(f"DendriteConfig.{name}", value, f"an int >= {minimum}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise invalid(f"DendriteConfig.{name}", value, "one of " + ", ".join(repr(c) for c in choices))


def _check_float(name: str, value: object, valid: str, ok: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise invalid(f"DendriteConfig.{name}", value, valid)
