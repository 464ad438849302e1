"""PerforatedTracker: the engine and phase machine in a plain PyTorch loop."""

from __future__ import annotations

import io
import logging
import runpy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import pb_lightning as pb
from pb_lightning.demos.digits import DigitsDataModule, DigitsMLP
from pb_lightning.engine.transitions import candidate_scores
from tests.helpers import fast_trainer

_REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# A score sequence that exercises every decision: baseline, an accepted cycle that improves,
# a cycle that fails and is retried, and a final failure. Dendrite phases have a fixed length,
# so the decisions depend on the validation scores alone (candidates see different data here).
# Values exact in float32, which Lightning logs.
SCORES = [0.5] + [0.625] * 4 + [0.75] * 4 + [0.6875] * 4 + [0.71875] * 3
SCHEDULE = {"neuron_patience": 1, "dendrite_epochs": 1, "max_tries": 2, "max_dendrites": 4, "run_budget": None}


def _loop(
    scores: list[float],
    tracker: pb.PerforatedTracker,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    for score in scores:
        for _ in range(2):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        model, restructured, complete = tracker.add_validation_score(score, model)
        if complete:
            break
        if restructured:
            optimizer, _ = tracker.setup_optimizer(model)
    return model, optimizer


def _plain_run(scores: list[float]) -> tuple[pb.PerforatedTracker, nn.Module]:
    torch.manual_seed(0)
    tracker = pb.PerforatedTracker("max", pb.PhaseSchedule(**SCHEDULE))
    model = tracker.initialize(nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10)))
    tracker.set_optimizer(torch.optim.Adam, lr=1e-2)
    optimizer, _ = tracker.setup_optimizer(model)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    model(x)
    _loop(scores, tracker, model, x, y, optimizer)
    return tracker, model


