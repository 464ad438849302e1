"""Phase control: what the training loop (Lightning or plain PyTorch) calls between phases.

The cycle of docs/ALGORITHM.md §3::

    neuron phase ──start_dendrite_phase──► dendrite phase ──accept_dendrites──► neuron phase
                                                       └──discard_candidates──┘

The phase is not stored separately: a model is in a dendrite phase exactly when its perforated
layers hold candidates. What the dendrite phase froze is remembered on the model, so returning
to the neuron phase unfreezes exactly that — parameters the user froze stay frozen.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from torch import Tensor, nn

from pb_lightning.engine.convert import perforated_layers
from pb_lightning.engine.layer import PerforatedLayer
from pb_lightning.errors import PerforationError

log = logging.getLogger(__name__)

_FROZEN = "_pb_frozen_by_dendrite_phase"
_EVAL_HOOK = "_pb_keep_eval_handle"
#: Layers whose forward differs between train and eval mode through running statistics.
_STATEFUL_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def _layers(model: nn.Module) -> list[PerforatedLayer]:
    layers = perforated_layers(model)
    if not layers:
        raise PerforationError(
            f"{type(model).__name__} has no perforated layers; call pb_lightning.perforate(model) first."
        )
    return layers


def in_dendrite_phase(model: nn.Module) -> bool:
    """Whether ``model``'s perforated layers currently hold candidates."""
    return any(layer.candidates is not None for layer in perforated_layers(model))


def _keep_eval(module: nn.Module, args: Any) -> None:
    # A training loop calls model.train() every epoch; this puts the norm back in eval mode
    # before each forward, so its running statistics cannot drift during the dendrite phase.
    module.training = False


def start_dendrite_phase(model: nn.Module, *, num_candidates: int | None = None) -> None:
    """Add a pool of candidate sets to every perforated layer and freeze the network.

    Frozen: every parameter that was trainable (original weights, accepted dendrites, output
    weights ``w``). Batch and instance norms are held in eval mode. Only the candidates train.

    Args:
        model: a perforated model in its neuron phase.
        num_candidates: pool size K for this phase (default: the layers' ``config.num_candidates``).
    """
    layers = _layers(model)
    if in_dendrite_phase(model):
        raise RuntimeError("The model is already in a dendrite phase; accept or discard its candidates first.")
    if num_candidates is not None and (
        isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 1
    ):
        raise PerforationError(f"`num_candidates` must be an int >= 1; got {num_candidates!r}.")
    for layer in layers:
        layer.add_candidates(num_candidates)
    candidate_ids = {id(p) for layer in layers for p in layer.candidates.parameters()}  # type: ignore[union-attr]
    frozen = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in candidate_ids]
    freeze_for_dendrite_phase(model, frozen)
    config = layers[0].config
    log.info(
        "Dendrite phase started: %d candidate sets in each of %d layers, trained by %s (%s normalisation); "
        "%d parameter tensors frozen.",
        layers[0].num_candidates,
        len(layers),
        "correlation learning" if config.learning == "correlation" else "gradient descent on the task loss",
        config.normalization,
        len(frozen),
    )


def frozen_by_dendrite_phase(model: nn.Module) -> list[str]:
    """The parameters the current dendrite phase froze (none in a neuron phase), by qualified name.

    Only these are unfrozen when the phase ends: a parameter the user froze stays frozen. This
    list is what :func:`~pb_lightning.engine.state.perforation_state` saves.
    """
    return list(getattr(model, _FROZEN, []))


def freeze_for_dendrite_phase(model: nn.Module, names: list[str]) -> None:
    """Freeze the parameters ``names`` for a dendrite phase, remember them, hold norms in eval.

    :func:`start_dendrite_phase` calls it with every trainable non-candidate parameter, and
    :func:`~pb_lightning.engine.state.load_perforation_state` with the saved list, so a restored
    dendrite phase is frozen exactly as the one that was saved.
    """
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(False)
    setattr(model, _FROZEN, list(names))
    _hold_norms_in_eval(model)


