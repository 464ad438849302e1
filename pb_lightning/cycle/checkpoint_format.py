"""The format version of what pb_lightning writes into checkpoints, and the refusal of newer ones.

Framework-free so that the callback's state, the tracker's state and the module's record share
one version number and one check.
"""

from __future__ import annotations

from pb_lightning.errors import PerforationError

#: Format of pb_lightning's checkpoint records. 0: no ``version`` key (up to 0.1.0, and every
#: PerforatedTracker state before the cycle driver); 1: adds ``version``, and the per-decision
#: history is stored once, as the recorder's rows. Loading accepts every format up to this one.
CHECKPOINT_VERSION = 1


def check_checkpoint_version(what: str, version: object) -> None:
    """Refuse a checkpoint written by a newer pb_lightning, whose format this one cannot know."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise PerforationError(f"{what} has an invalid format version {version!r}; expected an int >= 0.")
    if version > CHECKPOINT_VERSION:
        raise PerforationError(
            f"{what} has format version {version}, newer than this pb_lightning understands "
            f"({CHECKPOINT_VERSION}); upgrade pb_lightning to load it."
        )
