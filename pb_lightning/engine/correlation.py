r"""Correlation learning: candidates learn to follow their neuron's remaining error.

For candidate ``k`` of neuron ``i`` with output ``V`` and the neuron's error
``E = ∂L/∂y'_i`` (the ordinary backprop gradient at the neuron's output), Cascade-Correlation's
objective is the magnitude of their covariance over all samples and positions ``p``:

.. code-block:: text

    S_{k,i} = | Σ_p (V_{p,k,i} − V̄_{k,i}) (E_{p,i} − Ē_i) | / N_{k,i}

Running estimates (exponential moving averages over mini-batches) hold the first and second
moments of ``V`` and ``E`` and their cross moment; from them come the means, the sign
``σ = sign(cov)`` and the normaliser ``N``:

* ``"raw"``: ``N = 1``.
* ``"error_energy"``: ``N = mean(E²)`` (Cascade-Correlation's division by ``Σ E²``).
* ``"pearson"`` (default): ``N = std(V)·std(E)``, so ``S`` is a correlation and a loss scale
  (mixed precision, a loss multiplied by a constant) cancels out.

Each training step, with those estimates held constant, the candidate ascends the batch objective

.. code-block:: text

    J = Σ_{k,i} σ_{k,i} / (P · N_{k,i}) · Σ_p V_{p,k,i} (E_{p,i} − Ē_i)

(``P`` positions in the batch), whose gradient ``σ (E − Ē) / (P N)`` with respect to ``V`` is the
Cascade-Correlation update. :class:`CorrelationTap` delivers it from the *same* backward pass as
the task loss: it is the identity on the layer output in the forward pass, receives ``E`` in its
backward, and hands ``−∂J/∂V`` to the candidates' graph. No second backward pass is needed.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pb_lightning.engine.compiled import compiled_or_eager
from pb_lightning.engine.config import DendriteConfig

log = logging.getLogger(__name__)

# Rows of the moment buffer.
_V, _E, _VV, _EE, _VE = range(5)


def _sum_keeping(x: Tensor, keep: int, count: int) -> Tensor:
    """Sum of ``x`` over every axis except ``keep … keep + count - 1``.

    Axes after the kept ones (spatial positions) are summed first: they are innermost in memory,
    so that is a contiguous reduction, and the batch axes are then summed over a tensor smaller by
    the number of positions. One reduction over the scattered axes together was up to 2x slower
    on conv layouts.
    """
    inner = tuple(range(keep + count, x.dim()))
    if inner:
        x = x.sum(inner)
    return x.sum(tuple(range(keep))) if keep else x


def _float32(t: Tensor) -> Tensor:
    """``t`` detached, in float32; without a dispatch for what is already so (the common case)."""
    if t.requires_grad:
        t = t.detach()
    return t if t.dtype == torch.float32 else t.float()


def batch_moments(v: Tensor, e: Tensor, axis: int) -> Tensor:
    """The batch means of ``V, E, V², E², V·E`` per candidate and neuron: ``[5, K, out]``.

    ``V`` is ``(..., K, out, ...)`` with its set axis at ``axis``; ``E`` is ``(..., out, ...)`` with
    its neuron axis at ``axis``. Means run over every other axis (batch and positions) in the
    tensors' own layout — no flattening copies — and always in float32, whatever the autocast or
    parameter dtype.
    """
    v, e = _float32(v), _float32(e)
    k = v.shape[axis]
    # One statement per product, so that each full-size temporary is freed before the next one is
    # made: the allocator then reuses its memory instead of mapping fresh pages every time.
    sum_v = _sum_keeping(v, axis, 2)  # (K, out)
    sum_vv = _sum_keeping(v * v, axis, 2)
    sum_ve = _sum_keeping(v * e.unsqueeze(axis), axis, 2)
    sum_e = _sum_keeping(e, axis, 1).expand_as(sum_v)  # (out,) → (K, out)
    sum_ee = _sum_keeping(e * e, axis, 1).expand_as(sum_v)
    positions = v.numel() // (k * v.shape[axis + 1])
    return torch.stack([sum_v, sum_e, sum_vv, sum_ee, sum_ve]).div_(positions)


@compiled_or_eager
def _moments_and_sum(v: Tensor, e: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    """:func:`batch_moments` and their sum (for the finiteness check), in one compilable function."""
    moments = batch_moments(v, e, axis)
    return moments, moments.sum()


def _covariance(moments: Tensor) -> Tensor:
    mean_v, mean_e, _, _, mean_ve = moments.unbind(0)
    return torch.addcmul(mean_ve, mean_v, mean_e, value=-1)


def _normalizer(moments: Tensor, eps: float, mode: str) -> Tensor:
    mean_v, mean_e, mean_vv, mean_ee, _ = moments.unbind(0)
    if mode == "raw":
        return torch.ones_like(mean_v)
    if mode == "error_energy":
        return mean_ee + eps
    # In-place on fresh tensors: these [K, out] ops run for every layer at every step, and
    # at that size their cost is the per-op overhead, not arithmetic.
    var_v = torch.addcmul(mean_vv, mean_v, mean_v, value=-1).clamp_min_(0).add_(eps)
    var_e = torch.addcmul(mean_ee, mean_e, mean_e, value=-1).clamp_min_(0).add_(eps)
    return var_v.mul_(var_e).sqrt_()


def _gradient(e: Tensor, mean_e: Tensor, cov: Tensor, norm: Tensor, axis: int, scale: float) -> Tensor:
    """``−∂J/∂V`` (see :meth:`CorrelationStatistics.score_and_gradient`) from the running estimates."""
    p = e.numel() // e.shape[axis]
    coef = torch.sign(cov).div_(norm).mul_(-1.0 / p)  # (K, out)
    trailing = e.dim() - axis - 1
    mean_e = mean_e.view(-1, *([1] * trailing))
    centred = torch.sub(_float32(e), mean_e, alpha=scale)  # scale · (E/scale − Ē), (..., out, ...)
    return centred.unsqueeze(axis) * coef.view(*coef.shape, *([1] * trailing))


@compiled_or_eager
def _score_and_gradient(
    moments: Tensor, e: Tensor, axis: int, scale: float, eps: float, mode: str, gradient: bool
) -> tuple[Tensor, Tensor | None]:
    """The running score ``S`` ``[K, out]`` and, if ``gradient``, ``−∂J/∂V`` for errors ``e``."""
    cov, norm = _covariance(moments), _normalizer(moments, eps, mode)
    score = cov.abs() / norm
    return score, (_gradient(e, moments[_E, 0], cov, norm, axis, scale) if gradient else None)


class CorrelationStatistics(nn.Module):
    """Running moments of candidate outputs and neuron errors for one layer's candidate pool.

    The moments are buffers, so a checkpoint taken mid-dendrite-phase resumes with the same
    estimates. Moments of ``E`` are kept in *unscaled* units: :meth:`update` and
    :meth:`score_and_gradient` take the loss scale the incoming errors carry.

    Args:
        num_candidates: K.
        num_neurons: neurons of the layer.
        config: the engine configuration (momentum, normalisation, warm-up, eps).
    """

    # Buffers, declared for the type checker (``register_buffer`` sets them).
    moments: Tensor
    steps: Tensor
    skipped_steps: Tensor

    def __init__(self, num_candidates: int, num_neurons: int, config: DendriteConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("moments", torch.zeros(5, num_candidates, num_neurons))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        # A host-side copy of ``steps``: reading the buffer (``int(self.steps)``) waits for the
        # device at every step of every layer. Dropped whenever a state dict is loaded.
        self._host_steps: int | None = 0
        #: After :meth:`update`: which candidate sets produced non-finite outputs in that batch (or None).
        self.diverged: Tensor | None = None
        #: Under data parallelism, the process group whose ranks pool their batch moments, so that
        #: every replica holds the same statistics of all the data (docs/ALGORITHM.md §8).
        self.process_group: Any = None

    def covariance(self) -> Tensor:
        """Running covariance of each candidate with its neuron's error, ``[K, out]``."""
        return _covariance(self.moments)

    def normalizer(self) -> Tensor:
        """``N`` of the module docstring, ``[K, out]``."""
        return _normalizer(self.moments, self.config.eps, self.config.normalization)

    def score(self) -> Tensor:
        """The running objective ``S`` per candidate and neuron, ``[K, out]`` (≥ 0)."""
        return self.covariance().abs() / self.normalizer()

    @property
    def num_steps(self) -> int:
        """Batches folded in so far (``steps``), read from the device only after a state-dict load."""
        if self._host_steps is None:
            self._host_steps = int(self.steps)
        return self._host_steps

    @property
    def warmed_up(self) -> bool:
        """Whether enough batches have been seen to start updating candidates."""
        return self.num_steps > self.config.warmup_steps

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._host_steps = None  # the loaded buffer may hold any count
        super()._load_from_state_dict(*args, **kwargs)

    def update(self, v: Tensor, e: Tensor, axis: int, scale: float = 1.0) -> bool:
        """Fold one batch into the running moments; returns False (and skips) if it is not finite.

        ``e`` carries the loss scale ``scale``; its moments are stored unscaled. Non-finite batches
        happen under a GradScaler whenever the loss scale overflows (the optimizer step is then
        skipped too); folding them in would poison every later estimate.
        """
        self.diverged = None
        moments, total = _moments_and_sum(self.config.compile_statistics, v, e, axis)
        if scale != 1.0:
            moments[_E] /= scale
            moments[_VE] /= scale
            moments[_EE] /= scale * scale
        if self.process_group is not None:
            # Every rank's batch has the same size under a DistributedSampler, so the mean of the
            # ranks' means is the mean over all of them. A non-finite rank makes every rank skip.
            dist.all_reduce(moments, group=self.process_group)
            moments /= dist.get_world_size(self.process_group)
        if scale != 1.0 or self.process_group is not None:
            total = moments.sum()  # of the moments as changed above
        # A sum is non-finite exactly when some moment is (or the sum overflows, which the full
        # check below then clears): one reduction instead of a check per element on every step.
        if not math.isfinite(float(total)):
            finite = torch.isfinite(moments)
            if not bool(finite[[_E, _EE]].all()):
                self.skipped_steps += 1
                log.debug("Skipped a batch with non-finite neuron errors in the correlation statistics.")
                return False
            diverged = ~finite[[_V, _VV, _VE]].all(0).all(1)  # (K,)
            if bool(diverged.any()):
                # Only some candidates produced non-finite outputs: they restart from fresh weights
                # (CandidatePool.observe); their moments restart from zero, the others go on.
                self.diverged = diverged
                for row in (_V, _VV, _VE):
                    moments[row, diverged] = 0.0
                    self.moments[row, diverged] = 0.0
        steps = self.num_steps
        # Averaging with weight 1/(t+1) until the EMA's horizon is reached removes the bias of
        # zero-initialised moments, so the estimates are usable from the first batch.
        decay = min(self.config.statistics_momentum, steps / (steps + 1))
        self.moments.lerp_(moments.to(self.moments.dtype), 1 - decay)
        self.steps.add_(1)  # in place: no Module.__setattr__ on the hot path
        self._host_steps = steps + 1
        return True

    def score_and_gradient(self, e: Tensor, axis: int, scale: float = 1.0) -> tuple[Tensor, Tensor | None]:
        """:meth:`score` and, for correlation learning, ``−∂J/∂V`` for the batch whose errors are ``e``.

        The gradient is broadcast to ``V``'s shape, in float32, from the current running estimates
        of ``Ē``, ``σ`` and ``N`` (held constant). The minus sign makes it a gradient to *descend*;
        ``e`` carries the loss scale ``scale`` and so does the result, which a GradScaler's unscale
        step then brings back to ``−∂J/∂V``. With ``config.compile_statistics`` both run as one
        compiled function; otherwise (or where compilation fails) eagerly, with the same ops.
        """
        config = self.config
        gradient = config.learning == "correlation"
        return _score_and_gradient(
            config.compile_statistics, self.moments, e, axis, scale, config.eps, config.normalization, gradient
        )


class CandidateObserver(Protocol):
    """What :class:`CorrelationTap` reports a batch to (the layer's candidate pool)."""

    def observe(self, v: Tensor, e: Tensor) -> Tensor | None:
        """Take one batch's candidate outputs and neuron errors; return the gradient for ``V``."""
        ...


class CorrelationTap(torch.autograd.Function):
    """Identity on the layer output that hands its incoming gradient ``E`` to the candidate pool.

    ``forward(y, v, observer)`` returns ``y`` unchanged; ``v`` (the candidates' outputs) only
    enters so that its graph receives the gradient the observer returns.
    """

    @staticmethod
    def forward(ctx: Any, y: Tensor, v: Tensor, observer: CandidateObserver) -> Tensor:  # type: ignore[override]
        # The classic ``forward(ctx, ...)`` form: with a separate ``setup_context``, every call
        # binds its arguments through ``inspect.signature``, once per layer and step.
        ctx.observer = observer
        ctx.save_for_backward(v)
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor, Tensor | None, None]:  # type: ignore[override]
        (v,) = ctx.saved_tensors
        return grad_y, ctx.observer.observe(v, grad_y), None
