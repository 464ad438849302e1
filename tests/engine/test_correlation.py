"""Correlation learning of candidate dendrites, checked against the objective written out by hand.

The package hands the candidates ``−∂J/∂V`` from inside the ordinary backward pass (a custom
autograd function at the layer output). That is easy to get subtly wrong — a wrong sign, a mean
taken over the wrong axis, statistics updated after instead of before the gradient, a loss scale
applied twice — and none of those mistakes crash. So these tests rebuild the objective of
:mod:`pb_lightning.engine.correlation` from its definition, using only the model's public tensors as
inputs, and compare gradients, running moments, scores and snapshots with what the package did.
The last tests check that the learning actually helps on a task where the residual is learnable.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pb_lightning
from pb_lightning import (
    CandidatePool,
    DendriteConfig,
    PerforatedLayer,
    accept_dendrites,
    candidate_scores,
    perforate,
    perforated_layers,
    start_dendrite_phase,
    trainable_parameters,
)
from pb_lightning.engine import correlation
from pb_lightning.engine.config import Normalization
from pb_lightning.engine.correlation import CorrelationStatistics, batch_moments
from pb_lightning.errors import choices_of

_F: dict[str, Callable[[Tensor], Tensor]] = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}
_NORMALIZATIONS = choices_of(Normalization)

Batch = tuple[Tensor, Tensor]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one thread. With two, OpenMP's spin-waiting on a busy 2-core machine made
    the learning test 60x slower (0.2 s → 11 s for 500 steps) without changing any result."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------- models
def _tiny_model(kind: str, config: DendriteConfig, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Callable]:
    """A two-layer perforated network and a batch maker (fresh random batch on every call).

    Kinds: ``"linear"`` (``[B, F]`` input), ``"linear3d"`` (``[B, T, F]``: positions are batch and
    time, the neuron axis is last), ``"conv"`` (stride and padding in the observed layer, so a
    reference that ignores the template's hyperparameters, or mixes up spatial positions and
    neurons, cannot pass) and ``"conv_grouped"`` (groups=2, whose fused bank interleaves sets).
    """
    gen = torch.Generator().manual_seed(1234)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype)

    shapes: dict[str, tuple[nn.Module, tuple[int, ...], tuple[int, ...]]] = {
        "linear": (nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), (8, 4), (8, 3)),
        "linear3d": (nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), (3, 5, 4), (3, 5, 3)),
        "conv": (
            nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 3, padding=1)),
            (4, 2, 5, 5),
            (4, 2, 3, 3),
        ),
        "conv_grouped": (
            nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.Tanh(), nn.Conv2d(6, 2, 1)),
            (3, 4, 4, 4),
            (3, 2, 4, 4),
        ),
    }
    net, x_shape, y_shape = shapes[kind]

    def make_batch() -> Batch:
        return randn(*x_shape), randn(*y_shape)

    net = net.to(dtype)
    model = perforate(net, config=config)
    model(make_batch()[0])  # learn the neuron counts
    return model, make_batch


def _grow_accepted(model: nn.Module, num_sets: int) -> None:
    """Give every layer ``num_sets`` accepted sets with nonzero ``w`` and cascade weights.

    Accepting straight away installs the candidates' initial weights; randomising ``w`` and ``c``
    makes the accepted dendrites matter both to the network's output and to the candidates'
    cascade input, so the reference below has to get the cascade right.
    """
    for _ in range(num_sets):
        start_dendrite_phase(model)
        accept_dendrites(model)
    with torch.no_grad():
        for layer in perforated_layers(model):
            if layer.output_weight is not None:
                layer.output_weight.normal_(0.0, 0.5)
            if layer.cascade_weight is not None:
                layer.cascade_weight.normal_(0.0, 1.0)


def _loss(model: nn.Module, batch: Batch) -> Tensor:
    x, target = batch
    return F.mse_loss(model(x), target)


def _train_step(model: nn.Module, batch: Batch, opt: torch.optim.Optimizer) -> Tensor:
    opt.zero_grad(set_to_none=True)
    loss = _loss(model, batch)
    loss.backward()
    opt.step()
    return loss.detach()


# ------------------------------------------------------------------------------------ capturing
@dataclass
class Capture:
    """What one observed layer saw in the last training step: input, accepted acts, V and E."""

    x: Tensor | None = None
    accepted: Tensor | None = None
    v: Tensor | None = None
    e: Tensor | None = None
    handles: list[Any] = field(default_factory=list)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _capture(layer: PerforatedLayer) -> Capture:
    """Hook the candidates' forward (V and its inputs) and the layer output's gradient (E)."""
    cap = Capture()
    assert layer.candidates is not None

    def on_candidates(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        inputs, accepted = args[0], args[1]
        cap.x = inputs[0].detach().clone()
        cap.accepted = None if accepted is None else accepted.detach().clone()
        cap.v = output.detach().clone()

    def on_layer(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        def keep(grad: Tensor) -> None:
            cap.e = grad.detach().clone()

        output.register_hook(keep)

    cap.handles.append(layer.candidates.register_forward_hook(on_candidates))
    cap.handles.append(layer.register_forward_hook(on_layer))
    return cap


# ------------------------------------------------------------------------------------ reference
def _candidate_params(pool: CandidatePool) -> list[nn.Parameter]:
    params = [pool.bank.weight]
    if pool.bank.bias is not None:
        params.append(pool.bank.bias)
    if pool.cascade_weight is not None:
        params.append(pool.cascade_weight)
    return params


def _op(layer: PerforatedLayer, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """One copy of the wrapped module's operation with the given weights."""
    m = layer.module
    if isinstance(m, nn.Linear):
        return F.linear(x, weight, bias)
    assert isinstance(m, nn.Conv2d)
    return F.conv2d(x, weight, bias, m.stride, m.padding, m.dilation, m.groups)


