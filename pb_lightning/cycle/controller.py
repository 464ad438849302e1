"""Carrying out the phase machine's decisions on a model: snapshots, restores, phase switches.

Framework-free; :class:`~pb_lightning.cycle.driver.CycleDriver` steps it for the Lightning
callback and the plain-PyTorch tracker alike. The weights are the controller's (snapshots and
restores); the structural changes go through a :class:`~pb_lightning.cycle.restructure.Restructurer`,
the model owner's (the PerforatedModule under Lightning), so a user's overrides see them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from pb_lightning.cycle.decision import ACCEPT, RESTORE_GLOBAL_BEST, RETRY, START_DENDRITE_PHASE, Decision
from pb_lightning.cycle.machine import PhaseMachine
from pb_lightning.cycle.restructure import EngineRestructurer, Restructurer
from pb_lightning.engine.compiled import drop_stale_graphs
from pb_lightning.engine.transitions import candidate_scores, in_dendrite_phase


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A copy of ``model``'s state dict (weights of a best validation point), kept on the CPU.

    Snapshots are only ever restored (``load_state_dict`` copies them back onto the model's
    device), so holding them in accelerator memory would cost up to two extra models there for
    nothing.
    """
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def mean_candidate_score(model: nn.Module) -> float | None:
    """The mean over all neurons of each neuron's best candidate score (None outside dendrite phases)."""
    if not in_dendrite_phase(model):
        return None
    scores = list(candidate_scores(model).values())
    return float(sum(float(s.sum()) for s in scores) / sum(s.numel() for s in scores))


