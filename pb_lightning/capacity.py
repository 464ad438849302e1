"""Checks of the capacity test (ALGORITHM.md §5), shared by the Lightning callback and the tracker.

The probe records, for every perforated layer, the input of its latest training forward pass;
a check then re-runs each layer on that input. Accepting dendrites changes only perforated
layers, so per-layer function preservation implies the whole network's.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from pb_lightning.convert import perforated_layers
from pb_lightning.phases import load_perforation_state, perforation_state

CAPACITY_TEST_DENDRITES = 3


class CapacityProbe:
    """Records layer inputs in training and collects the problems the checks find."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self._inputs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self._handles: list[Any] = []

    def start(self, model: nn.Module) -> None:
        """Begin recording each perforated layer's latest training input (at most 64 samples)."""

        def record(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if layer.training:
                self._inputs[layer.name] = (
                    tuple(a.detach()[:64] if isinstance(a, Tensor) else a for a in args),
                    kwargs,
                )

        for layer in perforated_layers(model):
            self._handles.append(layer.register_forward_pre_hook(record, with_kwargs=True))

    def stop(self) -> None:
        """Remove the hooks and forget the inputs."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs.clear()

    @torch.no_grad()
    def outputs(self, model: nn.Module) -> dict[str, Tensor]:
        """Each perforated layer's output on its recorded input, in eval mode."""
        results = {}
        was_training = model.training
        model.eval()
        for layer in perforated_layers(model):
            if layer.name in self._inputs:
                args, kwargs = self._inputs[layer.name]
                results[layer.name] = layer(*args, **kwargs).clone()
        model.train(was_training)
        if not results:
            self.problems.append("no perforated layer ran in training, so nothing could be checked")
        return results

    def checked_accept(self, accept: Callable[[nn.Module], Any]) -> Callable[[nn.Module], Any]:
        """``accept`` wrapped with the function-preservation check."""

        def run(model: nn.Module) -> Any:
            before = self.outputs(model)
            result = accept(model)
            after = self.outputs(model)
            for name, out in before.items():
                if not torch.allclose(out, after[name], rtol=1e-4, atol=1e-5):
                    self.problems.append(f"accepting dendrites changed the output of layer `{name}`")
            return result

        return run

    def check_finite(self, name: str, score: float, epoch: int) -> None:
        if not torch.isfinite(torch.tensor(score)):
            self.problems.append(f"the monitored {name} was {score} at epoch {epoch}")

    def compare(self, model: nn.Module, loaded: nn.Module) -> None:
        """The loaded model must hold the same weights and compute the same layer outputs."""
        ours, theirs = model.state_dict(), loaded.state_dict()
        if ours.keys() != theirs.keys() or any(not torch.equal(ours[k], theirs[k]) for k in ours):
            self.problems.append("a checkpoint saved after restructuring loaded with different weights")
            return
        expected, got = self.outputs(model), self.outputs(loaded)
        if any(not torch.equal(expected[k], got[k]) for k in expected):
            self.problems.append("a model loaded from a checkpoint computes different outputs")

    def check_state_round_trip(self, model: nn.Module, fresh: nn.Module) -> None:
        """Save ``model``'s state (weights_only) and load it into ``fresh``, a newly perforated twin."""
        try:
            buffer = io.BytesIO()
            torch.save({"state_dict": model.state_dict(), "perforation": perforation_state(model)}, buffer)
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
            fresh.load_state_dict(saved["state_dict"])
            load_perforation_state(fresh, saved["perforation"])
        except Exception as error:  # the capacity test reports what failed instead of stopping
            self.problems.append(f"a state saved after restructuring did not load: {error!r}")
            return
        self.compare(model, fresh)

    def summary(self, dendrites: int) -> str:
        """The capacity test's verdict, in one line."""
        if self.problems:
            return "capacity test: problems found: " + "; ".join(self.problems)
        return f"capacity test: {dendrites} dendrite sets added; no problems detected"
