"""One snapshot per neuron: the candidate pool keeps, per neuron, only its best candidate's weights.

Every test here compares against the rule the pool followed when it kept a snapshot per candidate
(written out straightforwardly below): per candidate and neuron, the running best score and the
weights at the first step that reached it; acceptance takes, per neuron, the candidate of the
highest best score (the first maximum) and its snapshot. Keeping only that snapshot must accept
exactly the same set, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pb_lightning as pb
from pb_lightning import DendriteConfig
from pb_lightning.engine.candidates import CandidatePool
from pb_lightning.engine.layer import PerforatedLayer
from tests.helpers import Mixer


# ------------------------------------------------------------------------------ the old rule
class PerCandidateReference:
    """The per-candidate rule: every candidate's best score and a snapshot of its weights then."""

    def __init__(self, pool: CandidatePool) -> None:
        self.per_neuron = pool.bank.per_neuron
        k, out = pool.best_score.shape
        self.best = torch.full((k, out), -1.0)
        self.snapshots = {name: t.detach().clone() for name, t in _learned(pool).items()}

    def record(self, pool: CandidatePool, score: Tensor, skip: Tensor | None = None) -> None:
        """Fold in one step's ``score [K, out]`` with the pool's weights as they are now."""
        if not self.per_neuron:
            score = score.mean(1, keepdim=True).expand_as(score)
        current = _learned(pool)
        k, out = score.shape
        for i in range(k):
            if skip is not None and bool(skip[i]):
                continue
            for j in range(out):
                if float(score[i, j]) > float(self.best[i, j]):
                    self.best[i, j] = score[i, j]
                    for name, t in current.items():
                        if name == "cascade_weight":  # [K, D, out]
                            self.snapshots[name][i, :, j] = t[i, :, j]
                        elif self.per_neuron:  # [K, out, ...]
                            self.snapshots[name][i, j] = t[i, j]
                        else:  # one module copy per set: the whole set
                            self.snapshots[name][i] = t[i]

    def restart(self, sets: Tensor) -> None:
        self.best[sets] = -1.0

    def accepted(self, pool: CandidatePool) -> dict[str, Tensor]:
        """What acceptance installs: per neuron, the first maximum's snapshot (and its wiring)."""
        choice = self.best.argmax(0)
        tensors = dict(self.snapshots) | {"bank__" + n: b for n, b in pool.bank.structure().items()}
        out: dict[str, Tensor] = {}
        for name, t in tensors.items():
            if name == "cascade_weight":
                out[name] = torch.stack([t[int(c), :, j] for j, c in enumerate(choice)], dim=-1)
            elif self.per_neuron:
                out[name] = torch.stack([t[int(c), j] for j, c in enumerate(choice)])
            else:
                out[name] = t[int(choice[0])]
        return out


def _learned(pool: CandidatePool) -> dict[str, Tensor]:
    tensors = {"bank__" + n: p.detach() for n, p in pool.bank.stacked().items()}
    if pool.cascade_weight is not None:
        tensors["cascade_weight"] = pool.cascade_weight.detach()
    return tensors


def _selected(pool: CandidatePool) -> dict[str, Tensor]:
    """``pool.selected()`` named as the reference names it, without the set axis."""
    bank, cascade, _ = pool.selected()
    out = {"bank__" + n: t[0] for n, t in bank.items()}
    if cascade is not None:
        out["cascade_weight"] = cascade
    return out


def _assert_same_accepted(pool: CandidatePool, reference: PerCandidateReference) -> None:
    want = reference.accepted(pool)
    got = _selected(pool)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert torch.equal(pool.choice(), reference.best.argmax(0))
    assert torch.equal(pool.scores(), reference.best.max(0).values.clamp_min(0))


# --------------------------------------------------------------------------- the rule alone
_POOLS: dict[str, Callable[[], tuple[nn.Module, dict[str, Any], int]]] = {
    "linear": lambda: (nn.Linear(4, 5), {}, 0),
    "linear_cascade": lambda: (nn.Linear(4, 5), {}, 2),
    "conv": lambda: (nn.Conv2d(2, 3, 3), {}, 1),
    "custom": lambda: (Mixer(), {}, 1),
    "sparse": lambda: (nn.Linear(6, 4), {"fan_in": 2, "fan_in_mode": "random"}, 1),
}


