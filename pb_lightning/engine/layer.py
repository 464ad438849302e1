"""The perforated layer: a wrapped module whose neurons carry dendrites.

For input ``x``, the wrapped module's output ``y = M(x)`` (optionally followed by a
normalisation layer) and ``D`` accepted dendrite sets ``L_1 … L_D``::

    z_d = L_d(x̂) + Σ_{e<d} c_{d,e} ⊙ a_e        (cascade)
    a_d = f(z_d)
    y'  = y + Σ_d w_d ⊙ a_d

where ``x̂`` is ``x`` detached (perforation) and ``c``, ``w`` hold one scalar per neuron. All D
operations ``L_d`` run as one fused operation (:mod:`pb_lightning.banks`). With
``DendriteConfig.fan_in = k`` each ``L_d`` of a neuron reads only ``k`` of the inputs (a sparse
bank), so a set costs ``k/in`` of its layer's weights instead of a full copy.

During a dendrite phase the layer also holds a :class:`CandidatePool`: K candidate sets that see
exactly what an accepted dendrite would (``x̂`` and the accepted ``a_e``) but whose outputs do not
enter ``y'``. A :class:`~pb_lightning.correlation.CorrelationTap` at ``y'`` hands them the neuron's
error from the ordinary backward pass.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from pb_lightning.banks import DendriteBank, check_fan_in, connections, iter_stacked, make_bank, prune, take_sets
from pb_lightning.config import DendriteConfig
from pb_lightning.correlation import CorrelationStatistics, CorrelationTap
from pb_lightning.errors import PerforationError

log = logging.getLogger(__name__)

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
}


def _triangle(d: int) -> int:
    """Cascade weights of the first ``d`` dendrites: dendrite ``e`` has ``e`` of them."""
    return d * (d - 1) // 2


def _per_neuron(t: Tensor, trailing: int) -> Tensor:
    """View ``[..., out]`` per-neuron scalars so they broadcast over ``trailing`` spatial axes."""
    return t.view(*t.shape, *([1] * trailing))


def accepted_activations(
    bank: DendriteBank,
    cascade_weight: Tensor | None,
    inputs: tuple[Any, ...],
    axis: int,
    activation: str,
    **kwargs: Any,
) -> Tensor:
    """The activations ``a`` of all accepted dendrites, shaped ``(..., D, out, ...)``.

    Shared by the training layer and the deployment layer of :mod:`pb_lightning.inference`, so
    the two compute the very same function.
    """
    z = bank(*inputs, neuron_axis=axis, **kwargs)
    num = z.shape[axis]
    if cascade_weight is None or num == 1:
        return _ACTIVATIONS[activation](z)
    trailing = z.dim() - axis - 2
    if not torch.is_grad_enabled():
        return _cascade_in_place(z, cascade_weight, axis, activation, trailing)
    # The cascade is a recurrence through f: dendrite d needs a_e for all e < d. The expensive
    # part (L_d(x̂) for every d) is already one fused op above; this loop is elementwise, one
    # multiply-add per (d, e) pair: fewer autograd nodes than stacking the earlier activations
    # for every d, and no (..., d, out, ...) temporaries.
    # unbind, not select/indexing: its backward stacks the gradients once, where every select's
    # backward would allocate a zero tensor of the full size.
    f = _ACTIVATIONS[activation]
    pres, weights = z.unbind(axis), cascade_weight.unbind(0)
    acts = [f(pres[0])]
    for d in range(1, num):
        pre = pres[d]
        for e in range(d):
            pre = torch.addcmul(pre, acts[e], _per_neuron(weights[_triangle(d) + e], trailing))
        acts.append(f(pre))
    return torch.stack(acts, axis)


_IN_PLACE: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid_,
    "tanh": torch.tanh_,
    "relu": torch.relu_,
}


def _cascade_in_place(z: Tensor, cascade_weight: Tensor, axis: int, activation: str, trailing: int) -> Tensor:
    """The cascade without autograd (frozen dendrites behind a perforation: the common case).

    ``z`` becomes ``a`` in place: once ``a_e`` is final it is added, with each later dendrite's
    weight on it, to all later ``z_d`` in one ``addcmul_``. Memory traffic stays linear in the
    dendrites per step instead of re-stacking every earlier activation for every dendrite.
    """
    num = z.shape[axis]
    f_ = _IN_PLACE[activation]
    for e in range(num):
        a_e = z.select(axis, e)
        f_(a_e)
        if e + 1 < num:
            # c_{d,e} for d = e+1 … D-1 lives in row triangle(d) + e of the flat cascade weights.
            rows = [_triangle(d) + e for d in range(e + 1, num)]
            c = _per_neuron(cascade_weight[rows], trailing)  # (D-e-1, out, 1...)
            z.narrow(axis, e + 1, num - e - 1).addcmul_(a_e.unsqueeze(axis), c)
    return z


def add_weighted(y: Tensor, acts: Tensor, weight: Tensor, axis: int) -> Tensor:
    """``y + Σ_d w_d ⊙ a_d`` with ``acts (..., D, out, ...)`` and ``weight [D, out]``.

    One multiply-add per set: a broadcast product summed over the set axis would allocate a
    ``(..., D, out, ...)`` temporary in forward and another in backward, and for conv layers that
    allocation, not the arithmetic, dominated the step.
    """
    trailing = acts.dim() - axis - 2
    # unbind rather than select: one backward node that stacks the D gradients, instead of D
    # select-backwards that each allocate a zero tensor of the full (..., D, out, ...) size.
    for a, w in zip(acts.unbind(axis), weight.unbind(0), strict=True):
        y = torch.addcmul(y, a, _per_neuron(w, trailing))
    return y


def select_output(out: Any, key: int | str, name: str) -> Tensor:
    """The entry ``key`` of a module's tuple (or dict) output: the tensor that holds the neurons."""
    try:
        y = out[key]
    except (TypeError, IndexError, KeyError):
        raise PerforationError(
            f"Layer `{name}`: output_selectors gives {key!r}, but its module returned {type(out).__name__} "
            f"{_describe(out)}; give the index (tuple) or key (dict) of the tensor that holds the neurons."
        ) from None
    if not isinstance(y, Tensor):
        raise PerforationError(
            f"Layer `{name}`: output entry {key!r} is a {type(y).__name__}, not a tensor (a PackedSequence? "
            "pad the sequences, or select the tensor that holds the neurons)."
        )
    return y


