"""Persisting a perforated model's dendrite structure, for checkpoints and restores."""

from __future__ import annotations

from typing import Any

from torch import nn

from pb_lightning.engine.transitions import freeze_for_dendrite_phase, frozen_by_dendrite_phase, in_dendrite_phase
from pb_lightning.errors import PerforationError


def perforation_state(model: nn.Module) -> dict[str, Any]:
    """The phase bookkeeping that ``state_dict()`` does not hold, as plain data.

    Structure (accepted sets, candidates, statistics, snapshots) lives in the state dict and is
    rebuilt by ``load_state_dict``; this adds which parameters the dendrite phase froze. Save it
    beside the state dict and give it to :func:`load_perforation_state` after loading.
    """
    return {"dendrite_phase": in_dendrite_phase(model), "frozen": frozen_by_dendrite_phase(model)}


def load_perforation_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Re-apply :func:`perforation_state` after ``model.load_state_dict``."""
    if bool(state.get("dendrite_phase")) != in_dendrite_phase(model):
        raise PerforationError(
            f"The perforation state says dendrite_phase={state.get('dendrite_phase')!r}, but the loaded "
            f"model {'holds' if in_dendrite_phase(model) else 'holds no'} candidates; load the state "
            "dict saved with it first."
        )
    if not state.get("dendrite_phase"):
        return
    params = dict(model.named_parameters())
    missing = [n for n in state.get("frozen", []) if n not in params]
    if missing:
        raise PerforationError(f"The perforation state names parameters the model does not have: {missing}.")
    freeze_for_dendrite_phase(model, list(state.get("frozen", [])))
