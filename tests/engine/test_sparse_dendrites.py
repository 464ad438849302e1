"""Sparse dendrites (``DendriteConfig.fan_in``), checked against a masked dense reference written here.

A sparse dendrite set stores compact weights ``weight [D, out, k, *kernel]`` and the inputs they
connect to, ``index [D, out, k]``. The reference below scatters them into a dense zero weight one
connection at a time (Python loops, no vectorised indexing), runs one ``F.linear``/``F.convNd`` per
set and rebuilds the layer's output ``y + Σ_d w_d f(z_d + Σ_{e<d} c_{d,e} a_e)`` one dendrite at a
time. Both fused strategies of :class:`~pb_lightning.engine.sparse_banks.SparseBank` must agree with it in the
forward pass and in every gradient (input, compact weights, bias).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

import pb_lightning as pb
from pb_lightning import DendriteConfig, PerforatedLayer, PerforationError
from pb_lightning.engine.cascade import ACTIVATIONS
from pb_lightning.engine.sparse_banks import SparseBank

_MODES = ("local", "random", "learned")
_STRATEGIES = ("masked", "gather", "auto")


@pytest.fixture(params=_STRATEGIES)
def strategy(request: pytest.FixtureRequest) -> Iterator[str]:
    old = SparseBank.strategy
    SparseBank.strategy = request.param
    yield request.param
    SparseBank.strategy = old


def _module(kind: str) -> tuple[nn.Module, Tensor]:
    if kind == "linear":
        return nn.Linear(9, 5), torch.randn(6, 9)
    if kind == "linear_seq":
        return nn.Linear(9, 5), torch.randn(3, 4, 9)
    if kind == "conv1d":
        return nn.Conv1d(6, 4, 3, padding=1), torch.randn(3, 6, 7)
    if kind == "conv2d":
        return nn.Conv2d(5, 4, 3, stride=2, padding=1), torch.randn(2, 5, 6, 6)
    if kind == "conv2d_grouped":
        return nn.Conv2d(6, 4, (3, 2), groups=2, dilation=(1, 2), padding_mode="reflect", padding=1), torch.randn(
            2, 6, 5, 6
        )
    if kind == "conv3d":
        return nn.Conv3d(3, 2, 2), torch.randn(2, 3, 3, 3, 3)
    raise AssertionError(kind)


_KINDS = ("linear", "linear_seq", "conv1d", "conv2d", "conv2d_grouped", "conv3d")


def _train_candidates(model: nn.Module, x: Tensor, steps: int = 4) -> None:
    opt = torch.optim.Adam(pb.trainable_parameters(model), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def _grown_layer(kind: str, mode: str, num_dendrites: int, fan_in: int = 2, **config: Any) -> tuple[nn.Module, Tensor]:
    """A one-layer model with ``num_dendrites`` accepted sparse sets and random per-neuron scalars."""
    torch.manual_seed(0)
    module, x = _module(kind)
    cfg = DendriteConfig(fan_in=fan_in, fan_in_mode=mode, num_candidates=3, warmup_steps=0, **config)
    model = pb.perforate(nn.Sequential(module), config=cfg)
    model(x)
    for _ in range(num_dendrites):
        pb.start_dendrite_phase(model)
        _train_candidates(model, x)
        pb.accept_dendrites(model)
    layer = model[0]
    with torch.no_grad():  # away from the acceptance values (w = 0, c = 0), so every term matters
        layer.output_weight.normal_()
        if layer.cascade_weight is not None:
            layer.cascade_weight.normal_()
    return model, x


# ---------------------------------------------------------------------------------- reference
def _dense_reference_weight(weight: Tensor, index: Tensor, inputs: int) -> Tensor:
    """Scatter ``weight [out, k, *kernel]`` into a zero ``[out, inputs, *kernel]``, one connection at a time."""
    out, k = index.shape
    dense = weight.new_zeros((out, inputs, *weight.shape[2:]))
    for o in range(out):
        for j in range(k):
            dense[o, int(index[o, j])] = weight[o, j]
    return dense


def _reference_op(module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding: Any = 0
    else:
        padding = module.padding
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[weight.dim() - 2]
    return conv(x, weight, bias, module.stride, padding, module.dilation, module.groups)


def _reference(layer: PerforatedLayer, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The layer's output from the compact ``weight [D, out, k, ...]``, one dendrite at a time."""
    module, bank = layer.module, layer.dendrites
    inputs = module.in_features if isinstance(module, nn.Linear) else module.in_channels // module.groups
    axis = -1 if isinstance(module, nn.Linear) else 1
    y = module(x)
    acts: list[Tensor] = []
    f = ACTIVATIONS[layer.config.activation]
    for d in range(bank.index.shape[0]):
        dense = _dense_reference_weight(weight[d], bank.index[d], inputs)
        z = _reference_op(module, x, dense, None if bias is None else bias[d])
        for e in range(d):
            c = layer.cascade_weight[d * (d - 1) // 2 + e]
            z = z + acts[e] * (c if axis == -1 else c.view(-1, *([1] * (z.dim() - 2))))
        acts.append(f(z))
    for d, a in enumerate(acts):
        w = layer.output_weight[d]
        y = y + a * (w if axis == -1 else w.view(-1, *([1] * (a.dim() - 2))))
    return y


@pytest.mark.parametrize("kind", _KINDS)
@pytest.mark.parametrize("mode", _MODES)
def test_forward_and_backward_match_the_masked_dense_reference(kind: str, mode: str, strategy: str) -> None:
    model, x = _grown_layer(kind, mode, num_dendrites=3, train_accepted_dendrites=True, perforation=False)
    layer = model[0]
    bank = layer.dendrites
    assert isinstance(bank, SparseBank)
    assert bank.index.shape[:2] == (3, layer.num_neurons)
    x = x.clone().requires_grad_(True)
    got = model(x)
    grad_out = torch.randn_like(got)
    gx, gw, gb = torch.autograd.grad(got, (x, bank.weight, bank.bias), grad_out)

    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = bank.weight.detach().clone().requires_grad_(True)
    b_ref = bank.bias.detach().clone().requires_grad_(True)
    expected = _reference(layer, x_ref, w_ref, b_ref)
    rx, rw, rb = torch.autograd.grad(expected, (x_ref, w_ref, b_ref), grad_out)

    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(gx, rx, atol=1e-5, rtol=1e-5)
    assert torch.allclose(gw, rw, atol=1e-5, rtol=1e-5)
    assert torch.allclose(gb, rb, atol=1e-5, rtol=1e-5)
    # The dendrites matter: without them the output differs.
    assert not torch.allclose(got, layer.module(x), atol=1e-3)


@pytest.mark.parametrize("kind", ["linear", "conv2d_grouped"])
def test_candidates_match_the_reference_and_learn_through_their_compact_weights(kind: str, strategy: str) -> None:
    model, x = _grown_layer(kind, "random", num_dendrites=1)
    pb.start_dendrite_phase(model)
    pool = model[0].candidates
    module = model[0].module
    inputs = module.in_features if isinstance(module, nn.Linear) else module.in_channels // module.groups
    v = pool(((x,)), None, -1 if kind == "linear" else 1)
    for k in range(pool.num_candidates):
        dense = _dense_reference_weight(pool.bank.weight[k], pool.bank.index[k], inputs)
        z = _reference_op(module, x, dense, pool.bank.bias[k])
        assert torch.allclose(v.select(-2 if kind == "linear" else 1, k), torch.sigmoid(z), atol=1e-5)
    before = pool.bank.weight.detach().clone()
    _train_candidates(model, x)
    assert not torch.equal(before, pool.bank.weight)


# ---------------------------------------------------------------------------------- connectivity
def _indices(mode: str, seed: int = 0, name: str = "fc", inputs: int = 20, out: int = 6) -> Tensor:
    model = nn.Sequential()
    model.add_module(name, nn.Linear(inputs, out))
    model = pb.perforate(model, config=DendriteConfig(fan_in=4, fan_in_mode=mode, fan_in_seed=seed))
    model(torch.randn(2, inputs))
    pb.start_dendrite_phase(model)
    return getattr(model, name).candidates.bank.index.clone()


def test_local_windows_are_contiguous_and_spread_evenly_over_the_inputs() -> None:
    index = _indices("local")
    assert index.shape == (4, 6, 4)
    starts = index[0, :, 0]
    assert torch.equal(index[0], starts.view(-1, 1) + torch.arange(4))  # contiguous
    assert starts[0] == 0
    assert starts[-1] == 20 - 4
    assert torch.equal(starts, torch.tensor([round(i * 16 / 5) for i in range(6)]))
    assert all(torch.equal(index[k], index[0]) for k in range(4))  # all candidates share the window


def test_random_inputs_are_distinct_reproducible_and_seeded_per_layer() -> None:
    index = _indices("random")
    assert all(len(set(row.tolist())) == 4 for row in index.reshape(-1, 4))
    assert torch.equal(index, index.sort(-1).values)
    torch.manual_seed(123)  # the global random state does not matter
    assert torch.equal(_indices("random"), index)
    assert not torch.equal(_indices("random", seed=1), index)
    assert not torch.equal(_indices("random", name="other"), index)


def test_learned_mode_keeps_the_strongest_inputs_and_preserves_the_output_exactly() -> None:
    torch.manual_seed(0)
    model = pb.perforate(
        nn.Sequential(nn.Conv1d(6, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(15, 2)),
        config=DendriteConfig(fan_in=2, fan_in_mode="learned", num_candidates=3, warmup_steps=0),
    )
    x = torch.randn(8, 6, 7)
    model(x)
    pb.start_dendrite_phase(model)
    pool = model[0].candidates
    assert not isinstance(pool.bank, SparseBank)  # learned: dense candidates
    _train_candidates(model, x)
    snapshot = pool.best_bank__weight.detach().clone()  # [1, out, in, kernel]: each neuron's best candidate
    model.eval()
    before = model(x)
    pb.accept_dendrites(model)
    after = model(x)
    assert torch.equal(before, after)
    bank = model[0].dendrites
    for o in range(3):
        chosen = snapshot[0, o]  # [in, kernel]
        strongest = sorted(chosen.norm(dim=-1).topk(2).indices.tolist())
        assert bank.index[0, o].tolist() == strongest
        assert torch.equal(bank.weight[0, o], chosen[strongest])
    # The accepted dendrite computes the pruned snapshot: with w ≠ 0 it matches the reference.
    with torch.no_grad():
        model[0].output_weight.fill_(0.7)
    layer = model[0]
    assert torch.allclose(layer(x), _reference(layer, x, bank.weight, bank.bias), atol=1e-5)


# ---------------------------------------------------------------------------------- storage
def _real_connections(layer: PerforatedLayer) -> int:
    module, d, k = layer.module, layer.num_dendrites, layer.config.fan_in
    kernel = 1 if isinstance(module, nn.Linear) else module.weight[0, 0].numel()
    out = layer.num_neurons
    cascade = d * (d - 1) // 2 * out if layer.config.cascade else 0
    return d * out * (k * kernel + 1) + cascade + d * out  # weights, biases, cascade, w


def _cnn(mode: str, **config: Any) -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3)
    )
    cfg = DendriteConfig(fan_in=2, fan_in_mode=mode, num_candidates=2, warmup_steps=0, **config)
    return pb.perforate(model, config=cfg)


