"""A deployment copy of a perforated model: accepted dendrites only, no training machinery."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from pb_lightning.engine.banks import DendriteBank
from pb_lightning.engine.cascade import accepted_activations, add_weighted
from pb_lightning.engine.convert import perforated_layers
from pb_lightning.engine.layer import PerforatedLayer
from pb_lightning.engine.outputs import replace_output, select_output
from pb_lightning.errors import torchscript_refused


class DendriteInferenceLayer(nn.Module):
    """A module plus its accepted dendrites, for deployment.

    It computes exactly what the trained :class:`~pb_lightning.engine.layer.PerforatedLayer` computes in
    its neuron phase, with the same fused operation for all dendrites, and holds nothing else: no
    candidates, no statistics, no autograd hooks, no frozen-flag bookkeeping.

    Like the training layer, it looks attributes it does not have up on the wrapped module, so
    code that reads ``layer.weight`` or ``layer.out_features`` keeps working in deployment.
    """

    def __init__(self, layer: PerforatedLayer) -> None:
        super().__init__()
        if layer.dendrites is None or layer.output_weight is None:
            raise ValueError(f"Layer `{layer.name}` has no dendrites; deploy its module directly.")
        self.module = layer.module
        self.norm = layer.norm
        self.dendrites: DendriteBank = layer.dendrites
        self.cascade_weight = layer.cascade_weight
        self.output_weight = layer.output_weight
        self.neuron_axis = layer.neuron_axis
        self.activation = layer.config.activation
        self.output_key = layer.output_key
        self.name = layer.name

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__.get("_modules", {}).get("module")
            if module is None or name.startswith("_"):
                raise
            return getattr(module, name)

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this on every submodule before compiling: refuse by name here,
        # instead of TorchScript's error about variable argument lists.
        raise torchscript_refused(self.name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.jit.is_tracing():  # see errors.torchscript_refused for why (torch.export works)
            raise torchscript_refused(self.name)
        out = self.module(*args, **kwargs)
        key = self.output_key
        y = out if key is None else select_output(out, key, self.name)
        if self.norm is not None:
            y = self.norm(y)
        axis = self.neuron_axis % y.dim()
        acts = accepted_activations(self.dendrites, self.cascade_weight, args, axis, self.activation, **kwargs)
        y = add_weighted(y, acts, self.output_weight, axis)
        return y if key is None else replace_output(out, key, y)


def to_inference(model: nn.Module) -> nn.Module:
    """Return a deployment copy of ``model`` (the original is left untouched).

    Every perforated layer becomes a :class:`DendriteInferenceLayer` (or, without dendrites, its
    plain module — followed by its norm layer where one was wrapped in). Candidates are dropped.
    The copy is in eval mode with gradients switched off; its outputs equal the trained model's in
    eval mode. Deploy it with ``torch.export`` or ONNX (``torch.onnx.export(..., dynamo=True)``):
    TorchScript of a copy with dendrites is refused (:func:`~pb_lightning.errors.torchscript_refused`).
    """
    deployed = copy.deepcopy(model)
    for layer in perforated_layers(deployed):
        if layer.output_weight is None:
            replacement: nn.Module = layer.module if layer.norm is None else nn.Sequential(layer.module, layer.norm)
        else:
            replacement = DendriteInferenceLayer(layer)
        _replace(deployed, layer, replacement)
    for m in deployed.modules():
        handle = m.__dict__.pop("_pb_keep_eval_handle", None)
        if handle is not None:
            handle.remove()
    deployed.__dict__.pop("_pb_frozen_by_dendrite_phase", None)
    deployed.eval()
    deployed.requires_grad_(False)
    if hasattr(type(deployed), "_jit_is_scripting"):
        # A LightningModule copy: its ``trainer`` property raises when no Trainer is attached,
        # and torch.jit.trace reads every attribute first, so the trace would fail with "not
        # attached to a Trainer" before reaching the dendrites' own explanation. The flag (what
        # Lightning's to_torchscript sets) makes ``trainer`` None on this deployment copy only.
        deployed._jit_is_scripting = True  # type: ignore[assignment]  # a plain attribute, not a submodule
    return deployed


def _replace(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in root.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
                return
