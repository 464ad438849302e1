"""pb_lightning: Perforated Backpropagation (artificial dendrites) for PyTorch and Lightning.

The engine (config, banks, correlation, layer, attention, convert, phases, report, inference,
schedule) is framework-free: it converts a model, grows dendrites, runs the correlation learning
of the dendrite phase and decides when to switch phases, in any PyTorch training loop. The Lightning
layer (callback, module, cli, demo) drives it inside ``trainer.fit``.
"""

import torch

from pb_lightning.callback import PerforatedCallback
from pb_lightning.config import DendriteConfig
from pb_lightning.convert import perforate, perforated_layers, perforation_summary
from pb_lightning.errors import PerforationError
from pb_lightning.inference import DendriteInferenceLayer, to_inference
from pb_lightning.layer import CandidatePool, PerforatedLayer
from pb_lightning.module import PerforatedModule
from pb_lightning.phases import (
    accept_dendrites,
    candidate_scores,
    discard_candidates,
    in_dendrite_phase,
    load_perforation_state,
    parameter_groups,
    perforation_state,
    set_loss_scale,
    set_statistics_group,
    start_dendrite_phase,
    trainable_parameters,
)
from pb_lightning.report import parameter_counts
from pb_lightning.schedule import Decision, PhaseMachine, PhaseSchedule
from pb_lightning.tracker import PerforatedTracker

# Checkpoints store these configurations in their hyperparameters; allow them under
# torch.load(weights_only=True), which Lightning uses by default.
torch.serialization.add_safe_globals([DendriteConfig, PhaseSchedule])

__version__ = "0.1.0"

__all__ = [
    "CandidatePool",
    "Decision",
    "DendriteConfig",
    "DendriteInferenceLayer",
    "PerforatedCallback",
    "PerforatedLayer",
    "PerforatedModule",
    "PerforatedTracker",
    "PhaseMachine",
    "PhaseSchedule",
    "PerforationError",
    "__version__",
    "accept_dendrites",
    "candidate_scores",
    "discard_candidates",
    "in_dendrite_phase",
    "load_perforation_state",
    "parameter_groups",
    "parameter_counts",
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
