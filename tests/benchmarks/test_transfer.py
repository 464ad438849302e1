"""``benchmarks/transfer.py``: the widening, the adapters' size, the envelope, and the quick run end to end."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.helpers import run_benchmark

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
pytest.importorskip("peft")
transfer = pytest.importorskip("transfer")


def test_widening_preserves_the_function_and_lets_the_copies_diverge() -> None:
    torch.manual_seed(0)
    net = transfer.mlp(10, 8, 3)
    wide = transfer.widen(net, 20, torch.Generator().manual_seed(1))
    assert [m.out_features for m in wide if isinstance(m, nn.Linear)] == [20, 20, 3]
    x = torch.randn(64, 10)
    torch.testing.assert_close(wide(x), net(x), rtol=1e-5, atol=1e-5)
    # A copied unit shares its incoming weights with its original, but not its outgoing weights:
    # unequal shares make their gradients differ, so training separates them.
    first = wide[0].weight
    copies = [(i, j) for i in range(8) for j in range(8, 20) if torch.equal(first[i], first[j])]
    assert copies
    wide(x).square().sum().backward()
    i, j = copies[0]
    assert not torch.allclose(wide[0].weight.grad[i], wide[0].weight.grad[j])
    with pytest.raises(ValueError, match="width=4"):
        transfer.widen(net, 4, torch.Generator())


@pytest.mark.parametrize("train_base", [False, True])
def test_lora_adds_rank_times_fan_in_plus_fan_out_per_layer(train_base: bool) -> None:
    net = transfer.mlp(10, 8, 3)
    targets = ["0", "2", "4"] if train_base else ["0", "2"]
    model, added = transfer.lora(net, 4, targets, train_base=train_base)
    # Reference: a rank-r adapter of a Linear(i, o) is an (r × i) and an (o × r) matrix.
    sizes = {"0": (10, 8), "2": (8, 8), "4": (8, 3)}
    assert added == sum(4 * (i + o) for i, o in (sizes[t] for t in targets))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "modules_to_save" in n or train_base for n in trainable)
    assert any("modules_to_save" in n for n in trainable) != train_base  # the head: retrained or adapted
    assert any("base_layer" in n for n in trainable) == train_base
    x = torch.randn(5, 10)
    torch.testing.assert_close(model(x), net(x))  # adapters start at zero: the same function


def test_the_envelope_is_the_best_family_at_the_arms_size() -> None:
    def run(kind: str, params: float, score: float) -> dict:
        return {"kind": kind, "params": params, "test_acc": score}

    rows = {
        "finetune": run("finetune", 100, 0.50),
        "patient": run("patient", 100, 0.52),
        "restart": run("restart", 100, 0.51),
        "widen@2": run("widen", 400, 0.60),
        "lora@2": run("lora", 150, 0.40),
        "lora@8": run("lora", 600, 0.70),
        "lora-full@2": run("lora-full", 150, 0.55),
        "lora-full@8": run("lora-full", 600, 0.58),
    }
    # At 200: widen reads 0.50 + 0.10 × log(2)/log(4) = 0.55; lora 0.40 + 0.30 × log(200/150)/log(4);
    # lora-full 0.55 + 0.03 × log(200/150)/log(4); patient 0.52.
    widen = 0.50 + 0.10 * math.log(2) / math.log(4)
    lora = 0.40 + 0.30 * math.log(200 / 150) / math.log(4)
    lora_full = 0.55 + 0.03 * math.log(200 / 150) / math.log(4)
    best = max(("widen", widen), ("lora", lora), ("lora-full", lora_full), ("patient", 0.52), key=lambda t: t[1])
    value, family, beyond = transfer.envelope(rows, 200)
    assert (family, value, beyond) == (best[0], pytest.approx(best[1]), False)
    # At 1000, past every frontier: lora's last measured point is the best, flagged.
    assert transfer.envelope(rows, 1000) == (0.70, "lora", True)
    # At 120, below the adapters: the widening reads 0.50 + 0.10 × log(1.2)/log(4) ≈ 0.513, so
    # the patient network's 0.52 is the best.
    assert 0.50 + 0.10 * math.log(1.2) / math.log(4) < 0.52
    assert transfer.envelope(rows, 120) == (0.52, "patient", False)


@pytest.mark.slow  # a benchmark smoke test: the transfer script's quick run, in a subprocess
def test_quick_run_fits_every_arm_from_one_trained_network(tmp_path: Path) -> None:
    result = run_benchmark("transfer.py", "--quick", "--out", str(tmp_path), timeout=180)
    saved = json.loads((tmp_path / "results.json").read_text())
    bench = "Friedman-1 → shifted MLP-8"
    arms = {r["arm"] for r in saved["runs"]}
    variants = ["pb", "relu-fan2-random-trained", "relu-fan2-trained"]
    assert arms == {a.name for a in transfer.arms_for(transfer.BENCHES[bench], variants)}
    assert {r["seed"] for r in saved["runs"]} == {0, 1}
    # Every arm of a seed starts from the same trained source network.
    for seed in (0, 1):
        assert len({r["source_test"] for r in saved["runs"] if r["seed"] == seed}) == 1
    dendritic = [r for r in saved["runs"] if r["kind"] in ("dendrites", "inert")]
    assert all(r["dendrites_per_layer"] >= 1 for r in dendritic)
    assert all(r["dendrites_per_layer"] == 0 for r in saved["runs"] if r["kind"] not in ("dendrites", "inert"))
    summary = saved["summary"][f"{bench} | seeds 0-4"]["arms"]
    assert math.isfinite(summary["pb"]["vs_envelope"][0])
    assert summary["pb"]["verdict"] in ("wins", "loses", "level")
    written = (tmp_path / "results.md").read_text()
    (tmp_path / "results.md").unlink()
    run_benchmark("transfer.py", "--render", "--out", str(tmp_path))
    assert (tmp_path / "results.md").read_text() == written
    assert "| lora-full@16 |" in written
    assert written.strip() in result.stdout
