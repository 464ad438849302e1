"""The capacity test (docs/ALGORITHM.md §5): an observer of the cycle driver, and the probe it checks with.

:class:`CapacityTest` watches a :class:`~pb_lightning.cycle.driver.CycleDriver` (under the
Lightning callback and the tracker alike): scores must be finite, accepting dendrites must not
change any layer's output and every accepted dendrite must reach the output, and after every
restructure the model must survive the front end's own save and load (``round_trip``). The
front ends only choose the test's schedule and say how they save and load.

The probe records, for every perforated layer, the input of its latest training forward pass;
a check then re-runs each layer on that input. Accepting dendrites changes only perforated
layers, so per-layer function preservation implies the whole network's.

It also records the inputs of the modules around the perforated layers (the model itself and
every container of a perforated layer), to check after each acceptance that every layer's
dendrites reach the output of the outermost of them that ran: in train mode, and in eval mode
without gradients (a validation loop). A parent that reads a perforated child's weights instead
of calling it (torch's attention fast paths did) fails that check, with the layer's name.
"""

from __future__ import annotations

import copy
import io
import math
import os
import tempfile
import warnings
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

from pb_lightning.cycle.driver import missing_from_groups
from pb_lightning.cycle.observers import CycleObserver
from pb_lightning.cycle.phase_state import PhaseState
from pb_lightning.cycle.schedule import CAPACITY_TEST_DENDRITES
from pb_lightning.engine.convert import perforated_layers
from pb_lightning.engine.state import load_perforation_state, perforation_state

__all__ = ["CAPACITY_TEST_DENDRITES", "PROBE_OUTPUT_WEIGHT", "CapacityProbe", "CapacityTest"]

#: The output weight every accepted dendrite gets, for a moment, in the dead-dendrite check.
PROBE_OUTPUT_WEIGHT = 0.1


