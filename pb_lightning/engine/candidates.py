"""The candidate pool of a dendrite phase: K candidate sets trained by correlation learning
(docs/ALGORITHM.md §3), and the tap that hands them the neuron's error."""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pb_lightning.engine.banks import take_sets
from pb_lightning.engine.cascade import ACTIVATIONS, dendrite_sets, per_neuron
from pb_lightning.engine.config import DendriteConfig
from pb_lightning.engine.correlation import CorrelationStatistics, CorrelationTap
from pb_lightning.engine.sparse_banks import make_bank

log = logging.getLogger(__name__)


#: Live candidate pools by key, so that the traced tap below can find its pool from an integer:
#: a custom op takes tensors and numbers, never a Python object.
_POOLS: weakref.WeakValueDictionary[int, CandidatePool] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


def error_tap(y: Tensor, v: Tensor, pool: CandidatePool) -> Tensor:
    """Apply the correlation tap: ``y`` unchanged, and ``∂(−J)/∂V`` for ``v`` in backward.

    The layer calls it on its output during a dendrite phase: the gradient that reaches ``y`` is
    the neuron's error, which ``pool`` observes to score and train its candidates ``v``.

    Eagerly this is :class:`CorrelationTap`. Under ``torch.compile`` it is :class:`_TracedTap`,
    which dynamo traces into the layer's graph: a graph break here (the tap used to be a
    ``torch.compiler.disable``d call) split every layer into its own frame, and as all layers share
    ``PerforatedLayer.forward``, a model with more than 8 layer variants hit dynamo's recompile
    limit and ran the rest eagerly.
    """
    if torch.compiler.is_compiling():
        return _TracedTap.apply(y, v, pool.tap_key)
    return CorrelationTap.apply(y, v, pool)


@torch.library.custom_op("pb_lightning::tap_gradient", mutates_args=())
def _tap_gradient(v: Tensor, e: Tensor, key: int) -> Tensor:
    """Pool ``key`` observes a batch; returns the candidates' gradient (zeros when there is none).

    An opaque op: the statistics update has data-dependent Python control flow, so compiled
    backward graphs call it eagerly. A graph cannot return "no gradient", so a pool still warming
    up hands back zeros where the eager tap gives ``None`` (the candidates do not move either way).
    """
    grad = _POOLS[key].observe(v, e)
    # Contiguous, as the fake kernel promises: compiled code checks the layout it was built for.
    return v.new_zeros(v.shape) if grad is None else grad.contiguous()


@_tap_gradient.register_fake
def _(v: Tensor, e: Tensor, key: int) -> Tensor:
    return v.new_empty(v.shape)


class _TracedTap(torch.autograd.Function):
    """:class:`CorrelationTap` in a form dynamo traces: the pool travels as its integer key."""

    @staticmethod
    def forward(ctx: Any, y: Tensor, v: Tensor, key: int) -> Tensor:  # type: ignore[override]
        ctx.key = key
        ctx.save_for_backward(v)
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        (v,) = ctx.saved_tensors
        return grad_y, _tap_gradient(v, grad_y, ctx.key), None