def _axis(layer: PerforatedLayer, ndim: int) -> int:
    """The neuron axis of the layer's output, as a non-negative index."""
    return layer.neuron_axis % ndim


def _per_neuron(c: Tensor, like: Tensor, axis: int) -> Tensor:
    """View per-neuron scalars ``[out]`` so they broadcast over ``like`` (neurons at ``axis``)."""
    return c.view(-1, *([1] * (like.dim() - axis - 1)))


def _reference_accepted(layer: PerforatedLayer, x: Tensor) -> Tensor | None:
    """``a_d`` of the accepted dendrites, ``(..., D, out, ...)``, written from ALGORITHM.md §2."""
    if layer.dendrites is None or layer.num_dendrites == 0:
        return None
    f = _F[layer.config.activation]
    w, b = layer.dendrites.weight, layer.dendrites.bias
    acts: list[Tensor] = []
    row = 0  # cascade rows are c_{1,0}, c_{2,0}, c_{2,1}, ...
    for d in range(layer.num_dendrites):
        z = _op(layer, x, w[d], None if b is None else b[d])
        axis = _axis(layer, z.dim())
        for e in range(d):
            if layer.cascade_weight is not None:
                z = z + _per_neuron(layer.cascade_weight[row], z, axis) * acts[e]
            row += 1
        acts.append(f(z))
    return torch.stack(acts, axis)


def _reference_candidates(layer: PerforatedLayer, x: Tensor, accepted: Tensor | None) -> Tensor:
    """``V (..., K, out, ...)`` as a differentiable function of the candidate parameters."""
    pool = layer.candidates
    assert pool is not None
    f = _F[pool.config.activation]
    w, b, c = pool.bank.weight, pool.bank.bias, pool.cascade_weight
    outs = []
    for k in range(w.shape[0]):
        z = _op(layer, x.detach(), w[k], None if b is None else b[k])
        axis = _axis(layer, z.dim())
        if c is not None and accepted is not None:
            for d in range(accepted.shape[axis]):
                z = z + _per_neuron(c[k, d], z, axis) * accepted.select(axis, d).detach()
        outs.append(f(z))
    return torch.stack(outs, axis)


@dataclass
class Reference:
    """The running statistics after one batch, recomputed in float64 from their definition."""

    moments: Tensor  # [5, K, out]: means of V, E, V², E², V·E
    sigma: Tensor  # [K, out]
    e_bar: Tensor  # [out]
    normalizer: Tensor  # [K, out]
    score: Tensor  # [K, out]