class _Scripted(DigitsMLP):
    """Logs a scripted validation score per epoch, so both paths see the same sequence."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("score", SCORES[self.current_epoch])


def test_the_plain_loop_and_the_lightning_path_take_the_same_decisions(tmp_path: Path) -> None:
    tracker, model = _plain_run(SCORES)
    pl.seed_everything(0)
    callback = pb.PerforatedCallback("score", "max", **SCHEDULE)
    lightning_model = _Scripted(hidden=8)
    fast_trainer(tmp_path, [callback], len(SCORES)).fit(lightning_model, DigitsDataModule())
    # Reasons name the candidates' scores, which differ (different data); decisions may not.
    plain = [(h["action"], h["phase"], h["score"], h["dendrites"]) for h in tracker.machine.state.history]
    lightning = [(h["action"], h["phase"], h["score"], h["dendrites"]) for h in callback.machine.state.history]
    assert plain == lightning
    assert tracker.machine.state.global_best == callback.machine.state.global_best
    actions = [a for a, *_ in plain]
    assert {"start_dendrite_phase", "accept", "retry", "stop"} <= set(actions)
    assert [layer.num_dendrites for layer in pb.perforated_layers(model)] == [
        layer.num_dendrites for layer in lightning_model.perforated_layers()[:2]
    ]


def test_state_round_trip_resumes_with_the_same_decisions() -> None:
    full, _ = _plain_run(SCORES)
    # Run half, save tracker and model state (weights_only), rebuild both, and run the rest.
    tracker, model = _plain_run(SCORES[:7])
    torch.manual_seed(0)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))  # any batch: decisions follow the scores
    buffer = io.BytesIO()
    torch.save(
        {"tracker": tracker.state_dict(), "model": model.state_dict(), "perforation": pb.perforation_state(model)},
        buffer,
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = pb.PerforatedTracker("max", pb.PhaseSchedule(**SCHEDULE))
    fresh = resumed.initialize(nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10)))
    fresh.load_state_dict(saved["model"])
    pb.load_perforation_state(fresh, saved["perforation"])
    resumed.load_state_dict(saved["tracker"])
    resumed.set_optimizer(torch.optim.Adam, lr=1e-2)
    optimizer, _ = resumed.setup_optimizer(fresh)
    _loop(SCORES[7:], resumed, fresh, x, y, optimizer)
    assert [h["action"] for h in resumed.machine.state.history] == [h["action"] for h in full.machine.state.history]


def test_the_capacity_test_runs_in_a_plain_loop() -> None:
    torch.manual_seed(0)
    tracker = pb.PerforatedTracker("max", capacity_test=True)
    model = tracker.initialize(nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10)))
    tracker.set_optimizer(torch.optim.Adam, lr=1e-2)
    optimizer, _ = tracker.setup_optimizer(model)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    _loop([0.1 * i for i in range(10)], tracker, model, x, y, optimizer)
    assert tracker.capacity_report == "capacity test: 3 dendrite sets added; no problems detected"
    assert [layer.num_dendrites for layer in pb.perforated_layers(model)] == [3, 3]


def test_the_example_runs_to_completion_with_accepted_dendrites() -> None:
    namespace = runpy.run_path(str(_REPO / "examples" / "plain_pytorch_digits.py"))
    result = namespace["main"](["--max-epochs", "120", "--neuron-patience", "3", "--dendrite-patience", "1"])
    assert result["dendrites"] >= 1
    assert result["cycles_accepted"] >= 1
    assert result["val_accuracy"] > result["best_before_dendrites"]


def test_tracker_misuse_is_named() -> None:
    tracker = pb.PerforatedTracker()
    model = tracker.initialize(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(pb.PerforationError, match=r"set_optimizer\(OptimizerClass"):
        tracker.setup_optimizer(model)
    with pytest.raises(pb.PerforationError, match=r"`optimizer` must be a torch.optim.Optimizer subclass"):
        tracker.set_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))  # type: ignore[arg-type]
    with pytest.raises(pb.PerforationError, match=r"`params` must be left out"):
        tracker.set_optimizer(torch.optim.SGD, params=model.parameters(), lr=0.1)
    with pytest.raises(pb.PerforationError, match=r"`schedule` must be a pb_lightning.PhaseSchedule"):
        pb.PerforatedTracker("max", {"neuron_patience": 2})  # type: ignore[arg-type]


def test_a_dendrite_phase_ends_at_the_training_step_its_candidates_converge() -> None:
    torch.manual_seed(0)
    schedule = pb.PhaseSchedule(neuron_patience=1, dendrite_patience_steps=4, max_dendrites=1)
    tracker = pb.PerforatedTracker("min", schedule, verbose=False)
    model = tracker.initialize(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)))
    tracker.set_optimizer(torch.optim.Adam, lr=1e-2)
    optimizer, _ = tracker.setup_optimizer(model)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    for score in (1.0, 1.0):  # the first neuron phase ends: a dendrite phase starts
        model, restructured, _ = tracker.add_validation_score(score, model)
    assert restructured
    assert tracker.machine.state.phase == "dendrite"
    optimizer, _ = tracker.setup_optimizer(model)
    steps, ended, scores = 0, False, []
    while not ended and steps < 500:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        steps += 1
        scores.append(candidate_scores(model))
        before = model(x).detach()
        ended = tracker.add_training_step(model)
    assert ended, "the candidates' score never converged in 500 steps"
    # Accepted at that step, function-preserving, and the machine now runs a neuron phase.
    assert tracker.last_decision is not None
    assert tracker.last_decision.action == "accept"
    assert [layer.num_dendrites for layer in pb.perforated_layers(model)] == [1, 1]
    torch.testing.assert_close(model(x), before)
    assert tracker.machine.state.phase == "neuron"
    assert not tracker.add_training_step(model)
    # The step it ended at is the one the rule gives for the mean candidate scores it saw.
    means = [float(sum(s.sum() for s in step.values()) / sum(s.numel() for s in step.values())) for step in scores]
    running = [0.0]  # the running best since the phase began at 0; flat: 4 steps added <= 10% of it
    for i, score in enumerate(means):
        if score <= 0:
            continue
        running.append(max(running[-1], score))
        if len(running) > 4 and running[-1] - running[-5] <= 0.1 * running[-1]:
            assert i == steps - 1
            break
    else:
        raise AssertionError("the reference rule did not end the phase")


def test_the_tracker_says_a_nan_score_plainly_and_shows_its_summary_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tracker = pb.PerforatedTracker("max")
    with caplog.at_level(logging.INFO, logger="pb_lightning.loops.tracker"):
        model = tracker.initialize(nn.Sequential(nn.Linear(4, 3)))
        tracker.initialize(nn.Sequential(nn.Linear(4, 3)))  # again (a fresh model): no second summary
    summaries = [r for r in caplog.records if "perforated module" in r.getMessage() and r.levelno == logging.INFO]
    assert len(summaries) == 1
    with pytest.warns(UserWarning, match=r"pb_lightning: the validation score is nan at validation 1;"):
        tracker.add_validation_score(float("nan"), model)
