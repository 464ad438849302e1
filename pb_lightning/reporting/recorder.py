"""The run's one history: a row per decision, written by :class:`HistoryRecorder`.

The :class:`~pb_lightning.cycle.driver.CycleDriver` records a row right after carrying out each
decision, for the Lightning callback and the plain-PyTorch tracker alike; the callback's
publisher logs the rows and writes them to files (:mod:`pb_lightning.reporting.history`), and
checkpoints store them once: the phase machine's own per-validation history is a projection of
them (:func:`machine_history`), rebuilt on load.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pb_lightning.cycle.decision import Decision
from pb_lightning.cycle.phase_state import HISTORY_KEYS, PhaseState
from pb_lightning.engine.convert import perforated_layers
from pb_lightning.engine.params import parameter_counts
from pb_lightning.engine.transitions import candidate_scores, in_dendrite_phase
from pb_lightning.reporting.history import END

__all__ = ["HistoryRecorder", "candidate_scores_by_layer", "machine_history"]


class HistoryRecorder:
    """Collects one row per decision: the machine's entry, widened with the model's size.

    Each row holds the machine's history entry (:data:`~pb_lightning.cycle.phase_state.HISTORY_KEYS`),
    the ``epoch`` the front end gave (None from a loop that does not say), the dendrite sets per
    layer, the parameter count (and the count before any dendrite), the global best and the
    cycles accepted and rejected so far.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.initial_parameters: int | None = None

    def start(self, model: nn.Module) -> None:
        """Remember the model's size before any dendrite (once: a resumed run keeps its own)."""
        if self.initial_parameters is None:
            self.initial_parameters = parameter_counts(model)["total"]

    def record(self, model: nn.Module, state: PhaseState, decision: Decision, epoch: int | None) -> dict[str, Any]:
        """Append and return the row of the decision just carried out (``state.history[-1]``)."""
        row = self._row(model, state, state.history[-1], decision.action.value, decision.reason, epoch)
        self.rows.append(row)
        return row

    def close(self, model: nn.Module, state: PhaseState, epoch: int | None, global_step: int | None) -> dict[str, Any]:
        """Append the closing ``end`` row (after the final restore): the model the run leaves."""
        end: dict[str, Any] = {"validation": state.validations, "global_step": global_step, "phase": "neuron"}
        end["score"] = state.global_best
        row = self._row(model, state, end, END, "training ended", epoch)
        self.rows.append(row)
        return row

    def _row(
        self, model: nn.Module, s: PhaseState, entry: dict[str, Any], action: str, reason: str, epoch: int | None
    ) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "validation": entry["validation"],
            "global_step": entry.get("global_step"),
            "phase": entry["phase"],
            "score": entry["score"],
            "candidate_score": entry.get("candidate_score"),
            "action": action,
            "reason": reason,
            "dendrites": s.dendrites,
            "dendrites_per_layer": {layer.name: layer.num_dendrites for layer in perforated_layers(model)},
            "parameters": parameter_counts(model)["total"],
            "parameters_before": self.initial_parameters,
            "global_best": s.global_best,
            "cycles_accepted": s.accepted_cycles,
            "cycles_rejected": s.rejected_cycles,
        }

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """The rows as they are now (a copy of the list: later rows do not leak into a saved state)."""
        return {"rows": list(self.rows), "initial_parameters": self.initial_parameters}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = list(state.get("rows", []))
        self.initial_parameters = state.get("initial_parameters")

    def load_machine_history(self, history: list[dict[str, Any]]) -> None:
        """Rows from a machine history alone (a state written before the recorder kept them):
        the machine's fields, the rest unknown (None)."""
        self.rows = [{**{key: entry.get(key) for key in HISTORY_KEYS}, "epoch": None} for entry in history]


def machine_history(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The phase machine's per-validation history, rebuilt from the recorder's rows.

    One row is recorded right after each decision, so the machine's history is a projection of
    the rows: checkpoints store it once, as the rows (the closing ``end`` row is not a decision).
    """
    return [{key: row.get(key) for key in HISTORY_KEYS} for row in rows if row.get("action") != END]


def candidate_scores_by_layer(model: nn.Module) -> dict[str, tuple[float, float]]:
    """Per layer: mean and max over neurons of each neuron's best candidate score (empty outside dendrite phases)."""
    if not in_dendrite_phase(model):
        return {}
    return {name: (float(s.mean()), float(s.max())) for name, s in candidate_scores(model).items()}
