"""Carrying optimizer and LR-scheduler state across the optimizer rebuilds of a restructure.

Every restructure (dendrite phase started, dendrites accepted, a cycle rolled back) changes the
trainable parameter set, so the optimizer is rebuilt. The reference method starts that new
optimizer from scratch — Adam's moments and step count back to zero, a scheduler back to its
first epoch — and that stays the default (``optimizer_state="reset"``). With
``optimizer_state="carry"`` the :class:`OptimizerStateCarrier` moves the state of every parameter
that persists (the same parameter object, under the same name and shape) into the new optimizer,
new parameters (candidates, grown dendrite tensors) start fresh, and each scheduler continues
where it was. The state of parameters that a phase does not train (the network during a dendrite
phase) is kept on the CPU until an optimizer holds them again.

Framework-free: the Lightning callback and the plain-PyTorch tracker share it.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from collections.abc import Sequence
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from pb_lightning.errors import choices_of, invalid

OptimizerStateMode = Literal["reset", "carry"]


def check_optimizer_state(value: object) -> OptimizerStateMode:
    """``value`` if it is ``"reset"`` or ``"carry"``, else the library's standard error."""
    if value not in choices_of(OptimizerStateMode):
        raise invalid("optimizer_state", value, "'reset' (a fresh optimizer after each restructure) or 'carry'")
    return value  # type: ignore[return-value]


def _params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _to_cpu(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().to("cpu", copy=True) if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in state.items()}


def _fits(state: dict[str, Any], param: Tensor) -> bool:
    """Whether every per-element tensor of ``state`` (moments) has ``param``'s shape."""
    return all(v.dim() == 0 or v.shape == param.shape for v in state.values() if isinstance(v, Tensor))


class OptimizerStateCarrier:
    """Moves per-parameter optimizer state and scheduler positions from old optimizers to new ones.

    Use: :meth:`track` the optimizers when they are first built; around every rebuild call
    :meth:`before_rebuild` (the model already restructured, the old optimizers still alive) and
    :meth:`after_rebuild` (the new optimizers and schedulers built).

    Example::

        >>> model = nn.Linear(2, 2)
        >>> opt = torch.optim.Adam(model.parameters())
        >>> model(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> carrier = OptimizerStateCarrier(); carrier.track(model, [opt])
        >>> carrier.before_rebuild(model, [opt], [])
        >>> new = torch.optim.Adam(model.parameters()); carrier.after_rebuild(model, [new], [])
        >>> int(new.state[model.weight]["step"])
        1
    """

    def __init__(self) -> None:
        #: Per-parameter state of parameters no optimizer holds now, by name (on the CPU).
        self.saved: dict[str, dict[str, Any]] = {}
        self._saved_for: dict[str, weakref.ref[Tensor]] = {}
        self._names: dict[int, str] = {}
        self._schedulers: list[tuple[type, dict[str, Any]]] = []
        self._old_lrs: list[dict[Any, float]] = []

    # ------------------------------------------------------------------ the steps
    def track(self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Remember the names of the parameters ``optimizers`` hold (call after each build)."""
        current = dict(model.named_parameters())
        ids = {id(p): name for name, p in current.items()}
        self._names = {id(p): ids[id(p)] for opt in optimizers for p in _params(opt) if id(p) in ids}
        for name in list(self.saved):  # state loaded from a checkpoint belongs to today's parameters
            if name not in self._saved_for:
                if name in current:
                    self._saved_for[name] = weakref.ref(current[name])
                else:
                    del self.saved[name]

    def before_rebuild(
        self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any]
    ) -> None:
        """Keep the old optimizers' state of the parameters that are still in ``model``."""
        current = dict(model.named_parameters())
        for name in list(self.saved):
            ref = self._saved_for.get(name)
            if ref is None or ref() is not current.get(name):
                del self.saved[name]  # that parameter was replaced (a grown tensor, a rolled-back set)
                self._saved_for.pop(name, None)
        for opt in optimizers:
            for p in _params(opt):
                known = self._names.get(id(p))
                if known is not None and current.get(known) is p and opt.state.get(p):
                    self.saved[known] = _to_cpu(opt.state[p])
                    self._saved_for[known] = weakref.ref(p)
        self._schedulers = [(type(s), copy.deepcopy(s.state_dict())) for s in schedulers]
        self._old_lrs = [
            {group.get("name", i): group["lr"] for i, group in enumerate(s.optimizer.param_groups)} for s in schedulers
        ]

    def after_rebuild(
        self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any]
    ) -> None:
        """Load the kept state into ``optimizers`` and move ``schedulers`` to where the old ones were."""
        names = {id(p): name for name, p in model.named_parameters()}
        for opt in optimizers:
            state_dict = opt.state_dict()
            carried = []
            for group, saved_group in zip(opt.param_groups, state_dict["param_groups"], strict=True):
                for p, index in zip(group["params"], saved_group["params"], strict=True):
                    name = names.get(id(p))
                    if name is None:
                        continue
                    ref = self._saved_for.get(name)
                    if ref is None or ref() is not p:
                        continue  # never saved, or saved for a parameter since replaced
                    if _fits(self.saved[name], cast(Tensor, p)):  # a param of the group (`is` narrowed it)
                        state_dict["state"][index] = self.saved[name]
                        carried.append(name)
            if carried:
                # load_state_dict puts each value where the optimizer wants it (device, dtype,
                # `step` on the CPU unless capturable/fused), exactly as for a resumed run.
                opt.load_state_dict(state_dict)
            for name in carried:
                del self.saved[name]
                del self._saved_for[name]
        for i, scheduler in enumerate(schedulers):
            if i < len(self._schedulers) and type(scheduler) is self._schedulers[i][0]:
                self._continue(scheduler, self._schedulers[i][1], self._old_lrs[i])
        self._schedulers, self._old_lrs = [], []
        self.track(model, optimizers)

    @staticmethod
    def _continue(scheduler: Any, old: dict[str, Any], old_lrs: dict[Any, float]) -> None:
        """Move a freshly built ``scheduler`` to the position ``old`` (its predecessor's state dict)."""
        groups = scheduler.optimizer.param_groups
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # Its position is its counters and the learning rates it has lowered so far.
            scheduler.load_state_dict(old)
            for i, group in enumerate(groups):
                key = group.get("name", i)
                if key in old_lrs:
                    group["lr"] = old_lrs[key]
            scheduler._last_lr = [group["lr"] for group in groups]
            return
        if list(old.get("base_lrs", [])) == list(scheduler.base_lrs):
            # The same groups with the same base learning rates: take the old state as it is.
            scheduler.load_state_dict(old)
            for group, lr in zip(groups, scheduler.get_last_lr(), strict=True):
                group["lr"] = lr
            return
        # Other groups (a phase trains other parameters, candidates have their own rate): replay
        # the schedule from each group's own base rate up to the old position, which gives
        # exactly the rates an optimizer that had always held these groups would have now.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
            while scheduler.last_epoch < old.get("last_epoch", 0):
                scheduler.step()

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """The kept state of parameters no optimizer holds now (CPU tensors, for checkpoints)."""
        return {"saved": dict(self.saved)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved = dict(state.get("saved", {}))
        self._saved_for = {}