class CandidatePool(nn.Module):
    """K candidate dendrite sets of one layer, with their correlation statistics and snapshots.

    Per candidate and neuron the pool keeps the best score reached (:attr:`best_score`,
    ``[K, out]``). Per neuron it keeps one snapshot (the ``best_*`` buffers, each shaped like one
    set, ``[1, ...]``): the weights of the neuron's best candidate at its best step, which candidate
    that was (:attr:`best_candidate`) and the score it reached there (:attr:`best_candidate_score`).
    Acceptance installs only that snapshot, so keeping one per candidate (K sets more, the bulk of a
    dendrite phase's memory in a small network) bought nothing. Ties go to the lowest candidate
    index, then to the earliest step, so the choice is the one ``best_score.argmax(0)`` made when
    every candidate kept its own snapshot.

    A candidate set that diverges restarts from fresh weights and its :attr:`best_score` starts
    over, but a neuron's snapshot taken from it stays: it was taken at a finite score, before the
    divergence, and is still the best that neuron has seen. The restarted candidate replaces it
    only by beating its score. So the snapshot's score can exceed every current ``best_score``;
    :meth:`scores` (the accepted scores) is that snapshot's score.

    Custom modules (a bank that is not ``per_neuron``) share one set of weights across all their
    neurons, so there a set is judged by its mean score and every neuron holds the same candidate.

    Args:
        module: the wrapped module, template of the candidates' operation.
        num_candidates: K.
        num_neurons: neurons of the layer.
        num_accepted: D, the accepted sets the candidates cascade from.
        config: the engine configuration.
        output_key: for a module with a tuple output, the entry that holds the neurons.
        index: for sparse candidates, the inputs ``[K, out, k]`` each one sees (``None``: dense).
    """

    # Buffers and the unregistered template, declared for the type checker (``register_buffer``
    # and ``__dict__`` set them, so ``nn.Module.__getattr__`` would otherwise type them loosely).
    best_score: Tensor
    best_candidate: Tensor
    best_candidate_score: Tensor
    _template: nn.Module

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
        self.register_buffer("best_candidate", torch.zeros(num_neurons, dtype=torch.long, device=like.device))
        self.register_buffer("best_candidate_score", torch.full((num_neurons,), -1.0, device=like.device))
        for name, t in self._learned().items():
            self.register_buffer("best_" + name, t.detach()[:1].clone())
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
        self._register()

    def _register(self) -> None:
        # A copy (deepcopy, pickle) gets its own key: it must observe into its own statistics.
        self.tap_key: int = next(_KEYS)
        _POOLS[self.tap_key] = self

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._register()

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

    def forward(
        self, inputs: tuple[Any, ...], accepted: Tensor | Sequence[Tensor] | None, axis: int, **kwargs: Any
    ) -> Tensor:
        """Candidate outputs ``V`` shaped ``(..., K, out, ...)``; ``accepted`` as from :func:`accepted_activations`."""
        if self._diverged is not None:
            self._restart(self._diverged)
            self._diverged = None
        self.neuron_axis = axis
        z = self.bank(*inputs, neuron_axis=axis, **kwargs)  # (..., K, out, ...)
        if self.cascade_weight is not None and accepted is not None:
            trailing = z.dim() - axis - 2
            # One multiply-add per accepted dendrite; a single broadcast would materialise a
            # (..., K, D, out, ...) temporary in forward and again in backward.
            for a, c in zip(dendrite_sets(accepted, axis), self.cascade_weight.unbind(1), strict=True):
                z = torch.addcmul(z, a.detach().unsqueeze(axis), per_neuron(c, trailing))  # c: (K, out)
        return ACTIVATIONS[self.config.activation](z)

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
        score, grad = stats.score_and_gradient(e, axis, scale)  # grad: None unless learning="correlation"
        self._record_best(score)
        return None if grad is None else grad.to(v.dtype)

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
        """Give candidate ``sets`` fresh weights and forget their best scores.

        The neurons' snapshots stay, also those taken from ``sets`` (see the class docstring).
        """
        index = self.bank.structure().get("index")
        fan_in = None if index is None else index.shape[-1]
        bank = make_bank(self._template, self.num_candidates, self.config.init_scale, fan_in=fan_in, index=index)
        fresh = bank.stacked()
        for name, p in self.bank.stacked().items():
            p[sets] = fresh[name][sets].to(p)
        if self.cascade_weight is not None:
            self.cascade_weight[sets] = 0.0
        if self.output_weight is not None:
            self.output_weight[sets] = 0.0
        self.best_score[sets] = -1.0

    @torch.no_grad()
    def _record_best(self, score: Tensor) -> None:
        if not self.bank.per_neuron:
            # One custom-module copy serves every neuron, so it is judged by its mean score.
            score = score.mean(1, keepdim=True).expand_as(score)
        if self.statistics.diverged is not None:
            # A set that went non-finite in this batch restarts before the next forward: its
            # score here (of zeroed moments) and its weights are no candidate for a snapshot.
            score = score.masked_fill(self.statistics.diverged.view(-1, 1), float("nan"))
        improved = score > self.best_score  # False where the score is NaN
        self.best_score.copy_(torch.where(improved, score, self.best_score))
        # The snapshot goes to the best candidate of this step, the lowest index among equals
        # (argmax returns the first maximum), if it beats the neuron's snapshot, or equals it from
        # a lower index: the order (score, then lowest candidate, then earliest step) in which the
        # old per-candidate snapshots were chosen. Only candidates that improved their own best can
        # get there: any other score is at most its best, which the snapshot already weighed.
        step = torch.where(improved, score, float("-inf"))
        top, candidate = step.max(0)
        held = self.best_candidate_score
        replace = (top > held) | ((top == held) & (candidate < self.best_candidate))
        num_replaced = int(replace.sum())  # the one wait for the device in this method
        if num_replaced == 0:
            return
        everywhere = num_replaced == replace.numel()
        self.best_candidate_score.copy_(torch.where(replace, top, self.best_candidate_score))
        self.best_candidate.copy_(torch.where(replace, candidate, self.best_candidate))
        # Written into the snapshot buffers without set-sized temporaries: fresh allocations per
        # layer and step can change how glibc maps and trims the heap, and with it how many pages
        # the step's large tensors fault in (benchmarks/README.md, issue 16 item 1).
        rows = None if everywhere else replace.nonzero()[:, 0]
        for name, t in self._learned().items():
            best, t = getattr(self, "best_" + name), t.detach()
            if not self.bank.per_neuron and name != "cascade_weight":
                # One candidate for every neuron (they share its weights), so `everywhere` holds.
                torch.index_select(t, 0, candidate[:1], out=best)
            elif everywhere:  # while candidates learn, every neuron usually improves at every step
                index = candidate.view(1, *([1] * (name == "cascade_weight")), -1)
                index = index.view(*index.shape, *([1] * (t.dim() - index.dim())))
                torch.gather(t, 0, index.expand(1, *t.shape[1:]), out=best)
            elif name == "cascade_weight":  # [K, D, out]: the neuron axis is last
                best[0][:, rows] = t[candidate[rows], :, rows].T
            else:  # [K, out, ...]
                best[0][rows] = t[candidate[rows], rows]

    def _take(self, tensors: dict[str, Tensor], choice: Tensor) -> dict[str, Tensor]:
        """One set ``[1, ...]`` of :meth:`_learned`-named tensors: candidate ``choice[i]`` for neuron ``i``."""
        taken = take_sets(
            {n: t for n, t in tensors.items() if n != "cascade_weight"}, choice, per_neuron=self.bank.per_neuron
        )
        cascade = tensors.get("cascade_weight")
        if cascade is not None:  # [K, D, out]
            c = cascade.detach()
            taken["cascade_weight"] = c.gather(0, choice.view(1, 1, -1).expand(1, *c.shape[1:]))
        return taken

    def scores(self) -> Tensor:
        """Each neuron's best score so far, ``[out]``: that of the snapshot acceptance installs.

        Gradient-descent candidates are accepted with their final weights, not a snapshot: theirs
        is the best score of the candidates as they are (K = 1), which a restart starts over.
        """
        if self.config.learning == "gradient":
            return self.best_score.max(0).values.clamp_min(0)
        return self.best_candidate_score.clamp_min(0)

    def choice(self) -> Tensor:
        """For every neuron, the index of the candidate to accept."""
        if self.config.learning == "gradient":
            return torch.zeros(self.best_score.shape[1], dtype=torch.long, device=self.best_score.device)
        return self.best_candidate.clone()  # a copy: the buffer changes at every improvement

    def selected(self) -> tuple[dict[str, Tensor], Tensor | None, Tensor | None]:
        """The set to accept: bank tensors ``[1, ...]``, cascade ``[D, out]`` and output weight ``[out]``.

        Correlation candidates give their snapshot at the best score; gradient-descent candidates
        (no correlation objective to snapshot on) give their final weights and output weight. A
        sparse bank's wiring (``index``) is that of the chosen candidate either way.
        """
        choice = self.choice()
        if self.config.learning == "correlation":
            learned = {n: getattr(self, "best_" + n).detach().clone() for n in self._learned()}
        else:
            learned = self._take(self._learned(), choice)
        bank = {n[len("bank__") :]: t for n, t in learned.items() if n.startswith("bank__")}
        bank |= take_sets(self.bank.structure(), choice, per_neuron=self.bank.per_neuron)
        cascade = learned["cascade_weight"][0] if "cascade_weight" in learned else None
        output = None
        if self.output_weight is not None:
            output = self.output_weight.detach().gather(0, choice.view(1, -1))[0]
        return bank, cascade, output

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # A state dict from before one snapshot per neuron holds every candidate's snapshot
        # ([K, ...]) and no best_candidate: keep, per neuron, the one acceptance would have taken.
        scores = state_dict.get(prefix + "best_score")
        if scores is not None and prefix + "best_candidate" not in state_dict:
            choice = scores.argmax(0)
            state_dict[prefix + "best_candidate"] = choice
            state_dict[prefix + "best_candidate_score"] = scores.max(0).values
            for name in self._learned():
                key = prefix + "best_" + name
                if key in state_dict:  # (a missing one is reported by the load)
                    old = state_dict[key]
                    state_dict[key] = self._take({name: old}, choice.to(old.device))[name]
        super()._load_from_state_dict(state_dict, prefix, *args)