def _positions(v: Tensor, e: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    """``V (..., K, out, ...)`` → ``[P, K, out]`` and ``E (..., out, ...)`` → ``[P, out]``.

    ``axis`` is the neuron axis of ``E``; ``V`` has its candidate axis there, neurons after it.
    """
    k, out = v.shape[axis], v.shape[axis + 1]
    vf = v.movedim((axis, axis + 1), (-2, -1)).reshape(-1, k, out)
    ef = e.movedim(axis, -1).reshape(-1, out)
    return vf, ef


def _reference_statistics(
    v: Tensor, e: Tensor, axis: int, old_moments: Tensor, steps_before: int, config: DendriteConfig
) -> Reference:
    vf, ef = (t.detach().double() for t in _positions(v, e, axis))
    ef3 = ef[:, None, :]  # broadcast over candidates
    batch = torch.stack(
        [
            vf.mean(0),
            ef3.expand_as(vf).mean(0),
            (vf**2).mean(0),
            (ef3**2).expand_as(vf).mean(0),
            (vf * ef3).mean(0),
        ]
    )
    t = steps_before
    decay = min(config.statistics_momentum, t / (t + 1))
    m = decay * old_moments.double() + (1 - decay) * batch
    mean_v, mean_e, mean_vv, mean_ee, mean_ve = m
    cov = mean_ve - mean_v * mean_e
    eps = config.eps
    if config.normalization == "raw":
        n = torch.ones_like(cov)
    elif config.normalization == "error_energy":
        n = mean_ee + eps
    else:
        var_v = (mean_vv - mean_v**2).clamp_min(0)
        var_e = (mean_ee - mean_e**2).clamp_min(0)
        n = torch.sqrt(var_v + eps) * torch.sqrt(var_e + eps)
    return Reference(m, torch.sign(cov), mean_e[0], n, cov.abs() / n)


def _objective(v: Tensor, e: Tensor, axis: int, ref: Reference) -> Tensor:
    """``J = Σ_{k,i} σ/(P·N) · Σ_p V_{p,k,i} (E_{p,i} − Ē_i)`` (differentiable in ``v``)."""
    vf, ef = _positions(v, e.detach(), axis)
    p = vf.shape[0]
    centred = ef.double() - ref.e_bar  # [P, out]
    per_candidate = (vf.double() * centred[:, None, :]).sum(0)  # [K, out]
    return (ref.sigma / (p * ref.normalizer) * per_candidate).sum()


def _close(actual: Tensor, expected: Tensor, rtol: float = 1e-4) -> None:
    """Elementwise closeness, with an absolute floor relative to the tensor's own scale."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=rtol * scale + 1e-30)


# ----------------------------------------------------------------------- 1. analytic gradient
_KINDS = ["linear", "linear3d", "conv", "conv_grouped"]
#: The compiled statistics (``compile_statistics=True``) on every input rank and normalisation, with
#: and without a cascade; each case compiles for some seconds, so not the whole product.
_COMPILED_CASES = [
    ("pearson", "linear", 2),
    ("pearson", "conv", 2),
    ("raw", "linear3d", 0),
    ("error_energy", "conv_grouped", 0),
]
_GRADIENT_CASES = [
    pytest.param(n, k, a, False, id=f"{a}-{k}-{n}") for n in _NORMALIZATIONS for k in _KINDS for a in (0, 2)
] + [pytest.param(n, k, a, True, id=f"{a}-{k}-{n}-compiled") for n, k, a in _COMPILED_CASES]


@pytest.fixture
def _strict_compile() -> Iterator[None]:
    """Make a compiled case fail rather than run eagerly behind dynamo's back (recompile limit)."""
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    for fn in (correlation._moments_and_sum, correlation._score_and_gradient):
        assert not fn.failed, f"{fn.fn.__name__} fell back to eager"


@pytest.mark.parametrize(("normalization", "kind", "num_accepted", "compiled"), _GRADIENT_CASES)
@pytest.mark.usefixtures("_strict_compile")
def test_candidate_gradient_equals_autograd_of_the_objective(
    normalization: str, kind: str, num_accepted: int, compiled: bool
) -> None:
    """The gradient the tap hands the candidates is exactly −∂J/∂θ of the documented objective.

    Four steps run with an optimizer and every one is checked: ``t = 0`` is the warm-up (moments
    only, no gradient), then ``t = 1, 2, 3`` with EMA decays ``min(0.6, t/(t+1)) = 0.5, 0.6, 0.6``,
    so both the bias-correcting branch and the momentum branch of the decay are exercised, and
    the statistics the gradient uses include the current batch. ``compiled``: the same checks,
    same tolerances, on the ``torch.compile``d statistics.
    """
    config = DendriteConfig(
        num_candidates=3,
        normalization=normalization,  # type: ignore[arg-type]
        warmup_steps=1,
        statistics_momentum=0.6,
        compile_statistics=compiled,
    )
    model, make_batch = _tiny_model(kind, config)
    _grow_accepted(model, num_accepted)
    start_dendrite_phase(model)
    layer = perforated_layers(model)[0]
    pool = layer.candidates
    assert pool is not None
    if num_accepted:
        assert pool.cascade_weight is not None
        assert pool.cascade_weight.shape == (3, num_accepted, layer.num_neurons)
        with torch.no_grad():
            pool.cascade_weight.normal_(0.0, 1.0)  # zero at start: make the cascade term count
    else:
        assert pool.cascade_weight is None
    params = _candidate_params(pool)
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.5)
    for steps_before in range(4):
        cap = _capture(layer)
        old_moments = pool.statistics.moments.detach().clone()
        assert int(pool.statistics.steps) == steps_before
        opt.zero_grad(set_to_none=True)
        _loss(model, make_batch()).backward()
        cap.remove()
        assert cap.x is not None
        assert cap.v is not None
        assert cap.e is not None

        # The forward the candidates ran is the one of ALGORITHM.md §2 (cascade from accepted acts).
        accepted = _reference_accepted(layer, cap.x)
        if num_accepted:
            assert cap.accepted is not None
            _close(cap.accepted, accepted, rtol=1e-5)  # type: ignore[arg-type]
        v_ref = _reference_candidates(layer, cap.x, accepted)
        _close(cap.v, v_ref.detach(), rtol=1e-5)

        axis = _axis(layer, cap.e.dim())
        ref = _reference_statistics(v_ref, cap.e, axis, old_moments, steps_before, config)
        assert int(pool.statistics.steps) == steps_before + 1
        _close(pool.statistics.moments, ref.moments, rtol=1e-5)
        _close(pool.statistics.score(), ref.score, rtol=1e-4)
        if steps_before < config.warmup_steps:
            assert all(p.grad is None or not bool(p.grad.any()) for p in params)
        else:
            # A sign decided by rounding would make the comparison meaningless: covariances are clear.
            cov = ref.moments[4] - ref.moments[0] * ref.moments[1]
            assert float(cov.abs().min()) > 1e-4 * float(cov.abs().max())
            expected = [-g for g in torch.autograd.grad(_objective(v_ref, cap.e, axis, ref), params)]
            for name, p, e in zip(("weight", "bias", "cascade"), params, expected, strict=False):
                assert p.grad is not None, name
                assert float(e.abs().max()) > 0, name
                _close(p.grad, e)
        opt.step()


