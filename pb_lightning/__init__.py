"""pb_lightning: Perforated Backpropagation (artificial dendrites) for PyTorch and Lightning.

The engine (this package's top level) is framework-free: it converts a model, grows dendrites,
and runs the correlation learning of the dendrite phase in any PyTorch training loop.
"""

from pb_lightning.config import DendriteConfig
from pb_lightning.convert import perforate, perforated_layers
from pb_lightning.errors import PerforationError
from pb_lightning.inference import DendriteInferenceLayer, to_inference
from pb_lightning.layer import CandidatePool, PerforatedLayer
from pb_lightning.phases import (
    accept_dendrites,
    candidate_scores,
    discard_candidates,
    in_dendrite_phase,
    load_perforation_state,
    parameter_groups,
    perforation_state,
    set_loss_scale,
    start_dendrite_phase,
    trainable_parameters,
)
from pb_lightning.report import parameter_counts

__version__ = "0.1.0"

__all__ = [
    "CandidatePool",
    "DendriteConfig",
    "DendriteInferenceLayer",
    "PerforatedLayer",
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
    "set_loss_scale",
    "start_dendrite_phase",
    "to_inference",
    "trainable_parameters",
]
