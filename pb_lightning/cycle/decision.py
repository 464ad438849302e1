r"""What the phase machine decides: typed actions, phases, restore targets and verdicts.

Every field of a :class:`Decision` that code acts on is typed, so that no caller has to parse
the human-readable reason (the recorder's ``pb/event/cycle_rejected`` once searched it for "did
not beat"). The enums are :class:`enum.StrEnum`\ s whose values are the strings used before
them: histories, rows and checkpoints hold exactly the same plain strings.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from enum import Enum

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # Python 3.10: the same behaviour, built from str and Enum

    class StrEnum(str, Enum):
        """``enum.StrEnum`` before Python 3.11: members are their values, also under ``str()``."""

        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, spec: str) -> str:
            return format(str(self.value), spec)


class Action(StrEnum):
    """Every action a decision can carry.

    Members are strings equal to their values (``Action.ACCEPT == "accept"``): the history files,
    the recorder's rows and the checkpoints store those plain strings, exactly as before the enum.
    """

    CONTINUE = "continue"
    START_DENDRITE_PHASE = "start_dendrite_phase"
    ACCEPT = "accept"
    RETRY = "retry"
    STOP = "stop"
    #: ``restarts_only``: restore the weights the decision names and begin a new neuron phase with a
    #: fresh optimizer (the trainable parameters do not change, but the optimizer's state is dropped).
    RESTART = "restart"


class Phase(StrEnum):
    """The two phases of the cycle (:attr:`PhaseState.phase` holds the plain string value)."""

    NEURON = "neuron"
    DENDRITE = "dendrite"


class Restore(StrEnum):
    """What a decision asks the caller to restore before acting."""

    PHASE_BEST = "phase_best"
    GLOBAL_BEST = "global_best"


class Verdict(StrEnum):
    """The judgement on a finished cycle, at the end of the neuron phase that followed its acceptance."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"


# The module-level names that came before the enums (they are the enum members).
CONTINUE = Action.CONTINUE
START_DENDRITE_PHASE = Action.START_DENDRITE_PHASE
ACCEPT = Action.ACCEPT
RETRY = Action.RETRY
STOP = Action.STOP
RESTART = Action.RESTART
ACTIONS = tuple(Action)

RESTORE_PHASE_BEST = Restore.PHASE_BEST
RESTORE_GLOBAL_BEST = Restore.GLOBAL_BEST


@dataclass(frozen=True)
class Decision:
    """What to do after one validation.

    Attributes:
        action: an :class:`Action` (a plain string such as ``"accept"`` is converted).
        reason: a human-readable explanation, for logs only: code must never parse it (the
            verdict has its own field).
        restore: weights to restore *before* acting: :attr:`Restore.PHASE_BEST` (the best
            validation point of the neuron phase that just ended), :attr:`Restore.GLOBAL_BEST`
            (the best model so far), or None.
        new_phase_best: this validation is the best of the current neuron phase: snapshot the
            weights as the phase best.
        new_global_best: the phase best just became the global best: keep its snapshot as the
            global best.
        verdict: set when this decision judged a cycle (:attr:`Verdict.ACCEPTED` or
            :attr:`Verdict.REJECTED`); None otherwise.
    """

    action: Action
    reason: str
    restore: Restore | None = None
    new_phase_best: bool = False
    new_global_best: bool = False
    verdict: Verdict | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "action", Action(self.action))
        if self.restore is not None:
            object.__setattr__(self, "restore", Restore(self.restore))
        if self.verdict is not None:
            object.__setattr__(self, "verdict", Verdict(self.verdict))
