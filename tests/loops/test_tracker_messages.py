"""PerforatedTracker's messages and scores: what a plain loop sees, and what it may pass in."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
import torch
from torch import nn

import pb_lightning as pb

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _tracker_model(tracker: pb.PerforatedTracker) -> nn.Module:
    torch.manual_seed(0)
    model = tracker.initialize(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)))
    tracker.set_optimizer(torch.optim.SGD, lr=0.1)
    tracker.setup_optimizer(model)
    return model


def test_the_tracker_shows_its_decisions_when_no_logging_is_configured(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # a plain script: nothing configured
    tracker = pb.PerforatedTracker("max", pb.PhaseSchedule(neuron_patience=1))
    model = _tracker_model(tracker)
    for score in (0.5, 0.4):
        tracker.add_validation_score(score, model)
    assert tracker.last_decision is not None
    assert tracker.last_decision.action == "start_dendrite_phase"
    err = capsys.readouterr().err
    assert "validation 2: start_dendrite_phase" in err
    assert "validation 1" not in err  # "continue" is not announced

    quiet = pb.PerforatedTracker("max", pb.PhaseSchedule(neuron_patience=1), verbose=False)
    model = _tracker_model(quiet)
    for score in (0.5, 0.4):
        quiet.add_validation_score(score, model)
    assert quiet.last_decision is not None
    assert quiet.last_decision.action == "start_dendrite_phase"
    assert capsys.readouterr().err == ""


def test_configured_logging_receives_the_tracker_decisions_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    monkeypatch.setattr(logging.getLogger(), "handlers", [Collect()])  # e.g. logging.basicConfig()
    tracker = pb.PerforatedTracker("max", pb.PhaseSchedule(neuron_patience=1))
    model = _tracker_model(tracker)
    for score in (0.5, 0.4):
        tracker.add_validation_score(score, model)
    decisions = [r.getMessage() for r in records if "start_dendrite_phase" in r.getMessage()]
    assert len(decisions) == 1
    assert capsys.readouterr().err == ""  # not written a second time by the fallback handler


@pytest.mark.parametrize(("mode", "bad"), [("max", float("nan")), ("max", float("inf")), ("min", float("-inf"))])
def test_a_non_finite_tracker_score_is_reported_and_is_never_a_best(mode: str, bad: float) -> None:
    tracker = pb.PerforatedTracker(mode, pb.PhaseSchedule(neuron_patience=3))
    model = _tracker_model(tracker)
    tracker.add_validation_score(0.5, model)
    with pytest.warns(UserWarning, match=rf"score is {bad}.* at validation 2; it counts as no improvement"):
        tracker.add_validation_score(bad, model)
    with pytest.warns(UserWarning, match=r"at epoch 7;"):
        tracker.add_validation_score(bad, model, epoch=7)
    state = tracker.machine.state
    assert state.phase_best == 0.5
    assert state.wait == 2  # counted as no improvement
    assert all(math.isfinite(h["score"]) or h["action"] == "continue" for h in state.history)


@pytest.mark.parametrize("bad", ["high", None, True, torch.tensor([0.1, 0.2]), 1 + 2j])
def test_a_tracker_score_that_is_not_a_real_number_is_refused_by_name(bad: Any) -> None:
    tracker = pb.PerforatedTracker("max")
    model = _tracker_model(tracker)
    with pytest.raises(pb.PerforationError, match=r"`score` must be a real number"):
        tracker.add_validation_score(bad, model)
    assert tracker.machine.state.validations == 0  # refused before the machine saw it


def test_tracker_scores_may_be_tensors_and_numpy_numbers() -> None:
    import numpy as np

    tracker = pb.PerforatedTracker("max", pb.PhaseSchedule(neuron_patience=5))
    model = _tracker_model(tracker)
    for score in (torch.tensor(0.25), np.float32(0.5), 1):
        tracker.add_validation_score(score, model)
    assert [h["score"] for h in tracker.machine.state.history] == [0.25, 0.5, 1.0]


def test_the_tracker_shows_what_it_perforated_and_skipped(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3), nn.LayerNorm(3))
    with caplog.at_level(logging.INFO, logger="pb_lightning.loops.tracker"):
        pb.PerforatedTracker("max").initialize(model)
    summary = "\n".join(r.getMessage() for r in caplog.records if r.name == "pb_lightning.loops.tracker")
    assert "1 perforated module" in summary
    assert "embedding" in summary