def _describe(out: Any) -> str:
    if isinstance(out, Tensor):
        return f"of shape {tuple(out.shape)}"
    if isinstance(out, dict):
        return f"with keys {list(out)}"
    if isinstance(out, (tuple, list)):
        return f"of {len(out)} entries"
    return ""


def replace_output(out: Any, key: int | str, y: Tensor) -> Any:
    """``out`` with entry ``key`` replaced by ``y`` (same container type)."""
    if isinstance(out, dict):
        new = copy.copy(out)  # keeps a dict subclass (e.g. a Hugging Face ModelOutput)
        new[key] = y
        return new
    items = list(out)
    items[key] = y  # type: ignore[index]
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # a named tuple
        return type(out)(*items)
    return type(out)(items)


@torch._dynamo.disable
def _tap(y: Tensor, v: Tensor, pool: CandidatePool) -> Tensor:
    """Apply the correlation tap outside torch.compile's graphs.

    Its backward updates running statistics and snapshots with data-dependent Python control
    flow; compiled code calls it as an opaque eager function instead of failing to trace it.
    """
    return CorrelationTap.apply(y, v, pool)


class CandidatePool(nn.Module):
    """K candidate dendrite sets of one layer, with their correlation statistics and snapshots.

    Per neuron and candidate the pool keeps the best score reached (:attr:`best_score`) and a
    snapshot of the candidate's weights at that point (the ``best_*`` buffers); acceptance installs
    the snapshots of each neuron's best candidate.

    Args:
        module: the wrapped module, template of the candidates' operation.
        num_candidates: K.
        num_neurons: neurons of the layer.
        num_accepted: D, the accepted sets the candidates cascade from.
        config: the engine configuration.
        output_key: for a module with a tuple output, the entry that holds the neurons.
        index: for sparse candidates, the inputs ``[K, out, k]`` each one sees (``None``: dense).
    """

    def __init__(
        self,
        module: nn.Module,
        num_candidates: int,
        num_neurons: int,
        num_accepted: int,
        config: DendriteConfig,
        output_key: int | str | None = None,
        index: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        fan_in = None if index is None else index.shape[-1]
        self.bank = make_bank(module, num_candidates, config.init_scale, output_key, fan_in=fan_in, index=index)
        like = next(iter(self.bank.stacked().values()))
        zeros = like.new_zeros
        # Zero cascade weights: a candidate starts as a function of x̂ alone and learns how much
        # of the earlier dendrites to use.
        self.cascade_weight = (
            nn.Parameter(zeros(num_candidates, num_accepted, num_neurons)) if config.cascade and num_accepted else None
        )
        # Gradient-descent candidates feed the output through w, starting at 0 (function-preserving).
        self.output_weight = nn.Parameter(zeros(num_candidates, num_neurons)) if config.learning == "gradient" else None
        self.statistics = CorrelationStatistics(num_candidates, num_neurons, config)
        self.register_buffer("best_score", torch.full((num_candidates, num_neurons), -1.0, device=like.device))
        for name, t in self._learned().items():
            self.register_buffer("best_" + name, t.detach().clone())
        #: The loss scale the errors arriving in backward carry (a GradScaler's scale). Statistics
        #: are kept in unscaled units and the gradient handed back is scaled by it.
        self.loss_scale: float = 1.0
        #: Whether a loss scaler is in use (set by ``set_loss_scale``); see :meth:`observe`.
        self.scaled: bool = False
        #: Candidate sets whose outputs went non-finite in the last backward: their gradients are
        #: zeroed (so the optimizer's state stays finite) and they restart from fresh weights at
        #: the next forward.
        self._diverged: Tensor | None = None
        self.__dict__["_template"] = module  # not a submodule: the layer owns it
        self._initial_checksum = self._checksum()
        for p in self.parameters():
            p.register_hook(self._zero_diverged)
        self.neuron_axis: int = -1

    def _learned(self) -> dict[str, Tensor]:
        """Every tensor a candidate learns, by buffer-name suffix (bank params and cascade)."""
        tensors: dict[str, Tensor] = {"bank__" + n: p for n, p in self.bank.stacked().items()}
        if self.cascade_weight is not None:
            tensors["cascade_weight"] = self.cascade_weight
        return tensors

    @property
    def num_candidates(self) -> int:
        """K."""
        return self.best_score.shape[0]

    def forward(self, inputs: tuple[Any, ...], accepted: Tensor | None, axis: int, **kwargs: Any) -> Tensor:
        """Candidate outputs ``V`` shaped ``(..., K, out, ...)``."""
        if self._diverged is not None:
            self._restart(self._diverged)
            self._diverged = None
        self.neuron_axis = axis
        z = self.bank(*inputs, neuron_axis=axis, **kwargs)  # (..., K, out, ...)
        if self.cascade_weight is not None and accepted is not None:
            trailing = z.dim() - axis - 2
            accepted = accepted.detach()
            # One multiply-add per accepted dendrite; a single broadcast would materialise a
            # (..., K, D, out, ...) temporary in forward and again in backward.
            for a, c in zip(accepted.unbind(axis), self.cascade_weight.unbind(1), strict=True):
                z = torch.addcmul(z, a.unsqueeze(axis), _per_neuron(c, trailing))  # c: (K, out)
        return _ACTIVATIONS[self.config.activation](z)

    def observe(self, v: Tensor, e: Tensor) -> Tensor | None:
        """Fold a batch into the statistics, snapshot improved candidates, return ``∂(−J)/∂V``."""
        scale, axis, stats = self.loss_scale, self.neuron_axis, self.statistics
        finite = stats.update(v, e, axis, scale)
        if stats.diverged is not None:
            self._diverged = stats.diverged
            log.warning(
                "pb_lightning: %d candidate set(s) produced non-finite outputs and restart from fresh weights.",
                int(stats.diverged.sum()),
            )
        if not finite or not stats.warmed_up:
            if not self.scaled:
                return None
            # A GradScaler learns about the step only through these gradients (the candidates are
            # all that trains): it refuses a step with no gradient at all, and must see an overflow
            # as a non-finite gradient to skip the step and lower its scale.
            return torch.zeros_like(v) if finite else torch.full_like(v, float("nan"))
        cov, norm = stats.covariance(), stats.normalizer()
        self._record_best(cov.abs() / norm)  # = stats.score(), computed once for both uses
        if self.config.learning != "correlation":
            return None
        return stats.objective_gradient(e, axis, scale, covariance=cov, normalizer=norm).to(v.dtype)

    @torch.no_grad()
    def _checksum(self) -> float:
        return float(sum(float(p.double().abs().sum()) for p in self.parameters()))

    def moved(self) -> bool:
        """Whether training changed the candidates' weights at all since they were created."""
        return self._checksum() != self._initial_checksum

    def _zero_diverged(self, grad: Tensor) -> Tensor:
        # Every candidate tensor has the set axis first. Only diverged sets are touched: a
        # GradScaler must still see the overflow of a whole batch as non-finite gradients.
        if self._diverged is None:
            return grad
        grad = grad.clone()
        grad[self._diverged] = 0.0
        return grad

    @torch.no_grad()
    def _restart(self, sets: Tensor) -> None:
        """Give candidate ``sets`` fresh weights and forget their best scores and snapshots."""
        index = self.bank.structure().get("index")
        fan_in = None if index is None else index.shape[-1]
        fresh = make_bank(self._template, self.num_candidates, self.config.init_scale, fan_in=fan_in, index=index)
        fresh = fresh.stacked()
        for name, p in self.bank.stacked().items():
            p[sets] = fresh[name][sets].to(p)
        if self.cascade_weight is not None:
            self.cascade_weight[sets] = 0.0
        if self.output_weight is not None:
            self.output_weight[sets] = 0.0
        self.best_score[sets] = -1.0
        for name, current in self._learned().items():
            getattr(self, "best_" + name)[sets] = current[sets]

    @torch.no_grad()
    def _record_best(self, score: Tensor) -> None:
        if not self.bank.per_neuron:
            # One custom-module copy serves every neuron, so it is judged by its mean score.
            score = score.mean(1, keepdim=True).expand_as(score)
        improved = score > self.best_score
        num_improved = int(improved.sum())
        if num_improved == 0:
            return
        if num_improved == improved.numel():
            # While candidates are learning, every score usually rises at every step: whole-tensor
            # copies then do the same as the masked ones below without building index lists.
            self.best_score.copy_(score)
            for name, current in self._learned().items():
                getattr(self, "best_" + name).copy_(current.detach())
            return
        self.best_score[improved] = score[improved]
        set_improved = improved[:, 0]
        for name, current in self._learned().items():
            best = getattr(self, "best_" + name)
            if name == "cascade_weight":  # (K, D, out): the neuron axis is last
                best.transpose(1, 2)[improved] = current.detach().transpose(1, 2)[improved]
            elif self.bank.per_neuron:
                best[improved] = current.detach()[improved]
            else:
                best[set_improved] = current.detach()[set_improved]

    def choice(self) -> Tensor:
        """For every neuron, the index of the candidate to accept."""
        if self.config.learning == "gradient":
            return torch.zeros(self.best_score.shape[1], dtype=torch.long, device=self.best_score.device)
        return self.best_score.argmax(0)

    def selected(self) -> tuple[dict[str, Tensor], Tensor | None, Tensor | None]:
        """The set to accept: bank tensors ``[1, ...]``, cascade ``[D, out]`` and output weight ``[out]``.

        Correlation candidates give their snapshot at the best score; gradient-descent candidates
        (no correlation objective to snapshot on) give their final weights and output weight.
        """
        choice = self.choice()
        snapshot = self.config.learning == "correlation"
        source = {n: (getattr(self, "best_" + n) if snapshot else t) for n, t in self._learned().items()}
        bank = take_sets(
            {n[len("bank__") :]: t for n, t in source.items() if n.startswith("bank__")} | self.bank.structure(),
            choice,
            per_neuron=self.bank.per_neuron,
        )
        cascade = None
        if self.cascade_weight is not None:
            c = source["cascade_weight"].detach()  # (K, D, out)
            cascade = c.gather(0, choice.view(1, 1, -1).expand(1, *c.shape[1:]))[0]
        output = None
        if self.output_weight is not None:
            output = self.output_weight.detach().gather(0, choice.view(1, -1))[0]
        return bank, cascade, output


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
            self.cascade_weight = nn.Parameter(like.new_empty(_triangle(num), num_neurons))
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
        scores = pool.best_score.max(0).values.clamp_min(0)
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

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # One frame for the whole forward (it shows in small networks' steps); a tuple output's
        # neuron entry is taken out here and put back at every return.
        y = out = self.module(*args, **kwargs)
        key = self.output_key
        if key is not None:
            y = select_output(out, key, self.name)
        if self.norm is not None:
            y = self.norm(y)
        if self._num_neurons is None:  # a custom module: its output tells the neuron count
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
        observe = self.training and torch.is_grad_enabled()
        if not (observe or gradient_learning):
            # correlation candidates do not change the output: skip them when not learning
            return y if key is None else replace_output(out, key, y)
        v = pool(detached, acts, axis, **kwargs)
        if gradient_learning:
            y = add_weighted(y, v, pool.output_weight, axis)
        if observe:
            y = _tap(y, v, pool)
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

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, neurons={self._num_neurons}, dendrites={self.num_dendrites}, "
            f"candidates={self.num_candidates}"
        )