def _grown_cnn(mode: str, cycles: int = 2, mid_phase: bool = False) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    model, x = _cnn(mode), torch.randn(4, 3, 4, 4)
    model(x)
    for _ in range(cycles):
        pb.start_dendrite_phase(model)
        _train_candidates(model, x)
        pb.accept_dendrites(model)
        _train_candidates(model, x, 2)  # w away from 0
    if mid_phase:
        pb.start_dendrite_phase(model)
        _train_candidates(model, x)
    return model, x


@pytest.mark.parametrize("mode", _MODES)
def test_parameter_counts_are_the_real_connections(mode: str) -> None:
    model, _ = _grown_cnn(mode)
    layers = pb.perforated_layers(model)
    counts = pb.parameter_counts(model)
    assert counts["dendrites"] == sum(_real_connections(layer) for layer in layers)
    plain = sum(p.numel() for layer in layers for p in layer.module.parameters())
    assert counts["original"] == plain
    # A dense set would cost as much as its layer (first conv: 4·3·9 + 4 weights); sparse: 4·2·9 + 4.
    assert layers[0].dendrites.weight.shape == (2, 4, 2, 3, 3)


@pytest.mark.parametrize("mode", _MODES)
@pytest.mark.parametrize("mid_phase", [False, True])
def test_state_dict_is_compact_and_loads_into_a_fresh_model(mode: str, mid_phase: bool) -> None:
    model, x = _grown_cnn(mode, mid_phase=mid_phase)
    state = model.state_dict()
    assert state["0.dendrites.index"].shape == (2, 4, 2)
    assert state["0.dendrites.index"].dtype == torch.long
    assert state["0.dendrites.weight"].shape == (2, 4, 2, 3, 3)
    buffer = io.BytesIO()
    torch.save({"state": state, "perforation": pb.perforation_state(model)}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = _cnn(mode)
    fresh.load_state_dict(saved["state"])
    pb.load_perforation_state(fresh, saved["perforation"])
    assert fresh.state_dict().keys() == state.keys()
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    model.eval()
    fresh.eval()
    assert torch.equal(model(x), fresh(x))
    if mid_phase:  # the candidates resume with the same wiring and go on learning
        assert fresh[0].candidates is not None
        model.train()
        fresh.train()
        _train_candidates(model, x, 2)
        _train_candidates(fresh, x, 2)
        assert torch.equal(model[0].candidates.bank.weight, fresh[0].candidates.bank.weight)


@pytest.mark.parametrize("mode", _MODES)
def test_to_inference_exports_compactly_and_agrees(mode: str, strategy: str) -> None:
    model, x = _grown_cnn(mode)
    deployed = pb.to_inference(model)
    model.eval()
    assert torch.equal(deployed(x), model(x))
    exported = dict(deployed.state_dict())
    assert exported["0.dendrites.weight"].shape == (2, 4, 2, 3, 3)
    assert exported["0.dendrites.index"].shape == (2, 4, 2)
    assert sum(p.numel() for p in deployed.parameters()) == pb.parameter_counts(model)["total"]


# ---------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_a_cycle_and_matches_float32(dtype: torch.dtype, strategy: str) -> None:
    model, x = _grown_cnn("random", cycles=1)
    model.eval()
    exact = model(x)
    with torch.autocast("cpu", dtype=dtype):
        low = model(x)
    assert torch.allclose(low.float(), exact, atol=0.1, rtol=0.1)
    model.train()
    pb.start_dendrite_phase(model)
    with torch.autocast("cpu", dtype=dtype):
        _train_candidates(model, x)
    scores = pb.candidate_scores(model)
    assert all(torch.isfinite(s).all() and s.max() > 0 for s in scores.values())
    pb.accept_dendrites(model)
    assert all(layer.num_dendrites == 2 for layer in pb.perforated_layers(model))


# ---------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("kwargs", "field", "valid"),
    [
        ({"fan_in": 0}, "fan_in", "an int >= 1"),
        ({"fan_in": 2.0}, "fan_in", "an int >= 1"),
        ({"fan_in": True}, "fan_in", "an int >= 1"),
        ({"fan_in_mode": "window"}, "fan_in_mode", "'local', 'random', 'learned'"),
        ({"fan_in_seed": "7"}, "fan_in_seed", "an int"),
        (
            {"fan_in": 2, "fan_in_mode": "learned", "learning": "gradient", "num_candidates": 1},
            "fan_in_mode",
            "'local' or 'random' when learning='gradient'",
        ),
        ({"overrides": {"fc": {"fan_inn": 3}}}, "overrides['fc'] keys", "DendriteConfig fields"),
        ({"overrides": {"fc": {"learning": "gradient"}}}, "overrides['fc'] keys", "other than learning"),
        ({"overrides": {"fc": {"fan_in": -2}}}, "fan_in", "an int >= 1"),
        ({"overrides": {"fc": 3}}, "overrides['fc']", "a mapping {field: value}"),
    ],
)
def test_invalid_fan_in_settings_are_refused_with_a_named_message(kwargs: Any, field: str, valid: str) -> None:
    with pytest.raises(PerforationError) as info:
        DendriteConfig(**kwargs)
    assert f"DendriteConfig.{field}" in str(info.value)
    assert valid in str(info.value)


