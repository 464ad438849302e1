"""The perforated layer: a wrapped module whose neurons carry dendrites.

For input ``x``, the wrapped module's output ``y = M(x)`` (optionally followed by a
normalisation layer) and ``D`` accepted dendrite sets ``L_1 … L_D``::

    z_d = L_d(x̂) + Σ_{e<d} c_{d,e} ⊙ a_e        (cascade)
    a_d = f(z_d)
    y'  = y + Σ_d w_d ⊙ a_d

where ``x̂`` is ``x`` detached (perforation) and ``c``, ``w`` hold one scalar per neuron. All D
operations ``L_d`` run as one fused operation (:mod:`pb_lightning.engine.banks`). With
``DendriteConfig.fan_in = k`` each ``L_d`` of a neuron reads only ``k`` of the inputs (a sparse
bank), so a set costs ``k/in`` of its layer's weights instead of a full copy.

During a dendrite phase the layer also holds a :class:`CandidatePool`: K candidate sets that see
exactly what an accepted dendrite would (``x̂`` and the accepted ``a_e``) but whose outputs do not
enter ``y'``. A :class:`~pb_lightning.engine.correlation.CorrelationTap` at ``y'`` hands them the neuron's
error from the ordinary backward pass.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from pb_lightning.engine.banks import DendriteBank, iter_stacked
from pb_lightning.engine.candidates import CandidatePool, error_tap
from pb_lightning.engine.cascade import accepted_activations, add_weighted, cascade_weight_count
from pb_lightning.engine.config import DendriteConfig
from pb_lightning.engine.outputs import not_a_tensor, replace_output, select_output
from pb_lightning.engine.sparse_banks import check_fan_in, connections, make_bank, prune
from pb_lightning.errors import PerforationError, torchscript_refused


class PerforatedLayer(nn.Module):
    """A module whose output neurons can grow dendrites (see the module docstring).

    Attributes not found on the layer are looked up on the wrapped module, so code that reads
    ``layer.weight`` or ``layer.out_features`` keeps working after conversion.

    Args:
        module: the wrapped module (its output is the neurons' pre-activation).
        config: the engine configuration.
        neuron_axis: the axis of ``module``'s output that indexes neurons (``-1`` for Linear,
            ``1`` for Conv).
        num_neurons: the size of that axis, or ``None`` to read it from the first forward pass.
        norm: a normalisation layer applied to ``module``'s output before dendrites are added.
        name: the qualified name of the wrapped module in the model (for messages and reports).
        output_key: for a module whose output is a tuple (or dict), the index (or key) of the
            entry that holds the neurons; dendrites are added to it and the rest passes through.
    """

    #: Class-level default, so layers pickled before tuple outputs existed still load.
    output_key: int | str | None = None

    def __init__(
        self,
        module: nn.Module,
        *,
        config: DendriteConfig,
        neuron_axis: int,
        num_neurons: int | None,
        norm: nn.Module | None = None,
        name: str = "",
        output_key: int | str | None = None,
    ) -> None:
        super().__init__()
        check_fan_in(module, config.fan_in, name)
        self.module = module
        self.output_key = output_key
        self.norm = norm
        self.config = config
        self.neuron_axis = neuron_axis
        self.name = name
        self._num_neurons = num_neurons
        self.dendrites: DendriteBank | None = None
        self.cascade_weight: nn.Parameter | None = None  # [D(D-1)/2, out]: c_{d,e} for e < d
        self.output_weight: nn.Parameter | None = None  # [D, out]: w_d
        self.candidates: CandidatePool | None = None
        #: Process group over which candidate statistics are pooled (data parallelism), or None.
        self.statistics_group: Any = None

    def __getattr__(self, name: str) -> Any:
        # nn.Module.__getattr__'s lookup, inlined: forward reads several submodules and
        # parameters per call, and a second Python frame for each shows in small networks' steps.
        attributes = self.__dict__
        for store in ("_parameters", "_buffers", "_modules"):
            values = attributes.get(store)
            if values is not None and name in values:
                return values[name]
        module = attributes.get("_modules", {}).get("module")
        if module is None or name.startswith("_"):
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        return getattr(module, name)

    # ------------------------------------------------------------------ structure
    @property
    def num_dendrites(self) -> int:
        """D, the accepted dendrite sets of this layer."""
        return 0 if self.output_weight is None else self.output_weight.shape[0]

    @property
    def num_candidates(self) -> int:
        """K during a dendrite phase, else 0."""
        return 0 if self.candidates is None else self.candidates.num_candidates

    @property
    def num_neurons(self) -> int | None:
        """Neurons of the layer (``None`` for a custom module not yet run)."""
        return self._num_neurons

    def dendrite_parameters(self) -> list[nn.Parameter]:
        """Accepted-dendrite parameters: the fused bank, cascade and output weights."""
        params = [p for _, p in iter_stacked(self.dendrites)]
        return params + [p for p in (self.cascade_weight, self.output_weight) if p is not None]

    def _like(self) -> Tensor:
        return next(iter(self.module.parameters()))

    def _ensure_accepted(self, num: int, num_neurons: int) -> None:
        """Give the layer ``num`` accepted sets with uninitialised weights (for loading)."""
        if self.dendrites is None:
            self.dendrites = self._empty_bank()
        self.dendrites.resize(num)
        like = self._like()
        if self.config.cascade:
            self.cascade_weight = nn.Parameter(like.new_empty(cascade_weight_count(num), num_neurons))
        self.output_weight = nn.Parameter(like.new_empty(num, num_neurons))
        self._set_neuron_phase_trainability()

    def _empty_bank(self) -> DendriteBank:
        """A bank with no sets, of the kind that holds this layer's accepted dendrites."""
        return make_bank(self.module, 0, self.config.init_scale, self.output_key, fan_in=self.config.fan_in)

    def _set_neuron_phase_trainability(self) -> None:
        """w always learns in the neuron phase; L and c only if configured to."""
        if self.output_weight is not None:
            self.output_weight.requires_grad_(True)
        keep_training = self.config.train_accepted_dendrites
        for _, p in iter_stacked(self.dendrites):
            p.requires_grad_(keep_training)
        if self.cascade_weight is not None:
            self.cascade_weight.requires_grad_(keep_training)

    # ------------------------------------------------------------------ phases
    def add_candidates(self, num_candidates: int | None = None) -> CandidatePool:
        """Start this layer's dendrite phase with a pool of fresh candidate sets."""
        if self._num_neurons is None:
            raise RuntimeError(
                f"Layer `{self.name}` has not run a forward pass yet, so its number of neurons is "
                "unknown; run at least one batch through the model before starting a dendrite phase."
            )
        if self.candidates is not None:
            raise RuntimeError(f"Layer `{self.name}` already has candidates; accept or discard them first.")
        k = self.config.num_candidates if num_candidates is None else num_candidates
        self.candidates = self._new_pool(k, self._num_neurons)
        return self.candidates

    def _new_pool(self, num_candidates: int, num_neurons: int) -> CandidatePool:
        config, index = self.config, None
        if config.fan_in is not None and config.fan_in_mode != "learned":
            index = connections(
                self.module,
                num_candidates,
                config.fan_in,
                config.fan_in_mode,
                seed=config.fan_in_seed,
                name=self.name,
                dendrite=self.num_dendrites,
            )
        pool = CandidatePool(
            self.module, num_candidates, num_neurons, self.num_dendrites, config, self.output_key, index
        )
        pool.statistics.process_group = self.statistics_group
        return pool

    def drop_candidates(self) -> None:
        """End the dendrite phase without accepting anything."""
        self.candidates = None

    def accept_candidates(self) -> Tensor:
        """Install each neuron's best candidate as its next dendrite; returns the accepted scores.

        The new output weight ``w`` is exactly 0 for correlation-trained dendrites, so the layer
        computes the same function before and after (function preservation). With
        ``fan_in_mode="learned"`` the scores are those the dense candidates reached, before the
        accepted snapshots were pruned to their ``k`` strongest inputs.
        """
        pool = self.candidates
        if pool is None:
            raise RuntimeError(f"Layer `{self.name}` has no candidates to accept.")
        scores = pool.scores()
        bank, cascade, output = pool.selected()
        if self.config.fan_in is not None and "index" not in bank:
            # fan_in_mode="learned": the chosen dense snapshot keeps its k strongest inputs, and the
            # accepted dendrite is that pruned snapshot. It enters with w = 0 (correlation
            # learning; gradient learning cannot be combined with "learned"), so the layer's
            # output is exactly what it was.
            bank = prune(bank, self.config.fan_in)
        num, like = self.num_dendrites, self._like()
        if self.dendrites is None:
            self.dendrites = self._empty_bank()
        self.dendrites.append(bank, requires_grad=False)
        if self.config.cascade:
            old = self.cascade_weight.detach() if self.cascade_weight is not None else like.new_zeros(0, scores.numel())
            new_rows = cascade if cascade is not None else like.new_zeros(num, scores.numel())
            self.cascade_weight = nn.Parameter(torch.cat([old, new_rows.to(old)]))
        w_new = output if output is not None else like.new_zeros(scores.numel())
        w_old = self.output_weight.detach() if self.output_weight is not None else like.new_zeros(0, scores.numel())
        self.output_weight = nn.Parameter(torch.cat([w_old, w_new.to(w_old).unsqueeze(0)]))
        self.candidates = None
        self._set_neuron_phase_trainability()
        return scores

    def set_loss_scale(self, scale: float) -> None:
        """Tell the candidate pool by how much the incoming errors are scaled (mixed precision)."""
        if self.candidates is not None:
            self.candidates.loss_scale = float(scale)
            self.candidates.scaled = True

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script (and LightningModule.to_torchscript) calls this before compiling.
        raise torchscript_refused(self.name)

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # One frame for the whole forward (it shows in small networks' steps); a tuple output's
        # neuron entry is taken out here and put back at every return.
        y = out = self.module(*args, **kwargs)
        key = self.output_key
        if key is not None:
            y = select_output(out, key, self.name)
        elif not isinstance(y, Tensor):  # a tuple, dict or object, and no output_selectors entry
            raise not_a_tensor(out, self.name, self.module)
        if self.norm is not None:
            y = self.norm(y)
        if self._num_neurons is None:  # a custom module: its output tells the neuron count
            if y.dim() == 0:
                raise PerforationError(
                    f"Layer `{self.name}` ({type(self.module).__name__}): its output is a scalar (shape ()), which has "
                    "no neuron axis; exclude this module (perforate(..., exclude=[...])) and perforate the layers "
                    "inside it."
                )
            if not -y.dim() <= self.neuron_axis < y.dim():
                raise PerforationError(
                    f"Layer `{self.name}` ({type(self.module).__name__}): neuron_axis={self.neuron_axis} does not "
                    f"exist in its output of shape {tuple(y.shape)}; valid axes are {-y.dim()} to {y.dim() - 1}."
                )
            self._num_neurons = y.shape[self.neuron_axis]
        pool = self.candidates
        if self.output_weight is None and pool is None:
            # no dendrites yet: the wrapped module alone, no extra work
            return y if key is None else replace_output(out, key, y)
        axis = self.neuron_axis % y.dim()
        if y.shape[axis] != self._num_neurons:
            raise PerforationError(
                f"Layer `{self.name}` ({type(self.module).__name__}): its output has {y.shape[axis]} entries on "
                f"neuron_axis={self.neuron_axis} (shape {tuple(y.shape)}), but its dendrites were built for "
                f"{self._num_neurons} neurons; the declared neuron axis does not match the output."
            )
        perforated = self.config.perforation or pool is not None
        detached = tuple(a.detach() if isinstance(a, Tensor) else a for a in args) if perforated else args
        acts = None
        if self.dendrites is not None and self.output_weight is not None:
            learn_accepted = any(p.requires_grad for p in self.dendrites.parameters()) or (
                self.cascade_weight is not None and self.cascade_weight.requires_grad
            )
            # Frozen dendrites behind a perforation need no backward at all: only w gets a
            # gradient, and that needs only the activations.
            with torch.set_grad_enabled(torch.is_grad_enabled() and (learn_accepted or not perforated)):
                acts = accepted_activations(
                    self.dendrites, self.cascade_weight, detached, axis, self.config.activation, **kwargs
                )
            y = add_weighted(y, acts, self.output_weight, axis)
        if pool is None:
            return y if key is None else replace_output(out, key, y)
        gradient_learning = pool.output_weight is not None
        # Candidates learn from whatever backward pass follows a forward with gradients, whatever
        # the module's train/eval mode: Lightning keeps the modes a user set (a trained model put
        # in eval mode to be evaluated before fine-tuning stays in it, with only a warning), and in
        # a dendrite phase the tap is the only thing a loss can backpropagate through.
        observe = torch.is_grad_enabled()
        if not (observe or gradient_learning):
            # correlation candidates do not change the output: skip them when not learning
            return y if key is None else replace_output(out, key, y)
        v = pool(detached, acts, axis, **kwargs)
        if gradient_learning:
            y = add_weighted(y, v, cast(Tensor, pool.output_weight), axis)  # set for gradient learning
        if observe:
            y = error_tap(y, v, pool)
        return y if key is None else replace_output(out, key, y)

    # ------------------------------------------------------------------ checkpoints
    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Rebuild the structure the checkpoint describes (accepted sets, candidate pool) before the
        # tensors are copied in, so a state dict from any point of training loads into a freshly
        # perforated model.
        self._map_plain_keys(state_dict, prefix, strict, error_msgs)
        w = state_dict.get(prefix + "output_weight")
        if w is not None and (self.output_weight is None or self.output_weight.shape != w.shape):
            self._num_neurons = w.shape[1]
            self._ensure_accepted(w.shape[0], w.shape[1])
        elif w is None and self.output_weight is not None and any(k.startswith(prefix + "module.") for k in state_dict):
            # A state dict of this layer without dendrites (e.g. the model before a rejected cycle).
            self.dendrites = None
            self.cascade_weight = None
            self.output_weight = None
        moments = state_dict.get(prefix + "candidates.statistics.moments")
        if moments is None:
            self.candidates = None
        elif self.candidates is None or self.candidates.statistics.moments.shape != moments.shape:
            self._num_neurons = moments.shape[2]
            self.candidates = self._new_pool(moments.shape[1], moments.shape[2])
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _map_plain_keys(self, state_dict: dict[str, Any], prefix: str, strict: bool, error_msgs: list[str]) -> None:
        """Move the wrapped module's keys of a plain (never perforated) state dict to ``module.*``.

        Fine-tuning a trained network with dendrites loads its plain state dict, which names this
        layer's weights ``<name>.weight`` where the perforated model has ``<name>.module.weight``.
        The mapping is exact, not a guess: the wrapped module is the trained module itself, so its
        own state-dict names are the plain keys. It applies only when none of the perforated keys
        is present (a perforated state dict never needs it); with them absent, dendrites this layer
        holds are dropped as for any state dict of the layer without dendrites. A norm moved into
        the layer is mapped by a hook of :func:`~pb_lightning.engine.convert.perforate`, since its
        plain keys sit at its old place, outside this layer's prefix. A plain key whose first part
        names something the layer holds itself (a wrapped module with a child called ``module``)
        cannot be told from the layer's own, so it is refused with what to do instead.
        """
        names = list(self.module.state_dict(keep_vars=True))
        present = [n for n in names if prefix + n in state_dict]
        if not present or any(prefix + "module." + n in state_dict for n in names):
            return
        held = {n for n, m in self._modules.items() if m is not None}
        held |= {n for n in ("cascade_weight", "output_weight") if getattr(self, n) is not None}
        clashes = sorted(prefix + n for n in present if n.split(".", 1)[0] in held)
        if clashes:
            if strict:
                error_msgs.append(
                    f"pb_lightning: the plain keys {clashes} of the module wrapped at {prefix[:-1]!r} name "
                    f"parts of the perforated layer itself ({sorted(held)}), so they cannot be mapped onto "
                    "it; load this state dict into the network before perforating it."
                )
            return
        for n in present:
            state_dict[prefix + "module." + n] = state_dict.pop(prefix + n)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, neurons={self._num_neurons}, dendrites={self.num_dendrites}, "
            f"candidates={self.num_candidates}"
        )