# ------------------------------------------------------------------ 2. finite differences
def test_candidate_gradient_matches_finite_differences_in_float64() -> None:
    """−∂J/∂θ by central differences of J, with V recomputed by the pool's own forward.

    Unlike test 1 this does not trust a hand-written V: it perturbs one weight of the package's
    candidate bank, reruns the candidates and differences J. Statistics are held at their values
    for the batch (``σ``, ``Ē``, ``N`` are constants of J by definition).
    """
    config = DendriteConfig(num_candidates=2, normalization="pearson", warmup_steps=1, statistics_momentum=0.6)
    model, make_batch = _tiny_model("linear", config, dtype=torch.float64)
    _grow_accepted(model, 1)
    start_dendrite_phase(model)
    layer = perforated_layers(model)[0]
    pool = layer.candidates
    assert pool is not None
    assert pool.bank.weight.dtype == torch.float64
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.5)
    for _ in range(3):
        _train_step(model, make_batch(), opt)

    cap = _capture(layer)
    old_moments, steps_before = pool.statistics.moments.detach().clone(), int(pool.statistics.steps)
    opt.zero_grad(set_to_none=True)
    _loss(model, make_batch()).backward()
    cap.remove()
    assert cap.x is not None
    assert cap.v is not None
    assert cap.e is not None
    axis = _axis(layer, cap.e.dim())
    ref = _reference_statistics(cap.v, cap.e, axis, old_moments, steps_before, config)
    grad = pool.bank.weight.grad
    assert grad is not None
    index = tuple(int(i) for i in torch.unravel_index(grad.abs().argmax(), grad.shape))

    def objective_at(delta: float) -> float:
        with torch.no_grad():
            w = pool.bank.weight
            original = w[index].item()
            w[index] = original + delta
            v = pool((cap.x,), cap.accepted, axis)
            w[index] = original
            return float(_objective(v, cap.e, axis, ref))  # type: ignore[arg-type]

    h = 1e-5
    numeric = (objective_at(h) - objective_at(-h)) / (2 * h)
    assert abs(numeric) > 0
    assert -float(grad[index]) == pytest.approx(numeric, rel=1e-4)


# ------------------------------------------------------------------------------- 3. warm-up
def test_no_candidate_update_during_warmup_and_steps_count_batches() -> None:
    """Warm-up batches only gather statistics: no gradient, no best score; then learning starts."""
    config = DendriteConfig(num_candidates=2, warmup_steps=3)
    model, make_batch = _tiny_model("linear", config)
    start_dendrite_phase(model)
    pools = [layer.candidates for layer in perforated_layers(model)]
    params = trainable_parameters(model)
    opt = torch.optim.SGD(params, lr=0.1)
    for step in range(1, 7):
        _train_step(model, make_batch(), opt)
        for pool in pools:
            assert pool is not None
            assert int(pool.statistics.steps) == step
            assert int(pool.statistics.skipped_steps) == 0
            if step <= 3:
                assert all(p.grad is None or not bool(p.grad.any()) for p in pool.parameters())
                assert bool((pool.best_score == -1).all())  # nothing recorded yet
            else:
                assert all(p.grad is not None and bool(p.grad.any()) for p in _candidate_params(pool))
                assert bool((pool.best_score >= 0).all())