@pytest.mark.parametrize("kind", sorted(_POOLS))
def test_the_snapshot_rule_matches_the_per_candidate_rule_step_by_step_with_ties(kind: str) -> None:
    """Scores from few values (many ties, rising and falling) and new weights at every step."""
    torch.manual_seed(0)
    module, options, accepted = _POOLS[kind]()
    config = DendriteConfig(num_candidates=4, **options)
    k, out = 4, {"conv": 3, "custom": 6, "sparse": 4}.get(kind, 5)
    index = None
    if "fan_in" in options:
        index = torch.stack([torch.randperm(6)[:2].sort().values for _ in range(k * out)]).view(k, out, 2)
    pool = CandidatePool(module, k, out, accepted, config, index=index)
    reference = PerCandidateReference(pool)
    _assert_same_accepted(pool, reference)  # before any step: candidate 0's initial weights
    for step in range(40):
        with torch.no_grad():
            for t in _learned(pool).values():
                t.copy_(torch.randn_like(t))
        score = (torch.randint(0, 8, (k, out)) + step // 4).float() / 16  # a rising level, few values
        pool._record_best(score)
        reference.record(pool, score)
        assert torch.equal(pool.best_score, reference.best)
        _assert_same_accepted(pool, reference)
    assert len(set(pool.choice().tolist())) > 1 or kind == "custom", "the test needs different candidates chosen"


# ---------------------------------------------------------------------------- training runs
def _linear(**options: Any) -> tuple[nn.Module, Tensor]:
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)), torch.randn(32, 6)


def _conv(**options: Any) -> tuple[nn.Module, Tensor]:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    return model, torch.randn(16, 3, 5, 5)


def _mixer(**options: Any) -> tuple[nn.Module, Tensor]:
    return nn.Sequential(Mixer(), nn.Linear(6, 3)), torch.randn(32, 5)


_RUNS: dict[str, tuple[Callable[..., tuple[nn.Module, Tensor]], dict[str, Any], int]] = {
    "linear": (_linear, {}, 0),
    "linear_cascade": (_linear, {}, 2),
    "conv": (_conv, {}, 0),
    "conv_cascade": (_conv, {}, 1),
    "sparse_local": (_conv, {"fan_in": 2, "fan_in_mode": "local"}, 1),
    "sparse_random": (_linear, {"fan_in": 3, "fan_in_mode": "random"}, 1),
    "sparse_learned": (_conv, {"fan_in": 2, "fan_in_mode": "learned"}, 0),
    "custom": (_mixer, {}, 1),
}


def _perforated(kind: str) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    build, options, accepted = _RUNS[kind]
    model, x = build()
    extra: dict[str, Any] = {"include": [Mixer, nn.Linear], "neuron_axes": {Mixer: -1}} if kind == "custom" else {}
    config = DendriteConfig(num_candidates=3, warmup_steps=2, statistics_momentum=0.8, **options)
    model = pb.perforate(model, config=config, **extra)
    y = torch.randint(0, 3, (x.shape[0],))
    model(x)
    for _ in range(accepted):  # earlier dendrites, so the candidates cascade from them
        pb.start_dendrite_phase(model)
        _steps(model, x, y, 4)
        pb.accept_dendrites(model)
    pb.start_dendrite_phase(model)
    return model, x, y


