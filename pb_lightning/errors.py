"""Exceptions raised by pb_lightning.

Every error the library raises for bad input is a :class:`PerforationError` (itself a
``ValueError``), so a caller can catch all of them in one place while the message still names
the argument, the value it got and what would have been valid.
"""

from __future__ import annotations

from typing import Any


class PerforationError(ValueError):
    """A model, configuration or call that pb_lightning cannot work with."""


def invalid(argument: str, value: Any, valid: str) -> PerforationError:
    """Build the library's standard message: which argument, what it got, what would be valid.

    Keeping one format makes every message greppable and keeps tests able to match on
    ``argument`` and ``valid`` without depending on punctuation.
    """
    return PerforationError(f"`{argument}` must be {valid}; got {value!r}.")