# ---------------------------------------------------------------------------- 4. loss scale
def _scaled_run(
    normalization: str, factor: float, tell_scale: bool, steps: int = 6, compiled: bool = False
) -> tuple[list, list]:
    """Scores of every layer and candidate gradients per step, with the loss multiplied by ``factor``.

    Gradients are divided by ``factor`` before the optimizer step when the scale was declared
    (what a GradScaler's unscale does), so both runs follow the same trajectory.
    """
    torch.manual_seed(7)
    config = DendriteConfig(
        num_candidates=2,
        normalization=normalization,  # type: ignore[arg-type]
        warmup_steps=1,
        compile_statistics=compiled,
    )
    model, make_batch = _tiny_model("linear", config)
    start_dendrite_phase(model)
    if tell_scale:
        pb_lightning.set_loss_scale(model, factor)
    params = trainable_parameters(model)
    opt = torch.optim.SGD(params, lr=0.5)
    scores, grads = [], []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        (_loss(model, make_batch()) * factor).backward()
        scores.append([layer.candidates.statistics.score().clone() for layer in perforated_layers(model)])
        grads.append([None if p.grad is None else p.grad.clone() for p in params])
        if tell_scale:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(factor)
        opt.step()
    return scores, grads


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.usefixtures("_strict_compile")
def test_declared_loss_scale_leaves_scores_unchanged_and_scales_gradients_exactly(compiled: bool) -> None:
    """Loss × 1024 with ``set_loss_scale(model, 1024)``: same scores, candidate gradients × 1024.

    1024 is a power of two, so scaling is exact in floating point and the gradients must be
    *bit-for-bit* 1024 times the unscaled ones — which is what a GradScaler's unscale expects.
    """
    base_scores, base_grads = _scaled_run("pearson", 1.0, tell_scale=False, compiled=compiled)
    scaled_scores, scaled_grads = _scaled_run("pearson", 1024.0, tell_scale=True, compiled=compiled)
    for base, scaled in zip(base_scores, scaled_scores, strict=True):
        for b, s in zip(base, scaled, strict=True):
            torch.testing.assert_close(s, b, rtol=1e-4, atol=0)
    checked = 0
    for base, scaled in zip(base_grads, scaled_grads, strict=True):
        for b, s in zip(base, scaled, strict=True):
            if b is None or s is None:  # warm-up: no update either way (None or an all-zero gradient)
                assert all(g is None or not bool(g.any()) for g in (b, s))
            else:
                assert torch.equal(s, b * 1024)
                checked += int(bool(b.any()))
    assert checked > 0


def test_declared_loss_scale_keeps_raw_statistics_in_unscaled_units() -> None:
    """Even the scale-sensitive "raw" score is unchanged when the scale is declared."""
    base_scores, _ = _scaled_run("raw", 1.0, tell_scale=False)
    scaled_scores, _ = _scaled_run("raw", 1024.0, tell_scale=True)
    for base, scaled in zip(base_scores, scaled_scores, strict=True):
        for b, s in zip(base, scaled, strict=True):
            torch.testing.assert_close(s, b, rtol=1e-4, atol=0)


def test_pearson_score_is_invariant_to_an_undeclared_loss_scale_and_raw_is_not() -> None:
    """Pearson divides the scale out by itself; raw covariance grows with the loss factor."""
    pearson, _ = _scaled_run("pearson", 1.0, tell_scale=False)
    pearson10, _ = _scaled_run("pearson", 10.0, tell_scale=False)
    for base, scaled in zip(pearson, pearson10, strict=True):
        for b, s in zip(base, scaled, strict=True):
            # ×10 is not exact in floating point, and a near-zero correlation computed as
            # E[VE] − E[V]E[E] in float32 carries ~1e-6 of cancellation error: hence the atol.
            torch.testing.assert_close(s, b, rtol=1e-4, atol=1e-5)
    raw, _ = _scaled_run("raw", 1.0, tell_scale=False, steps=2)
    raw10, _ = _scaled_run("raw", 10.0, tell_scale=False, steps=2)
    for b, s in zip(raw[-1], raw10[-1], strict=True):
        torch.testing.assert_close(s, 10 * b, rtol=1e-4, atol=0)  # the raw score is in loss units


