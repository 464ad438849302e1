"""pb_lightning: Perforated Backpropagation (artificial dendrites) for PyTorch and Lightning.

The package is three layers, each importing only the ones before it:

* :mod:`pb_lightning.engine` (``nn.Module`` level, no Lightning): convert a model, grow dendrites,
  run the correlation learning of the dendrite phase, switch a model between phases.
* :mod:`pb_lightning.cycle` (the phase machine and the driver that runs it): validation scores
  in, decisions out, carried out on a model — usable from any PyTorch training loop
  (:mod:`pb_lightning.loops`); :mod:`pb_lightning.diagnostics` watches it (the capacity test).
* :mod:`pb_lightning.lightning`: the callback, module, recorder and CLI that drive it inside
  ``trainer.fit``.

``import pb_lightning`` does not import Lightning: :class:`PerforatedCallback` and
:class:`PerforatedModule` are loaded on first access (PEP 562), so the engine and the plain-PyTorch
tracker work where Lightning is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import torch

from pb_lightning import _moved
from pb_lightning.cycle.decision import Decision
from pb_lightning.cycle.machine import PhaseMachine
from pb_lightning.cycle.schedule import PhaseSchedule
from pb_lightning.engine.candidates import CandidatePool
from pb_lightning.engine.config import DendriteConfig
from pb_lightning.engine.convert import perforate, perforated_layers, perforation_summary
from pb_lightning.engine.inference import DendriteInferenceLayer, to_inference
from pb_lightning.engine.layer import PerforatedLayer
from pb_lightning.engine.params import parameter_counts, parameter_groups, trainable_parameters
from pb_lightning.engine.state import load_perforation_state, perforation_state
from pb_lightning.engine.transitions import (
    accept_dendrites,
    candidate_scores,
    discard_candidates,
    in_dendrite_phase,
    set_loss_scale,
    set_statistics_group,
    start_dendrite_phase,
)
from pb_lightning.errors import PerforationError
from pb_lightning.loops.sampling import EpochShuffleSampler
from pb_lightning.loops.tracker import PerforatedTracker

if TYPE_CHECKING:
    from pb_lightning.lightning.callback import PerforatedCallback
    from pb_lightning.lightning.module import PerforatedModule

# Checkpoints store these configurations in their hyperparameters; allow them under
# torch.load(weights_only=True), which Lightning uses by default. The second entry of each pair
# is the path older checkpoints recorded (before the engine/cycle layout).
torch.serialization.add_safe_globals(
    [
        DendriteConfig,
        PhaseSchedule,
        (DendriteConfig, "pb_lightning.config.DendriteConfig"),
        (PhaseSchedule, "pb_lightning.schedule.PhaseSchedule"),
    ]
)

_moved.install()

__version__ = "0.1.0"

#: Names that need Lightning, loaded on first access so ``import pb_lightning`` does not import it.
_LAZY = {
    "PerforatedCallback": "pb_lightning.lightning.callback",
    "PerforatedModule": "pb_lightning.lightning.module",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _moved.MOVED:
        # `pb_lightning.callback` used as an attribute, as it worked when __init__ imported it.
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CandidatePool",
    "Decision",
    "DendriteConfig",
    "DendriteInferenceLayer",
    "EpochShuffleSampler",
    "PerforatedCallback",
    "PerforatedLayer",
    "PerforatedModule",
    "PerforatedTracker",
    "PerforationError",
    "PhaseMachine",
    "PhaseSchedule",
    "__version__",
    "accept_dendrites",
    "candidate_scores",
    "discard_candidates",
    "in_dendrite_phase",
    "load_perforation_state",
    "parameter_counts",
    "parameter_groups",
    "perforate",
    "perforated_layers",
    "perforation_state",
    "perforation_summary",
    "set_loss_scale",
    "set_statistics_group",
    "start_dendrite_phase",
    "to_inference",
    "trainable_parameters",
]
