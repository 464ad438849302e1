"""Carrying out the phase machine's decisions on a model: snapshots, restores, phase switches.

Framework-free and shared by the Lightning callback and the plain-PyTorch tracker, so the two
take the same decisions and change the model the same way. What differs between them —
rebuilding optimizers, DDP, logging — stays with each caller, which learns from :meth:`step`
whether the trainable parameters changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from pb_lightning.phases import accept_dendrites, candidate_scores, discard_candidates, in_dendrite_phase
from pb_lightning.phases import start_dendrite_phase as start_phase
from pb_lightning.schedule import ACCEPT, RESTORE_GLOBAL_BEST, RETRY, START_DENDRITE_PHASE, Decision, PhaseMachine


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A copy of ``model``'s state dict (weights of a best validation point)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def mean_candidate_score(model: nn.Module) -> float | None:
    """The mean over all neurons of each neuron's best candidate score (None outside dendrite phases)."""
    if not in_dendrite_phase(model):
        return None
    scores = list(candidate_scores(model).values())
    return float(sum(float(s.sum()) for s in scores) / sum(s.numel() for s in scores))


class CycleController:
    """Applies :class:`~pb_lightning.schedule.Decision`\\ s to a perforated model.

    It keeps the two weight snapshots the decisions refer to — the best validation point of the
    current neuron phase and the global best — and restores them when asked. Restoring a
    snapshot with fewer dendrite sets (a rejected cycle) shrinks the layers back.

    Args:
        machine: the phase machine whose decisions are carried out.
    """

    def __init__(self, machine: PhaseMachine) -> None:
        self.machine = machine
        self.phase_best: dict[str, Tensor] | None = None
        self.global_best: dict[str, Tensor] | None = None

    def step(
        self,
        model: nn.Module,
        score: float,
        candidate_score: float | None,
        *,
        accept: Callable[[nn.Module], Any] = accept_dendrites,
    ) -> tuple[Decision, bool]:
        """Feed one validation score and carry out the decision.

        ``accept`` installs the dendrites (a caller may wrap it with checks). Returns the
        decision and whether the set of trainable parameters changed (rebuild the optimizer).
        """
        decision = self.machine.step(score, candidate_score)
        return decision, self.apply(model, decision, accept=accept)

    def apply(
        self, model: nn.Module, decision: Decision, *, accept: Callable[[nn.Module], Any] = accept_dendrites
    ) -> bool:
        """Carry out ``decision`` on ``model``: snapshot, restore, then act. Returns "restructured"."""
        if decision.new_phase_best:
            self.phase_best = snapshot(model)
        restructured = decision.restore is not None
        if decision.restore is not None:
            self.restore(model, decision.restore)
        if decision.new_global_best and self.phase_best is not None:
            self.global_best = self.phase_best
        if decision.action in (START_DENDRITE_PHASE, RETRY):
            start_phase(model)
            restructured = True
        elif decision.action == ACCEPT:
            accept(model)
            restructured = True
        return restructured

    def restore(self, model: nn.Module, which: str) -> None:
        """Load the global-best or phase-best snapshot (dropping candidates first)."""
        weights = self.global_best if which == RESTORE_GLOBAL_BEST else self.phase_best
        if in_dendrite_phase(model):
            discard_candidates(model)
        if weights is not None:
            model.load_state_dict(weights)

    def finish(self, model: nn.Module) -> Decision | None:
        """When training ends for another reason: leave the global-best model. None if already done."""
        if self.machine.state.done:
            return None
        decision = self.machine.finish()
        if decision.restore is not None:
            self.restore(model, decision.restore)
        if decision.new_global_best and self.phase_best is not None:
            self.global_best = self.phase_best
        return decision

    def state_dict(self) -> dict[str, Any]:
        """The machine's plain-data state and the two snapshots (tensors)."""
        return {"machine": self.machine.state_dict(), "phase_best": self.phase_best, "global_best": self.global_best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.machine.load_state_dict(state["machine"])
        self.phase_best = state.get("phase_best")
        self.global_best = state.get("global_best")
