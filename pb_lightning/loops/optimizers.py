"""The plain loop's optimizer recipe: a class and its arguments, rebuilt over each phase's groups.

A plain PyTorch loop has no ``configure_optimizers``; the tracker takes the optimizer (and
scheduler) class with its arguments instead, and builds them anew over what the current phase
trains after every restructure (:func:`pb_lightning.engine.params.parameter_groups`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pb_lightning.engine.params import parameter_groups
from pb_lightning.errors import PerforationError, invalid


class OptimizerRecipe:
    """How to build the optimizer and scheduler of each phase.

    Args:
        weight_decay: weight decay of the parameter groups (never on dendrite output weights).
        candidate_lr: learning rate of the candidates (default: the optimizer's).
    """

    def __init__(self, weight_decay: float = 0.0, candidate_lr: float | None = None) -> None:
        self.weight_decay, self.candidate_lr = weight_decay, candidate_lr
        self.optimizer: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None
        self.scheduler: tuple[Any, dict[str, Any]] | None = None

    def set_optimizer(self, optimizer: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> None:
        if not (isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer)):
            raise invalid("optimizer", optimizer, "a torch.optim.Optimizer subclass (the class, not an instance)")
        if "params" in kwargs:
            raise invalid("params", "given", "left out: the tracker builds the parameter groups of each phase")
        self.optimizer = (optimizer, kwargs)

    def set_scheduler(self, scheduler: Any, kwargs: dict[str, Any]) -> None:
        if not callable(scheduler):
            raise invalid("scheduler", scheduler, "an LR scheduler class")
        self.scheduler = (scheduler, kwargs)

    def groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The parameter groups of what the current phase trains."""
        return parameter_groups(model, weight_decay=self.weight_decay, candidate_lr=self.candidate_lr)

    def build(self, model: nn.Module) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        """A new optimizer over :meth:`groups` (and its scheduler, if one was set)."""
        if self.optimizer is None:
            raise PerforationError("Call tracker.set_optimizer(OptimizerClass, **kwargs) before setup_optimizer.")
        groups = self.groups(model)
        if not groups:
            raise PerforationError("The model has no trainable parameters in this phase.")
        optimizer = self.optimizer[0](groups, **self.optimizer[1])
        schedulers = [] if self.scheduler is None else [self.scheduler[0](optimizer, **self.scheduler[1])]
        return [optimizer], schedulers
