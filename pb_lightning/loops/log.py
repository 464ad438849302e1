"""Where a plain PyTorch loop's pb_lightning messages go when the application configured no logging.

A plain loop usually configures no logging, and INFO records would then go nowhere, so the
tracker's logger carries :class:`UnconfiguredLoggingHandler`: it writes them to stderr while the
root logger has no handler; once the application configures logging, records reach its handlers
instead (never both).
"""

from __future__ import annotations

import logging
import sys


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