def test_a_fan_in_larger_than_the_layer_input_is_refused_at_perforate() -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.Conv1d(4, 4, 1, groups=2))
    with pytest.raises(
        PerforationError, match=r"`DendriteConfig.fan_in` must be an int in \[1, 2\] for layer `1`.*got 3"
    ):
        pb.perforate(model, config=DendriteConfig(fan_in=3))
    assert not pb.perforated_layers(model)  # refused before anything was converted
    with pytest.raises(PerforationError, match=r"\[1, 8\] for layer `0` \(8 input features\).*got 9"):
        pb.perforate(nn.Sequential(nn.Linear(8, 4)), config=DendriteConfig(fan_in=9))


def test_fan_in_on_a_custom_module_is_refused_with_the_fix() -> None:
    from tests.helpers import Mixer

    model = nn.Sequential(Mixer(), nn.Linear(6, 3))
    with pytest.raises(
        PerforationError, match=r"only for nn.Linear and nn.Conv.*overrides=\{'0': \{'fan_in': None\}\}"
    ):
        pb.perforate(model, include=[Mixer, nn.Linear], neuron_axes={Mixer: -1}, config=DendriteConfig(fan_in=2))
    config = DendriteConfig(fan_in=2, overrides={"0": {"fan_in": None}})
    pb.perforate(model, include=[Mixer, nn.Linear], neuron_axes={Mixer: -1}, config=config)
    assert [layer.config.fan_in for layer in pb.perforated_layers(model)] == [None, 2]