class CapacityProbe:
    """Records layer inputs in training and collects the problems the checks find."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self._inputs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self._calls: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self._handles: list[Any] = []
        self._model: nn.Module | None = None
        self._recording = True

    def start(self, model: nn.Module) -> None:
        """Begin recording each perforated layer's latest training input (at most 64 samples).

        The inputs of the model and of every module that contains a perforated layer are
        recorded too (whole, detached), for :meth:`check_dendrites_reach_output`.
        """
        self._model = model
        self._attach(model)

    def _attach(self, model: nn.Module) -> None:
        def record(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if layer.training and self._recording:
                self._inputs[str(layer.name)] = (
                    tuple(a.detach()[:64] if isinstance(a, Tensor) else a for a in args),
                    kwargs,
                )

        def record_call(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                if module.training and self._recording:
                    self._calls[name] = (_detached(args), _detached(kwargs))

            return hook

        layers = perforated_layers(model)
        for layer in layers:
            self._handles.append(layer.register_forward_pre_hook(record, with_kwargs=True))
        inside = {id(m) for layer in layers for m in layer.modules()}
        for name, module in model.named_modules():
            if id(module) not in inside and any(id(m) in inside for m in module.modules()):
                self._handles.append(module.register_forward_pre_hook(record_call(name), with_kwargs=True))

    def _detach_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def stop(self) -> None:
        """Remove the hooks and forget the inputs."""
        self._detach_hooks()
        self._inputs.clear()
        self._calls.clear()
        self._model = None

    @torch.no_grad()
    def outputs(self, model: nn.Module) -> dict[str, Tensor]:
        """Each perforated layer's output on its recorded input, in eval mode."""
        results = {}
        was_training = model.training
        model.eval()
        for layer in perforated_layers(model):
            if layer.name in self._inputs:
                args, kwargs = self._inputs[layer.name]
                results[layer.name] = _tensors(layer(*args, **kwargs))[0].clone()
        model.train(was_training)
        if not results:
            self.problems.append("no perforated layer ran in training, so nothing could be checked")
        return results

    def checked_accept(self, accept: Callable[[nn.Module], Any]) -> Callable[[nn.Module], Any]:
        """``accept`` wrapped with the function-preservation and dead-dendrite checks."""

        def run(model: nn.Module) -> Any:
            before = self.outputs(model)
            result = accept(model)
            after = self.outputs(model)
            for name, out in before.items():
                if not torch.allclose(out, after[name], rtol=1e-4, atol=1e-5):
                    self.problems.append(f"accepting dendrites changed the output of layer `{name}`")
            self.check_dendrites_reach_output(model)
            return result

        return run

    def check_dendrites_reach_output(self, model: nn.Module) -> None:
        """Check, layer by layer, that accepted dendrites change the output in every mode.

        Each layer's output weights get :data:`PROBE_OUTPUT_WEIGHT` added for a moment; the
        outermost recorded module around the layer is then run on its recorded training input in
        train mode and in eval mode without gradients, and must compute something different.
        Weights, buffers (batch-norm statistics) and modes are restored afterwards, and the
        random state is the same for both runs (dropout draws the same masks).
        """
        layers = [layer for layer in perforated_layers(model) if layer.output_weight is not None]
        if not layers:
            return
        # The probe's own hooks stay off during the check: torch's fast paths turn themselves off
        # when hooks are attached, which would hide exactly what this check looks for.
        self._detach_hooks()
        self._recording = False
        modules = dict(model.named_modules())
        names = {id(m): n for n, m in modules.items()}
        modes = {m: m.training for m in model.modules()}
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
        baselines: dict[tuple[str, str], list[Tensor]] = {}  # every run restores what it changed
        try:
            for layer in layers:
                where = self._outermost_call(names[id(layer)])
                if where is None:
                    continue
                module = modules[where]
                args, kwargs = self._calls[where] if where in self._calls else self._inputs[layer.name]
                label = f"`{where}`" if where else "the model"
                for mode in ("train", "eval + no_grad"):
                    if (where, mode) not in baselines:
                        baselines[where, mode] = _run(module, model, args, kwargs, mode, buffers)
                    before = baselines[where, mode]
                    weight = cast(Tensor, layer.output_weight)  # the layers with accepted dendrites
                    saved = weight.detach().clone()
                    with torch.no_grad():
                        weight.add_(PROBE_OUTPUT_WEIGHT)
                    try:
                        after = _run(module, model, args, kwargs, mode, buffers)
                    finally:
                        with torch.no_grad():
                            weight.copy_(saved)
                    if _same(before, after):
                        self.problems.append(
                            f"the dendrites of layer `{layer.name}` do not change the output of {label} in {mode} "
                            "mode (does a parent module read the wrapped module's weights instead of calling it?)"
                        )
        finally:
            for m, training in modes.items():
                m.training = training
            self._recording = True
            if self._model is not None:
                self._attach(self._model)

    def _outermost_call(self, layer_name: str) -> str | None:
        """The recorded module nearest the root that contains ``layer_name`` (or the layer itself)."""
        containing = [n for n in self._calls if n == "" or layer_name.startswith(n + ".")]
        if containing:
            return min(containing, key=lambda n: (n != "", n.count(".")))
        return layer_name if layer_name in self._inputs else None

    def check_finite(self, name: str, score: float, when: str) -> None:
        """A NaN or infinite monitored score is a problem (``when``: ``"epoch 3"``, for the message)."""
        if not math.isfinite(score):
            self.problems.append(f"the monitored {name} was {score} at {when}")

    def compare(self, model: nn.Module, loaded: nn.Module) -> None:
        """The loaded model must hold the same weights and compute the same layer outputs."""
        ours, theirs = model.state_dict(), loaded.state_dict()
        if ours.keys() != theirs.keys() or any(not torch.equal(ours[k], theirs[k]) for k in ours):
            self.problems.append("a checkpoint saved after restructuring loaded with different weights")
            return
        expected, got = self.outputs(model), self.outputs(loaded)
        if any(not torch.equal(expected[k], got[k]) for k in expected):
            self.problems.append("a model loaded from a checkpoint computes different outputs")

    def check_checkpoint_round_trip(
        self,
        model: nn.Module,
        save: Callable[[str], None],
        load: Callable[[str], nn.Module],
        directory: str | None = None,
    ) -> None:
        """Save a checkpoint of ``model`` with ``save(path)``, load it with ``load(path)``, compare.

        The framework's own checkpoint calls do the work (``Trainer.save_checkpoint`` and
        ``load_from_checkpoint`` for Lightning), so what is checked is what a user's checkpoint
        goes through. The file goes into ``directory``, which the caller cleans up (under DDP every
        rank must read rank 0's file), or by default into a temporary directory of the probe's
        own, deleted afterwards. A failure is reported once, however often it repeats.
        """
        with tempfile.TemporaryDirectory() as own:
            path = os.path.join(own if directory is None else directory, "pb_capacity_test.ckpt")
            try:
                save(path)
                loaded = load(path)
            except Exception as error:  # the capacity test reports what failed instead of stopping
                problem = f"a checkpoint saved after restructuring did not load: {error!r}"
                if problem not in self.problems:  # the same failure at every restructure: say it once
                    self.problems.append(problem)
                return
        self.compare(model, loaded)

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

    def check_fresh_round_trip(self, model: nn.Module, groups: list[dict[str, Any]] | None = None) -> None:
        """:meth:`check_state_round_trip` into a newly perforated twin of ``model`` (no dendrites,
        no candidates), as a plain loop would rebuild it before loading a saved state; with
        ``groups`` (the parameter groups the loop's next optimizer gets), first check that they
        hold every trainable parameter."""
        missing = [] if groups is None else missing_from_groups(model, groups)
        if missing:
            self.problems.append(f"trainable parameters missing from the optimizer: {missing}")
        fresh = copy.deepcopy(model)
        for layer in perforated_layers(fresh):
            layer.dendrites = layer.cascade_weight = layer.output_weight = layer.candidates = None
        self.check_state_round_trip(model, fresh)

    def summary(self, dendrites: int) -> str:
        """The capacity test's verdict, in one line."""
        if self.problems:
            return "capacity test: problems found: " + "; ".join(self.problems)
        return f"capacity test: {dendrites} dendrite sets added; no problems detected"


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=4)


