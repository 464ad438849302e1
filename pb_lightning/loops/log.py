"""What a plain loop's tracker says (:class:`DecisionLog`), and where it goes without logging set up.

A plain loop usually configures no logging, and INFO records would then go nowhere, so the
tracker's logger carries :class:`UnconfiguredLoggingHandler`: it writes them to stderr while the
root logger has no handler; once the application configures logging, records reach its handlers
instead (never both).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from torch import nn

from pb_lightning.cycle.decision import CONTINUE, Decision
from pb_lightning.cycle.driver import Outcome
from pb_lightning.engine.convert import perforation_summary


class UnconfiguredLoggingHandler(logging.StreamHandler):
    """Writes records to stderr, but only while the root logger has no handler.

    Lightning makes its INFO messages visible the same way; checking at every record (instead
    of once at import) means that logging configured later takes over without duplicates.
    """

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return  # the application configured logging: propagation delivers the record there
        self.setStream(sys.stderr)  # the current stderr (a test or a notebook may have replaced it)
        super().emit(record)


def visible_without_configuration(log: logging.Logger) -> logging.Logger:
    """Give ``log`` the handler (once) and the INFO level (unless set): its records are seen."""
    if not any(isinstance(h, UnconfiguredLoggingHandler) for h in log.handlers):
        log.addHandler(UnconfiguredLoggingHandler())
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    return log


class DecisionLog:
    """The tracker's messages: every one that changes something at INFO when ``verbose``, the rest
    at DEBUG; the perforation summary once (a loop that calls ``initialize`` again would repeat it)."""

    def __init__(self, log: logging.Logger, verbose: bool) -> None:
        self.log, self.verbose = log, verbose
        self._summarised = False

    def summary(self, model: nn.Module) -> None:
        """What was perforated and what was skipped (and why), as the callback shows at fit start."""
        level = logging.INFO if self.verbose and not self._summarised else logging.DEBUG
        self.log.log(level, "%s", perforation_summary(model))
        self._summarised = True

    def decision(self, outcome: Outcome, when: str) -> Decision | None:
        """Say the outcome's decision (if any), and return it."""
        said = outcome.decision
        if said is not None:
            level = logging.INFO if self.verbose and said.action != CONTINUE else logging.DEBUG
            self.log.log(level, "pb_lightning %s: %s — %s (score=%.6g)", when, said.action, said.reason, outcome.score)
        return said

    def end(self, decision: Decision | None) -> None:
        """Say why training ended, when the loop ended it."""
        if decision is not None:
            self.log.log(logging.INFO if self.verbose else logging.DEBUG, "pb_lightning: %s.", decision.reason)

    def report(self, lines: Sequence[str]) -> None:
        """The observers' closing lines (the capacity test's verdict), always at INFO."""
        for line in lines:
            self.log.info("pb_lightning %s", line)