def test_per_layer_overrides_apply_by_glob_in_order() -> None:
    config = DendriteConfig(
        fan_in=2,
        overrides={
            "body.*": {"fan_in": 4, "fan_in_mode": "random"},
            "body.1": {"activation": "tanh"},
            "head": {"fan_in": None},
        },
    )
    model = nn.Sequential()
    model.add_module("body", nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)))
    model.add_module("mid", nn.Linear(8, 8))
    model.add_module("head", nn.Linear(8, 2))
    pb.perforate(model, config=config)
    got = {
        layer.name: (layer.config.fan_in, layer.config.fan_in_mode, layer.config.activation)
        for layer in pb.perforated_layers(model)
    }
    assert got == {
        "body.0": (4, "random", "sigmoid"),
        "body.1": (4, "random", "tanh"),
        "mid": (2, "local", "sigmoid"),
        "head": (None, "local", "sigmoid"),
    }
    assert all(layer.config.overrides == {} for layer in pb.perforated_layers(model))
    hash(config)  # usable as a hyperparameter / dict key


def test_an_override_that_matches_no_layer_is_an_error() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(PerforationError, match=r"DendriteConfig.overrides.*the layers are 0; got \['fc\*'\]"):
        pb.perforate(model, config=DendriteConfig(overrides={"fc*": {"fan_in": 2}}))
    assert not pb.perforated_layers(model)