class CycleController:
    """Applies :class:`~pb_lightning.cycle.machine.Decision`\\ s to a perforated model.

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
        #: Base seed of the candidates' initialisation (see :meth:`_candidate_rng`).
        self.candidate_seed: int | None = None
        self._keys_from_model: dict[str, list[str]] = {}
        self._phase_is_global = False

    def step(
        self,
        model: nn.Module,
        score: float,
        candidate_score: float | None,
        *,
        restructurer: Restructurer | None = None,
        global_step: int | None = None,
        seconds: float | None = None,
    ) -> tuple[Decision, bool]:
        """Feed one validation score and carry out the decision.

        ``restructurer`` makes the structural changes (default: :class:`EngineRestructurer` of
        ``model``); ``global_step`` goes into the history row; ``seconds`` is the time since the
        previous validation (:meth:`PhaseMachine.step`). Returns the decision and whether the set
        of trainable parameters changed (rebuild the optimizer).
        """
        decision = self.machine.step(score, candidate_score, global_step=global_step, seconds=seconds)
        return decision, self.apply(model, decision, restructurer=restructurer)

    def training_step(
        self,
        model: nn.Module,
        candidate_score: float | None,
        *,
        restructurer: Restructurer | None = None,
        global_step: int | None = None,
    ) -> Decision | None:
        """After one training step of a dendrite phase (``PhaseSchedule.dendrite_patience_steps``):
        feed the candidates' score and, if the phase is over, accept. Returns the decision (the
        trainable parameters changed: rebuild the optimizer) or None.

        Call it only while ``machine.checks_steps``; ``candidate_score`` is
        :func:`mean_candidate_score` of ``model`` (a caller under DDP broadcasts it first).
        """
        decision = self.machine.training_step(candidate_score, global_step=global_step)
        if decision is not None:
            self.apply(model, decision, restructurer=restructurer)
        return decision

    def apply(self, model: nn.Module, decision: Decision, *, restructurer: Restructurer | None = None) -> bool:
        """Carry out ``decision`` on ``model``: snapshot, restore, then act. Returns "restructured"."""
        structure = EngineRestructurer(model) if restructurer is None else restructurer
        if decision.new_phase_best:
            self.phase_best = snapshot(model)
        restructured = decision.restore is not None
        if decision.restore is not None:
            self.restore(model, decision.restore, restructurer=structure)
        if decision.new_global_best and self.phase_best is not None:
            self.global_best = self.phase_best
        if decision.action in (START_DENDRITE_PHASE, RETRY):
            with self._candidate_rng(model):
                structure.start_dendrite_phase()
            restructured = True
        elif decision.action == ACCEPT:
            structure.accept_dendrites()
            restructured = True
        if restructured:
            drop_stale_graphs(model)
        return restructured

    @contextlib.contextmanager
    def _candidate_rng(self, model: nn.Module) -> Iterator[None]:
        """Draw the new candidates from a seed of their own: ``base seed + validation count``.

        Candidates are the only random numbers the cycle draws. Taken from the global generator,
        they would depend on everything else that drew from it since the process started (data
        loader workers' seeds, dropout, a resumed process's different history), so a run resumed
        from a checkpoint would grow different candidates than the uninterrupted run. The base
        seed is fixed at the first dendrite phase (from ``torch.initial_seed()``, so seeded runs
        are reproducible) and checkpointed; the global generator is left as it was.
        """
        if self.candidate_seed is None:
            self.candidate_seed = torch.initial_seed() % 2**62
        devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.candidate_seed + self.machine.state.validations)
            yield

    def restore(self, model: nn.Module, which: str, *, restructurer: Restructurer | None = None) -> None:
        """Load the global-best or phase-best snapshot (dropping candidates first)."""
        weights = self.global_best if which == RESTORE_GLOBAL_BEST else self.phase_best
        if in_dendrite_phase(model):
            (EngineRestructurer(model) if restructurer is None else restructurer).discard_candidates()
        if weights is not None:
            model.load_state_dict(weights)

    def finish(self, model: nn.Module, *, restructurer: Restructurer | None = None) -> Decision | None:
        """When training ends for another reason: leave the global-best model. None if already done."""
        if self.machine.state.done:
            return None
        decision = self.machine.finish()
        if decision.restore is not None:
            self.restore(model, decision.restore, restructurer=restructurer)
        if decision.new_global_best and self.phase_best is not None:
            self.global_best = self.phase_best
        return decision

    def state_dict(self, model: nn.Module | None = None) -> dict[str, Any]:
        """The machine's plain-data state and the snapshots (tensors), none stored twice.

        Right after a cycle is judged (and through the first neuron phase) the phase best *is*
        the global best: it is stored once. With ``model`` — only when the caller saves this state
        in the same checkpoint as ``model``'s weights, as Lightning does — a snapshot equal to the
        model's current weights (the best validation was the last one; the final, restored model)
        is stored as the list of its keys and rebuilt from the loaded weights by
        :meth:`load_state_dict`, instead of as a second copy of the model.
        """
        same = (self.phase_best is not None and self.phase_best is self.global_best) or (
            bool(self._keys_from_model) and self._phase_is_global
        )
        current = model.state_dict() if model is not None else None
        state: dict[str, Any] = {"machine": self.machine.state_dict(), "candidate_seed": self.candidate_seed}
        for name, weights in (("phase_best", None if same else self.phase_best), ("global_best", self.global_best)):
            if name in self._keys_from_model:  # loaded by reference and not yet rebuilt: keep the reference
                state[name], state[f"{name}_keys_from_model"] = None, self._keys_from_model[name]
            elif weights is not None and current is not None and _equal_to_model(weights, current):
                state[name], state[f"{name}_keys_from_model"] = None, list(weights)
            else:
                state[name] = weights
        state["phase_best_is_global_best"] = same
        return state

    def load_state_dict(self, state: dict[str, Any], model: nn.Module | None = None) -> None:
        """Restore :meth:`state_dict`'s output.

        A snapshot stored by reference to the model's weights (``*_keys_from_model``) is rebuilt
        from ``model``, which must hold the checkpoint's weights; without ``model`` it is rebuilt
        by :meth:`rebuild_from_model` before it is needed.
        """
        self.machine.load_state_dict(state["machine"])
        self.candidate_seed = state.get("candidate_seed")
        self._keys_from_model = {}
        for name in ("global_best", "phase_best"):
            keys = state.get(f"{name}_keys_from_model")
            if keys is not None:
                self._keys_from_model[name] = list(keys)
        self.global_best = _on_cpu(state.get("global_best"))
        self.phase_best = _on_cpu(state.get("phase_best"))
        self._phase_is_global = bool(state.get("phase_best_is_global_best", False))
        if self._phase_is_global:
            self.phase_best = self.global_best
        if model is not None:
            self.rebuild_from_model(model)

    def rebuild_from_model(self, model: nn.Module) -> None:
        """Rebuild the snapshots that a loaded state holds by reference to the model's weights."""
        if not self._keys_from_model:
            return
        current = model.state_dict()
        for name, keys in self._keys_from_model.items():
            setattr(self, name, {k: current[k].detach().to("cpu", copy=True) for k in keys})
        self._keys_from_model = {}
        if self._phase_is_global:
            self.phase_best = self.global_best


def _equal_to_model(weights: dict[str, Tensor], current: dict[str, Tensor]) -> bool:
    """Whether a snapshot holds exactly the model's weights (the model may hold candidates besides)."""
    extra = current.keys() - weights.keys()
    if any(".candidates." not in key for key in extra):
        return False
    return all(
        key in current and current[key].shape == value.shape and torch.equal(current[key].cpu(), value)
        for key, value in weights.items()
    )


def _on_cpu(weights: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
    """Snapshots from checkpoints written before they were kept on the CPU may name a device."""
    return None if weights is None else {k: v.to("cpu") for k, v in weights.items()}
