"""The phase state machine: validation scores in, decisions out (docs/ALGORITHM.md §4).

Pure Python, no torch and no Lightning, so the rules can be tested over synthetic score sequences
and the same machine drives the Lightning callback and plain PyTorch loops. It holds no weights:
each :class:`Decision` says which weights the caller must snapshot or restore.

The cycle::

    neuron phase ──(plateau)──► dendrite phase ──(candidate plateau)──► accept ──► neuron phase
         ▲                                                                            │
         └──────── verdict at the end of that neuron phase: did it beat the global best? ─┘
                   yes → next cycle     no → restore the pre-acceptance model and retry
                                             with fresh candidates, up to ``max_tries``

``PhaseSchedule(restarts_only=True)`` runs the same cycle without its dendrite phase: each
neuron phase that ends by patience rolls back to its best weights and restarts with a fresh
optimizer (action ``restart``); a restart whose neuron phase does not beat the global best rolls
back to the global best, and ``max_tries`` such failures in a row end training. It is the control
that says how much of a dendritic run's gain is the schedule of warm restarts rather than the
dendrites, and a training schedule in its own right.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, replace
from typing import Any

from pb_lightning.cycle.decision import (
    ACCEPT,
    CONTINUE,
    RESTART,
    RESTORE_GLOBAL_BEST,
    RESTORE_PHASE_BEST,
    RETRY,
    START_DENDRITE_PHASE,
    STOP,
    Decision,
    Phase,
    Restore,
    Verdict,
)
from pb_lightning.cycle.limits import (
    baseline_seconds,
    budget_note,
    budget_spent,
    count_seconds,
    cycle_fits,
    plateau_reason,
    plateaued,
    still_improving,
    warn_max_dendrite_epochs,
)
from pb_lightning.cycle.phase_state import HISTORY_KEYS, PhaseState, check_global_step
from pb_lightning.cycle.schedule import Mode, PhaseSchedule
from pb_lightning.cycle.scores import format_scores, score_change
from pb_lightning.errors import invalid

__all__ = ["PhaseMachine"]


class PhaseMachine:
    """Feeds on one validation score at a time and returns a :class:`Decision`.

    Args:
        mode: ``"max"`` if a higher monitored score is better (accuracy), ``"min"`` otherwise (loss).
        schedule: the switching rules.

    Example::

        >>> machine = PhaseMachine("min", PhaseSchedule(neuron_patience=1, dendrite_epochs=1))
        >>> [str(machine.step(s).action) for s in (1.0, 0.5, 0.6)]
        ['continue', 'continue', 'start_dendrite_phase']
        >>> machine.step(0.5, candidate_score=0.2).action == "accept"  # an Action, equal to its string
        True
    """

    def __init__(self, mode: Mode, schedule: PhaseSchedule | None = None) -> None:
        if mode not in ("min", "max"):
            raise invalid("mode", mode, "'min' or 'max'")
        self.mode: Mode = mode
        self.schedule = PhaseSchedule() if schedule is None else schedule
        if not isinstance(self.schedule, PhaseSchedule):
            raise invalid("schedule", schedule, "a pb_lightning.PhaseSchedule")
        self.state = PhaseState()
        self._warned_max_dendrite_epochs = False

    # ------------------------------------------------------------------ comparisons
    def is_improvement(self, score: float, best: float | None) -> bool:
        """Whether ``score`` beats ``best`` by more than both thresholds (NaN never does)."""
        if not math.isfinite(score):
            return False
        if best is None:
            return True
        margin = max(abs(best) * self.schedule.improvement_threshold, self.schedule.improvement_threshold_abs)
        return score < best - margin if self.mode == "min" else score > best + margin

    # ------------------------------------------------------------------ the machine
    def step(
        self,
        score: float,
        candidate_score: float | None = None,
        *,
        global_step: int | None = None,
        seconds: float | None = None,
    ) -> Decision:
        """Take one validation's monitored ``score`` and return the decision.

        Args:
            score: the monitored validation score.
            candidate_score: during a dendrite phase, the candidates' correlation score (higher is
                better; e.g. the mean of each neuron's best candidate score). Ignored otherwise.
            global_step: the training steps run so far, recorded in the history row (only there).
            seconds: the wall-clock time since the previous validation (training and validating),
                what a ``run_budget_unit="time"`` budget counts; the
                :class:`~pb_lightning.cycle.driver.CycleDriver` reports it. A machine fed no
                seconds during its first neuron phase counts its budget in validations.
        """
        if isinstance(score, bool) or not isinstance(score, numbers.Real):
            raise invalid("score", score, "a real number (the monitored validation score)")
        check_global_step(global_step)
        count_seconds(self.schedule, self.state, seconds)
        s = self.state
        s.validations += 1
        s.epochs_in_phase += 1
        s.last_score = float(score)
        phase = s.phase
        if s.done:
            decision = Decision(STOP, "training is already complete")
        elif s.phase == Phase.DENDRITE and budget_spent(self.schedule, self.state):
            # No validation would be left to judge what the phase would accept: drop the candidates.
            decision = self._spend_budget(new_phase_best=False)
        elif s.phase == Phase.DENDRITE:
            decision = self._dendrite_step(candidate_score)
        else:
            decision = self._neuron_step(float(score))
            if decision.action == CONTINUE and budget_spent(self.schedule, self.state):
                decision = self._spend_budget(new_phase_best=decision.new_phase_best)
        # Plain strings in the history (a checkpoint loaded with weights_only=True holds no enums).
        self._remember(phase, float(score), candidate_score, decision, global_step)
        return decision

    def _remember(
        self, phase: str, score: float, candidate_score: float | None, decision: Decision, global_step: int | None
    ) -> None:
        s = self.state
        values = (s.validations, global_step, phase, score, candidate_score, s.dendrites, decision.action.value)
        s.history.append(dict(zip(HISTORY_KEYS, (*values, decision.reason), strict=True)))

    @property
    def checks_steps(self) -> bool:
        """Whether the caller should call :meth:`training_step` after each training step now.

        True only in a dendrite phase of a schedule with ``dendrite_patience_steps`` (and no
        fixed ``dendrite_epochs``), and once a validation score exists; the caller then reads the
        candidates' score (one device read per step). Everywhere else it costs nothing.
        """
        s = self.state
        return (
            self.schedule.dendrite_patience_steps is not None
            and self.schedule.dendrite_epochs is None
            and s.phase == Phase.DENDRITE
            and not s.done
            and s.last_score is not None
        )

    def training_step(self, candidate_score: float | None, *, global_step: int | None = None) -> Decision | None:
        """Fold the candidates' score after one training step of a dendrite phase.

        Returns None while the phase goes on (and whenever :attr:`checks_steps` is False), or the
        ``accept`` decision once the last ``dendrite_patience_steps`` steps added less than
        ``candidate_plateau_fraction`` of the candidates' score. That decision is recorded in the
        history under the last validation's number, with the score of the weights the phase
        restored (the network is frozen in a dendrite phase, so a validation would return that
        score) and ``global_step`` (the training steps run so far, this one included): that
        validation's own row has the same number, and an earlier step. A score of 0 or less (no
        candidate scored yet: the statistics are still warming up) is not counted.
        """
        check_global_step(global_step)
        if not self.checks_steps or candidate_score is None or not candidate_score > 0:
            return None
        s = self.state
        size, fraction = self.schedule.dendrite_patience_steps, self.schedule.candidate_plateau_fraction
        if not plateaued(s.step_candidate_window, candidate_score, size, fraction):  # type: ignore[arg-type]
            return None
        s.candidate_best = max(s.candidate_best or 0.0, s.step_candidate_window[-1])
        decision = self._accept(plateau_reason(fraction, size, "training steps", "dendrite_patience_steps"))  # type: ignore[arg-type]
        self._remember(Phase.DENDRITE.value, float(s.last_score), candidate_score, decision, global_step)  # type: ignore[arg-type]
        return decision

    def _neuron_step(self, score: float) -> Decision:
        s, sched = self.state, self.schedule
        new_best = self.is_improvement(score, s.phase_best)
        if new_best:
            s.phase_best, s.wait = score, 0
        else:
            s.wait += 1
        if sched.neuron_epochs is not None:
            over = s.epochs_in_phase >= sched.neuron_epochs
            why = f"the neuron phase reached its {sched.neuron_epochs} validations (neuron_epochs)"
        else:
            over = s.wait >= sched.neuron_patience
            why = f"no improvement for {s.wait} validations (neuron_patience={sched.neuron_patience})"
        if over and s.dendrites == 0 and not s.awaiting_verdict and s.validations < sched.warmup_epochs:
            over = False
        if not over:
            return Decision(CONTINUE, "neuron phase", new_phase_best=new_best)
        return self._end_neuron_phase(why, new_best)

    def _judge_cycle(self, *, keep_unimproved: bool) -> bool:
        """The verdict at the end of a neuron phase that followed an acceptance (or a restart).

        The one copy of the rule, shared by :meth:`step` and :meth:`finish`: the cycle is
        accepted if its neuron phase's best beat the global best (or ``keep_unimproved``), and
        then becomes the global best; a rejected cycle's dendrite set is taken back off the
        count. Returns whether the cycle was accepted.
        """
        s = self.state
        improved = s.phase_best is not None and self.is_improvement(s.phase_best, s.global_best)
        if improved or keep_unimproved:
            s.accepted_cycles += 1
            if improved:
                s.global_best = s.phase_best
            return True
        s.rejected_cycles += 1
        if not self.schedule.restarts_only:
            s.dendrites -= 1
        return False

    def _end_neuron_phase(self, why: str, new_best: bool) -> Decision:
        s, sched = self.state, self.schedule
        if s.awaiting_verdict:
            s.awaiting_verdict = False
            previous_best = s.global_best
            if self._judge_cycle(keep_unimproved=not sched.require_improvement):
                s.tries = 0
                verdict = f"{why}; the cycle improved the global best {score_change(previous_best, s.phase_best)}"
                return self._next_cycle(verdict, new_best, Verdict.ACCEPTED)
            s.tries += 1
            best, phase = format_scores(s.global_best, s.phase_best)
            verdict = f"{why}; the cycle did not beat the global best {best} (phase best {phase})"
            rejected: dict[str, Any] = {
                "restore": Restore.GLOBAL_BEST,
                "new_phase_best": new_best,
                "verdict": Verdict.REJECTED,
            }
            if s.tries >= sched.max_tries or not cycle_fits(sched, s):
                s.done = True
                why = (
                    f"{s.tries} failed tries (max_tries={sched.max_tries})"
                    if s.tries >= sched.max_tries
                    else f"no retry fits in what is left ({budget_note(self.schedule, self.state)})"
                )
                return Decision(STOP, f"{verdict}; {why}: training is complete", **rejected)
            if sched.restarts_only:
                self._enter_neuron_phase_after_restart()
                return Decision(
                    RESTART,
                    f"{verdict}; restarting from the global best with a fresh optimizer "
                    f"(try {s.tries + 1} of {sched.max_tries})",
                    **rejected,
                )
            self._enter_dendrite_phase(restored_score=s.global_best)
            return Decision(
                RETRY, f"{verdict}; retrying with fresh candidates (try {s.tries + 1} of {sched.max_tries})", **rejected
            )
        # The first neuron phase: its best is the baseline every later cycle must beat.
        s.global_best = s.baseline = s.phase_best
        s.baseline_validations = s.validations
        s.baseline_seconds = baseline_seconds(self.schedule, s)
        return self._next_cycle(f"{why}; baseline best {format_scores(s.phase_best)[0]}", new_best, None)

    def _spend_budget(self, *, new_phase_best: bool) -> Decision:
        """The budget ran out in the middle of a cycle: judge it there, as :meth:`finish` does."""
        final, note = self.finish(), budget_note(self.schedule, self.state)
        reason = f"{note}: {final.reason}{still_improving(final.verdict)}"
        return replace(final, reason=reason, new_phase_best=new_phase_best)

    def _next_cycle(self, reason: str, new_best: bool, verdict: Verdict | None) -> Decision:
        s, sched = self.state, self.schedule
        out_of_budget = not cycle_fits(sched, s)
        if sched.restarts_only and not out_of_budget:
            return self._next_restart(reason, new_best, verdict)
        if s.dendrites >= sched.max_dendrites or out_of_budget:
            s.done = True
            budget_ended = out_of_budget and s.dendrites < sched.max_dendrites
            why = (
                f"no cycle fits in what is left ({budget_note(self.schedule, self.state)})"
                if budget_ended
                else f"{s.dendrites} dendrite sets reached max_dendrites"
            )
            return Decision(
                STOP,
                f"{reason}; {why}: training is complete{still_improving(verdict) if budget_ended else ''}",
                restore=RESTORE_PHASE_BEST,
                new_phase_best=new_best,
                new_global_best=True,
                verdict=verdict,
            )
        self._enter_dendrite_phase(restored_score=s.phase_best)
        return Decision(
            START_DENDRITE_PHASE,
            reason,
            restore=RESTORE_PHASE_BEST,
            new_phase_best=new_best,
            new_global_best=True,
            verdict=verdict,
        )

    def _next_restart(self, reason: str, new_best: bool, verdict: Verdict | None) -> Decision:
        s, sched = self.state, self.schedule
        restarts = s.accepted_cycles if sched.require_improvement else s.accepted_cycles + s.rejected_cycles
        if restarts >= sched.max_dendrites:
            s.done = True
            return Decision(
                STOP,
                f"{reason}; {restarts} restarts reached max_dendrites={sched.max_dendrites}: training is complete",
                restore=RESTORE_PHASE_BEST,
                new_phase_best=new_best,
                new_global_best=True,
                verdict=verdict,
            )
        self._enter_neuron_phase_after_restart()
        return Decision(
            RESTART,
            f"{reason}; restarting from the phase's best weights with a fresh optimizer",
            restore=RESTORE_PHASE_BEST,
            new_phase_best=new_best,
            new_global_best=True,
            verdict=verdict,
        )

    def _enter_neuron_phase_after_restart(self) -> None:
        s = self.state
        s.phase, s.epochs_in_phase = Phase.NEURON.value, 0
        s.phase_best, s.wait = None, 0
        s.awaiting_verdict = True

    def _enter_dendrite_phase(self, *, restored_score: float | None) -> None:
        """``restored_score``: the score of the weights the decision restores (the phase best for a
        new cycle, the global best for a retry) — the frozen network's score for the whole phase."""
        s = self.state
        s.last_score = restored_score
        s.phase, s.epochs_in_phase = Phase.DENDRITE.value, 0
        s.candidate_best, s.candidate_window, s.step_candidate_window = None, [0.0], [0.0]

    def _dendrite_step(self, candidate_score: float | None) -> Decision:
        s, sched = self.state, self.schedule
        if candidate_score is not None and math.isfinite(candidate_score):
            s.candidate_best = max(s.candidate_best or candidate_score, candidate_score)
        flat = plateaued(s.candidate_window, candidate_score, sched.dendrite_patience, sched.candidate_plateau_fraction)
        if sched.dendrite_epochs is not None and s.epochs_in_phase >= sched.dendrite_epochs:
            why = f"the dendrite phase reached its {sched.dendrite_epochs} validations (dendrite_epochs)"
        elif sched.dendrite_epochs is None and flat:
            patience = sched.dendrite_patience
            why = plateau_reason(sched.candidate_plateau_fraction, patience, "validations", "dendrite_patience")
        elif s.epochs_in_phase >= sched.max_dendrite_epochs:
            why = f"the dendrite phase reached max_dendrite_epochs={sched.max_dendrite_epochs} validations"
            if not self._warned_max_dendrite_epochs:
                self._warned_max_dendrite_epochs = True
                warn_max_dendrite_epochs(sched)
        else:
            return Decision(CONTINUE, "dendrite phase")
        return self._accept(why)

    def _accept(self, why: str) -> Decision:
        s = self.state
        s.phase, s.epochs_in_phase = Phase.NEURON.value, 0
        s.phase_best, s.wait = None, 0
        s.dendrites += 1
        s.awaiting_verdict = True
        return Decision(
            ACCEPT, f"{why}; accepting dendrite set {s.dendrites} (best candidate score {s.candidate_best})"
        )

    def finish(self) -> Decision:
        """The decision when training ends for another reason (the trainer's own limits).

        Leaves the global-best model: in a dendrite phase the candidates are dropped; a neuron
        phase after an acceptance is judged as if it had ended.
        """
        s = self.state
        if s.done:
            return Decision(CONTINUE, "training already complete")
        s.done = True
        if s.phase == Phase.DENDRITE:
            return Decision(STOP, "training ended during a dendrite phase", restore=RESTORE_GLOBAL_BEST)
        if s.awaiting_verdict:
            # Judged as if the phase had ended, but an unimproved cycle is never kept here, even
            # with require_improvement=False: a run cut short leaves the best model it found.
            if self._judge_cycle(keep_unimproved=False):
                return Decision(
                    STOP,
                    "training ended; the last cycle improved the global best",
                    restore=RESTORE_PHASE_BEST,
                    new_global_best=True,
                    verdict=Verdict.ACCEPTED,
                )
            return Decision(
                STOP,
                "training ended; the last cycle did not beat the global best {} (phase best {})".format(
                    *format_scores(s.global_best, s.phase_best)
                ),
                restore=RESTORE_GLOBAL_BEST,
                verdict=Verdict.REJECTED,
            )
        s.global_best = s.phase_best
        return Decision(
            STOP, "training ended in the first neuron phase", restore=RESTORE_PHASE_BEST, new_global_best=True
        )

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (``torch.load(weights_only=True)`` accepts it)."""
        return {"mode": self.mode, "schedule": asdict(self.schedule), "state": asdict(self.state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (the schedule of this machine is kept)."""
        self.mode = state.get("mode", self.mode)
        self.state = PhaseState.from_dict(state["state"])