def test_grad_scaler_through_warmup_and_an_overflow_follows_the_unscaled_run() -> None:
    """A real ``torch.amp.GradScaler`` across a dendrite phase, as mixed precision runs it.

    In a dendrite phase the candidates are the only trainable parameters, so the scaler learns
    about the step only through their gradients. Two things must hold:

    * warm-up batches (statistics only) must not break the scaler's ``step`` — it refuses an
      optimizer none of whose parameters has a gradient ("No inf checks were recorded");
    * an overflowing batch must reach the scaler as a non-finite gradient, so that it skips the
      step and lowers its scale. Otherwise the scale only ever grows (×2 per growth interval),
      every batch ends up overflowing, and correlation learning silently stops.

    With scales that are powers of two the scaled run must then follow, bit for bit, a plain run
    that simply leaves the overflowing batch out.
    """
    overflow_at, steps = 3, 7

    def run(use_scaler: bool) -> tuple[nn.Module, float]:
        torch.manual_seed(7)
        config = DendriteConfig(num_candidates=2, warmup_steps=2)
        model, make_batch = _tiny_model("linear", config)
        start_dendrite_phase(model)
        opt = torch.optim.SGD(trainable_parameters(model), lr=0.5)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=10**6)
        for i in range(steps):
            batch = make_batch()
            if not use_scaler:
                if i != overflow_at:
                    _train_step(model, batch, opt)
                continue
            pb_lightning.set_loss_scale(model, scaler.get_scale())
            opt.zero_grad(set_to_none=True)
            loss = _loss(model, batch)
            if i == overflow_at:
                loss = loss * float("inf")  # an fp16 overflow somewhere in the backward pass
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return model, scaler.get_scale()

    plain, _ = run(use_scaler=False)
    scaled, final_scale = run(use_scaler=True)
    assert final_scale == 512.0  # the overflow was seen: step skipped, scale backed off once
    for a, b in zip(perforated_layers(plain), perforated_layers(scaled), strict=True):
        assert a.candidates is not None
        assert b.candidates is not None
        assert int(b.candidates.statistics.skipped_steps) == 1
        assert int(b.candidates.statistics.steps) == int(a.candidates.statistics.steps) == steps - 1
        assert torch.equal(a.candidates.statistics.moments, b.candidates.statistics.moments)
        for pa, pb in zip(a.candidates.parameters(), b.candidates.parameters(), strict=True):
            assert torch.equal(pa, pb)


