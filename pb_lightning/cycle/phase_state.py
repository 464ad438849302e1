"""The phase machine's whole state as plain data (:class:`PhaseState`), apart from its rules.

Kept apart from :mod:`pb_lightning.cycle.machine` so that what a checkpoint stores — and what an
older checkpoint may lack, which then loads with these defaults — is readable in one place.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields
from typing import Any

from pb_lightning.cycle.decision import Phase
from pb_lightning.errors import invalid

#: The fields of each :attr:`PhaseState.history` entry, one per decision. ``validation`` is the
#: number of validations so far; ``global_step`` the training steps the caller had run (None where
#: it does not say: the plain-PyTorch tracker, and rows from before the field). A dendrite phase
#: ended mid-epoch (``PhaseSchedule.dendrite_patience_steps``) is recorded under the last
#: validation's number, like that validation's own row: ``global_step`` tells the two apart.
HISTORY_KEYS = ("validation", "global_step", "phase", "score", "candidate_score", "dendrites", "action", "reason")


def check_global_step(global_step: int | None) -> None:
    """Refuse a ``global_step`` for a history row that is not None or a non-negative integer."""
    if global_step is not None and (
        isinstance(global_step, bool) or not isinstance(global_step, numbers.Integral) or global_step < 0
    ):
        raise invalid("global_step", global_step, "None or a non-negative integer (the training steps run so far)")


@dataclass
class PhaseState:
    """The machine's whole state, plain data (it round-trips through ``weights_only`` checkpoints).

    ``phase`` is therefore the plain string value of a :class:`Phase`, never the enum member.
    """

    phase: str = Phase.NEURON.value
    validations: int = 0
    epochs_in_phase: int = 0
    phase_best: float | None = None
    wait: int = 0
    global_best: float | None = None
    baseline: float | None = None
    dendrites: int = 0
    tries: int = 0
    awaiting_verdict: bool = False
    #: The candidates' best score in the current dendrite phase, and its values at the phase's
    #: start (0) and at the last validations, the plateau rule's window
    #: (``PhaseSchedule.candidate_plateau_fraction``).
    candidate_best: float | None = None
    candidate_window: list[float] = field(default_factory=list)
    #: The score of the current weights as far as the machine knows: the latest validation's,
    #: or, from the start of a dendrite phase, that of the weights it restored (a dendrite phase
    #: ended by steps is recorded with it: the network is frozen then).
    last_score: float | None = None
    #: The same window over training steps (``PhaseSchedule.dendrite_patience_steps``).
    step_candidate_window: list[float] = field(default_factory=list)
    #: Validations at the end of the first neuron phase: the unit of a budget of validations.
    baseline_validations: int | None = None
    #: Wall-clock seconds reported with the validations so far (``PhaseMachine.step(seconds=...)``),
    #: how many validations reported them, the latest few (what the next ones will cost), and the
    #: first neuron phase's seconds: the unit of a ``run_budget_unit="time"`` budget, None when
    #: that phase's validations did not all report seconds (then the budget counts validations).
    seconds: float = 0.0
    timed_validations: int = 0
    recent_seconds: list[float] = field(default_factory=list)
    baseline_seconds: float | None = None
    done: bool = False
    accepted_cycles: int = 0
    rejected_cycles: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> PhaseState:
        """Rebuild a state saved by any version: fields it lacks take their defaults, and fields
        this version no longer has are dropped (before 0.3 a dendrite phase counted
        ``candidate_wait`` and ``step_candidate_wait``; such a phase resumes with its plateau
        window started afresh, from its best score so far)."""
        known = {f.name for f in fields(cls)}
        loaded = cls(**{k: v for k, v in state.items() if k in known})
        if loaded.phase == Phase.DENDRITE.value:
            if not loaded.candidate_window:
                loaded.candidate_window = [0.0 if loaded.candidate_best is None else float(loaded.candidate_best)]
            if not loaded.step_candidate_window:
                loaded.step_candidate_window = [0.0]
        return loaded
