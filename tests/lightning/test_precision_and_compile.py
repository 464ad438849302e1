"""Every supported precision, and torch.compile, run a full cycle correctly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

import pb_lightning as pb
from pb_lightning.demos.digits import DigitsDataModule, DigitsMLP
from pb_lightning.engine import correlation

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class _HalfSafe(DigitsMLP):
    """Adam's default eps (1e-8) underflows in float16; pure-fp16 training needs a larger one."""

    def configure_optimizers(self) -> Any:
        groups = self.dendrite_parameter_groups(candidate_lr=self.candidate_lr)
        return torch.optim.Adam(groups, lr=self.lr, eps=1e-4)


class _Compiled(DigitsMLP):
    """Compiles itself in place (state-dict keys unchanged) after perforation.

    The LightningModule, not ``self.net``: dynamo does not trace a frame of ``torch.nn``'s own
    code, so ``nn.Sequential.compile()`` would compile each perforated layer as a frame of the
    one ``PerforatedLayer.forward`` they share (and reach the recompile limit at the fourth).
    """

    def configure_model(self) -> None:
        super().configure_model()
        self.compile()


def _fit(model: DigitsMLP, tmp_path: Path, **trainer_options: Any) -> pb.PerforatedCallback:
    pl.seed_everything(0)
    callback = pb.PerforatedCallback("val_loss", "min", neuron_epochs=2, dendrite_epochs=2, max_dendrites=2)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=10,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_options,
    )
    trainer.fit(model, DigitsDataModule())
    return callback


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [
        ("32-true", torch.float32),
        ("bf16-mixed", torch.float32),
        ("16-mixed-scaler", torch.float32),
        ("bf16-true", torch.bfloat16),
        ("16-true", torch.float16),
    ],
)
def test_each_precision_runs_a_full_cycle_with_finite_scores(
    precision: str, dtype: torch.dtype, tmp_path: Path
) -> None:
    options: dict[str, Any] = {"precision": precision}
    if precision == "16-mixed-scaler":  # Lightning picks bf16 on CPU for "16-mixed"; force a GradScaler
        options = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    pl.seed_everything(0)
    model = _HalfSafe(hidden=8, lr=1e-2)
    callback = _fit(model, tmp_path, **options)
    scores = torch.tensor([h["score"] for h in callback.machine.state.history])
    assert torch.isfinite(scores).all(), scores
    assert [layer.num_dendrites for layer in model.perforated_layers()] == [2, 2, 2]
    # New parameters were converted by the precision plugin, and they trained.
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert all(layer.output_weight.abs().sum() > 0 for layer in model.perforated_layers())
    assert scores[-1] < scores[0]


@pytest.mark.slow  # a compiled and an eager fit: among the longest tests (--durations)
def test_a_compiled_model_trains_across_restructures_and_matches_eager(tmp_path: Path) -> None:
    """Five structures (two accepted sets), each trained and validated: compiled throughout.

    Dynamo keeps the graphs of every structure the model had, so without the reset after each
    restructure (``drop_stale_graphs``) the ten variants pass the recompile limit (8), which the
    strict setting below turns from a warning (and eager execution) into an error. The compiled
    model also compiles its statistics (``compile_statistics``), which then run inside the opaque
    tap op of the model's compiled backward graph.
    """
    torch._dynamo.reset()
    pl.seed_everything(0)
    compiled = _Compiled(hidden=8, lr=1e-2, dendrites=pb.DendriteConfig(compile_statistics=True))
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        compiled_run = _fit(compiled, tmp_path / "compiled")
    assert not correlation._moments_and_sum.failed
    assert not correlation._score_and_gradient.failed
    pl.seed_everything(0)
    eager = DigitsMLP(hidden=8, lr=1e-2)
    eager_run = _fit(eager, tmp_path / "eager")
    assert [h["action"] for h in compiled_run.machine.state.history] == [
        h["action"] for h in eager_run.machine.state.history
    ]
    compiled_scores = [h["score"] for h in compiled_run.machine.state.history]
    eager_scores = [h["score"] for h in eager_run.machine.state.history]
    # Inductor reorders floating-point sums, so many steps later the scores differ slightly.
    assert compiled_scores[0] == pytest.approx(eager_scores[0], rel=1e-4)
    assert compiled_scores == pytest.approx(eager_scores, rel=2e-2)
    # The compiled forward computes what the eager forward of the same weights computes.
    x = torch.randn(9, 64)
    compiled.eval()
    with torch.no_grad():
        assert torch.allclose(compiled(x), torch.nn.Sequential.forward(compiled.net, x), atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("setting", ["32-true", "bf16-mixed"])
def test_compiled_statistics_follow_the_eager_statistics_through_a_fit(setting: str, tmp_path: Path) -> None:
    """``DendriteConfig(compile_statistics=True)`` in a Lightning fit: same decisions, near-equal scores.

    Under ``bf16-mixed`` the candidates' outputs arrive in bfloat16 (a graph of its own). With a
    compiled model: ``test_a_compiled_model_trains_across_restructures_and_matches_eager``.
    """

    def run(compile_statistics: bool, root: Path) -> tuple[pb.PerforatedCallback, DigitsMLP]:
        torch._dynamo.reset()
        for fn in (correlation._moments_and_sum, correlation._score_and_gradient):
            fn.reset()
        pl.seed_everything(0)
        model = DigitsMLP(hidden=8, lr=1e-2, dendrites=pb.DendriteConfig(compile_statistics=compile_statistics))
        return _fit(model, root, precision=setting), model

    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        fused, fused_model = run(True, tmp_path / "compiled")
    assert not correlation._moments_and_sum.failed
    assert not correlation._score_and_gradient.failed
    assert correlation._score_and_gradient._compiled is not None
    eager, _ = run(False, tmp_path / "eager")
    torch._dynamo.reset()
    assert [h["action"] for h in fused.machine.state.history] == [h["action"] for h in eager.machine.state.history]
    assert [layer.num_dendrites for layer in fused_model.perforated_layers()] == [2, 2, 2]
    fused_scores = [h["score"] for h in fused.machine.state.history]
    eager_scores = [h["score"] for h in eager.machine.state.history]
    # Identical until the first dendrite phase; afterwards the fused sums' rounding carries over.
    assert fused_scores[:2] == eager_scores[:2]
    assert fused_scores == pytest.approx(eager_scores, rel=2e-2)