# ---------------------------------------------------------------------- 5. non-finite batches
def _poison(kind: str) -> Callable[[nn.Module, Batch], Tensor]:
    def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
        if kind == "nan_loss":
            return _loss(model, batch) * float("nan")
        # One infinite error entry at the observed layer, as a GradScaler overflow would give.
        layer = perforated_layers(model)[0]

        def inject(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            def bad(grad: Tensor) -> Tensor:
                grad = grad.clone()
                grad.view(-1)[0] = float("inf")
                return grad

            output.register_hook(bad)

        handle = layer.register_forward_hook(inject)
        try:
            return _loss(model, batch)
        finally:
            handle.remove()

    return loss_fn


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("kind", ["nan_loss", "inf_error"])
@pytest.mark.usefixtures("_strict_compile")
def test_non_finite_batches_are_skipped(kind: str, compiled: bool) -> None:
    """A non-finite batch leaves the moments alone, counts as skipped and trains nothing."""
    config = DendriteConfig(num_candidates=2, warmup_steps=1, compile_statistics=compiled)
    model, make_batch = _tiny_model("linear", config)
    start_dendrite_phase(model)
    layer = perforated_layers(model)[0]
    pool = layer.candidates
    assert pool is not None
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    for _ in range(3):
        _train_step(model, make_batch(), opt)
    moments, best = pool.statistics.moments.clone(), pool.best_score.clone()

    opt.zero_grad(set_to_none=True)
    _poison(kind)(model, make_batch()).backward()
    assert torch.equal(pool.statistics.moments, moments)
    assert torch.equal(pool.best_score, best)
    assert int(pool.statistics.steps) == 3
    assert int(pool.statistics.skipped_steps) == 1
    assert all(p.grad is None for p in pool.parameters())

    opt.zero_grad(set_to_none=True)
    _loss(model, make_batch()).backward()
    assert int(pool.statistics.steps) == 4
    assert int(pool.statistics.skipped_steps) == 1
    assert not torch.equal(pool.statistics.moments, moments)
    assert bool(torch.isfinite(pool.statistics.moments).all())
    for p in _candidate_params(pool):
        assert p.grad is not None
        assert bool(torch.isfinite(p.grad).all())
        assert bool(p.grad.any())


def test_finite_moments_whose_sum_overflows_are_folded_in() -> None:
    """The cheap finiteness check sums the moments; an overflow of that sum alone is no divergence."""
    stats = CorrelationStatistics(num_candidates=2, num_neurons=3, config=DendriteConfig())
    v = torch.full((1, 2, 3), 1.5e19)  # V² = 2.25e38 is finite in float32; the sum of the moments is not
    e = torch.ones(1, 3)
    batch = batch_moments(v, e, 1)
    assert bool(torch.isfinite(batch).all())
    assert not bool(torch.isfinite(batch.sum()))
    assert stats.update(v, e, 1)
    assert stats.diverged is None
    assert int(stats.steps) == 1
    assert int(stats.skipped_steps) == 0
    torch.testing.assert_close(stats.moments, batch)


# -------------------------------------------------------------------- 6. best score, snapshot
def test_best_score_is_the_running_maximum_and_snapshot_holds_the_weights_of_that_step() -> None:
    """Per (candidate, neuron): best = max over post-warm-up steps. Per neuron: the snapshot holds
    the weights of its best candidate (the first maximum) at that candidate's best step."""
    warmup = 2
    config = DendriteConfig(num_candidates=3, warmup_steps=warmup, statistics_momentum=0.7)
    model, make_batch = _tiny_model("linear", config)
    _grow_accepted(model, 1)  # so the candidates have cascade weights to snapshot too
    start_dendrite_phase(model)
    layer = perforated_layers(model)[0]
    pool = layer.candidates
    assert pool is not None
    assert pool.cascade_weight is not None
    opt = torch.optim.Adam(trainable_parameters(model), lr=0.05)
    k, out = pool.best_score.shape
    best = torch.full((k, out), -1.0)
    best_step = torch.full((k, out), -1, dtype=torch.long)
    history: list[dict[str, Tensor]] = []
    for step in range(14):
        weights = {
            "weight": pool.bank.weight.detach().clone(),
            "bias": pool.bank.bias.detach().clone(),
            "cascade": pool.cascade_weight.detach().clone(),
        }
        opt.zero_grad(set_to_none=True)
        _loss(model, make_batch()).backward()
        history.append(weights)
        score = pool.statistics.score()
        if step >= warmup:
            improved = score > best
            best[improved] = score[improved]
            best_step[improved] = step
        else:
            assert bool((pool.best_score == -1).all())
        opt.step()

    torch.testing.assert_close(pool.best_score, best, rtol=0, atol=0)
    assert len(set(best_step.flatten().tolist())) > 1, "the test needs bests reached at different steps"
    assert (best_step < 13).any(), "the test needs some best reached before the last step"
    chosen = best.argmax(0)
    assert torch.equal(pool.best_candidate, chosen)
    assert torch.equal(pool.best_candidate_score, best.max(0).values)
    assert pool.best_bank__weight.shape == (1, *pool.bank.weight.shape[1:])  # one set, not K
    for j in range(out):
        i = int(chosen[j])
        then = history[int(best_step[i, j])]
        assert torch.equal(pool.best_bank__weight[0, j], then["weight"][i, j])
        assert torch.equal(pool.best_bank__bias[0, j], then["bias"][i, j])
        assert torch.equal(pool.best_cascade_weight[0, :, j], then["cascade"][i, :, j])
    assert (best_step.gather(0, chosen.view(1, -1)) < 13).any(), "the test needs a snapshot older than the end"
    # The snapshot is not merely the final weights of the chosen candidates.
    final = pool.bank.weight.detach().gather(0, chosen.view(1, -1, 1).expand(1, -1, pool.bank.weight.shape[-1]))
    assert not torch.equal(pool.best_bank__weight, final)


# ------------------------------------------------------------------------------- 7. learning
def _residual_task() -> tuple[Tensor, Tensor]:
    """Four tanh ridges in the plane: a 2-2-1 MLP can fit about two, the residual is the rest."""
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(256, 2, generator=gen) * 4 - 2
    x0, x1 = x[:, :1], x[:, 1:]
    y = torch.tanh(3 * (x0 + x1)) + torch.tanh(3 * (x0 - x1)) + torch.tanh(2 * x0 - 1) + torch.tanh(3 * x1 + 1)
    return x, y


def _full_batch_steps(model: nn.Module, x: Tensor, y: Tensor, steps: int, lr: float) -> float:
    """Adam over the current phase's trainable parameters (rebuilt, as after every switch)."""
    opt = torch.optim.Adam(trainable_parameters(model), lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        return float(F.mse_loss(model(x), y))


@pytest.mark.slow
def test_dendrites_learn_a_residual_the_small_network_cannot() -> None:
    """A too-small MLP plateaus; correlation-trained dendrites then lower the loss clearly.

    The control trains the plateaued network on without dendrites for as many steps as the
    post-acceptance neuron phase, so the gain is not "more training". (Dendrites accepted straight
    from their random initialisation were tried as a second control: the trained ones won on 5
    of 6 seeds but lost on one, so that comparison is not asserted.)
    """
    torch.manual_seed(0)
    x, y = _residual_task()
    config = DendriteConfig(num_candidates=4, warmup_steps=5, activation="tanh")
    model = perforate(nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1)), config=config)
    plateau = _full_batch_steps(model, x, y, 600, 3e-2)
    control_loss = _full_batch_steps(copy.deepcopy(model), x, y, 300, 1e-2)

    start_dendrite_phase(model)
    opt = torch.optim.Adam(trainable_parameters(model), lr=5e-2)
    gen = torch.Generator().manual_seed(5)
    running: list[float] = []  # per epoch: mean over steps of the mean over neurons of max_k score
    best: list[float] = []  # per epoch end: mean over neurons of the best score so far
    for _ in range(12):
        epoch_scores = []
        for idx in torch.randperm(len(x), generator=gen).split(32):
            opt.zero_grad(set_to_none=True)
            F.mse_loss(model(x[idx]), y[idx]).backward()
            opt.step()
            stats = [layer.candidates.statistics for layer in perforated_layers(model)]  # type: ignore[union-attr]
            if all(s.warmed_up for s in stats):
                epoch_scores.append(float(torch.cat([s.score().max(0).values for s in stats]).mean()))
        running.append(sum(epoch_scores) / len(epoch_scores))
        best.append(float(torch.cat(list(candidate_scores(model).values())).mean()))
    with torch.no_grad():
        assert float(F.mse_loss(model(x), y)) == plateau  # candidates never touch the output

    assert running[-1] > 1.5 * running[0], running
    assert best[-1] > best[0] + 0.02, best

    accept_dendrites(model)
    with torch.no_grad():
        assert float(F.mse_loss(model(x), y)) == pytest.approx(plateau, rel=1e-5)  # function-preserving
    new_w = [layer.output_weight for layer in perforated_layers(model)]
    trainable = {id(p) for p in trainable_parameters(model)}
    assert all(w is not None and id(w) in trainable for w in new_w)  # the rebuilt optimizer trains w
    after = _full_batch_steps(model, x, y, 300, 1e-2)
    assert all(bool(w.detach().abs().gt(0).any()) for w in new_w if w is not None)
    # Margins checked on 10 seeds: control/plateau >= 0.93, after/min(plateau, control) <= 0.63.
    assert control_loss > 0.9 * plateau, (plateau, control_loss)  # it really is a plateau
    assert after < 0.7 * min(plateau, control_loss), (plateau, control_loss, after)