def test_dense_stays_the_default() -> None:
    assert DendriteConfig().fan_in is None
    model = pb.perforate(nn.Sequential(nn.Linear(4, 3)))
    model(torch.randn(2, 4))
    pb.start_dendrite_phase(model)
    pb.accept_dendrites(model)
    assert not isinstance(model[0].dendrites, SparseBank)
    assert model[0].dendrites.weight.shape == (1, 3, 4)


# ---------------------------------------------------------------------------------- data parallel
def _ddp_worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same model on every rank
    model = pb.perforate(
        nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)),
        config=DendriteConfig(
            fan_in=3,
            fan_in_mode="random",
            num_candidates=2,
            warmup_steps=0,
            overrides={"2": {"fan_in_mode": "learned"}},
        ),
    )
    pb.set_statistics_group(model, dist.group.WORLD)
    torch.manual_seed(1 + rank)  # every rank its own data
    x, target = torch.randn(16, 6), torch.randn(16, 2)
    model(x)
    pb.start_dendrite_phase(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(pb.trainable_parameters(model), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        F.mse_loss(ddp(x), target).backward()
        opt.step()
    pb.accept_dendrites(model)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, f"{out}{rank}.pt")
    dist.destroy_process_group()


def test_ddp_ranks_accept_identical_sparse_dendrites(tmp_path: Any) -> None:
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "rank")), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    assert [k for k in ranks[0] if not torch.equal(ranks[0][k], ranks[1][k])] == []
    assert ranks[0]["0.dendrites.index"].shape == (1, 5, 3)
    assert ranks[0]["2.dendrites.index"].shape == (1, 2, 3)


