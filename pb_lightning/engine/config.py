"""The one typed, validated configuration object of the dendrite engine.

All options that change how dendrites are built and trained live in :class:`DendriteConfig`, a
frozen dataclass checked at construction. Nothing is read from globals, so two models in one
process can use different settings, and a LightningCLI YAML maps onto the fields one to one.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from pb_lightning.errors import PerforationError, check_choice, check_float, check_int, choices_of, invalid

Activation = Literal["sigmoid", "tanh", "relu"]
Learning = Literal["correlation", "gradient"]
Normalization = Literal["pearson", "error_energy", "raw"]
FanInMode = Literal["local", "random", "learned"]

#: Fields that must be the same in every layer: the training loop reads them from the model's
#: one configuration (which objective the candidates follow decides what the callback monitors).
_GLOBAL_FIELDS: tuple[str, ...] = ("learning", "overrides")


@dataclass(frozen=True)
class DendriteConfig:
    """How dendrites are built and how candidates learn.

    Args:
        num_candidates: candidate sets added per perforated layer at the start of a dendrite
            phase (the pool K). The best candidate of each neuron is accepted. ``1`` reproduces
            the reference package; Cascade-Correlation used up to 8.
        activation: the dendrite nonlinearity ``f`` in ``a = f(z)``.
        learning: ``"correlation"`` trains candidates to correlate with their neuron's error
            (docs/ALGORITHM.md §3, the default). ``"gradient"`` adds the candidate's output to the
            network (through a trainable output weight) and trains it by ordinary gradient
            descent on the task loss: the reference package's free behaviour, for ablations.
            It needs ``num_candidates=1`` because every candidate then changes the output.
        normalization: how the covariance between a candidate's output ``V`` and its neuron's
            error ``E`` is normalised. ``"pearson"`` divides by both standard deviations, so the
            score is a correlation in [0, 1] and does not depend on the loss scale (mixed
            precision, a loss multiplied by a constant); it is the default. ``"error_energy"``
            divides by the mean of ``E²`` (Cascade-Correlation). ``"raw"`` does not normalise.
        perforation: detach a dendrite's input so that no error flows through dendrites into
            earlier layers (docs/ALGORITHM.md §2). ``False`` is for ablations and only changes the
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
        fan_in: how many of its layer's inputs each dendrite sees. ``None`` (the default): all of
            them, a dense dendrite. An int ``k``: each dendrite of a ``nn.Linear`` sees ``k`` of
            its input features; each dendrite of a ``nn.Conv`` sees ``k`` of its input channels
            (of its group) with the full kernel. Why: a dense dendrite set costs a full copy of its
            layer's weights while each dendrite feeds only its own neuron, so at equal parameter
            count a plain wider network wins; with limited fan-in a set costs ``k/in`` of that
            (Chavlis & Poirazi, *Nat. Commun.* 2025: each dendrite sees a small local receptive
            field). Only real connections are stored and counted (``parameter_counts``).
        fan_in_mode: which inputs a dendrite with limited fan-in sees. ``"local"``: a contiguous
            window of ``k`` inputs; the windows of the layer's neurons are spread evenly over the
            input axis (neuron ``i`` of ``n`` starts at ``round(i·(in−k)/(n−1))``), and all
            dendrites and candidates of a neuron share its window. ``"random"``: ``k`` distinct
            inputs drawn per candidate and neuron from a generator seeded by ``fan_in_seed``, the
            layer's name and the dendrite's number, so they are the same on every rank and in
            every rerun. ``"learned"``: candidates are dense; at acceptance each neuron's chosen
            candidate keeps its ``k`` inputs of largest weight magnitude (for convs, the largest
            kernel norm), and the accepted dendrite is that pruned snapshot (it enters with output
            weight 0, so the network's output does not change).
        fan_in_seed: seed of ``fan_in_mode="random"``; vary it to draw other connections.
        compile_statistics: run the candidates' correlation statistics (batch moments, score,
            the gradient handed to the candidates) through ``torch.compile``, which fuses their
            some 20 small ops per layer and step into a few loops: about 2x faster statistics on
            conv layers and wide pools (benchmarks/README.md, issue 16 item 1). Off by default,
            because the first dendrite-phase step then compiles for some seconds per layer
            variant and needs inductor's toolchain (a C++ compiler on CPU, Triton on CUDA).
            Where compilation fails the statistics run eagerly, say so once in the log, and give
            the same results; it never changes what is computed.
        overrides: per-layer changes to these fields, as ``{glob over layer names: {field:
            value}}`` (e.g. ``{"head": {"fan_in": None}}``). A layer takes the fields of every
            glob that matches its qualified name, later entries winning. ``learning`` cannot be
            overridden (the training loop reads it once for the model). Every glob must match a
            perforated layer, so a typo is an error rather than a silently ignored setting.

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
    fan_in: int | None = None
    fan_in_mode: FanInMode = "local"
    fan_in_seed: int = 0
    compile_statistics: bool = False
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_int("DendriteConfig.num_candidates", self.num_candidates, minimum=1)
        check_choice("DendriteConfig.activation", self.activation, choices_of(Activation))
        check_choice("DendriteConfig.learning", self.learning, choices_of(Learning))
        check_choice("DendriteConfig.normalization", self.normalization, choices_of(Normalization))
        for name in ("perforation", "cascade", "train_accepted_dendrites", "compile_statistics"):
            if not isinstance(getattr(self, name), bool):
                raise invalid(f"DendriteConfig.{name}", getattr(self, name), "a bool")
        check_float("DendriteConfig.init_scale", self.init_scale, "a finite float > 0", lambda v: v > 0)
        check_float(
            "DendriteConfig.statistics_momentum", self.statistics_momentum, "a float in [0, 1)", lambda v: 0 <= v < 1
        )
        check_int("DendriteConfig.warmup_steps", self.warmup_steps, minimum=0)
        check_float("DendriteConfig.eps", self.eps, "a finite float > 0", lambda v: v > 0)
        if self.learning == "gradient" and self.num_candidates != 1:
            raise invalid(
                "DendriteConfig.num_candidates",
                self.num_candidates,
                "1 when learning='gradient' (gradient-descent candidates all feed the network's "
                "output, so there is no pool to choose from); use learning='correlation' for a pool",
            )
        if self.fan_in is not None:
            check_int("DendriteConfig.fan_in", self.fan_in, minimum=1)
        check_choice("DendriteConfig.fan_in_mode", self.fan_in_mode, choices_of(FanInMode))
        if isinstance(self.fan_in_seed, bool) or not isinstance(self.fan_in_seed, int):
            raise invalid("DendriteConfig.fan_in_seed", self.fan_in_seed, "an int")
        if self.fan_in is not None and self.fan_in_mode == "learned" and self.learning == "gradient":
            raise invalid(
                "DendriteConfig.fan_in_mode",
                self.fan_in_mode,
                "'local' or 'random' when learning='gradient' (a gradient-descent candidate already "
                "feeds the output, so pruning it at acceptance would change the network's function)",
            )
        self._check_overrides()

    def _check_overrides(self) -> None:
        if not isinstance(self.overrides, Mapping):
            raise invalid("DendriteConfig.overrides", self.overrides, "a mapping {layer-name glob: {field: value}}")
        names = {f.name for f in fields(self)} - set(_GLOBAL_FIELDS)
        for pattern, values in self.overrides.items():
            where = f"DendriteConfig.overrides[{pattern!r}]"
            if not isinstance(pattern, str):
                raise invalid("DendriteConfig.overrides", pattern, "a mapping whose keys are layer-name globs (str)")
            if not isinstance(values, Mapping):
                raise invalid(where, values, "a mapping {field: value}")
            unknown = [k for k in values if k not in names]
            if unknown:
                raise invalid(f"{where} keys", unknown, "DendriteConfig fields other than " + ", ".join(_GLOBAL_FIELDS))
            try:
                replace(self, overrides={}, **values)
            except PerforationError as error:
                raise PerforationError(f"In {where}: {error}") from None
        # A private copy: a frozen config must not change when the caller's dict does.
        object.__setattr__(self, "overrides", {p: dict(v) for p, v in self.overrides.items()})

    def for_layer(self, name: str) -> DendriteConfig:
        """The configuration of the layer called ``name``: these fields with its overrides applied.

        Example::

            >>> config = DendriteConfig(fan_in=4, overrides={"head": {"fan_in": None}})
            >>> config.for_layer("body.0").fan_in, config.for_layer("head").fan_in
            (4, None)
        """
        values: dict[str, Any] = {}
        for pattern, changes in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                values.update(changes)
        return replace(self, overrides={}, **values) if values or self.overrides else self

    def __hash__(self) -> int:
        # The generated hash would fail on the overrides dict; hash its items instead.
        items = tuple(sorted((p, tuple(sorted(v.items()))) for p, v in self.overrides.items()))
        return hash(tuple(getattr(self, f.name) for f in fields(self) if f.name != "overrides") + (items,))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, for checkpoints and loggers' hyperparameters."""
        return asdict(self)