class CapacityTest(CycleObserver):
    """The capacity test as an observer of a :class:`~pb_lightning.cycle.driver.CycleDriver`.

    Args:
        round_trip: after each restructure, saves ``model`` the front end's way, loads it into a
            fresh model and compares, reporting into the probe (e.g.
            :meth:`CapacityProbe.check_checkpoint_round_trip`).
        monitor: the score's name, for messages.
        warn: how the problems are reported at the end (default :func:`warnings.warn`; the
            callback warns on rank 0 only).
    """

    def __init__(
        self,
        round_trip: Callable[[nn.Module, CapacityProbe], None],
        *,
        monitor: str = "score",
        warn: Callable[[str], Any] = _warn,
    ) -> None:
        self.probe = CapacityProbe()
        self.round_trip = round_trip
        self.monitor = monitor
        self.warn = warn
        #: The verdict in one line, once training has ended.
        self.report: str | None = None

    @property
    def problems(self) -> list[str]:
        """The problems found so far (empty: none)."""
        return self.probe.problems

    def on_start(self, model: nn.Module) -> None:
        self.probe.stop()  # a resumed or re-initialised model: record the new one's inputs
        self.probe.start(model)

    def on_validation(self, model: nn.Module, score: float, when: str) -> None:
        self.probe.check_finite(self.monitor, score, when)

    def around_accept(self, model: nn.Module, accept: Callable[[], Any]) -> Any:
        return self.probe.checked_accept(lambda _: accept())(model)

    def on_restructured(self, model: nn.Module) -> None:
        self.round_trip(model, self.probe)

    def on_finish(self, model: nn.Module, state: PhaseState) -> list[str]:
        if self.report is None:
            self.report = self.probe.summary(state.dendrites)
            self.probe.stop()
            if self.problems:
                self.warn("pb_lightning capacity test found problems: " + "; ".join(self.problems))
        return [self.report]


def _detached(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value) if not hasattr(value, "_fields") else value
    return value


def _tensors(value: Any) -> list[Tensor]:
    """Every floating-point tensor in a (nested) output, in a stable order."""
    if isinstance(value, Tensor):
        return [value] if value.is_floating_point() or value.is_complex() else []
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _run(
    module: nn.Module,
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    mode: str,
    buffers: list[tuple[Tensor, Tensor]],
) -> list[Tensor]:
    model.train(mode == "train")
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices), torch.set_grad_enabled(mode == "train"):
        torch.manual_seed(0)
        out = [t.detach().clone() for t in _tensors(module(*args, **kwargs))]
    with torch.no_grad():
        for b, saved in buffers:  # train mode moved batch-norm statistics
            b.copy_(saved)
    return out


def _same(before: list[Tensor], after: list[Tensor]) -> bool:
    # Bitwise: a bypassed dendrite leaves the very same computation (same kernels, inputs and
    # random state), while a live one may move the output by little (query/key projections
    # under nearly uniform attention), so any tolerance would risk a false alarm.
    return len(before) == len(after) and all(
        torch.equal(a, b) or (a.isnan().all() and b.isnan().all()) for a, b in zip(before, after, strict=True)
    )
