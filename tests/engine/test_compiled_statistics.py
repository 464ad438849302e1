"""``DendriteConfig(compile_statistics=True)``: compiled once per input rank, and an eager fallback in the log.

The numerics of the compiled statistics are checked against the written-out objective by the
``compiled`` cases of ``test_correlation.py`` (same tolerances as eager). These tests check what
compiling adds: layers of different widths and batch sizes share one graph per function, and a
failed compilation runs the same eager code, bit for bit, and says so once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn
from torch._dynamo.utils import counters
from torch.nn import functional as F

import pb_lightning as pb
from pb_lightning.engine import compiled as compiled_module
from pb_lightning.engine import correlation

_FUNCTIONS = (correlation._moments_and_sum, correlation._score_and_gradient)


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    counters.clear()  # dynamo's counters outlive its reset: graphs counted here are this test's
    for fn in _FUNCTIONS:
        fn.reset()
    yield
    torch._dynamo.reset()
    for fn in _FUNCTIONS:
        fn.reset()
    torch.set_num_threads(threads)


def _mlp(widths: list[int], compile_statistics: bool) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(a, b), nn.Tanh()]
    config = pb.DendriteConfig(num_candidates=3, warmup_steps=1, compile_statistics=compile_statistics)
    model = pb.perforate(nn.Sequential(*layers[:-1]), config=config)
    model(torch.randn(2, widths[0]))
    pb.start_dendrite_phase(model)
    return model


def _train(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
    opt = torch.optim.SGD(pb.trainable_parameters(model), lr=0.2)
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        opt.step()
    return [t.detach().clone() for t in model.state_dict().values() if isinstance(t, Tensor)]


def _batches(widths: list[int], sizes: list[int]) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(n, widths[0], generator=gen), torch.randn(n, widths[-1], generator=gen)) for n in sizes]


def test_layers_of_every_width_and_batch_size_share_one_graph_per_function() -> None:
    widths = [7, 9, 12, 5, 4]  # four perforated layers, all of different widths
    model = _mlp(widths, compile_statistics=True)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        _train(model, _batches(widths, [16, 16, 24, 10]))
    # A first shape compiles statically; the second shape seen recompiles once with dynamic sizes
    # at the latest, and every layer and batch size after that reuses those graphs.
    assert counters["stats"]["unique_graphs"] <= 2 * len(_FUNCTIONS)
    assert all(fn._compiled is not None and not fn.failed for fn in _FUNCTIONS)
    graphs = counters["stats"]["unique_graphs"]
    _train(model, _batches(widths, [13, 31]))
    assert counters["stats"]["unique_graphs"] == graphs  # nothing new to compile


def test_compiled_statistics_follow_the_eager_run() -> None:
    """Eight steps, four layers: the compiled run stays within float32 reassociation of eager.

    Fused loops sum in another order (about 1e-7 relative per step); eight SGD steps at lr 0.2
    carry that to about 1e-5 in the weights, hence the tolerance. Each step's statistics are
    checked at eager's own tolerances against the objective in ``test_correlation.py``.
    """
    widths = [7, 9, 12, 5, 4]
    batches = _batches(widths, [16] * 8)
    eager = _train(_mlp(widths, compile_statistics=False), batches)
    fused = _train(_mlp(widths, compile_statistics=True), batches)
    assert len(eager) == len(fused)
    for e, f in zip(eager, fused, strict=True):
        if e.is_floating_point():
            torch.testing.assert_close(f, e, rtol=1e-3, atol=1e-4)
        else:
            assert torch.equal(f, e)


def test_a_failed_compilation_runs_eagerly_bit_for_bit_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_compile(fn, **kwargs):  # type: ignore[no-untyped-def]
        def run(*args, **kw):  # type: ignore[no-untyped-def]
            raise RuntimeError("no C++ compiler found\nsecond line")

        return run

    widths = [7, 9, 4]
    batches = _batches(widths, [16] * 4)
    eager = _train(_mlp(widths, compile_statistics=False), batches)
    monkeypatch.setattr(compiled_module.torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING, logger="pb_lightning.engine.compiled"):
        fallen = _train(_mlp(widths, compile_statistics=True), batches)
    for e, f in zip(eager, fallen, strict=True):
        assert torch.equal(f, e)
    warnings = [r.getMessage() for r in caplog.records if r.name == "pb_lightning.engine.compiled"]
    assert len(warnings) == len(_FUNCTIONS)  # once per function, not once per layer and step
    assert all("runs eagerly" in w and "no C++ compiler found" in w and "second line" not in w for w in warnings)
    assert all(fn.failed for fn in _FUNCTIONS)


def test_compile_statistics_must_be_a_bool() -> None:
    with pytest.raises(pb.PerforationError, match=r"`DendriteConfig.compile_statistics` must be a bool; got 'yes'"):
        pb.DendriteConfig(compile_statistics="yes")  # type: ignore[arg-type]


def test_only_a_compiled_model_has_its_graphs_dropped_after_a_restructure() -> None:
    from pb_lightning.engine.compiled import drop_stale_graphs, is_compiled

    plain = nn.Sequential(nn.Linear(3, 4))
    in_place = nn.Sequential(nn.Linear(3, 4))
    in_place.compile()
    wrapped = nn.Sequential(torch.compile(nn.Linear(3, 4)))
    assert not is_compiled(plain)
    assert is_compiled(in_place)
    assert is_compiled(wrapped)

    square = torch.compile(lambda t: t * t)
    square(torch.ones(2))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    assert not drop_stale_graphs(plain)
    square(torch.ones(2))  # still cached: nothing was reset
    assert counters["stats"]["unique_graphs"] == graphs
    assert drop_stale_graphs(in_place)
    square(torch.ones(2))  # reset: compiled again
    assert counters["stats"]["unique_graphs"] == graphs + 1