# ---------------------------------------------------------------------------------- robustness
def test_a_diverged_sparse_candidate_restarts_with_its_wiring() -> None:
    torch.manual_seed(0)
    model = pb.perforate(
        nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)),
        config=DendriteConfig(fan_in=2, fan_in_mode="random", num_candidates=3, warmup_steps=0),
    )
    x = torch.randn(32, 8)
    model(x)
    pb.start_dendrite_phase(model)
    pool = model[0].candidates
    wiring = pool.bank.index.clone()
    _train_candidates(model, x, 2)
    with torch.no_grad():
        pool.bank.weight[1, 2, 0] = float("nan")  # candidate set 1 blows up
    _train_candidates(model, x, 5)  # flagged, then restarted from fresh weights
    assert torch.isfinite(pool.bank.weight).all()
    assert torch.equal(pool.bank.index, wiring)
    assert (pool.best_score[1] >= 0).all()
    pb.accept_dendrites(model)
    assert torch.isfinite(model[0].dendrites.weight).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_compute_what_float32_does(dtype: torch.dtype, strategy: str) -> None:
    model, x = _grown_layer("linear", "random", num_dendrites=2, fan_in=2)
    exact = model(x)
    low = model.to(dtype)
    got = low(x.to(dtype))
    assert got.dtype == dtype
    assert torch.allclose(got.float(), exact, atol=0.05, rtol=0.05)
    pb.start_dendrite_phase(low)
    _train_candidates(low, x.to(dtype), 3)
    assert all(torch.isfinite(p).all() for p in low.parameters())


@pytest.mark.slow  # an inductor compile: among the longest tests (--durations)
def test_torch_compile_matches_eager() -> None:
    model, x = _grown_cnn("random")
    pb.start_dendrite_phase(model)
    compiled = torch.compile(model)
    expected, got = model(x), compiled(x)
    assert torch.allclose(got, expected, atol=1e-5)
    grads = torch.autograd.grad(got.square().sum(), pb.trainable_parameters(model))
    reference = torch.autograd.grad(model(x).square().sum(), pb.trainable_parameters(model))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, reference, strict=True))


@pytest.mark.slow  # a benchmark run (engine_speed): among the longest tests (--durations)
def test_engine_speed_times_both_sparse_strategies(tmp_path: Any) -> None:
    from tests.helpers import run_benchmark

    out = tmp_path / "results"
    result = run_benchmark("engine_speed.py", "--quick", "--fan-in", "4", "--out", str(out))
    assert "### Sparse dendrites (fan_in k" in result.stdout
    saved = (out / "results.json").read_text()
    import json

    rows = [row for network in json.loads(saved)["networks"] for row in network["sparse"]]
    assert [(r["network"], r["configuration"]) for r in rows] == [
        ("mlp", "neuron D=4"),
        ("mlp", "dendrite D=2 K=4"),
        ("conv", "neuron D=4"),
        ("conv", "dendrite D=2 K=4"),
    ]
    assert all(r["sparse_dendrite_parameters"] < r["dense_dendrite_parameters"] for r in rows if r["network"] == "mlp")
    (out / "results.md").unlink()
    assert run_benchmark("engine_speed.py", "--render", "--out", str(out)).stdout.strip() == result.stdout.strip()


@pytest.mark.parametrize("mode", ["local", "random"])
def test_gradient_learning_candidates_become_the_same_accepted_sparse_dendrites(mode: str) -> None:
    torch.manual_seed(0)
    model = pb.perforate(
        nn.Sequential(nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 2)),
        config=DendriteConfig(fan_in=3, fan_in_mode=mode, learning="gradient", num_candidates=1),
    )
    x = torch.randn(16, 8)
    model(x)
    for _ in range(2):  # the second cycle's candidates cascade from the first dendrite
        pb.start_dendrite_phase(model)
        _train_candidates(model, x, 3)
        model.eval()
        before = model(x)
        pb.accept_dendrites(model)
        assert torch.allclose(model(x), before, atol=1e-6)
        model.train()
    assert model[0].dendrites.index.shape == (2, 5, 3)