# ---------------------------------------------------------------------- 8. gradient learning
def test_correlation_candidates_leave_the_outputs_unchanged() -> None:
    """Correlation candidates train, yet the network's outputs stay exactly the same."""
    config = DendriteConfig(num_candidates=2, warmup_steps=0)
    model, make_batch = _tiny_model("linear", config)
    probe = make_batch()[0]
    with torch.no_grad():
        before = model(probe)
    start_dendrite_phase(model)
    pool = perforated_layers(model)[0].candidates
    assert pool is not None
    initial = pool.bank.weight.detach().clone()
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.5)
    for _ in range(5):
        _train_step(model, make_batch(), opt)
    assert not torch.equal(pool.bank.weight, initial)
    with torch.no_grad():
        assert torch.equal(model(probe), before)


def test_gradient_learning_changes_outputs_and_accept_installs_the_final_weights() -> None:
    """learning="gradient": the candidate feeds the output through w, and acceptance keeps it."""
    config = DendriteConfig(num_candidates=1, learning="gradient", warmup_steps=0)
    model, make_batch = _tiny_model("linear", config)
    probe = make_batch()[0]
    with torch.no_grad():
        before_phase = model(probe)
    start_dendrite_phase(model)
    layers = perforated_layers(model)
    pools = [layer.candidates for layer in layers]
    assert all(p is not None and p.output_weight is not None for p in pools)
    opt = torch.optim.Adam(trainable_parameters(model), lr=0.05)
    for _ in range(10):
        _train_step(model, make_batch(), opt)
    for pool in pools:
        assert pool is not None
        assert pool.output_weight is not None
        assert bool(pool.output_weight.detach().abs().gt(0).all())
    with torch.no_grad():
        before_accept = model(probe)
    assert not torch.allclose(before_accept, before_phase, atol=1e-4)

    final = [
        (p.bank.weight.detach().clone(), p.bank.bias.detach().clone(), p.output_weight.detach().clone())  # type: ignore[union-attr]
        for p in pools
    ]
    accept_dendrites(model)
    with torch.no_grad():
        after_accept = model(probe)
    torch.testing.assert_close(after_accept, before_accept, rtol=1e-6, atol=1e-6)
    for layer, (w, b, out_w) in zip(layers, final, strict=True):
        assert layer.num_dendrites == 1
        assert layer.dendrites is not None
        assert layer.output_weight is not None
        assert torch.equal(layer.dendrites.weight[0], w[0])
        assert torch.equal(layer.dendrites.bias[0], b[0])
        assert torch.equal(layer.output_weight[0], out_w[0])
