"""The hooks a diagnostic may observe on a :class:`~pb_lightning.cycle.driver.CycleDriver`.

Diagnostics — the capacity test, the Lightning fit checks — watch the cycle without deciding
anything. As observers of the one driver they run the same way under the callback and the
tracker, and the front ends carry no branch for them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from pb_lightning.cycle.decision import Decision
from pb_lightning.cycle.phase_state import PhaseState


class CycleObserver:
    """Base class: every hook does nothing; override the ones a diagnostic needs."""

    def on_start(self, model: nn.Module) -> None:
        """Training starts (or resumes) on ``model``."""

    def on_validation(self, model: nn.Module, score: float, when: str) -> None:
        """A validation ``score`` (shared by every rank) arrives, before the machine decides on it.

        ``when`` says which, for messages: ``"epoch 3"``, or ``"validation 4"`` from a loop that
        gives no epoch.
        """

    def around_accept(self, model: nn.Module, accept: Callable[[], Any]) -> Any:
        """Wrap the installation of the dendrites: call ``accept()`` and return its result."""
        return accept()

    def on_decision(self, model: nn.Module, decision: Decision, state: PhaseState) -> None:
        """A decision was carried out on ``model`` (its optimizer not rebuilt yet)."""

    def on_restructured(self, model: nn.Module) -> None:
        """The front end has finished a restructure (rebuilt what it rebuilds after one)."""

    def on_finish(self, model: nn.Module, state: PhaseState) -> list[str]:
        """Training ended; returns lines for the final report (none by default)."""
        return []