def _steps(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    steps: int,
    references: dict[PerforatedLayer, PerCandidateReference] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Steps of the dendrite phase; ``references`` follow each pool as the old rule would."""
    opt = optimizer or torch.optim.Adam(pb.trainable_parameters(model), lr=0.05)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        for layer, reference in (references or {}).items():
            pool = layer.candidates
            assert pool is not None
            if pool.statistics.warmed_up:
                reference.record(pool, pool.statistics.score(), skip=pool.statistics.diverged)
        opt.step()


@pytest.mark.parametrize("kind", sorted(_RUNS))
def test_a_training_run_accepts_what_the_per_candidate_rule_accepts(kind: str) -> None:
    model, x, y = _perforated(kind)
    layers = [layer for layer in pb.perforated_layers(model) if layer.candidates is not None]
    references = {layer: PerCandidateReference(layer.candidates) for layer in layers}
    _steps(model, x, y, 12, references)
    for layer, reference in references.items():
        pool = layer.candidates
        assert torch.equal(pool.best_score, reference.best)
        _assert_same_accepted(pool, reference)
        for name, snapshot in pool.named_buffers():
            if name.startswith("best_") and name not in ("best_score", "best_candidate", "best_candidate_score"):
                assert snapshot.shape[0] == 1, name  # one set, not K
    # and what acceptance installs is that set
    expected = {layer: reference.accepted(layer.candidates) for layer, reference in references.items()}
    pb.accept_dendrites(model)
    for layer, want in expected.items():
        bank = layer.dendrites
        for name, value in want.items():
            if name == "cascade_weight" or kind == "sparse_learned":
                continue  # the cascade rows land in the layer's own cascade; learned mode prunes
            assert torch.equal(getattr(bank, name[len("bank__") :])[-1], value), name
        if "cascade_weight" in want:  # the new set's rows [D, out] come last in the layer's cascade
            rows = want["cascade_weight"].shape[0]
            assert torch.equal(layer.cascade_weight.detach()[-rows:], want["cascade_weight"])


# ------------------------------------------------------------------------------- divergence
def test_a_snapshot_outlives_the_restart_of_the_candidate_it_came_from() -> None:
    """A neuron keeps its snapshot from a candidate that later diverged; it is accepted unless beaten."""
    model, x, y = _perforated("linear")
    layer = pb.perforated_layers(model)[0]
    pool = layer.candidates
    assert pool is not None
    # Per neuron, the best over all (score, lowest candidate, earliest step) seen before divergence
    # or after it: the restart does not invalidate weights that reached a finite score.
    opt = torch.optim.Adam(pb.trainable_parameters(model), lr=0.05)
    best: list[tuple[float, int, int]] = [(-1.0, 0, -1)] * pool.best_score.shape[1]
    history: list[Tensor] = []

    def step(t: int) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        history.append(pool.bank.weight.detach().clone())
        if pool.statistics.warmed_up:
            score, diverged = pool.statistics.score(), pool.statistics.diverged
            for j in range(score.shape[1]):
                for i in range(score.shape[0]):
                    if diverged is not None and bool(diverged[i]):
                        continue
                    entry = (float(score[i, j]), i, t)
                    if (-entry[0], entry[1], entry[2]) < (-best[j][0], best[j][1], best[j][2]):
                        best[j] = entry
        opt.step()

    for t in range(8):
        step(t)
    poisoned = int(pool.best_candidate.mode().values)  # the candidate most neurons hold
    held = pool.best_candidate == poisoned
    before = pool.best_bank__weight.clone()
    with torch.no_grad():
        pool.bank.weight[poisoned, 0, 0] = float("nan")
    step(8)  # sees the NaN: the set is flagged, its gradients zeroed
    assert pool.statistics.diverged is not None
    assert bool(pool.statistics.diverged[poisoned])
    changed = (pool.best_bank__weight != before).flatten(2).any(-1)[0]
    assert not bool((pool.best_candidate[changed] == poisoned).any())  # the diverged weights were not snapshot
    step(9)  # restarts from fresh weights before this forward
    assert bool(torch.isfinite(pool.bank.weight).all())
    for t in range(10, 14):
        step(t)
    assert bool((pool.best_score[poisoned] >= 0).all())  # the restarted candidate is scored again
    kept = held & (pool.best_candidate == poisoned)
    assert bool(kept.any()), "the test needs a neuron whose snapshot outlived its candidate's restart"
    # Those neurons' snapshot scores exceed every score their candidates hold now.
    assert bool((pool.best_candidate_score[kept] > pool.best_score.max(0).values[kept]).all())
    for j, (value, i, t) in enumerate(best):
        assert int(pool.best_candidate[j]) == i
        assert float(pool.best_candidate_score[j]) == value
        assert torch.equal(pool.best_bank__weight[0, j], history[t][i, j])
    accepted = pool.best_bank__weight[0].clone()
    scores = pb.accept_dendrites(model)[layer.name]
    assert torch.equal(scores, torch.tensor([b[0] for b in best]).clamp_min(0))
    assert torch.equal(layer.dendrites.weight[0], accepted)


# ------------------------------------------------------------------- old checkpoint layout
def _old_layout(model: nn.Module, references: dict[PerforatedLayer, PerCandidateReference]) -> dict[str, Tensor]:
    """The model's state dict as the per-candidate pool stored it: ``[K, ...]`` snapshots, no choice."""
    state = model.state_dict()
    for layer, reference in references.items():
        prefix = next(n for n, m in model.named_modules() if m is layer) + ".candidates."
        del state[prefix + "best_candidate"]
        del state[prefix + "best_candidate_score"]
        state[prefix + "best_score"] = reference.best.clone()
        for name, snapshot in reference.snapshots.items():
            state[prefix + "best_" + name] = snapshot.clone()
    return state


@pytest.mark.parametrize("kind", ["linear_cascade", "conv", "sparse_random", "custom"])
def test_an_old_layout_state_dict_converts_on_load_and_resumes_exactly(kind: str) -> None:
    model, x, y = _perforated(kind)
    layers = [layer for layer in pb.perforated_layers(model) if layer.candidates is not None]
    references = {layer: PerCandidateReference(layer.candidates) for layer in layers}
    optimizer = torch.optim.SGD(pb.trainable_parameters(model), lr=0.1)  # no state to carry over
    _steps(model, x, y, 6, references, optimizer)
    old = _old_layout(model, references)
    assert any(v.shape[0] == 3 for k, v in old.items() if ".best_bank__" in k)  # K sets: the old layout

    fresh, _, _ = _perforated(kind)  # a model built the same way, its own candidates untrained
    fresh.load_state_dict(old, strict=True)
    fresh_layers = [layer for layer in pb.perforated_layers(fresh) if layer.candidates is not None]
    for mine, (layer, reference) in zip(fresh_layers, references.items(), strict=True):
        pool = mine.candidates
        # The conversion, written out: per neuron, the argmax candidate's rows.
        assert torch.equal(pool.best_candidate, reference.best.argmax(0))
        assert torch.equal(pool.best_candidate_score, reference.best.max(0).values)
        _assert_same_accepted(pool, reference)
        for name, value in layer.candidates.state_dict().items():
            assert torch.equal(pool.state_dict()[name], value), name  # = the live pool's state

    # Both go on from the same state: they must keep accepting the same sets, bit for bit.
    _steps(model, x, y, 6, references, optimizer)
    _steps(fresh, x, y, 6, None, torch.optim.SGD(pb.trainable_parameters(fresh), lr=0.1))
    for mine, (layer, reference) in zip(fresh_layers, references.items(), strict=True):
        _assert_same_accepted(mine.candidates, reference)
        _assert_same_accepted(layer.candidates, reference)


def test_a_set_that_diverged_in_this_batch_is_not_recorded() -> None:
    """Its weights produced non-finite outputs (they may hold NaNs): never a neuron's snapshot."""
    pool = CandidatePool(nn.Linear(3, 2), 3, 2, 0, DendriteConfig(num_candidates=3))
    with torch.no_grad():
        pool.bank.weight[1] = float("nan")
    pool.statistics.diverged = torch.tensor([False, True, False])
    pool._record_best(torch.tensor([[0.1, 0.2], [0.9, 0.9], [0.3, 0.0]]))
    assert torch.equal(pool.best_score, torch.tensor([[0.1, 0.2], [-1.0, -1.0], [0.3, 0.0]]))
    assert pool.best_candidate.tolist() == [2, 0]
    assert torch.equal(pool.best_bank__weight[0], torch.stack([pool.bank.weight[2, 0], pool.bank.weight[0, 1]]))