def _hold_norms_in_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, _STATEFUL_NORMS) and _EVAL_HOOK not in m.__dict__:
            m.__dict__[_EVAL_HOOK] = m.register_forward_pre_hook(_keep_eval)
            m.training = False


def _return_to_neuron_phase(model: nn.Module) -> None:
    params = dict(model.named_parameters())
    for name in getattr(model, _FROZEN, []):
        if name in params:
            params[name].requires_grad_(True)
    if hasattr(model, _FROZEN):
        delattr(model, _FROZEN)
    for layer in perforated_layers(model):
        layer._set_neuron_phase_trainability()
    parents = {id(child): parent for parent in model.modules() for child in parent.children()}
    for m in model.modules():
        handle = m.__dict__.pop(_EVAL_HOOK, None)
        if handle is not None:
            handle.remove()
            m.training = parents.get(id(m), model).training


def accept_dendrites(model: nn.Module) -> dict[str, Tensor]:
    """Install every neuron's best candidate as its next dendrite and return to the neuron phase.

    The new dendrites enter with output weight ``w = 0`` (the model's outputs do not change) and
    frozen; the other candidates are dropped.

    Returns:
        For every layer (by name), the score of the accepted dendrite of each neuron.
    """
    layers = _layers(model)
    if not in_dendrite_phase(model):
        raise RuntimeError("The model is not in a dendrite phase; call start_dendrite_phase(model) first.")
    if not any(layer.candidates.moved() for layer in layers):  # type: ignore[union-attr]
        warnings.warn(
            "pb_lightning: no candidate learned anything in this dendrite phase: their weights never changed. "
            "Are the candidates in the optimizer (rebuild it after start_dendrite_phase) with a learning rate > 0?",
            stacklevel=2,
        )
    scores = {layer.name: layer.accept_candidates() for layer in layers}
    _return_to_neuron_phase(model)
    log.info(
        "Accepted dendrites: %s",
        ", ".join(f"{n} (mean score {s.mean():.3f})" for n, s in scores.items()),
    )
    return scores


def discard_candidates(model: nn.Module) -> None:
    """Drop all candidates without accepting any, and return to the neuron phase."""
    for layer in _layers(model):
        layer.drop_candidates()
    _return_to_neuron_phase(model)


def candidate_scores(model: nn.Module) -> dict[str, Tensor]:
    """During a dendrite phase: per layer, each neuron's best candidate score so far (``[out]``).

    A training loop can watch these to end the phase when they stop improving.
    """
    return {layer.name: layer.candidates.scores() for layer in _layers(model) if layer.candidates is not None}


def set_loss_scale(model: nn.Module, scale: float) -> None:
    """Tell the candidates the current loss scale (e.g. ``GradScaler.get_scale()``) before backward.

    Correlation statistics are kept in unscaled units and the candidate gradient is scaled back,
    so that the scaler's unscale step leaves it correct. Once told, candidates also hand the
    scaler a zero gradient during warm-up (it refuses a step without any gradient) and a NaN
    gradient for a batch whose errors overflowed (so it skips the step and lowers its scale).
    Call it before every backward pass of the dendrite phase (``PerforatedCallback`` does).
    """
    for layer in _layers(model):
        layer.set_loss_scale(scale)


def set_statistics_group(model: nn.Module, group: Any) -> None:
    """Pool the candidates' correlation statistics over the ranks of ``group`` (data parallelism).

    Each rank sees its own batches; with the moments averaged across ranks before they enter the
    running estimates, every replica keeps the same statistics, signs, best scores and snapshots,
    and so accepts the same dendrites (docs/ALGORITHM.md §8). ``None`` switches pooling off. Every
    rank must call it, and the group must exist on every rank (``torch.distributed.new_group``).
    """
    for layer in _layers(model):
        layer.statistics_group = group
        if layer.candidates is not None:
            layer.candidates.statistics.process_group = group
