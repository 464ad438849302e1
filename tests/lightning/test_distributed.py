"""Data parallelism: two CPU processes (gloo) must stay identical through every restructure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pb_lightning as pb
from pb_lightning.cycle.decision import ACCEPT
from pb_lightning.demos.digits import DigitsDataModule, DigitsMLP
from pb_lightning.engine.correlation import CorrelationStatistics
from tests.helpers import run_python

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ddp_cycle.py"
# Process-level: DDP runs in subprocesses (and the refusals need a Trainer with a DDP strategy).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("distributed"),  # one pytest-xdist worker: the module's DDP run is shared
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def _run_ddp(out: Path, *extra: str) -> tuple[dict[str, Any], dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    run_python(str(_SCRIPT), str(out), *extra, cwd=out)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    return ranks[0], ranks[1]


def _assert_identical(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert [h["action"] for h in a["history"]] == [h["action"] for h in b["history"]]
    assert a["state"].keys() == b["state"].keys()
    different = [k for k in a["state"] if not torch.equal(a["state"][k], b["state"][k])]
    assert different == []


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp")
    return (out, *_run_ddp(out))


def test_two_ranks_take_the_same_decisions_and_end_bit_identical(ddp_run: Any) -> None:
    _, rank0, rank1 = ddp_run
    _assert_identical(rank0, rank1)
    assert [h["action"] for h in rank0["history"]].count(ACCEPT) == 2
    assert rank0["dendrites"] == [2, 2, 2]
    # The accepted dendrites' output weights (0 at acceptance) were trained on both ranks.
    assert all(rank0["state"][f"net.{i}.output_weight"][d].abs().sum() > 0 for i in (0, 2, 4) for d in (0, 1))


def test_a_ddp_run_resumes_from_a_mid_dendrite_phase_checkpoint(ddp_run: Any, tmp_path: Path) -> None:
    out, full, _ = ddp_run
    # Epochs 0-2 are the neuron phase, 3-4 the dendrite phase: epoch 3's checkpoint is mid-phase.
    checkpoint = next((out / "ckpt").glob("epoch=3-*.ckpt"))
    assert torch.load(checkpoint, weights_only=True)["pb_lightning"]["dendrite_phase"] is True
    rank0, rank1 = _run_ddp(tmp_path, "--resume", str(checkpoint))
    _assert_identical(rank0, rank1)
    assert [h["action"] for h in rank0["history"]] == [h["action"] for h in full["history"]]
    assert rank0["dendrites"] == full["dendrites"]


def _pooled_moments(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(rank)  # every rank has its own batch
    v, e = torch.rand(16, 3, 5), torch.randn(16, 5)
    stats = CorrelationStatistics(3, 5, pb.DendriteConfig())
    stats.process_group = dist.group.WORLD
    stats.update(v, e, axis=1)
    torch.save({"moments": stats.moments, "v": v, "e": e}, f"{out}{rank}.pt")
    dist.destroy_process_group()


def test_statistics_are_pooled_over_all_ranks_data(tmp_path: Path) -> None:
    mp.spawn(_pooled_moments, args=(2, str(tmp_path / "store"), str(tmp_path / "rank")), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert torch.equal(ranks[0]["moments"], ranks[1]["moments"])
    # The pooled moments are those of both ranks' batches together.
    v = torch.cat([r["v"] for r in ranks])
    e = torch.cat([r["e"] for r in ranks])
    alone = CorrelationStatistics(3, 5, pb.DendriteConfig())
    alone.update(v, e, axis=1)
    assert torch.allclose(ranks[0]["moments"], alone.moments, atol=1e-6)


def test_ddp_spawn_is_refused_with_the_reason(tmp_path: Path) -> None:
    callback = pb.PerforatedCallback("val_loss", "min", neuron_epochs=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(Exception, match=r"does not support strategy='ddp_spawn'.*strict=False"):
        trainer.fit(DigitsMLP(hidden=8), DigitsDataModule())


def test_a_monitor_logged_on_some_ranks_only_is_named(tmp_path: Path) -> None:
    result = run_python(
        str(_SCRIPT), str(tmp_path), "--monitor-rank0-only", "--max-epochs", "2", cwd=tmp_path, check=False
    )
    assert result.returncode != 0
    assert "was logged on some ranks but not on others" in result.stderr
